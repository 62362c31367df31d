//! The pre-norm transformer shared by both CLIP towers, named as open_clip names it
//! (`transformer.resblocks.N.{ln_1, attn.in_proj, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`).

use burn::module::Initializer;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use serde::{Deserialize, Serialize};

/// MLP activation: exact GELU (open_clip's own runs) or QuickGELU `x * sigmoid(1.702 x)` (OpenAI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Act {
    #[default]
    Gelu,
    QuickGelu,
}

impl Act {
    fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Act::Gelu => activation::gelu(x),
            Act::QuickGelu => x.clone() * activation::sigmoid(x * 1.702),
        }
    }
}

/// A `Linear` over the last dim of `[B, T, D]`, as one `[B*T, D]` GEMM: burn's `Linear` on a 3-D
/// input runs B small broadcast GEMMs, each below flex's threshold for going multi-threaded.
pub fn linear_3d<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let y = layer.forward(x.reshape([b * t, d]));
    let out = y.dims()[1];
    y.reshape([b, t, out])
}

/// Multi-head self-attention with a packed input projection (`in_proj`: width -> 3 x width).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub in_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub n_heads: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// `x`: `[B, T, D]` -> `[B, T, D]`.
    pub fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let h = self.n_heads;
        let qkv = linear_3d(&self.in_proj, x)
            .reshape([b, t, 3, h, d / h])
            .permute([2, 0, 3, 1, 4]); // [3, B, H, T, Dh]
        let q = qkv.clone().slice(s![0..1]).squeeze_dim::<4>(0);
        let k = qkv.clone().slice(s![1..2]).squeeze_dim::<4>(0);
        let v = qkv.slice(s![2..3]).squeeze_dim::<4>(0);
        let opts = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        };
        let y = attention(q, k, v, None, None, opts); // [B, H, T, Dh]
        linear_3d(&self.out_proj, y.swap_dims(1, 2).reshape([b, t, d]))
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub c_fc: Linear<B>,
    pub c_proj: Linear<B>,
    #[module(skip)]
    pub act: Act,
}

/// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Module, Debug)]
pub struct ResidualAttentionBlock<B: Backend> {
    pub ln_1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub ln_2: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> ResidualAttentionBlock<B> {
    pub fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let x = x.clone() + self.attn.forward(self.ln_1.forward(x), causal);
        let h = linear_3d(&self.mlp.c_fc, self.ln_2.forward(x.clone()));
        x + linear_3d(&self.mlp.c_proj, self.mlp.act.forward(h))
    }
}

/// A stack of residual attention blocks.
#[derive(Module, Debug)]
pub struct Transformer<B: Backend> {
    pub resblocks: Vec<ResidualAttentionBlock<B>>,
}

impl<B: Backend> Transformer<B> {
    /// open_clip's initialisation: attention and MLP weights scaled by width and depth.
    pub fn new(
        width: usize,
        layers: usize,
        heads: usize,
        mlp_ratio: f64,
        act: Act,
        device: &B::Device,
    ) -> Self {
        let normal = |std: f64| Initializer::Normal { mean: 0.0, std };
        let attn_std = (width as f64).powf(-0.5);
        let proj_std = attn_std * ((2 * layers) as f64).powf(-0.5);
        let fc_std = ((2 * width) as f64).powf(-0.5);
        let hidden = (width as f64 * mlp_ratio) as usize;
        let linear = |i, o, std| {
            LinearConfig::new(i, o)
                .with_initializer(normal(std))
                .init(device)
        };
        let resblocks = (0..layers)
            .map(|_| ResidualAttentionBlock {
                ln_1: LayerNormConfig::new(width).init(device),
                attn: Attention {
                    in_proj: linear(width, 3 * width, attn_std),
                    out_proj: linear(width, width, proj_std),
                    n_heads: heads,
                },
                ln_2: LayerNormConfig::new(width).init(device),
                mlp: Mlp {
                    c_fc: linear(width, hidden, fc_std),
                    c_proj: linear(hidden, width, proj_std),
                    act,
                },
            })
            .collect();
        Transformer { resblocks }
    }

    pub fn forward(&self, mut x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        for block in &self.resblocks {
            x = block.forward(x, causal);
        }
        x
    }
}
