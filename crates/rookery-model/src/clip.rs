//! CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
//! Supervision"): an image tower and a text tower projected into one embedding space, compared
//! by cosine similarity scaled by the learnable temperature `logit_scale`.

use burn::module::Param;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::text::{TextConfig, TextTransformer};
use crate::vit::{VisionTransformer, VitConfig};

/// Upper bound of `logit_scale` (ln 100), as in CLIP.
pub const MAX_LOGIT_SCALE: f32 = 4.605_170_2;

/// `[model]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClipConfig {
    pub embed_dim: usize,
    /// Contrastive objective: "infonce" (CLIP's softmax) or "siglip" (pairwise sigmoid).
    pub loss: ContrastiveLoss,
    /// Initial `logit_scale` (ln(1/0.07) for InfoNCE; SigLIP uses ln 10).
    pub init_logit_scale: f32,
    /// Initial `logit_bias`, SigLIP only (the paper's -10).
    pub init_logit_bias: f32,
    pub vision: VitConfig,
    pub text: TextConfig,
    /// Start from weights written by `rookery export` in this directory ("": random init).
    pub init_from: String,
}

/// The contrastive objective (`model.loss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContrastiveLoss {
    /// CLIP's symmetric softmax cross-entropy over the global batch.
    Infonce,
    /// SigLIP's pairwise sigmoid, with a learned `logit_bias`.
    Siglip,
}

impl Default for ClipConfig {
    fn default() -> Self {
        ClipConfig {
            embed_dim: 128,
            loss: ContrastiveLoss::Infonce,
            init_logit_scale: (1.0f32 / 0.07).ln(),
            init_logit_bias: -10.0,
            vision: VitConfig::default(),
            text: TextConfig::default(),
            init_from: String::new(),
        }
    }
}

impl ClipConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Clip<B> {
        Clip {
            visual: self.vision.init(self.embed_dim, device),
            text: self.text.init(self.embed_dim, device),
            logit_scale: Param::from_data([self.init_logit_scale], device),
            logit_bias: (self.loss == ContrastiveLoss::Siglip)
                .then(|| Param::from_data([self.init_logit_bias], device)),
        }
    }

    /// Checks the shape constraints, naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vision;
        let checks = [
            (self.embed_dim == 0, "model.embed_dim", "must be > 0"),
            (v.image_size == 0, "model.vision.image_size", "must be > 0"),
            (v.width == 0, "model.vision.width", "must be > 0"),
            (
                !(v.mlp_ratio.is_finite() && v.mlp_ratio > 0.0),
                "model.vision.mlp_ratio",
                "must be a number > 0",
            ),
            (self.text.width == 0, "model.text.width", "must be > 0"),
            (
                !(self.text.mlp_ratio.is_finite() && self.text.mlp_ratio > 0.0),
                "model.text.mlp_ratio",
                "must be a number > 0",
            ),
            (
                v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size),
                "model.vision.patch_size",
                "must divide model.vision.image_size",
            ),
            (
                v.heads == 0 || !v.width.is_multiple_of(v.heads),
                "model.vision.heads",
                "must divide model.vision.width",
            ),
            (
                v.stem_patch > 0 && !v.patch_size.is_multiple_of(v.stem_patch),
                "model.vision.stem_patch",
                "must divide model.vision.patch_size (0: no stem)",
            ),
            (
                v.stem_patch > 0 && v.stem_width == 0,
                "model.vision.stem_width",
                "must be > 0",
            ),
            (v.layers == 0, "model.vision.layers", "must be > 0"),
            (
                !(0.0..1.0).contains(&v.patch_dropout),
                "model.vision.patch_dropout",
                "must be in [0, 1)",
            ),
            (
                self.text.heads == 0 || !self.text.width.is_multiple_of(self.text.heads),
                "model.text.heads",
                "must divide model.text.width",
            ),
            (self.text.layers == 0, "model.text.layers", "must be > 0"),
            (
                self.text.context_length < 2,
                "model.text.context_length",
                "must be >= 2",
            ),
            (
                v.locked && self.text.locked,
                "model.text.locked",
                "and model.vision.locked leave nothing but logit_scale to train: lock one tower",
            ),
            (
                self.text.length_buckets == 0,
                "model.text.length_buckets",
                "must be > 0 (1: no buckets)",
            ),
        ];
        match checks.iter().find(|c| c.0) {
            Some((_, key, why)) => Err(format!("`{key}` {why}")),
            None => Ok(()),
        }
    }
}

#[derive(Module, Debug)]
pub struct Clip<B: Backend> {
    pub visual: VisionTransformer<B>,
    pub text: TextTransformer<B>,
    pub logit_scale: Param<Tensor<B, 1>>,
    /// SigLIP's learnable bias of the pairwise logits (absent for InfoNCE).
    pub logit_bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Clip<B> {
    /// L2-normalised image features `[B, E]`.
    pub fn encode_image(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        l2_normalize(self.visual.forward(images))
    }

    /// L2-normalised image features `[B, E]` from the patches `keep` `[B, K]` names (patch
    /// dropout in training; `None` = every patch).
    pub fn encode_image_kept(
        &self,
        images: Tensor<B, 4>,
        keep: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 2> {
        match keep {
            None => self.encode_image(images),
            Some(keep) => l2_normalize(self.visual.forward_kept(images, keep)),
        }
    }

    /// L2-normalised text features `[B, E]`.
    pub fn encode_text(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        l2_normalize(self.text.forward(tokens))
    }

    /// Clamps `logit_scale` to at most ln(100) after an optimizer step, keeping its id. The clamp
    /// happens outside the autodiff graph: a clamped *tracked* tensor would be a non-leaf and
    /// silently stop receiving gradients.
    pub fn clamp_logit_scale(mut self) -> Self {
        let require_grad = self.logit_scale.is_require_grad();
        self.logit_scale = self.logit_scale.map(|t| {
            let clamped = t.clone().detach().clamp_max(MAX_LOGIT_SCALE).into_data();
            Tensor::from_data(clamped, &t.device()).set_require_grad(require_grad)
        });
        self
    }
}

pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}
