//! Generation with a key/value cache, as transformers' `generate` runs with `past_key_values`:
//! the prompt goes through the LM once (the prefill), each later step feeds only the newest
//! token of every row, whose queries attend to the keys and values the cache holds for the
//! row's earlier positions. Rows keep their own lengths (right padding): a row's new token sits
//! at its own position, so positions (GPT-2's table, RoPE's rotation) and the key mask are per
//! row; a padded slot's keys are masked until the row's own token overwrites them.
//!
//! What a token sees through the gated cross-attention depends only on the `<image>` tokens up
//! to it, so the media mask of the new tokens comes from each row's tokens so far. The output
//! equals [`Flamingo::forward_visual`]'s at those positions (up to float rounding: the
//! attention sums run over the cache's capacity instead of the row's length).

use burn::prelude::*;

use super::decoder::{alibi_bias, rotate_part, DecoderBlock};
use super::lm::{LanguageModel, LmBlock};
use super::model::Flamingo;
use crate::cpu::softmax;
use crate::layers::{linear_3d, norm, ResidualAttentionBlock};
use crate::precision::to_dtype;

/// The keys and values of every LM layer for every row's positions so far.
pub struct KvCache<B: Backend> {
    /// Per layer: keys and values `[R, kv_heads, capacity, head_dim]` (after the prefill).
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    capacity: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `lm`, holding up to its context length of positions.
    pub fn new(lm: &LanguageModel<B>) -> Self {
        KvCache {
            layers: vec![None; lm.blocks.len()],
            capacity: lm.context_length,
        }
    }
}

/// Where `t` new tokens of each row go: positions `start[r]..start[r] + t`.
struct Place<B: Backend> {
    start: Vec<usize>,
    t: usize,
    /// Position ids `[R, t]`.
    ids: Tensor<B, 2, Int>,
    /// `[R, 1, t, capacity]`: true where a query must not see a key (later than itself).
    later: Tensor<B, 4, Bool>,
    /// `[R, 1, capacity, 1]`: each row's own slot, for a one-token step (every layer writes
    /// its keys and values there).
    slot: Tensor<B, 4, Bool>,
}

impl<B: Backend> Place<B> {
    fn new(start: &[usize], t: usize, capacity: usize, device: &B::Device) -> Self {
        let r = start.len();
        assert!(
            start.iter().all(|&s| s + t <= capacity),
            "positions {start:?} + {t} beyond the cache's {capacity}"
        );
        let ids: Vec<i64> = start
            .iter()
            .flat_map(|&s| (s..s + t).map(|p| p as i64))
            .collect();
        let later: Vec<bool> = start
            .iter()
            .flat_map(|&s| (s..s + t).flat_map(move |q| (0..capacity).map(move |k| k > q)))
            .collect();
        let slot: Vec<bool> = start
            .iter()
            .flat_map(|&s| (0..capacity).map(move |k| k == s))
            .collect();
        Place {
            start: start.to_vec(),
            t,
            ids: Tensor::from_data(TensorData::new(ids, [r, t]), device),
            later: Tensor::from_data(TensorData::new(later, [r, 1, t, capacity]), device),
            slot: Tensor::from_data(TensorData::new(slot, [r, 1, capacity, 1]), device),
        }
    }

    /// `cache` `[R, H, C, Dh]` with `new` `[R, H, t, Dh]` written at the rows' positions: a
    /// prefill (every row from 0) writes a slice, a one-token step each row's own slot.
    fn write(&self, cache: Option<Tensor<B, 4>>, new: Tensor<B, 4>, c: usize) -> Tensor<B, 4> {
        let [r, h, t, dh] = new.dims();
        let Some(cache) = cache else {
            assert!(
                self.start.iter().all(|&s| s == 0),
                "the first call fills the cache from position 0"
            );
            let empty = Tensor::zeros([r, h, c, dh], (&new.device(), new.dtype()));
            return empty.slice_assign(s![.., .., 0..t, ..], new);
        };
        assert_eq!(t, 1, "after the prefill, one token per row and call");
        let slot = self.slot.clone().expand([r, h, c, dh]);
        cache.mask_where(slot, new.expand([r, h, c, dh]))
    }

    /// Attention of `q` `[R, H, t, Dh]` over the cached keys and values `[R, H, C, Dh]`, with
    /// `bias` `[R, H, t, C]` on the scores where the block has one (ALiBi).
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let [r, h, t, dh] = q.dims();
        let c = k.dims()[2];
        let mut scores = q.matmul(k.swap_dims(2, 3)) / (dh as f32).sqrt();
        if let Some(bias) = bias {
            scores = scores + bias;
        }
        let hidden = self.later.clone().expand([r, h, t, c]);
        softmax(scores.mask_fill(hidden, f32::NEG_INFINITY), 3).matmul(v)
    }
}

/// RoPE at each row's own positions (`ids` `[R, t]`) of `x` `[R, H, t, Dh]`: burn's rotation
/// (adjacent pairs, its frequency table) with the table's rows picked per row.
fn rope_at<B: Backend>(
    rope: &burn::nn::RotaryEncoding<B>,
    x: Tensor<B, 4>,
    ids: Tensor<B, 2, Int>,
) -> Tensor<B, 4> {
    let [r, h, t, d] = x.dims();
    let device = x.device();
    let freq = rope
        .freq_complex
        .clone()
        .select(0, ids.reshape([r * t]))
        .reshape([r, 1, t, d, 2]);
    let sign = Tensor::<B, 2>::from_floats([[1.0, 0.0, 0.0, 1.0], [0.0, -1.0, 1.0, 0.0]], &device);
    let pairs = x.reshape([r, h, t, d / 2, 2]).matmul(sign.unsqueeze::<5>());
    (pairs.reshape([r, h, t, d, 2]) * freq)
        .sum_dim(4)
        .reshape([r, h, t, d])
}

impl<B: Backend> LanguageModel<B> {
    /// Next-token logits `[R, t, V]` of `tokens` `[R, t]` at positions `start[r]..start[r] + t`
    /// of each row: the first call (every `start` 0) fills `cache`, each later one takes one
    /// token per row and extends it.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        start: &[usize],
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let place = Place::new(start, tokens.dims()[1], cache.capacity, &tokens.device());
        let mut x = self.add_positions_at(self.embed_tokens(tokens), &place);
        for i in 0..self.blocks.len() {
            x = self.block_cached(i, x, &place, cache);
        }
        self.head(x)
    }

    /// GPT-2's learned positions of the new tokens (llama's enter through RoPE).
    fn add_positions_at(&self, x: Tensor<B, 3>, place: &Place<B>) -> Tensor<B, 3> {
        let Some(wpe) = &self.wpe else { return x };
        let dt = x.dtype();
        x + to_dtype(wpe.forward(place.ids.clone()), dt)
    }

    /// Block `i` on the new tokens `x` `[R, t, D]` at `place`, reading and extending `cache`.
    fn block_cached(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        place: &Place<B>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let (c, slot) = (cache.capacity, &mut cache.layers[i]);
        let rope = || self.rope.as_ref().expect("a rotary style has rope");
        self.in_own_dtype(x, |x| match &self.blocks[i] {
            LmBlock::Gpt2(b) => gpt2_cached(b, x, place, slot, c),
            LmBlock::Llama(b) => decoder_cached(b, x, Some(rope()), place, slot, c),
            LmBlock::Neox(b) => decoder_cached(b, x, Some(rope()), place, slot, c),
            LmBlock::Mpt(b) => decoder_cached(b, x, None, place, slot, c),
        })
    }
}

type Slot<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// [`Place::write`] of both keys and values into `slot`; the whole cached keys and values.
fn extend<B: Backend>(
    place: &Place<B>,
    slot: &mut Slot<B>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    c: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (ck, cv) = match slot.take() {
        Some((ck, cv)) => (Some(ck), Some(cv)),
        None => (None, None),
    };
    let (k, v) = (place.write(ck, k, c), place.write(cv, v, c));
    *slot = Some((k.clone(), v.clone()));
    (k, v)
}

fn gpt2_cached<B: Backend>(
    b: &ResidualAttentionBlock<B>,
    x: Tensor<B, 3>,
    place: &Place<B>,
    slot: &mut Slot<B>,
    c: usize,
) -> Tensor<B, 3> {
    let [r, t, d] = x.dims();
    let h = b.attn.n_heads;
    let qkv = linear_3d(&b.attn.in_proj, norm(&b.ln_1, x.clone()))
        .reshape([r, t, 3, h, d / h])
        .permute([2, 0, 3, 1, 4]); // [3, R, H, t, Dh]
    let part = |i: usize| qkv.clone().slice(s![i..i + 1]).squeeze_dim::<4>(0);
    let (k, v) = extend(place, slot, part(1), part(2), c);
    let y = place
        .attend(part(0), k, v, None)
        .swap_dims(1, 2)
        .reshape([r, t, d]);
    b.mlp_residual(x + linear_3d(&b.attn.out_proj, y))
}

fn decoder_cached<B: Backend>(
    b: &impl DecoderBlock<B>,
    x: Tensor<B, 3>,
    rope: Option<&burn::nn::RotaryEncoding<B>>,
    place: &Place<B>,
    slot: &mut Slot<B>,
    c: usize,
) -> Tensor<B, 3> {
    let [r, t, _] = x.dims();
    let (q, k, v) = b.qkv_heads(x.clone());
    let [_, h, _, hd] = q.dims();
    // As the uncached block: the rotated dimensions only, in f32; ALiBi at the rows' own
    // positions over the cache's slots.
    let rotate = |y: Tensor<B, 4>| match rope {
        Some(rope) => {
            let rd = rope.freq_complex.dims()[1];
            rotate_part(y, rd, |z| rope_at(rope, z, place.ids.clone()))
        }
        None => y,
    };
    let bias = b
        .alibi()
        .map(|s| alibi_bias(&s, place.ids.clone(), c, x.dtype()));
    let (k, v) = extend(place, slot, rotate(k), v, c);
    let y = place.attend(rotate(q), b.shared(k), b.shared(v), bias);
    b.finish(x, y.swap_dims(1, 2).reshape([r, t, h * hd]))
}

/// The media mask of the new tokens (as [`super::xattn::media_mask`] gives it for the whole
/// rows): `rows[r]` holds row r's tokens so far (positions past its end count as padding).
#[allow(clippy::too_many_arguments)]
fn media_mask_at<B: Backend>(
    rows: &[Vec<i64>],
    place: &Place<B>,
    image_token: i64,
    n: usize,
    per_image: usize,
    only_immediate: bool,
    device: &B::Device,
) -> (Tensor<B, 3, Bool>, Tensor<B, 3>) {
    let (r, t, m) = (rows.len(), place.t, n * per_image);
    let mut hidden = Vec::with_capacity(r * t * m);
    let mut sees = Vec::with_capacity(r * t);
    for (row, &s) in rows.iter().zip(&place.start) {
        for p in s..s + t {
            let upto = &row[..(p + 1).min(row.len())];
            let time = upto.iter().filter(|&&id| id == image_token).count();
            sees.push(if time > 0 { 1.0f32 } else { 0.0 });
            hidden.extend((0..m).map(|j| {
                let image = j / per_image + 1;
                !(image == time || (!only_immediate && image <= time))
            }));
        }
    }
    (
        Tensor::from_data(TensorData::new(hidden, [r, t, m]), device),
        Tensor::from_data(TensorData::new(sees, [r, t, 1]), device),
    )
}

impl<B: Backend> Flamingo<B> {
    /// Next-token logits `[R, t, V]` of `tokens` `[R, t]`, row r's at positions
    /// `start[r]..start[r] + t`, with the `n` media of each row already encoded (`visual`, as
    /// [`Flamingo::forward_visual`] takes them); `rows[r]` is row r's tokens so far, these
    /// included. The first call (every `start` 0) fills `cache`; each later one takes one
    /// token per row and extends it.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        rows: &[Vec<i64>],
        start: &[usize],
        visual: Tensor<B, 3>,
        n: usize,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let device = tokens.device();
        let t = tokens.dims()[1];
        let place = Place::new(start, t, cache.capacity, &device);
        let per_image = visual.dims()[1] / n;
        let (hidden, sees) = media_mask_at(
            rows,
            &place,
            self.image_token,
            n,
            per_image,
            self.only_immediate,
            &device,
        );
        let mut x = self.lm.add_positions_at(self.embed(tokens), &place);
        let mut gated = self.xattn.iter();
        for i in 0..self.lm.blocks.len() {
            if (i + 1) % self.every == 0 {
                let xa = gated.next().expect("one gated block per n-th layer");
                x = xa.forward(x, visual.clone(), hidden.clone(), sees.clone());
            }
            x = self.lm.block_cached(i, x, &place, cache);
        }
        self.head(x)
    }
}

#[cfg(test)]
mod tests {
    use super::super::lm::LmStyle;
    use super::super::model::FlamingoConfig;
    use super::*;
    use burn::backend::Flex;
    use burn::module::Param;
    use burn::tensor::{DType, Distribution};

    type B = Flex;

    fn model(style: LmStyle, immediate: bool) -> Flamingo<B> {
        let mut c = FlamingoConfig::default();
        (c.vision.image_size, c.vision.patch_size, c.vision.width) = (16, 8, 32);
        (c.vision.layers, c.vision.heads) = (1, 2);
        (c.lm.vocab_size, c.lm.context_length, c.lm.width) = (20, 16, 32);
        (c.lm.layers, c.lm.heads, c.lm.style) = (2, 4, style);
        c.lm.kv_heads = 2;
        if style == LmStyle::Mpt {
            c.lm.kv_heads = 0;
        }
        if style == LmStyle::Neox {
            // Pythia's layout: a quarter of each head rotated, attention and MLP side by side.
            (c.lm.kv_heads, c.lm.rotary_pct, c.lm.parallel_residual) = (0, 0.25, true);
        }
        (c.resampler.latents, c.resampler.depth) = (3, 1);
        (c.resampler.heads, c.resampler.dim_head) = (2, 8);
        (c.xattn_heads, c.xattn_dim_head) = (2, 8);
        c.only_attend_immediate_media = immediate;
        let dev = Default::default();
        B::seed(&dev, 8);
        let mut m = c.init::<B>(&dev);
        for x in m.xattn.iter_mut() {
            x.attn_gate = Param::from_tensor(Tensor::ones([1], &dev) * 0.7);
            x.ff_gate = Param::from_tensor(Tensor::ones([1], &dev) * 0.5);
        }
        m
    }

    fn last_logits(m: &Flamingo<B>, rows: &[Vec<i64>], visual: &Tensor<B, 3>) -> Vec<Vec<f32>> {
        let len = rows.iter().map(Vec::len).max().unwrap();
        let flat: Vec<i64> = rows
            .iter()
            .flat_map(|r| r.iter().copied().chain(std::iter::repeat(0)).take(len))
            .collect();
        let tokens = Tensor::from_data(
            TensorData::new(flat, [rows.len(), len]),
            &Default::default(),
        );
        let logits = m.forward_visual(tokens, visual.clone(), 2);
        let v = logits.dims()[2];
        let all: Vec<f32> = logits.into_data().to_vec().unwrap();
        rows.iter()
            .enumerate()
            .map(|(r, row)| all[(r * len + row.len() - 1) * v..][..v].to_vec())
            .collect()
    }

    /// Prefill then one token at a time, rows of different lengths, every LM style, both media
    /// masks, f32 and bf16 frozen towers: every step's logits equal the uncached model's on
    /// the whole rows.
    #[test]
    fn cached_steps_give_the_whole_forward_logits() {
        let dev = Default::default();
        for (style, immediate, dtype) in [
            (LmStyle::Gpt2, true, DType::F32),
            (LmStyle::Llama, true, DType::F32),
            (LmStyle::Llama, false, DType::F32),
            (LmStyle::Llama, true, DType::BF16),
            (LmStyle::Neox, true, DType::F32),
            (LmStyle::Neox, false, DType::BF16),
            (LmStyle::Mpt, true, DType::F32),
            (LmStyle::Mpt, false, DType::BF16),
        ] {
            let m = model(style, immediate).with_frozen_dtype(dtype);
            // The two paths sum in other orders: bf16 rounds each differently.
            let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
            let images =
                Tensor::<B, 5>::random([2, 2, 3, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
            let visual = m.encode_images(images);
            // <image> is 4: row 0 sees its second image from the fourth step on.
            let mut rows = vec![vec![2i64, 4, 7, 8, 9], vec![2, 7, 4, 9]];
            let steps = [[11i64, 12], [4, 13], [14, 4], [15, 16]];
            let mut cache = KvCache::new(&m.lm);
            let len = 5;
            let flat: Vec<i64> = rows
                .iter()
                .flat_map(|r| r.iter().copied().chain(std::iter::repeat(0)).take(len))
                .collect();
            let tokens = Tensor::from_data(TensorData::new(flat, [2, len]), &dev);
            let logits = m.forward_cached(tokens, &rows, &[0, 0], visual.clone(), 2, &mut cache);
            let mut got: Vec<Vec<f32>> = {
                let all: Vec<f32> = logits.into_data().to_vec().unwrap();
                rows.iter()
                    .enumerate()
                    .map(|(r, row)| all[(r * len + row.len() - 1) * 20..][..20].to_vec())
                    .collect()
            };
            let check = |got: &[Vec<f32>], rows: &[Vec<i64>], i: usize| {
                let want = last_logits(&m, rows, &visual);
                let worst = got
                    .iter()
                    .flatten()
                    .zip(want.iter().flatten())
                    .fold(0f32, |w, (a, b)| w.max((a - b).abs()));
                assert!(
                    worst < tol,
                    "{style:?} {immediate} {dtype:?}: step {i}: {worst}"
                );
            };
            for (i, step) in steps.iter().enumerate() {
                check(&got, &rows, i);
                let start: Vec<usize> = rows.iter().map(Vec::len).collect();
                for (row, &tok) in rows.iter_mut().zip(step) {
                    row.push(tok);
                }
                let tokens = Tensor::from_data(TensorData::new(step.to_vec(), [2, 1]), &dev);
                let logits = m.forward_cached(tokens, &rows, &start, visual.clone(), 2, &mut cache);
                let all: Vec<f32> = logits.into_data().to_vec().unwrap();
                got = all.chunks(20).map(<[f32]>::to_vec).collect();
            }
            check(&got, &rows, steps.len());
        }
    }
}
