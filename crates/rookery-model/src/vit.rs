//! The CLIP image tower: a Vision Transformer (Dosovitskiy et al. 2021) as CLIP uses it
//! (Radford et al. 2021): conv patch embedding, class token, learned positions, `ln_pre`,
//! pre-norm blocks, `ln_post` on the class token, projection. Field names follow open_clip's
//! `VisionTransformer` (`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
//! `transformer`, `ln_post`, `proj`), plus an optional patch stem before `conv1` (`stem`, not
//! CLIP's; [`VitConfig::stem_patch`]).

use burn::module::{Initializer, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::LayerNorm;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::layers::{layer_norm, norm, select_rows, Act, Transformer};

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
    /// Share of patch tokens dropped at random from each training image (FLIP, Li et al. 2023;
    /// open_clip's `patch_dropout`): the tower sees fewer tokens per image, so a step costs less.
    /// The class token always stays; evaluation sees every patch. 0 = off.
    pub patch_dropout: f64,
    /// What the image features are read from (open_clip's `pool_type`): `"tok"` the class
    /// token (CLIP), `"avg"` the mean of the patch tokens after `ln_post`.
    pub pool_type: Pool,
    /// Sub-patch size of a two-level patch embedding (0 = CLIP's single `conv1`). With `s`,
    /// `stem` embeds each `s x s` sub-patch on its own (a conv with kernel = stride = `s`, then
    /// LayerNorm and the activation), and `conv1` embeds each patch from its `(p/s)^2`
    /// sub-patch features. A patch token is then a non-linear, translation-shared function of
    /// its pixels, where `conv1` alone is linear: it can say "a corner here" for a shape much
    /// smaller than the patch. 8-px sub-patches of 64 channels take fewer FLOPs than a 16-px
    /// `conv1` alone (an early-convolution stem as in Xiao et al. 2021, with non-overlapping
    /// kernels). open_clip and HF have no such layer: such a tower exports under rookery's own
    /// names only.
    pub stem_patch: usize,
    /// Channels of the stem's sub-patch features.
    pub stem_width: usize,
    /// Train with this tower frozen (LiT: a locked, pretrained image tower): no gradient, no
    /// optimizer state, weights bit-identical to where the run started.
    pub locked: bool,
}

/// What a ViT's image features are read from (`model.vision.pool_type`, open_clip's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The class token (CLIP).
    Tok,
    /// The mean of the patch tokens after `ln_post`.
    Avg,
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
            patch_dropout: 0.0,
            pool_type: Pool::Tok,
            stem_patch: 0,
            stem_width: 64,
            locked: false,
        }
    }
}

impl VitConfig {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patch tokens a training image keeps under `patch_dropout` (at least one).
    pub fn kept_patches(&self) -> usize {
        let n = self.grid() * self.grid();
        ((n as f64 * (1.0 - self.patch_dropout)).round() as usize).clamp(1, n)
    }

    pub fn init<B: Backend>(&self, embed_dim: usize, device: &B::Device) -> VisionTransformer<B> {
        let w = self.width;
        let scale = (w as f64).powf(-0.5);
        let normal = Initializer::Normal {
            mean: 0.0,
            std: scale,
        };
        let n = self.grid() * self.grid() + 1;
        let (stem, c, k) = match self.stem_patch {
            0 => (None, 3, self.patch_size),
            s => (
                Some(PatchStem {
                    conv: Conv2dConfig::new([3, self.stem_width], [s, s])
                        .with_stride([s, s])
                        .init(device),
                    ln: layer_norm(self.stem_width, device),
                    act: self.act,
                }),
                self.stem_width,
                self.patch_size / s,
            ),
        };
        VisionTransformer {
            stem,
            conv1: Conv2dConfig::new([c, w], [k, k])
                .with_stride([k, k])
                .with_bias(false)
                .init(device),
            class_embedding: normal.init([w], device),
            positional_embedding: normal.init([n, w], device),
            ln_pre: layer_norm(w, device),
            transformer: Transformer::new(
                w,
                self.layers,
                self.heads,
                self.mlp_ratio,
                self.act,
                device,
            ),
            ln_post: layer_norm(w, device),
            proj: normal.init([w, embed_dim], device),
            avg_pool: self.pool_type == Pool::Avg,
        }
    }
}

/// The first level of a two-level patch embedding ([`VitConfig::stem_patch`]).
#[derive(Module, Debug)]
pub struct PatchStem<B: Backend> {
    pub conv: Conv2d<B>,
    pub ln: LayerNorm<B>,
    /// The tower's activation ([`VitConfig::act`]).
    #[module(skip)]
    pub act: Act,
}

impl<B: Backend> PatchStem<B> {
    /// `conv1`'s input rows: for each `p x p` patch (row-major over the grid), the features of
    /// its `s x s` sub-patches side by side (sub-patches row-major, then channels).
    ///
    /// # Shapes
    /// `images`: `[B, 3, H, W]` -> `[B * (H/p) * (W/p), (p/s)^2 * C]`.
    pub fn forward(&self, images: Tensor<B, 4>, p: usize) -> Tensor<B, 2> {
        let c = images.dims()[1];
        let [width, _, s, _] = self.conv.weight.dims();
        // The patches as images of their own, and those cut into sub-patches: rows come out
        // patch by patch, so `conv1`'s input is a reshape, not a permute of a feature map.
        let patches = crate::cpu::patchify(images, p);
        let n = patches.dims()[0];
        let sub = crate::cpu::patchify(patches.reshape([n, c, p, p]), s);
        let kernel = self
            .conv
            .weight
            .val()
            .reshape([width, c * s * s])
            .transpose();
        let bias = self
            .conv
            .bias
            .as_ref()
            .expect("the stem conv has a bias")
            .val();
        let x = self
            .act
            .forward(norm(&self.ln, crate::cpu::affine(sub, kernel, bias)));
        x.reshape([n, (p / s) * (p / s) * width])
    }
}

#[derive(Module, Debug)]
pub struct VisionTransformer<B: Backend> {
    /// Sub-patch embedding before `conv1` ([`VitConfig::stem_patch`]); `None` in CLIP.
    pub stem: Option<PatchStem<B>>,
    pub conv1: Conv2d<B>,
    pub class_embedding: Param<Tensor<B, 1>>,
    pub positional_embedding: Param<Tensor<B, 2>>,
    pub ln_pre: LayerNorm<B>,
    pub transformer: Transformer<B>,
    pub ln_post: LayerNorm<B>,
    pub proj: Param<Tensor<B, 2>>,
    /// `pool_type = "avg"`.
    pub avg_pool: bool,
}

impl<B: Backend> VisionTransformer<B> {
    /// Token features after the transformer, before `ln_post`: class token first, then patches.
    ///
    /// # Shapes
    /// `images`: `[B, 3, H, W]` -> `[B, 1 + (H/p)(W/p), width]`.
    pub fn forward_tokens(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = self.embed(self.patch_tokens(images), None);
        self.transformer.forward(x, false)
    }

    /// The transformer's input: class token and patches with their positions, after `ln_pre`.
    /// With `keep` `[B, K]` (patch dropout), only the patches it names for each image; the
    /// class token always stays, and positions are added first, so a kept patch still knows
    /// where it was.
    ///
    /// # Shapes
    /// `x`: `[B, N, width]` -> `[B, 1 + N (or K), width]`.
    fn embed(&self, x: Tensor<B, 3>, keep: Option<Tensor<B, 2, Int>>) -> Tensor<B, 3> {
        let [b, _, w] = x.dims();
        let pos = self.positional_embedding.val();
        let x = match keep {
            None => {
                let cls = self
                    .class_embedding
                    .val()
                    .reshape([1, 1, w])
                    .expand([b, 1, w]);
                crate::cpu::add_positions(Tensor::cat(vec![cls, x], 1), pos)
            }
            Some(keep) => {
                let x = crate::cpu::add_positions(x, pos.clone().slice(s![1.., ..]));
                let x = select_rows(x, keep);
                let cls = (self.class_embedding.val().reshape([1, w]) + pos.slice(s![0..1, ..]))
                    .reshape([1, 1, w])
                    .expand([b, 1, w]);
                Tensor::cat(vec![cls, x], 1)
            }
        };
        norm(&self.ln_pre, x)
    }

    /// Patch embeddings `[B, N, width]`, before positions: `conv1` (kernel = stride = patch) as
    /// what it is, one GEMM of the flattened patches `[B*N, 3*p*p]` by the kernel `[3*p*p,
    /// width]`. burn-flex runs the conv through a 3-D im2col whose copies and weight gradient
    /// cost 7% of a CPU step; the GEMM reads its inputs in place. With a stem, the rows are
    /// the stem's sub-patch features of each patch, and `conv1` convolves those.
    fn patch_tokens(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let b = images.dims()[0];
        let [width, c_in, k, _] = self.conv1.weight.dims();
        let kernel = self.conv1.weight.val();
        let (rows, kernel) = match &self.stem {
            None => (crate::cpu::patchify(images, k), kernel),
            // `conv1` over the stem's feature map, its kernel in the stem rows' order.
            Some(stem) => {
                let s = stem.conv.weight.dims()[2];
                (stem.forward(images, k * s), kernel.permute([0, 2, 3, 1]))
            }
        };
        let n = rows.dims()[0] / b;
        rows.matmul(kernel.reshape([width, c_in * k * k]).transpose())
            .reshape([b, n, width])
    }

    /// # Shapes
    /// `images`: `[B, 3, H, W]` -> `[B, embed_dim]` (not normalised).
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.embed(self.patch_tokens(images), None);
        self.encode_tokens(x)
    }

    /// [`forward`](Self::forward) with patch dropout: `keep` `[B, K]` names each image's patches.
    pub fn forward_kept(&self, images: Tensor<B, 4>, keep: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let x = self.embed(self.patch_tokens(images), Some(keep));
        self.encode_tokens(x)
    }

    /// The transformer on the embedded tokens `x`, then `ln_post` on the class token (or on
    /// every token, then the patches' mean), then `proj`. With the class token, the last block
    /// computes that row alone (exact: nothing else is read).
    fn encode_tokens(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, t, w] = x.dims();
        let pooled = if self.avg_pool {
            let x = self.transformer.forward(x, false);
            let patches = norm(&self.ln_post, x.slice(s![.., 1..t, ..]));
            patches.mean_dim(1).reshape([b, w])
        } else {
            let cls = Tensor::<B, 1, Int>::zeros([b], &x.device());
            let x = self.transformer.forward_rows(x, cls, false);
            norm(&self.ln_post, x.reshape([b, w]))
        };
        pooled.matmul(self.proj.val())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    fn tower(device: &Device<Flex>) -> VisionTransformer<Flex> {
        let cfg = VitConfig {
            image_size: 16,
            patch_size: 4,
            width: 16,
            layers: 2,
            heads: 2,
            ..Default::default()
        };
        cfg.init(8, device)
    }

    fn keep(rows: &[[i64; 3]], device: &Device<Flex>) -> Tensor<Flex, 2, Int> {
        let ids: Vec<i64> = rows.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(ids, [rows.len(), 3]), device)
    }

    fn max_diff(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    type AD = burn::backend::Autodiff<Flex>;

    /// `ours` equals `reference` `[B, N, W]`, and so do the gradients they give each kernel
    /// (through a random weighting of the tokens); each reference gradient must exceed its
    /// floor somewhere, so a kernel the tokens do not reach fails.
    fn assert_same_tokens_and_grads(
        ours: Tensor<AD, 3>,
        reference: Tensor<AD, 3>,
        kernels: &[(&Param<Tensor<AD, 4>>, f32)],
    ) {
        assert_eq!(ours.dims(), reference.dims());
        let diff: f32 = (ours.clone() - reference.clone()).abs().max().into_scalar();
        assert!(diff < 1e-5, "tokens differ by {diff}");
        let weights = Tensor::<AD, 3>::random(ours.dims(), Distribution::Default, &ours.device());
        let grads_ours = (ours * weights.clone()).sum().backward();
        let grads_ref = (reference * weights).sum().backward();
        for (kernel, floor) in kernels {
            let g = |grads| kernel.val().grad(grads).expect("kernel gradient");
            let (a, b) = (g(&grads_ours), g(&grads_ref));
            let diff: f32 = (a - b.clone()).abs().max().into_scalar();
            let size: f32 = b.abs().max().into_scalar();
            assert!(diff < 1e-4 && size > *floor, "{diff} of {size}");
        }
    }

    /// The GEMM form of the patch embedding is `conv1` itself: outputs and the kernel's
    /// gradient match burn's convolution on a non-square image.
    #[test]
    fn patch_tokens_are_the_strided_convolution() {
        let device = Default::default();
        let cfg = VitConfig {
            image_size: 16,
            patch_size: 4,
            width: 16,
            ..Default::default()
        };
        let vit: VisionTransformer<AD> = cfg.init(8, &device);
        let images = Tensor::<AD, 4>::random([2, 3, 16, 12], Distribution::Default, &device);
        let ours = vit.patch_tokens(images.clone());
        let conv = vit.conv1.forward(images).flatten::<3>(2, 3).swap_dims(1, 2);
        assert_eq!(ours.dims(), [2, 12, 16]);
        assert_same_tokens_and_grads(ours, conv, &[(&vit.conv1.weight, 0.1)]);
    }

    /// With a stem, the patch tokens are burn's convolution, LayerNorm over channels, GELU and
    /// `conv1`'s convolution composed on a feature map: outputs and both kernels' gradients.
    #[test]
    fn stem_tokens_are_two_convolutions() {
        let device = Default::default();
        let cfg = VitConfig {
            image_size: 16,
            patch_size: 8,
            width: 16,
            stem_patch: 2,
            stem_width: 6,
            ..Default::default()
        };
        let vit: VisionTransformer<AD> = cfg.init(8, &device);
        let stem = vit.stem.as_ref().expect("a stem");
        let images = Tensor::<AD, 4>::random([2, 3, 16, 24], Distribution::Default, &device);
        let ours = vit.patch_tokens(images.clone());
        let map = stem.conv.forward(images).permute([0, 2, 3, 1]); // [B, 8, 12, C]
        let map = crate::cpu::gelu(stem.ln.forward(map)).permute([0, 3, 1, 2]);
        let conv = vit.conv1.forward(map).flatten::<3>(2, 3).swap_dims(1, 2);
        assert_eq!(ours.dims(), [2, 6, 16]);
        let kernels = [(&vit.conv1.weight, 0.01), (&stem.conv.weight, 0.01)];
        assert_same_tokens_and_grads(ours, conv, &kernels);
    }

    #[test]
    fn kept_patches_rounds_and_keeps_at_least_one() {
        let mut cfg = VitConfig::default(); // 8 x 8 = 64 patches
        assert_eq!(cfg.kept_patches(), 64);
        cfg.patch_dropout = 0.5;
        assert_eq!(cfg.kept_patches(), 32);
        cfg.patch_dropout = 0.3;
        assert_eq!(cfg.kept_patches(), 45); // 44.8
        cfg.patch_dropout = 0.999;
        assert_eq!(cfg.kept_patches(), 1);
    }

    /// `pool_type = "avg"`: the features are `proj` of the mean of `ln_post` over the patch
    /// tokens; the class token's own output is not read.
    #[test]
    fn average_pooling_reads_the_mean_of_the_patch_tokens() {
        let device = Default::default();
        let cfg = VitConfig {
            image_size: 16,
            patch_size: 4,
            width: 16,
            layers: 1,
            heads: 2,
            pool_type: Pool::Avg,
            ..Default::default()
        };
        let v = cfg.init::<Flex>(8, &device);
        assert!(v.avg_pool);
        let images =
            Tensor::<Flex, 4>::random([2, 3, 16, 16], Distribution::Normal(0., 1.), &device);
        let tokens = v.forward_tokens(images.clone()); // [2, 17, 16]
        let mut rows = Vec::new();
        for i in 0..2 {
            let mut acc = Tensor::<Flex, 1>::zeros([16], &device);
            for j in 1..17 {
                let t = tokens
                    .clone()
                    .slice(s![i..i + 1, j..j + 1, ..])
                    .reshape([1, 16]);
                acc = acc + v.ln_post.forward(t).reshape([16]);
            }
            rows.push((acc / 16.0).reshape([1, 16]));
        }
        let want = Tensor::cat(rows, 0).matmul(v.proj.val());
        let d = max_diff(v.forward(images), want);
        assert!(d < 1e-5, "differs by {d}");
    }

    /// Keeping every patch, in order, is the plain forward.
    #[test]
    fn keeping_every_patch_is_the_plain_forward() {
        let device = Default::default();
        let v = tower(&device);
        let images =
            Tensor::<Flex, 4>::random([2, 3, 16, 16], Distribution::Normal(0., 1.), &device);
        let all = Tensor::<Flex, 1, Int>::arange(0..16, &device)
            .reshape([1, 16])
            .repeat_dim(0, 2);
        let d = max_diff(v.forward(images.clone()), v.forward_kept(images, all));
        assert!(d < 1e-5, "differs by {d}");
    }

    /// A dropped patch cannot reach the features; a kept one does, and kept patches are
    /// per image.
    #[test]
    fn dropped_patches_do_not_reach_the_features() {
        let device = Default::default();
        let v = tower(&device);
        let images =
            Tensor::<Flex, 4>::random([2, 3, 16, 16], Distribution::Normal(0., 1.), &device);
        // Image 0 keeps patches 0, 5, 15; image 1 keeps 1, 2, 3 (patch 5 is rows 4..8,
        // columns 4..8; patch 0 is rows 0..4, columns 0..4).
        let k = keep(&[[0, 5, 15], [1, 2, 3]], &device);
        let base = v.forward_kept(images.clone(), k.clone());
        let bump = |img: usize, y: usize, x: usize| {
            let patch = Tensor::<Flex, 4>::full([1, 3, 4, 4], 3.0, &device);
            images
                .clone()
                .slice_assign(s![img..img + 1, .., y..y + 4, x..x + 4], patch)
        };
        // Patch 5 of image 1 is dropped there: no change at all.
        let d = max_diff(base.clone(), v.forward_kept(bump(1, 4, 4), k.clone()));
        assert_eq!(d, 0.0, "a dropped patch changed the features");
        // Patch 5 of image 0 is kept: its features change, image 1's do not.
        let out = v.forward_kept(bump(0, 4, 4), k.clone());
        let d0 = max_diff(
            base.clone().slice(s![0..1, ..]),
            out.clone().slice(s![0..1, ..]),
        );
        let d1 = max_diff(base.clone().slice(s![1..2, ..]), out.slice(s![1..2, ..]));
        assert!(d0 > 1e-3, "a kept patch did not reach the features ({d0})");
        assert_eq!(d1, 0.0, "another image's patch reached image 1");
        // Patch 0 of image 1 is dropped, patch 0 of image 0 kept.
        let out = v.forward_kept(bump(1, 0, 0), k);
        assert_eq!(max_diff(base, out), 0.0);
    }
}
