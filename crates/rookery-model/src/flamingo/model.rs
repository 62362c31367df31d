//! The Flamingo model, top to bottom: images -> frozen ViT patch tokens -> Perceiver Resampler
//! -> visual tokens; text -> frozen LM embeddings (with trainable `<image>` and
//! `<|endofchunk|>` rows) -> LM blocks with a gated cross-attention block before every n-th one
//! -> LM head.

use burn::module::{Module, Param};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::lm::{LanguageModel, LmConfig};
use super::resampler::{PerceiverResampler, ResamplerConfig};
use super::xattn::{media_mask, GatedCrossAttention};
use crate::precision::{cast_params, to_dtype};
use crate::siglip::{SiglipConfig, SiglipVision};
use crate::vit::{VisionTransformer, VitConfig};
use burn::tensor::DType;

/// `[model]` of a Flamingo run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlamingoConfig {
    pub vision: VitConfig,
    /// A SigLIP vision tower instead of `vision`'s CLIP one (set from a SigLIP source).
    pub siglip: Option<SiglipConfig>,
    /// Output width of the vision tower's CLIP projection (kept so that the tower's weights
    /// load whole; Flamingo reads the patch tokens before it). 0: the tower's width.
    pub vision_embed_dim: usize,
    pub lm: LmConfig,
    pub resampler: ResamplerConfig,
    /// A gated cross-attention block before LM layer i when (i + 1) % n == 0.
    pub cross_attn_every_n_layers: usize,
    pub xattn_heads: usize,
    pub xattn_dim_head: usize,
    pub xattn_ff_mult: usize,
    /// Text attends to the latest image only (true) or to every image before it (false).
    pub only_attend_immediate_media: bool,
    /// Token ids of `<image>` and `<|endofchunk|>` (set from the tokenizer).
    pub image_token: usize,
    pub eoc_token: usize,
    /// Which patch tokens of the vision tower feed the resampler.
    pub vision_tokens: VisionTokens,
}

/// `[flamingo.model] vision_tokens`: the vision tower's patch tokens before its `ln_post`
/// (what OpenFlamingo's v2 checkpoints saw: open_clip before 2.23 applied `ln_post` to the
/// pooled token only; rookery's tiny recipe too), or after it (open_clip 2.23 and later, and
/// SigLIP-style towers whose final norm covers every token). Weights trained elsewhere need
/// the tokens they were trained on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionTokens {
    #[default]
    BeforeLnPost,
    AfterLnPost,
}

impl Default for FlamingoConfig {
    fn default() -> Self {
        FlamingoConfig {
            vision: VitConfig::default(),
            siglip: None,
            vision_embed_dim: 0,
            lm: LmConfig::default(),
            resampler: ResamplerConfig {
                latents: 16,
                depth: 2,
                heads: 4,
                dim_head: 32,
                ..Default::default()
            },
            cross_attn_every_n_layers: 1,
            xattn_heads: 4,
            xattn_dim_head: 32,
            xattn_ff_mult: 4,
            only_attend_immediate_media: true,
            image_token: 4,
            eoc_token: 5,
            vision_tokens: VisionTokens::default(),
        }
    }
}

impl FlamingoConfig {
    /// Width of the vision tower's tokens (what the resampler reads).
    pub fn vision_width(&self) -> usize {
        match &self.siglip {
            Some(s) => s.vision.width,
            None => self.vision.width,
        }
    }

    /// Side of the images the vision tower takes.
    pub fn image_size(&self) -> usize {
        match &self.siglip {
            Some(s) => s.image_size,
            None => self.vision.image_size,
        }
    }

    /// A Flamingo whose vision tower and LM are freshly initialised (load them before
    /// training), frozen, and whose new token rows start equal to the LM's.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Flamingo<B> {
        let dv = self.vision_width();
        let every = self.cross_attn_every_n_layers.max(1);
        let xattn = (0..self.lm.layers)
            .filter(|i| (i + 1) % every == 0)
            .map(|_| {
                GatedCrossAttention::new(
                    self.lm.width,
                    dv,
                    self.xattn_heads,
                    self.xattn_dim_head,
                    self.xattn_ff_mult,
                    device,
                )
            })
            .collect();
        let vision = match &self.siglip {
            Some(s) => VisionTower::Siglip(s.init_vision(device)),
            None => VisionTower::Clip(self.vision.init(
                match self.vision_embed_dim {
                    0 => dv,
                    e => e,
                },
                device,
            )),
        };
        let model = Flamingo {
            vision,
            resampler: self.resampler.init(dv, device),
            lm: self.lm.init(device),
            xattn,
            new_tokens: Param::from_tensor(Tensor::zeros([2, self.lm.width], device)),
            every,
            image_token: self.image_token as i64,
            eoc_token: self.eoc_token as i64,
            only_immediate: self.only_attend_immediate_media,
            vision_tokens: self.vision_tokens,
            tied: self.lm.tie_embeddings,
        };
        model.freeze()
    }
}

/// The frozen vision tower: CLIP's ViT or SigLIP's.
// One per model, never in a collection: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum VisionTower<B: Backend> {
    Clip(VisionTransformer<B>),
    Siglip(SiglipVision<B>),
}

impl<B: Backend> VisionTower<B> {
    /// The dtype its weights are held in (bf16 when stage 2 holds it so).
    pub fn dtype(&self) -> DType {
        match self {
            VisionTower::Clip(v) => v.positional_embedding.val().dtype(),
            VisionTower::Siglip(v) => v.position_embedding.val().dtype(),
        }
    }

    /// The patch tokens `[B, P, Dv]` of `images` `[B, 3, H, W]`, before or after the tower's
    /// final norm (CLIP's `ln_post`, SigLIP's `post_layernorm`); never a class token. Run in
    /// the tower's dtype; the tokens come back in f32.
    pub fn patch_tokens(&self, images: Tensor<B, 4>, after_norm: bool) -> Tensor<B, 3> {
        let images = to_dtype(images, self.dtype());
        to_dtype(self.patch_tokens_own_dtype(images, after_norm), DType::F32)
    }

    fn patch_tokens_own_dtype(&self, images: Tensor<B, 4>, after_norm: bool) -> Tensor<B, 3> {
        match self {
            VisionTower::Clip(v) => {
                let mut tokens = v.forward_tokens(images);
                if after_norm {
                    tokens = crate::layers::norm(&v.ln_post, tokens);
                }
                let [_, p1, _] = tokens.dims();
                // The class token and the projection are CLIP's, not Flamingo's.
                tokens.slice(s![.., 1..p1, ..])
            }
            VisionTower::Siglip(v) => match after_norm {
                true => v.forward_tokens(images),
                false => v.forward_tokens_unnormed(images),
            },
        }
    }
}

#[derive(Module, Debug)]
pub struct Flamingo<B: Backend> {
    /// Frozen: patch tokens come from it, never gradients.
    pub vision: VisionTower<B>,
    pub resampler: PerceiverResampler<B>,
    /// Frozen, except through `new_tokens`.
    pub lm: LanguageModel<B>,
    pub xattn: Vec<GatedCrossAttention<B>>,
    /// Trainable embeddings of `<image>` and `<|endofchunk|>`, used instead of the LM's rows
    /// (and, when the LM's head is tied to its embedding, instead of the head's rows too: one
    /// parameter, as in OpenFlamingo; an untied head stays frozen, as there).
    pub new_tokens: Param<Tensor<B, 2>>,
    #[module(skip)]
    pub every: usize,
    #[module(skip)]
    pub image_token: i64,
    #[module(skip)]
    pub eoc_token: i64,
    #[module(skip)]
    pub only_immediate: bool,
    #[module(skip)]
    pub vision_tokens: VisionTokens,
    #[module(skip)]
    pub tied: bool,
}

impl<B: Backend> Flamingo<B> {
    /// Freezes the vision tower and the LM, and restarts the new token rows from the LM's rows
    /// (call again after loading LM weights), so the untrained model is exactly the LM.
    pub fn freeze(self) -> Self {
        let mut m = self.fix_frozen();
        let w = to_dtype(m.lm.wte.weight.val().detach(), DType::F32);
        let [_, d] = w.dims();
        let rows = |id: i64| w.clone().slice(s![id as usize..id as usize + 1, 0..d]);
        let fresh = Tensor::cat(vec![rows(m.image_token), rows(m.eoc_token)], 0);
        m.new_tokens = Param::from_tensor(fresh);
        m
    }

    /// Marks the frozen parts untrainable again (weights loaded from a checkpoint come back
    /// trainable): the vision tower, the LM, a single frame's embedding.
    pub fn fix_frozen(mut self) -> Self {
        self.vision = self.vision.no_grad();
        self.lm = self.lm.no_grad();
        self.resampler = self.resampler.freeze_single_frame();
        self
    }

    /// The vision tower and the LM held (and run) in `dtype` ([`crate::precision`]); the
    /// trained parts stay f32. Call after loading and freezing: the new token rows start from
    /// the LM's rows as loaded.
    pub fn with_frozen_dtype(mut self, dtype: DType) -> Self {
        self.vision = cast_params(self.vision, dtype);
        self.lm = cast_params(self.lm, dtype);
        self.fix_frozen()
    }

    /// Visual tokens `[B, N * latents, Dv]` of `images` `[B, N, 3, H, W]`: each a medium of one
    /// frame ([`Flamingo::encode_media`]).
    pub fn encode_images(&self, images: Tensor<B, 5>) -> Tensor<B, 3> {
        self.encode_media(images.unsqueeze_dim(2), None)
    }

    /// Visual tokens `[B, N * latents, Dv]` of `media` `[B, N, F, 3, H, W]`: N media of F
    /// frames each, medium `i` (row-major over B and N) having `frames[i]` real frames and the
    /// rest padding (`None`: all F real). Every medium gives `latents` tokens, whatever its
    /// frames, so the gated cross-attention sees one medium per `<image>` token.
    pub fn encode_media(&self, media: Tensor<B, 6>, frames: Option<&[usize]>) -> Tensor<B, 3> {
        let [b, n, f, c, h, w] = media.dims();
        let after = self.vision_tokens == VisionTokens::AfterLnPost;
        let tokens = self
            .vision
            .patch_tokens(media.reshape([b * n * f, c, h, w]), after);
        let [_, p, dv] = tokens.dims();
        let visual = self
            .resampler
            .forward_frames(tokens.reshape([b * n, f, p, dv]).detach(), frames);
        let l = visual.dims()[1];
        visual.reshape([b, n * l, dv])
    }

    /// LM embeddings with the trainable rows for `<image>` and `<|endofchunk|>`.
    pub(crate) fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = self.lm.embed_tokens(tokens.clone());
        let [b, t, d] = x.dims();
        let nt = self.new_tokens.val();
        let row = |i: usize| {
            nt.clone()
                .slice(s![i..i + 1, ..])
                .reshape([1, 1, d])
                .expand([b, t, d])
        };
        let is = |id: i64| {
            tokens
                .clone()
                .equal_elem(id)
                .unsqueeze_dim::<3>(2)
                .expand([b, t, d])
        };
        x.mask_where(is(self.image_token), row(0))
            .mask_where(is(self.eoc_token), row(1))
    }

    /// Next-token logits `[B, T, V]` for `tokens` `[B, T]` interleaved with `images`
    /// `[B, N, 3, H, W]` (the k-th `<image>` token of a row is its k-th image; unused image
    /// slots may hold anything).
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, images: Tensor<B, 5>) -> Tensor<B, 3> {
        let n = images.dims()[1];
        self.forward_visual(tokens, self.encode_images(images), n)
    }

    /// As [`Flamingo::forward`] with media of several frames `[B, N, F, 3, H, W]` (`frames`
    /// as in [`Flamingo::encode_media`]).
    pub fn forward_media(
        &self,
        tokens: Tensor<B, 2, Int>,
        media: Tensor<B, 6>,
        frames: Option<&[usize]>,
    ) -> Tensor<B, 3> {
        let n = media.dims()[1];
        self.forward_visual(tokens, self.encode_media(media, frames), n)
    }

    /// As [`Flamingo::forward`], with the visual tokens of the `n` images per row already
    /// encoded (generation reuses them for every new token).
    pub fn forward_visual(
        &self,
        tokens: Tensor<B, 2, Int>,
        visual: Tensor<B, 3>,
        n: usize,
    ) -> Tensor<B, 3> {
        let per_image = visual.dims()[1] / n;
        let (hidden, sees) = media_mask(
            tokens.clone(),
            self.image_token,
            n,
            per_image,
            self.only_immediate,
        );
        let mut x = self.lm.add_positions(self.embed(tokens));
        let mut gated = self.xattn.iter();
        for i in 0..self.lm.blocks.len() {
            if (i + 1) % self.every == 0 {
                let xa = gated.next().expect("one gated block per n-th layer");
                x = xa.forward(x, visual.clone(), hidden.clone(), sees.clone());
            }
            x = self.lm.block(i, x);
        }
        self.head(x)
    }

    /// Logits `[B, T, V]` of the last block's output `x` `[B, T, D]`.
    pub(crate) fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.lm.final_norm(x);
        let logits = self.lm.logits(h.clone());
        if !self.tied {
            return logits;
        }
        // A tied head scores a token with its embedding row: the new rows score the new tokens.
        let [b, _, d] = h.dims();
        let rows = self.new_tokens.val().transpose().unsqueeze::<3>();
        let own = h.matmul(rows.expand([b, d, 2])); // [B, T, 2]
        let col = |id: i64| id as usize..id as usize + 1;
        logits
            .slice_assign(
                s![.., .., col(self.image_token)],
                own.clone().slice(s![.., .., 0..1]),
            )
            .slice_assign(s![.., .., col(self.eoc_token)], own.slice(s![.., .., 1..2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flamingo::lm::LmBlock;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    type B = Flex;

    fn tiny() -> FlamingoConfig {
        let mut c = FlamingoConfig::default();
        (c.vision.image_size, c.vision.patch_size, c.vision.width) = (16, 8, 32);
        (c.vision.layers, c.vision.heads) = (1, 2);
        (c.lm.vocab_size, c.lm.context_length, c.lm.width) = (20, 12, 32);
        (c.lm.layers, c.lm.heads) = (2, 2);
        (
            c.resampler.latents,
            c.resampler.depth,
            c.resampler.heads,
            c.resampler.dim_head,
        ) = (3, 1, 2, 8);
        (c.xattn_heads, c.xattn_dim_head) = (2, 8);
        c
    }

    /// `<sot> a <image> b c <image> d <image> e`: image times 0 0 1 1 1 2 2 3 3.
    fn tokens<Bk: Backend>(dev: &Bk::Device) -> Tensor<Bk, 2, Int> {
        Tensor::from_data(
            TensorData::new(vec![2i64, 7, 4, 8, 9, 4, 10, 4, 11], [1, 9]),
            dev,
        )
    }

    fn floats<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn untrained_flamingo_is_exactly_its_language_model() {
        let dev = Default::default();
        B::seed(&dev, 1);
        let model = tiny().init::<B>(&dev);
        let images =
            Tensor::<B, 5>::random([1, 3, 3, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
        let with = floats(model.forward(tokens(&dev), images));
        let lm_only = floats(model.lm.forward(tokens(&dev)));
        assert_eq!(
            with, lm_only,
            "gates at 0 must leave the LM's output bit-identical"
        );
    }

    fn changed(a: &[f32], b: &[f32], t: usize, d: usize) -> Vec<bool> {
        (0..t)
            .map(|i| (0..d).any(|k| a[i * d + k] != b[i * d + k]))
            .collect()
    }

    #[test]
    fn a_token_sees_only_the_images_its_mask_allows() {
        let dev = Default::default();
        B::seed(&dev, 2);
        let xa = GatedCrossAttention::<B>::new(16, 8, 2, 4, 2, &dev);
        let xa = GatedCrossAttention {
            attn_gate: Param::from_tensor(Tensor::ones([1], &dev)),
            ff_gate: Param::from_tensor(Tensor::ones([1], &dev)),
            ..xa
        };
        let x = Tensor::<B, 3>::random([1, 9, 16], Distribution::Normal(0.0, 1.0), &dev);
        let visual = Tensor::<B, 3>::random([1, 3 * 2, 8], Distribution::Normal(0.0, 1.0), &dev);
        // Image 2 (visual tokens 2..4) perturbed.
        let bump = Tensor::<B, 3>::zeros([1, 2, 8], &dev).add_scalar(1.0);
        let other = visual.clone().slice_assign(s![.., 2..4, ..], bump);
        for (immediate, want) in [
            (
                true,
                [false, false, false, false, false, true, true, false, false],
            ),
            (
                false,
                [false, false, false, false, false, true, true, true, true],
            ),
        ] {
            let (hidden, sees) = media_mask(tokens(&dev), 4, 3, 2, immediate);
            let run =
                |v: Tensor<B, 3>| floats(xa.forward(x.clone(), v, hidden.clone(), sees.clone()));
            let got = changed(&run(visual.clone()), &run(other.clone()), 9, 16);
            assert_eq!(got, want, "immediate = {immediate}");
        }
    }

    /// A tiny model whose resampler takes up to 4 frames, with random time embeddings (they
    /// start at zero in training).
    fn video_model(dev: &Device<B>) -> Flamingo<B> {
        let mut c = tiny();
        c.resampler.max_frames = 4;
        let mut m = c.init::<B>(dev);
        m.resampler.frame_embs =
            Param::from_tensor(Tensor::random([4, 32], Distribution::Normal(0.0, 1.0), dev));
        m
    }

    fn frames(n: usize, dev: &Device<B>) -> Tensor<B, 6> {
        Tensor::random([1, 1, n, 3, 16, 16], Distribution::Normal(0.0, 1.0), dev)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn a_one_frame_video_is_the_image_path_exactly() {
        let dev = Default::default();
        B::seed(&dev, 3);
        let model = video_model(&dev);
        let images =
            Tensor::<B, 5>::random([2, 3, 3, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
        let as_images = floats(model.encode_images(images.clone()));
        let as_videos = floats(model.encode_media(images.unsqueeze_dim(2), Some(&[1; 6])));
        assert_eq!(as_images, as_videos);
    }

    #[test]
    fn frame_order_matters_through_the_time_embeddings_only() {
        let dev = Default::default();
        B::seed(&dev, 4);
        let mut model = video_model(&dev);
        let video = frames(3, &dev);
        let reversed = video.clone().flip([2]);
        let (a, b) = (
            floats(model.encode_media(video.clone(), None)),
            floats(model.encode_media(reversed.clone(), None)),
        );
        assert!(
            max_diff(&a, &b) > 1e-3,
            "reordered frames gave the same tokens"
        );
        // Without time embeddings attention cannot tell the frames' order.
        model.resampler.frame_embs = Param::from_tensor(Tensor::zeros([4, 32], &dev));
        let (a, b) = (
            floats(model.encode_media(video, None)),
            floats(model.encode_media(reversed, None)),
        );
        assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
    }

    #[test]
    fn padded_frames_change_nothing() {
        let dev = Default::default();
        B::seed(&dev, 5);
        let model = video_model(&dev);
        let two = frames(2, &dev);
        let padded = Tensor::cat(vec![two.clone(), frames(2, &dev)], 2); // 2 real, 2 garbage
        let want = floats(model.encode_media(two, None));
        let masked = floats(model.encode_media(padded.clone(), Some(&[2])));
        assert!(
            max_diff(&want, &masked) < 1e-5,
            "{}",
            max_diff(&want, &masked)
        );
        let unmasked = floats(model.encode_media(padded, None));
        assert!(
            max_diff(&want, &unmasked) > 1e-3,
            "the mask must be what hides them"
        );
    }

    #[test]
    fn frozen_parts_get_no_gradient() {
        type A = Autodiff<Flex>;
        let dev = Default::default();
        let model = tiny().init::<A>(&dev);
        let images =
            Tensor::<A, 5>::random([1, 3, 3, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
        let grads = model.forward(tokens(&dev), images).sum().backward();
        assert!(model.lm.wte.weight.val().grad(&grads).is_none());
        assert!(model.lm.lm_head.weight.val().grad(&grads).is_none());
        let LmBlock::Gpt2(block) = &model.lm.blocks[0] else {
            panic!("gpt2 style")
        };
        assert!(block.attn.in_proj.weight.val().grad(&grads).is_none());
        let VisionTower::Clip(vision) = &model.vision else {
            panic!("a CLIP tower")
        };
        assert!(vision.conv1.weight.val().grad(&grads).is_none());
        assert!(model.new_tokens.val().grad(&grads).is_some());
        assert!(model.xattn[0].attn_gate.val().grad(&grads).is_some());
        assert!(model.resampler.latents.val().grad(&grads).is_some());
    }

    /// A Flamingo step on burn's generic ops (what every backend but flex runs) gives the flex
    /// kernels' loss and gradients, from the same weights.
    #[test]
    fn the_generic_path_gives_the_flex_kernels_loss_and_gradients() {
        type A = Autodiff<Flex>;
        let dev = Default::default();
        A::seed(&dev, 5);
        let mut model = tiny().init::<A>(&dev);
        // Open the gates, so that the image path reaches the loss.
        for x in model.xattn.iter_mut() {
            x.attn_gate = Param::from_tensor(Tensor::ones([1], &dev).mul_scalar(0.7));
            x.ff_gate = Param::from_tensor(Tensor::ones([1], &dev).mul_scalar(0.5));
        }
        let images =
            Tensor::<A, 5>::random([1, 3, 3, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
        let step = |m: &Flamingo<A>| {
            let logits = m.forward(tokens(&dev), images.clone());
            let loss = crate::cpu::softmax(logits, 2).log().mean().neg();
            let grads = loss.backward();
            let loss: f32 = loss.into_scalar();
            let g = |p: &Param<Tensor<A, 2>>| -> Vec<f32> {
                p.grad(&grads).unwrap().into_data().to_vec().unwrap()
            };
            let mut all = g(&m.new_tokens);
            all.extend(g(&m.resampler.latents));
            all.extend(g(&m.xattn[1].to_kv.weight));
            all.extend(g(&m.resampler.layers[0].ff_in.weight));
            (loss, all)
        };
        let (loss, grads) = step(&model);
        let (g_loss, g_grads) = crate::cpu::generic_kernels(|| step(&model));
        let rel = |a: &[f32], b: &[f32]| {
            let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
            (num / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
        };
        let (dl, dg) = (((loss - g_loss) / loss).abs(), rel(&g_grads, &grads));
        assert!(dl < 1e-5 && dg < 1e-4, "loss {dl:e}, gradients {dg:e}");
        assert!(
            dl > 0.0 || dg > 0.0,
            "bit-identical: the switch changed nothing"
        );
    }

    /// Frozen towers held in bf16 (stage 2 on a GPU) give the f32 model's logits, loss and
    /// trained gradients to bf16's precision, in every LM style and with either vision tower: every
    /// frozen part runs in bf16, every trained part in f32, and nothing frozen gets a gradient.
    #[test]
    fn bf16_frozen_towers_give_the_f32_logits_loss_and_gradients() {
        use super::super::lm::LmStyle;
        use crate::siglip::SiglipTower;
        type A = Autodiff<Flex>;
        let dev = Default::default();
        let siglip = SiglipConfig {
            image_size: 16,
            patch_size: 8,
            vision: SiglipTower {
                width: 32,
                layers: 1,
                heads: 2,
                hidden: 64,
                eps: 1e-6,
                act: crate::layers::Act::GeluTanh,
            },
            vision_head: false,
            text: None,
        };
        for (style, siglip) in [
            (LmStyle::Gpt2, None),
            (LmStyle::Llama, None),
            (LmStyle::Llama, Some(siglip)),
            (LmStyle::Neox, None),
            (LmStyle::Mpt, None),
        ] {
            A::seed(&dev, 6);
            let mut c = tiny();
            (c.lm.style, c.lm.kv_heads, c.siglip) = (style, 1, siglip);
            if style == LmStyle::Neox {
                (c.lm.kv_heads, c.lm.rotary_pct, c.lm.parallel_residual) = (0, 0.5, true);
            }
            if style == LmStyle::Mpt {
                c.lm.kv_heads = 0;
            }
            let style = (style, c.siglip.is_some());
            let mut model = c.init::<A>(&dev);
            for x in model.xattn.iter_mut() {
                x.attn_gate = Param::from_tensor(Tensor::ones([1], &dev).mul_scalar(0.7));
                x.ff_gate = Param::from_tensor(Tensor::ones([1], &dev).mul_scalar(0.5));
            }
            let images =
                Tensor::<A, 5>::random([1, 3, 3, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
            // Parameters are drawn when first used: use them once before casting a copy.
            let _ = model.forward(tokens(&dev), images.clone());
            let half = model.clone().with_frozen_dtype(DType::BF16);
            // Next-token cross-entropy of the tokens' own continuation.
            let targets = tokens::<A>(&dev).slice(s![.., 1..9]).unsqueeze_dim::<3>(2);
            let step = |m: &Flamingo<A>| {
                let logits = m.forward(tokens(&dev), images.clone());
                assert_eq!(logits.dtype(), DType::F32);
                let out: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
                let logp = burn::tensor::activation::log_softmax(logits.slice(s![.., 0..8, ..]), 2);
                let loss = logp.gather(2, targets.clone()).mean().neg();
                let grads = loss.backward();
                let g = |p: &Param<Tensor<A, 2>>| -> Vec<f32> {
                    p.grad(&grads).unwrap().into_data().to_vec().unwrap()
                };
                let mut all = g(&m.new_tokens);
                all.extend(g(&m.resampler.latents));
                all.extend(g(&m.xattn[0].to_kv.weight));
                all.extend(g(&m.xattn[1].to_q.weight));
                assert!(m.lm.wte.weight.val().grad(&grads).is_none());
                (out, loss.into_scalar().elem::<f32>(), all)
            };
            let (logits, loss, grads) = step(&model);
            let (h_logits, h_loss, h_grads) = step(&half);
            assert_eq!(
                (half.lm.dtype(), half.vision.dtype()),
                (DType::BF16, DType::BF16)
            );
            assert_eq!(half.new_tokens.val().dtype(), DType::F32);
            assert_eq!(half.xattn[0].to_q.weight.val().dtype(), DType::F32);
            assert!(!half.lm.wte.weight.is_require_grad());
            let rel = |a: &[f32], b: &[f32]| {
                let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
                (num / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
            };
            let (dl, dg) = (((loss - h_loss) / loss).abs(), rel(&h_grads, &grads));
            let dz = rel(&h_logits, &logits);
            // Measured: logits 5-7e-3, loss <= 8e-4, gradients 5e-3-1.3e-2; RoPE skipped in
            // bf16 gives 2.8e-2, 2.6e-3 and 4.6e-2.
            assert!(
                dz < 1.2e-2 && dl < 2e-3 && dg < 2.5e-2,
                "{style:?}: logits {dz:e}, loss {dl:e}, gradients {dg:e}"
            );
            assert!(dl > 0.0 && dg > 0.0, "{style:?}: bf16 changed nothing");
        }
    }

    /// `vision_tokens = "after_ln_post"` feeds the resampler the tower's `ln_post` of every
    /// patch token; the default feeds them before it.
    #[test]
    fn the_resampler_reads_the_chosen_vision_tokens() {
        let dev = Default::default();
        let images =
            Tensor::<Flex, 5>::random([1, 2, 3, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
        // Parameters are drawn when first used: use them once before cloning.
        let before = tiny().init::<Flex>(&dev);
        let _ = before.encode_images(images.clone());
        let mut after = before.clone();
        after.vision_tokens = VisionTokens::AfterLnPost;
        let VisionTower::Clip(vision) = &before.vision else {
            panic!("a CLIP tower")
        };
        let tokens = vision.forward_tokens(images.clone().reshape([2, 3, 16, 16]));
        let [_, p1, dv] = tokens.dims();
        let expect = |t: Tensor<Flex, 3>| -> Vec<f32> {
            let patches = t.slice(s![.., 1..p1, ..]).reshape([2, 1, p1 - 1, dv]);
            let v = before.resampler.forward(patches);
            let l = v.dims()[1];
            v.reshape([1, 2 * l, dv]).into_data().to_vec().unwrap()
        };
        let got = |m: &Flamingo<Flex>| -> Vec<f32> {
            m.encode_images(images.clone())
                .into_data()
                .to_vec()
                .unwrap()
        };
        assert_eq!(got(&before), expect(tokens.clone()));
        let normed = crate::layers::norm(&vision.ln_post, tokens);
        assert_eq!(got(&after), expect(normed));
        assert_ne!(got(&before), got(&after));
    }
}
