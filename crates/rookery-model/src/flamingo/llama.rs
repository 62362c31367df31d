//! A Llama decoder block (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama):
//!
//! ```text
//! h = x + attn(rms(x));  h + down(silu(gate(rms(h))) * up(rms(h)))
//! ```
//!
//! RoPE on queries and keys (the LM's table), grouped-query attention (each key/value head
//! serves `heads / kv_heads` query heads), no biases but Qwen2's on q/k/v.

use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;

use super::decoder::{split_qkv, DecoderBlock};
use super::lm::LmConfig;
use crate::layers::linear_3d;

/// A Llama decoder block: `x + attn(rms(x))` with RoPE, then `x + swiglu(rms(x))`.
#[derive(Module, Debug)]
pub struct LlamaBlock<B: Backend> {
    pub attn_norm: RmsNorm<B>,
    pub qkv: Linear<B>,
    pub out: Linear<B>,
    pub ffn_norm: RmsNorm<B>,
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
    pub heads: usize,
    /// Key/value heads; each serves `heads / kv_heads` query heads (grouped-query attention).
    pub kv_heads: usize,
}

impl<B: Backend> LlamaBlock<B> {
    /// A block of `cfg`'s shapes (style `llama`).
    pub fn new(cfg: &LmConfig, device: &B::Device) -> Self {
        let (w, hidden, hd) = (cfg.width, cfg.hidden(), cfg.head_dim());
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let rms = || {
            RmsNormConfig::new(w)
                .with_epsilon(cfg.norm_eps)
                .init(device)
        };
        LlamaBlock {
            attn_norm: rms(),
            qkv: LinearConfig::new(w, (cfg.heads + 2 * cfg.kv()) * hd)
                .with_bias(cfg.qkv_bias)
                .init(device),
            out: lin(cfg.heads * hd, w),
            ffn_norm: rms(),
            gate: lin(w, hidden),
            up: lin(w, hidden),
            down: lin(hidden, w),
            heads: cfg.heads,
            kv_heads: cfg.kv(),
        }
    }

    /// The packed projection of `rms(x)` (`x` `[B, T, D]`) as query, key and value heads
    /// ([`split_qkv`]).
    pub(crate) fn qkv_heads(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let qkv = linear_3d(&self.qkv, self.attn_norm.forward(x));
        split_qkv(qkv, self.heads, self.kv_heads)
    }

    /// Key or value heads `[B, kv, T, Dh]` for every query head `[B, h, T, Dh]`: each serves
    /// the `h / kv` query heads after it (HF's `repeat_kv`).
    pub(crate) fn shared(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, kv, t, hd] = x.dims();
        let h = self.heads;
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv, h / kv, t, hd])
            .reshape([b, h, t, hd])
    }

    /// `x + swiglu(rms(x))`, the block's second half.
    pub fn ffn_residual(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let n = self.ffn_norm.forward(x.clone());
        let g = silu(linear_3d(&self.gate, n.clone())) * linear_3d(&self.up, n);
        x + linear_3d(&self.down, g)
    }
}

impl<B: Backend> DecoderBlock<B> for LlamaBlock<B> {
    fn qkv_heads(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        LlamaBlock::qkv_heads(self, x)
    }
    fn shared(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        LlamaBlock::shared(self, x)
    }
    fn finish(&self, x: Tensor<B, 3>, y: Tensor<B, 3>) -> Tensor<B, 3> {
        self.ffn_residual(x + linear_3d(&self.out, y))
    }
}
