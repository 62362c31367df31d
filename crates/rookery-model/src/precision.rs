//! The precision frozen towers are held and run in. Stage 2 trains a few new parameters around
//! a frozen vision tower and a frozen LM; on a GPU those two hold almost all the weights and
//! do almost all the work, so holding them in bf16 halves their memory and runs their matmuls
//! on bf16 tensor cores (what OpenFlamingo's `--precision amp_bf16` and HF's
//! `torch_dtype=bfloat16` do). The trained parts stay f32, and so does the residual stream
//! between the LM's blocks: a frozen module casts its input to its own dtype and its output
//! back ([`to_dtype`]), so the gated cross-attention, the resampler and the loss see f32.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::DType;
use serde::{Deserialize, Serialize};

/// `[flamingo] frozen_dtype`: what the frozen vision tower and LM are held in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrozenDtype {
    /// bf16 on CUDA, f32 elsewhere (CPU kernels are written for f32; burn-flex runs bf16
    /// matmuls by converting to f32 and back, slower than f32 itself).
    #[default]
    Auto,
    F32,
    Bf16,
}

impl FrozenDtype {
    /// The dtype on `device`; an error when the backend cannot compute in it.
    pub fn resolve<B: Backend>(self, device: &B::Device) -> Result<DType, String> {
        let want = match self {
            FrozenDtype::F32 => return Ok(DType::F32),
            FrozenDtype::Bf16 => DType::BF16,
            FrozenDtype::Auto if is_cuda::<B>(device) => DType::BF16,
            FrozenDtype::Auto => return Ok(DType::F32),
        };
        if !B::supports_dtype(device, want) {
            return Err(format!(
                "flamingo.frozen_dtype = \"bf16\": the {} backend cannot compute in bf16; use \"f32\"",
                B::name(device)
            ));
        }
        Ok(want)
    }
}

/// Whether `B` runs on CUDA (also under autodiff: `autodiff<cubecl<cuda>>`).
fn is_cuda<B: Backend>(device: &B::Device) -> bool {
    B::name(device).contains("cuda")
}

/// `x` in `dtype`: a cast when it differs (under autodiff the gradient is cast back), `x`
/// itself when not, so an f32 model gains no op.
pub fn to_dtype<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    match x.dtype() == dtype {
        true => x,
        false => x.cast(dtype),
    }
}

/// Every float parameter of `module` cast to `dtype`, ids and trainability kept.
pub fn cast_params<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    module.map(&mut CastParams(dtype))
}

struct CastParams(DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let require_grad = p.is_require_grad();
        let dtype = self.0;
        p.map(|t| to_dtype(t, dtype).set_require_grad(require_grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::LinearConfig;

    #[test]
    fn auto_is_f32_on_cpu() {
        let dev = Default::default();
        assert_eq!(FrozenDtype::Auto.resolve::<Flex>(&dev), Ok(DType::F32));
        assert_eq!(
            FrozenDtype::Bf16.resolve::<Autodiff<Flex>>(&dev),
            Ok(DType::BF16)
        );
    }

    #[test]
    fn cast_params_keeps_ids_and_trainability() {
        let dev = Default::default();
        let lin = LinearConfig::new(3, 2)
            .init::<Autodiff<Flex>>(&dev)
            .no_grad();
        let id = lin.weight.id;
        let cast = cast_params(lin, DType::BF16);
        assert_eq!(cast.weight.id, id);
        assert_eq!(cast.weight.val().dtype(), DType::BF16);
        assert!(!cast.weight.is_require_grad());
        assert_eq!(cast.bias.unwrap().val().dtype(), DType::BF16);
    }
}
