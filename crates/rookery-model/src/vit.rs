//! The CLIP image tower: a Vision Transformer (Dosovitskiy et al. 2021) as CLIP uses it
//! (Radford et al. 2021): conv patch embedding, class token, learned positions, `ln_pre`,
//! pre-norm blocks, `ln_post` on the class token, projection. Field names follow open_clip's
//! `VisionTransformer` (`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
//! `transformer`, `ln_post`, `proj`).

use burn::module::{Initializer, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::layers::{Act, Transformer};

/// `[model.vision]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    pub act: Act,
}

impl Default for VitConfig {
    fn default() -> Self {
        VitConfig {
            image_size: 64,
            patch_size: 8,
            width: 128,
            layers: 3,
            heads: 4,
            mlp_ratio: 4.0,
            act: Act::Gelu,
        }
    }
}

impl VitConfig {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn init<B: Backend>(&self, embed_dim: usize, device: &B::Device) -> VisionTransformer<B> {
        let w = self.width;
        let scale = (w as f64).powf(-0.5);
        let normal = Initializer::Normal {
            mean: 0.0,
            std: scale,
        };
        let n = self.grid() * self.grid() + 1;
        VisionTransformer {
            conv1: Conv2dConfig::new([3, w], [self.patch_size, self.patch_size])
                .with_stride([self.patch_size, self.patch_size])
                .with_bias(false)
                .init(device),
            class_embedding: normal.init([w], device),
            positional_embedding: normal.init([n, w], device),
            ln_pre: LayerNormConfig::new(w).init(device),
            transformer: Transformer::new(
                w,
                self.layers,
                self.heads,
                self.mlp_ratio,
                self.act,
                device,
            ),
            ln_post: LayerNormConfig::new(w).init(device),
            proj: normal.init([w, embed_dim], device),
        }
    }
}

#[derive(Module, Debug)]
pub struct VisionTransformer<B: Backend> {
    pub conv1: Conv2d<B>,
    pub class_embedding: Param<Tensor<B, 1>>,
    pub positional_embedding: Param<Tensor<B, 2>>,
    pub ln_pre: LayerNorm<B>,
    pub transformer: Transformer<B>,
    pub ln_post: LayerNorm<B>,
    pub proj: Param<Tensor<B, 2>>,
}

impl<B: Backend> VisionTransformer<B> {
    /// Token features after the transformer, before `ln_post`: class token first, then patches.
    ///
    /// # Shapes
    /// `images`: `[B, 3, H, W]` -> `[B, 1 + (H/p)(W/p), width]`.
    pub fn forward_tokens(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = self
            .conv1
            .forward(images)
            .flatten::<3>(2, 3)
            .swap_dims(1, 2); // [B, N, W]
        let [b, _, w] = x.dims();
        let cls = self
            .class_embedding
            .val()
            .reshape([1, 1, w])
            .expand([b, 1, w]);
        let x = Tensor::cat(vec![cls, x], 1) + self.positional_embedding.val().unsqueeze::<3>();
        self.transformer.forward(self.ln_pre.forward(x), false)
    }

    /// # Shapes
    /// `images`: `[B, 3, H, W]` -> `[B, embed_dim]` (not normalised).
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.forward_tokens(images);
        let [b, _, w] = x.dims();
        let cls = self
            .ln_post
            .forward(x.slice(s![.., 0..1, ..]).reshape([b, w]));
        cls.matmul(self.proj.val())
    }
}
