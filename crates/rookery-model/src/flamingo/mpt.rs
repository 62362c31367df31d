//! An MPT decoder block (MosaicML's MPT-7B and MPT-1B: the LMs of OpenFlamingo-9B and -3B):
//!
//! ```text
//! h = x + attn(ln_1(x));  h + mlp(ln_2(h))
//! ```
//!
//! No positions are added: each head's attention scores get ALiBi's bias instead (Press et al.
//! 2022, "Train Short, Test Long"), `slope_h * (j - i)` for query `i` and key `j`, the slopes a
//! geometric sequence over the heads ([`alibi_slopes`]). LayerNorms have no bias and no
//! projection has one; the MLP is `down(gelu(up(x)))`. Queries, keys and values are one packed
//! projection, all query heads, then the keys, then the values (as MPT's `Wqkv` packs them).

use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;

use super::decoder::{split_qkv, DecoderBlock};
use super::lm::LmConfig;
use crate::layers::{linear_3d, Mlp};

#[derive(Module, Debug)]
pub struct MptBlock<B: Backend> {
    /// MPT `norm_1` (no bias).
    pub ln_1: LayerNorm<B>,
    /// MPT `attn.Wqkv`.
    pub qkv: Linear<B>,
    /// MPT `attn.out_proj`.
    pub out: Linear<B>,
    /// MPT `norm_2` (no bias).
    pub ln_2: LayerNorm<B>,
    /// MPT `ffn.up_proj`, `ffn.down_proj`.
    pub mlp: Mlp<B>,
    pub heads: usize,
    #[module(skip)]
    pub alibi_bias_max: f64,
}

/// ALiBi's slope of each of `heads` heads, as MPT computes them: for `n`, the next power of
/// two at least `heads`, slope `k` (from 1) is `2^(-k * max / n)`; when `heads` is not a power
/// of two, the odd-numbered slopes come first, then the even ones, and the first `heads` are
/// taken.
pub fn alibi_slopes(heads: usize, max: f64) -> Vec<f32> {
    let n = heads.next_power_of_two();
    let all: Vec<f64> = (1..=n)
        .map(|k| 2f64.powf(-(k as f64) * max / n as f64))
        .collect();
    let order: Vec<f64> = match n == heads {
        true => all,
        false => all
            .iter()
            .skip(1)
            .step_by(2)
            .chain(all.iter().step_by(2))
            .copied()
            .collect(),
    };
    order.into_iter().take(heads).map(|s| s as f32).collect()
}

impl<B: Backend> MptBlock<B> {
    /// A block of `cfg`'s shapes (style `mpt`).
    pub fn new(cfg: &LmConfig, device: &B::Device) -> Self {
        let (w, hd) = (cfg.width, cfg.head_dim());
        let ln = || {
            LayerNormConfig::new(w)
                .with_epsilon(cfg.norm_eps)
                .with_bias(false)
                .init(device)
        };
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        MptBlock {
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
            alibi_bias_max: cfg.alibi_bias_max,
        }
    }
}

impl<B: Backend> DecoderBlock<B> for MptBlock<B> {
    fn qkv_heads(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let qkv = linear_3d(&self.qkv, self.ln_1.forward(x));
        split_qkv(qkv, self.heads, self.heads)
    }

    fn shared(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        x
    }

    fn alibi(&self) -> Option<Vec<f32>> {
        Some(alibi_slopes(self.heads, self.alibi_bias_max))
    }

    fn finish(&self, x: Tensor<B, 3>, y: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = x + linear_3d(&self.out, y);
        let up = linear_3d(&self.mlp.c_fc, self.ln_2.forward(h.clone()));
        h + linear_3d(&self.mlp.c_proj, self.mlp.act.forward(up))
    }
}
