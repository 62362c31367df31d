//! SigLIP (Zhai et al. 2023) as HF transformers' `SiglipModel` builds it, read top to bottom;
//! field names are HF's, so the checkpoint paths read across (`rookery_interop::hf_siglip`).
//!
//! Where it differs from CLIP's towers:
//! - vision: a patch convolution **with** bias, learned positions for the patches only (no
//!   class token), no `ln_pre`, `post_layernorm` over **every** token, and a multi-head
//!   attention-pooling head (MAP: one learned probe attends to the tokens, then
//!   `a + mlp(layernorm(a))`) for the image embedding;
//! - text: **bidirectional** attention, `final_layer_norm`, the **last** position pooled (text
//!   is padded to the length the model was trained with), then a `head` Linear with bias;
//! - no projection to a shared width and no normalisation inside: the two heads' outputs are the
//!   embeddings; LayerNorm epsilon and activation come from the config (1e-6, tanh GELU).

use burn::module::{Initializer, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::flamingo::resampler::multi_head;
use crate::layers::{linear_3d, Act, Attention, Mlp};

/// One tower's transformer shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiglipTower {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// The MLP's hidden width (`intermediate_size`).
    pub hidden: usize,
    pub eps: f64,
    pub act: Act,
}

/// A SigLIP model's shapes: the vision tower, and the text tower if there is one (a
/// `SiglipVisionModel` alone has none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiglipConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub vision: SiglipTower,
    /// The MAP head (HF `vision_use_head`).
    pub vision_head: bool,
    pub text: Option<SiglipText>,
}

/// The text tower's shapes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiglipText {
    pub vocab_size: usize,
    pub context_length: usize,
    pub tower: SiglipTower,
    /// Output width of `head` (HF `projection_size`).
    pub projection: usize,
    /// The id texts are padded with to `context_length` (HF `pad_token_id`).
    pub pad_token: usize,
}

impl SiglipConfig {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// The vision tower alone.
    pub fn init_vision<B: Backend>(&self, device: &B::Device) -> SiglipVision<B> {
        let v = &self.vision;
        let n = self.grid() * self.grid();
        SiglipVision {
            patch_embedding: Conv2dConfig::new([3, v.width], [self.patch_size; 2])
                .with_stride([self.patch_size; 2])
                .init(device),
            position_embedding: Initializer::Zeros.init([n, v.width], device),
            layers: blocks(v, device),
            post_layernorm: ln(v, device),
            head: self.vision_head.then(|| MapHead {
                probe: Initializer::Zeros.init([1, v.width], device),
                attention: attention(v, device),
                layernorm: ln(v, device),
                mlp: mlp(v, device),
            }),
        }
    }

    /// A model with these shapes (weights to be loaded).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Siglip<B> {
        let vision = self.init_vision(device);
        let text = self.text.as_ref().map(|t| SiglipTextTower {
            token_embedding: EmbeddingConfig::new(t.vocab_size, t.tower.width).init(device),
            position_embedding: Initializer::Zeros.init([t.context_length, t.tower.width], device),
            layers: blocks(&t.tower, device),
            final_layer_norm: ln(&t.tower, device),
            head: LinearConfig::new(t.tower.width, t.projection).init(device),
        });
        Siglip {
            vision,
            text,
            logit_scale: Initializer::Zeros.init([1], device),
            logit_bias: Initializer::Zeros.init([1], device),
        }
    }
}

fn ln<B: Backend>(t: &SiglipTower, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(t.width)
        .with_epsilon(t.eps)
        .init(device)
}

fn attention<B: Backend>(t: &SiglipTower, device: &B::Device) -> Attention<B> {
    Attention {
        in_proj: LinearConfig::new(t.width, 3 * t.width).init(device),
        out_proj: LinearConfig::new(t.width, t.width).init(device),
        n_heads: t.heads,
    }
}

fn mlp<B: Backend>(t: &SiglipTower, device: &B::Device) -> Mlp<B> {
    Mlp {
        c_fc: LinearConfig::new(t.width, t.hidden).init(device),
        c_proj: LinearConfig::new(t.hidden, t.width).init(device),
        act: t.act,
    }
}

fn blocks<B: Backend>(t: &SiglipTower, device: &B::Device) -> Vec<SiglipBlock<B>> {
    (0..t.layers)
        .map(|_| SiglipBlock {
            layer_norm1: ln(t, device),
            self_attn: attention(t, device),
            layer_norm2: ln(t, device),
            mlp: mlp(t, device),
        })
        .collect()
}

/// `x + self_attn(layer_norm1(x))`, then `x + mlp(layer_norm2(x))` (q/k/v packed in
/// `self_attn.in_proj`, as CLIP's blocks hold them).
#[derive(Module, Debug)]
pub struct SiglipBlock<B: Backend> {
    pub layer_norm1: LayerNorm<B>,
    pub self_attn: Attention<B>,
    pub layer_norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> SiglipBlock<B> {
    fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), causal);
        let h = linear_3d(&self.mlp.c_fc, self.layer_norm2.forward(x.clone()));
        x + linear_3d(&self.mlp.c_proj, self.mlp.act.forward(h))
    }
}

/// Multi-head attention pooling: a learned probe attends to the tokens.
#[derive(Module, Debug)]
pub struct MapHead<B: Backend> {
    pub probe: Param<Tensor<B, 2>>,
    pub attention: Attention<B>,
    pub layernorm: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> MapHead<B> {
    /// `[B, N, W]` tokens -> `[B, W]`.
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, _, w] = x.dims();
        let wt = self.attention.in_proj.weight.val(); // [W, 3W]: q, k, v columns
        let bias = self.attention.in_proj.bias.as_ref().expect("bias").val();
        let part = |i: usize, x: Tensor<B, 3>| {
            let [b, t, _] = x.dims();
            let y = x
                .reshape([b * t, w])
                .matmul(wt.clone().slice(s![.., i * w..(i + 1) * w]))
                + bias.clone().slice(s![i * w..(i + 1) * w]).unsqueeze();
            y.reshape([b, t, w])
        };
        let probe = self.probe.val().unsqueeze::<3>().expand([b, 1, w]);
        let (q, k, v) = (part(0, probe), part(1, x.clone()), part(2, x));
        let a = multi_head(q, k, v, self.attention.n_heads, None); // [B, 1, W]
        let a = linear_3d(&self.attention.out_proj, a);
        let h = linear_3d(&self.mlp.c_fc, self.layernorm.forward(a.clone()));
        let out = a + linear_3d(&self.mlp.c_proj, self.mlp.act.forward(h));
        out.reshape([b, w])
    }
}

#[derive(Module, Debug)]
pub struct SiglipVision<B: Backend> {
    pub patch_embedding: Conv2d<B>,
    pub position_embedding: Param<Tensor<B, 2>>,
    pub layers: Vec<SiglipBlock<B>>,
    pub post_layernorm: LayerNorm<B>,
    pub head: Option<MapHead<B>>,
}

impl<B: Backend> SiglipVision<B> {
    /// Every patch token after `post_layernorm` (HF's `last_hidden_state`).
    ///
    /// # Shapes
    /// `images`: `[B, 3, H, W]` -> `[B, (H/p)(W/p), width]`.
    pub fn forward_tokens(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        self.post_layernorm
            .forward(self.forward_tokens_unnormed(images))
    }

    /// The patch tokens before `post_layernorm`.
    pub fn forward_tokens_unnormed(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = self.patch_embedding.forward(images); // [B, W, H/p, W/p]
        let [b, w, gh, gw] = x.dims();
        let x = x.reshape([b, w, gh * gw]).swap_dims(1, 2);
        let mut x = x + self.position_embedding.val().unsqueeze::<3>();
        for layer in &self.layers {
            x = layer.forward(x, false);
        }
        x
    }

    /// The image embedding: the MAP head over the tokens (`[B, width]`, not normalised).
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let head = self
            .head
            .as_ref()
            .expect("a SigLIP vision tower without its head");
        head.forward(self.forward_tokens(images))
    }
}

#[derive(Module, Debug)]
pub struct SiglipTextTower<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Param<Tensor<B, 2>>,
    pub layers: Vec<SiglipBlock<B>>,
    pub final_layer_norm: LayerNorm<B>,
    pub head: Linear<B>,
}

impl<B: Backend> SiglipTextTower<B> {
    /// The text embedding of ids `[B, T]` (padded to the trained length): `[B, projection]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = tokens.dims();
        let pos = self.position_embedding.val().slice(s![0..t, ..]);
        let mut x = self.token_embedding.forward(tokens) + pos.unsqueeze::<3>();
        for layer in &self.layers {
            x = layer.forward(x, false);
        }
        let w = x.dims()[2];
        let last = self
            .final_layer_norm
            .forward(x)
            .slice(s![.., t - 1..t, ..])
            .reshape([b, w]);
        self.head.forward(last)
    }
}

#[derive(Module, Debug)]
pub struct Siglip<B: Backend> {
    pub vision: SiglipVision<B>,
    pub text: Option<SiglipTextTower<B>>,
    pub logit_scale: Param<Tensor<B, 1>>,
    pub logit_bias: Param<Tensor<B, 1>>,
}
