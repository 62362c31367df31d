//! Vectorised CPU kernels for the ops that burn-flex (burn 0.21's CPU backend) runs one scalar
//! at a time, used when the model runs on `Flex` or `Autodiff<Flex>` and the tensor is f32.
//! On every other backend and dtype the functions here are burn's own ops.
//!
//! - [`gelu`]: exact GELU, forward and backward (see [`math`] for how it is computed).

mod gelu;
pub mod math;

use std::any::Any;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::backend::BackendTypes;
use burn::tensor::{DType, TensorPrimitive};

/// Exact GELU, `x * Phi(x)`: on flex through [`math::gelu`] (8 or 16 lanes at a time) with a
/// backward of its own; elsewhere burn's `activation::gelu`.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() != DType::F32 {
        return activation::gelu(x);
    }
    let p = x.into_primitive().tensor();
    let p = match concrete::<B::FloatTensorPrimitive, ADFlexTensor>(p) {
        Ok(t) => return float::<B, D>(generic(gelu::autodiff(t))),
        Err(p) => p,
    };
    let p = match concrete::<B::FloatTensorPrimitive, FlexTensor>(p) {
        Ok(t) => return float::<B, D>(generic(gelu::forward(t))),
        Err(p) => p,
    };
    activation::gelu(float::<B, D>(p))
}

/// The float primitive of `Autodiff<Flex>`, the backend rookery trains with on CPU.
type ADFlexTensor = <Autodiff<Flex, NoCheckpointing> as BackendTypes>::FloatTensorPrimitive;

/// `value` as a `T` when that is its type. Generic code over `B: Backend` reaches the flex
/// kernels this way: Rust has no specialisation, and `B` is a concrete type at run time.
fn concrete<P: Any, T: Any>(value: P) -> Result<T, P> {
    let mut slot = Some(value);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        Some(t) => Ok(t.take().expect("just filled")),
        None => Err(slot.expect("untouched")),
    }
}

/// The inverse of [`concrete`]: a concrete primitive back as the generic one.
fn generic<T: Any, P: Any>(value: T) -> P {
    concrete(value).unwrap_or_else(|_| unreachable!("the primitive came from this backend"))
}

fn float<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The f32 values of a flex tensor in row-major order: borrowed when it is laid out that way
/// already, copied otherwise.
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    fn max_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
        (a - b).abs().max().into_scalar().elem()
    }

    #[test]
    fn gelu_and_its_gradient_match_burns_on_autodiff_flex() {
        let device = Default::default();
        let x = Tensor::<AD, 3>::random([3, 40, 300], Distribution::Normal(0.0, 3.0), &device);
        // One contiguous input and one transposed view (copied before the kernel reads it).
        for x in [x.clone(), x.swap_dims(1, 2)] {
            let (a, b) = (x.clone().detach().require_grad(), x.detach().require_grad());
            let w = Tensor::<AD, 3>::random(a.dims(), Distribution::Default, &device);
            let (ya, yb) = (gelu(a.clone()), activation::gelu(b.clone()));
            assert!(max_diff(ya.clone(), yb.clone()) < 1e-6);
            let (ga, gb) = ((ya * w.clone()).sum().backward(), (yb * w).sum().backward());
            let (ga, gb) = (a.grad(&ga).unwrap(), b.grad(&gb).unwrap());
            assert!(max_diff(ga.clone(), gb) < 1e-6);
            assert!(
                ga.abs().sum().into_scalar() > 1.0,
                "gradients reach the input"
            );
        }
    }

    #[test]
    fn gelu_without_autodiff_or_tracking_matches_burns() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([17, 33], Distribution::Normal(0.0, 2.0), &device);
        assert!(max_diff(gelu(x.clone()), activation::gelu(x)) < 1e-6);
        let x = Tensor::<AD, 2>::random([17, 33], Distribution::Normal(0.0, 2.0), &device);
        assert!(max_diff(gelu(x.clone()), activation::gelu(x)) < 1e-6);
    }
}
