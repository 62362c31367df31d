//! The Perceiver Resampler (Alayrac et al. 2022, §2.1): a fixed set of learned latents
//! cross-attends to one medium's vision features (an image, or a video's frames, each with a
//! learned time embedding), so every medium becomes the same number of visual tokens whatever
//! its patch and frame count. Keys and values come from the media and the latents
//! together; each layer is attention then a feed-forward block, both residual; a final
//! LayerNorm.

use crate::cpu::{gelu, softmax};
use burn::module::{Initializer, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::layers::linear_3d;

/// `[model.resampler]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResamplerConfig {
    pub latents: usize,
    pub depth: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub ff_mult: usize,
    /// Frames per media item with a learned time embedding each (1 for still images).
    pub max_frames: usize,
}

impl Default for ResamplerConfig {
    fn default() -> Self {
        ResamplerConfig {
            latents: 64,
            depth: 6,
            heads: 8,
            dim_head: 64,
            ff_mult: 4,
            max_frames: 1,
        }
    }
}

impl ResamplerConfig {
    /// A resampler over vision features of width `dim`.
    pub fn init<B: Backend>(&self, dim: usize, device: &B::Device) -> PerceiverResampler<B> {
        let inner = self.heads * self.dim_head;
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let layers = (0..self.depth)
            .map(|_| ResamplerLayer {
                norm_media: LayerNormConfig::new(dim).init(device),
                norm_latents: LayerNormConfig::new(dim).init(device),
                to_q: lin(dim, inner),
                to_kv: lin(dim, 2 * inner),
                to_out: lin(inner, dim),
                ff_norm: LayerNormConfig::new(dim).init(device),
                ff_in: lin(dim, dim * self.ff_mult),
                ff_out: lin(dim * self.ff_mult, dim),
                heads: self.heads,
            })
            .collect();
        let normal = Initializer::Normal {
            mean: 0.0,
            std: 1.0,
        };
        PerceiverResampler {
            latents: normal.init([self.latents, dim], device),
            // Random as OpenFlamingo's `randn` when videos are read: frames must differ from
            // the first step. With one frame, zero (and frozen): OpenFlamingo's image models
            // have no frame embedding.
            frame_embs: match self.max_frames {
                1 => Initializer::Zeros.init([1, dim], device),
                f => normal.init([f, dim], device),
            },
            layers,
            norm: LayerNormConfig::new(dim).init(device),
        }
    }
}

#[derive(Module, Debug)]
pub struct ResamplerLayer<B: Backend> {
    pub norm_media: LayerNorm<B>,
    pub norm_latents: LayerNorm<B>,
    pub to_q: Linear<B>,
    pub to_kv: Linear<B>,
    pub to_out: Linear<B>,
    pub ff_norm: LayerNorm<B>,
    pub ff_in: Linear<B>,
    pub ff_out: Linear<B>,
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct PerceiverResampler<B: Backend> {
    pub latents: Param<Tensor<B, 2>>,
    pub frame_embs: Param<Tensor<B, 2>>,
    pub layers: Vec<ResamplerLayer<B>>,
    pub norm: LayerNorm<B>,
}

impl<B: Backend> PerceiverResampler<B> {
    /// With one frame per medium the frame embedding would be a learned bias on every media
    /// token, which OpenFlamingo's resampler (built without `max_num_frames`) does not have:
    /// it stays at zero, untrained, so weights move between the two unchanged.
    pub fn freeze_single_frame(mut self) -> Self {
        if self.frame_embs.dims()[0] == 1 {
            self.frame_embs = self.frame_embs.set_require_grad(false);
        }
        self
    }

    /// # Shapes
    /// `media`: `[N, F, P, D]` (N media, F frames, P patch tokens) -> `[N, latents, D]`.
    pub fn forward(&self, media: Tensor<B, 4>) -> Tensor<B, 3> {
        self.forward_frames(media, None)
    }

    /// As [`Self::forward`] for media of different lengths: medium `i` has `frames[i]` real
    /// frames (at most F), the rest padding, which the latents never attend to, so it changes
    /// nothing. Every frame's tokens get its time embedding (frame `t`: row `t` of
    /// `frame_embs`), and the latents attend to all real frames' tokens at once (Flamingo §2.1).
    pub fn forward_frames(&self, media: Tensor<B, 4>, frames: Option<&[usize]>) -> Tensor<B, 3> {
        let [n, f, p, d] = media.dims();
        let max = self.frame_embs.dims()[0];
        assert!(
            f <= max,
            "media of {f} frames for a resampler with {max} time embeddings (max_frames)"
        );
        let time = self
            .frame_embs
            .val()
            .slice(s![0..f, ..])
            .reshape([1, f, 1, d]);
        let media = (media + time).reshape([n, f * p, d]);
        let [l, _] = self.latents.dims();
        // Nothing padded: the unmasked path (the same values, fewer ops).
        let padded = frames.filter(|fr| fr.iter().any(|&real| real != f));
        let mask = padded.map(|fr| padding_mask::<B>(fr, f, p, l, &media.device()));
        let mut x = self.latents.val().unsqueeze::<3>().expand([n, l, d]);
        for layer in &self.layers {
            x = x.clone() + layer.attend(media.clone(), x, mask.clone());
            let h = linear_3d(&layer.ff_in, layer.ff_norm.forward(x.clone()));
            x = x + linear_3d(&layer.ff_out, gelu(h));
        }
        self.norm.forward(x)
    }
}

/// `[N, L, F * P + L]`, true where a latent must not look: the tokens of padded frames (the
/// latents themselves, last, are always visible).
fn padding_mask<B: Backend>(
    frames: &[usize],
    f: usize,
    p: usize,
    l: usize,
    device: &B::Device,
) -> Tensor<B, 3, Bool> {
    let n = frames.len();
    let keys = f * p + l;
    let row: Vec<bool> = frames
        .iter()
        .flat_map(|&real| {
            assert!(
                (1..=f).contains(&real),
                "a medium of {real} frames in a batch padded to {f}"
            );
            (0..keys).map(move |k| k < f * p && k / p >= real)
        })
        .collect();
    Tensor::<B, 3, Bool>::from_data(TensorData::new(row, [n, 1, keys]), device).expand([n, l, keys])
}

impl<B: Backend> ResamplerLayer<B> {
    /// Latents attend to `[media, latents]` (`mask`: what they must not see).
    fn attend(
        &self,
        media: Tensor<B, 3>,
        latents: Tensor<B, 3>,
        mask: Option<Tensor<B, 3, Bool>>,
    ) -> Tensor<B, 3> {
        let media = self.norm_media.forward(media);
        let latents = self.norm_latents.forward(latents);
        let [n, l, _] = latents.dims();
        let q = linear_3d(&self.to_q, latents.clone());
        let kv = linear_3d(&self.to_kv, Tensor::cat(vec![media, latents], 1));
        let inner = q.dims()[2];
        let (k, v) = (
            kv.clone().slice(s![.., .., 0..inner]),
            kv.slice(s![.., .., inner..]),
        );
        let out = multi_head(q, k, v, self.heads, mask);
        linear_3d(&self.to_out, out.reshape([n, l, inner]))
    }
}

/// Softmax attention over heads; `mask` `[B, Tq, Tk]` (true = hidden) is applied with a large
/// finite negative, so a fully hidden row gives finite (uniform) weights the caller can zero.
pub fn multi_head<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    mask: Option<Tensor<B, 3, Bool>>,
) -> Tensor<B, 3> {
    let ([b, tq, inner], tk) = (q.dims(), k.dims()[1]);
    let dh = inner / heads;
    let split = |x: Tensor<B, 3>, t| x.reshape([b, t, heads, dh]).swap_dims(1, 2);
    let (q, k, v) = (split(q, tq), split(k, tk), split(v, tk));
    let mut scores = q.matmul(k.swap_dims(2, 3)) / (dh as f32).sqrt(); // [B, H, Tq, Tk]
    if let Some(m) = mask {
        scores = scores.mask_fill(m.unsqueeze_dim::<4>(1).expand([b, heads, tq, tk]), -1e9);
    }
    softmax(scores, 3)
        .matmul(v)
        .swap_dims(1, 2)
        .reshape([b, tq, inner])
}
