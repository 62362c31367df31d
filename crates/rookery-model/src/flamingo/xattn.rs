//! Gated cross-attention dense blocks (Alayrac et al. 2022, §2.2): text attends to visual
//! tokens, then a feed-forward block, each scaled by `tanh(gate)` with the gates starting at 0,
//! so before training the model is exactly its frozen language model.
//!
//! Media masking: a text token's "time" is the number of `<image>` tokens at or before it; it
//! attends only to the visual tokens of that image (or, with `only_immediate = false`, of every
//! image up to it). Tokens before the first image see no image: their cross-attention output is
//! zeroed (the feed-forward still applies, as in OpenFlamingo).

use crate::cpu::gelu;
use burn::module::{Initializer, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;

use super::resampler::multi_head;
use crate::layers::linear_3d;

#[derive(Module, Debug)]
pub struct GatedCrossAttention<B: Backend> {
    pub norm: LayerNorm<B>,
    pub to_q: Linear<B>,
    pub to_kv: Linear<B>,
    pub to_out: Linear<B>,
    pub attn_gate: Param<Tensor<B, 1>>,
    pub ff_norm: LayerNorm<B>,
    pub ff_in: Linear<B>,
    pub ff_out: Linear<B>,
    pub ff_gate: Param<Tensor<B, 1>>,
    pub heads: usize,
}

impl<B: Backend> GatedCrossAttention<B> {
    /// A block for text of width `dim` over visual tokens of width `dim_visual`.
    pub fn new(
        dim: usize,
        dim_visual: usize,
        heads: usize,
        dim_head: usize,
        ff_mult: usize,
        device: &B::Device,
    ) -> Self {
        let inner = heads * dim_head;
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        GatedCrossAttention {
            norm: LayerNormConfig::new(dim).init(device),
            to_q: lin(dim, inner),
            to_kv: lin(dim_visual, 2 * inner),
            to_out: lin(inner, dim),
            attn_gate: Initializer::Zeros.init([1], device),
            ff_norm: LayerNormConfig::new(dim).init(device),
            ff_in: lin(dim, dim * ff_mult),
            ff_out: lin(dim * ff_mult, dim),
            ff_gate: Initializer::Zeros.init([1], device),
            heads,
        }
    }

    /// # Shapes
    /// `x`: `[B, T, D]` text; `visual`: `[B, M, Dv]` (M = images x tokens per image);
    /// `hidden`: `[B, T, M]`, true where a token must not see a visual token; `sees_any`:
    /// `[B, T, 1]`, 1.0 for tokens that see at least one image, else 0.0.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        visual: Tensor<B, 3>,
        hidden: Tensor<B, 3, Bool>,
        sees_any: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let q = linear_3d(&self.to_q, self.norm.forward(x.clone()));
        let kv = linear_3d(&self.to_kv, visual);
        let inner = q.dims()[2];
        let (k, v) = (
            kv.clone().slice(s![.., .., 0..inner]),
            kv.slice(s![.., .., inner..]),
        );
        let attended = multi_head(q, k, v, self.heads, Some(hidden)).reshape([b, t, inner]);
        let y = linear_3d(&self.to_out, attended) * sees_any;
        let x = x + y * gate(&self.attn_gate);
        let h = linear_3d(&self.ff_in, self.ff_norm.forward(x.clone()));
        x.clone() + linear_3d(&self.ff_out, gelu(h)) * gate(&self.ff_gate)
    }
}

fn gate<B: Backend>(g: &Param<Tensor<B, 1>>) -> Tensor<B, 3> {
    g.val().tanh().reshape([1, 1, 1])
}

/// The media mask for `tokens` `[B, T]` against `n_images` images of `per_image` visual tokens
/// each: (`hidden` `[B, T, n_images * per_image]`, `sees_any` `[B, T, 1]`).
pub fn media_mask<B: Backend>(
    tokens: Tensor<B, 2, Int>,
    image_token: i64,
    n_images: usize,
    per_image: usize,
    only_immediate: bool,
) -> (Tensor<B, 3, Bool>, Tensor<B, 3>) {
    let [b, t] = tokens.dims();
    let device = tokens.device();
    let m = n_images * per_image;
    // Which image (1-based) each token follows; 0 before the first.
    let time = tokens
        .equal_elem(image_token)
        .int()
        .cumsum(1)
        .reshape([b, t, 1]);
    let media = (Tensor::<B, 1, Int>::arange(0..m as i64, &device).div_scalar(per_image as i64)
        + 1)
    .reshape([1, 1, m]);
    let (time_b, media_b) = (time.clone().expand([b, t, m]), media.expand([b, t, m]));
    let visible = match only_immediate {
        true => time_b.equal(media_b),
        false => media_b.lower_equal(time_b),
    };
    let sees_any = time.greater_elem(0).float();
    (visible.bool_not(), sees_any)
}
