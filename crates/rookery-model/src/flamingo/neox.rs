//! A GPT-NeoX decoder block (Black et al. 2022, "GPT-NeoX-20B"; the LMs of Pythia and
//! RedPajama-INCITE, which OpenFlamingo-4B builds on):
//!
//! ```text
//! parallel:    x + attn(ln_1(x)) + mlp(ln_2(x))
//! sequential:  h = x + attn(ln_1(x));  h + mlp(ln_2(h))
//! ```
//!
//! Attention is multi-head (no grouped keys) with biases on every projection, RoPE on the
//! leading `rotary_dim` dimensions of each query and key head (Pythia rotates a quarter), and
//! the MLP is `c_proj(gelu(c_fc(x)))` with biases. Queries, keys and values are one packed
//! projection, laid out as rookery's llama blocks pack them (all query heads, then the keys,
//! then the values; the importer reorders HF's per-head `[q, k, v]` rows).

use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;

use super::decoder::{split_qkv, DecoderBlock};
use super::lm::LmConfig;
use crate::layers::{linear_3d, Mlp};

#[derive(Module, Debug)]
pub struct NeoxBlock<B: Backend> {
    /// HF `input_layernorm`.
    pub ln_1: LayerNorm<B>,
    /// HF `attention.query_key_value`, repacked.
    pub qkv: Linear<B>,
    /// HF `attention.dense`.
    pub out: Linear<B>,
    /// HF `post_attention_layernorm`.
    pub ln_2: LayerNorm<B>,
    /// HF `mlp.dense_h_to_4h`, `mlp.dense_4h_to_h`.
    pub mlp: Mlp<B>,
    pub heads: usize,
    pub parallel: bool,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> NeoxBlock<B> {
    /// A block of `cfg`'s shapes (style `neox`).
    pub fn new(cfg: &LmConfig, device: &B::Device) -> Self {
        let (w, hd) = (cfg.width, cfg.head_dim());
        let ln = || {
            LayerNormConfig::new(w)
                .with_epsilon(cfg.norm_eps)
                .init(device)
        };
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        NeoxBlock {
            ln_1: ln(),
            qkv: lin(w, 3 * cfg.heads * hd),
            out: lin(cfg.heads * hd, w),
            ln_2: ln(),
            mlp: Mlp {
                c_fc: lin(w, cfg.hidden()),
                c_proj: lin(cfg.hidden(), w),
                act: cfg.act,
            },
            heads: cfg.heads,
            parallel: cfg.parallel_residual,
            eps: cfg.norm_eps,
        }
    }

    fn mlp_of(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let n = crate::cpu::layer_norm(&self.ln_2, x, self.eps);
        let h = self.mlp.act.forward(linear_3d(&self.mlp.c_fc, n));
        linear_3d(&self.mlp.c_proj, h)
    }
}

impl<B: Backend> DecoderBlock<B> for NeoxBlock<B> {
    fn qkv_heads(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let n = crate::cpu::layer_norm(&self.ln_1, x, self.eps);
        split_qkv(linear_3d(&self.qkv, n), self.heads, self.heads)
    }

    fn shared(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        x
    }

    fn finish(&self, x: Tensor<B, 3>, y: Tensor<B, 3>) -> Tensor<B, 3> {
        let attn = linear_3d(&self.out, y);
        if self.parallel {
            let mlp = self.mlp_of(x.clone());
            x + attn + mlp
        } else {
            let h = x + attn;
            h.clone() + self.mlp_of(h)
        }
    }
}
