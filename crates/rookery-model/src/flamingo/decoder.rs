//! What the decoder blocks with split attention (llama, neox, mpt) share: the packed q/k/v
//! split into heads, RoPE on a head's leading dimensions, ALiBi's bias, and the causal
//! attention over a whole sequence ([`decoder_forward`]; the key/value cache,
//! [`super::cache`], runs the same parts one step at a time).

use burn::nn::RotaryEncoding;
use burn::prelude::*;
use burn::tensor::DType;

use crate::cpu::softmax;
use crate::precision::to_dtype;

/// The parts of a decoder block with split attention (llama, neox, mpt) that the whole forward
/// ([`decoder_forward`]) and the key/value cache ([`super::cache`]) share; positions enter
/// through the LM's RoPE, or through the block's ALiBi slopes.
pub(crate) trait DecoderBlock<B: Backend> {
    /// Query, key and value heads `[B, n, T, Dh]` of the block's input `[B, T, D]` (normed,
    /// projected; before RoPE).
    fn qkv_heads(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);
    /// Key or value heads for every query head.
    fn shared(&self, x: Tensor<B, 4>) -> Tensor<B, 4>;
    /// ALiBi's slope of each head, for blocks whose positions enter as a bias on the scores.
    fn alibi(&self) -> Option<Vec<f32>> {
        None
    }
    /// The block's output from its input `x` and the attention's merged heads `y`
    /// `[B, T, H * Dh]` (before the output projection).
    fn finish(&self, x: Tensor<B, 3>, y: Tensor<B, 3>) -> Tensor<B, 3>;
}

/// A packed query/key/value projection `[B, T, (h + 2 kv) * Dh]` as query heads `[B, h, T, Dh]`
/// and key and value heads `[B, kv, T, Dh]`: the query heads first, then the keys, then the
/// values (how rookery packs every style's projection).
pub(crate) fn split_qkv<B: Backend>(
    qkv: Tensor<B, 3>,
    h: usize,
    kv: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, t, width] = qkv.dims();
    let hd = width / (h + 2 * kv);
    let heads = |from: usize, n: usize| {
        qkv.clone()
            .slice(s![.., .., from * hd..(from + n) * hd])
            .reshape([b, t, n, hd])
            .swap_dims(1, 2)
    };
    (heads(0, h), heads(h, kv), heads(h + kv, kv))
}

/// `f` (RoPE) on the leading `r` dimensions of each head of `x` `[B, H, T, Dh]`, the rest
/// passed through. RoPE's table is f32 (a constant, not a parameter): it rotates in f32, as HF
/// computes its cos/sin in f32, and the result goes on in `x`'s dtype.
pub(crate) fn rotate_part<B: Backend>(
    x: Tensor<B, 4>,
    r: usize,
    f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let (dt, d) = (x.dtype(), x.dims()[3]);
    let rotate = |t: Tensor<B, 4>| to_dtype(f(to_dtype(t, DType::F32)), dt);
    if r == d {
        return rotate(x);
    }
    let head = rotate(x.clone().slice(s![.., .., .., 0..r]));
    Tensor::cat(vec![head, x.slice(s![.., .., .., r..d])], 3)
}

/// ALiBi's bias `slope_h * (key - query)` `[R, H, t, C]` for queries at positions `queries`
/// `[R, t]` over keys at positions `0..keys`, in `dtype`.
pub(crate) fn alibi_bias<B: Backend>(
    slopes: &[f32],
    queries: Tensor<B, 2, Int>,
    keys: usize,
    dtype: DType,
) -> Tensor<B, 4> {
    let device = queries.device();
    let [r, t] = queries.dims();
    let k = Tensor::<B, 1, Int>::arange(0..keys as i64, &device)
        .float()
        .reshape([1, 1, 1, keys]);
    let q = queries.float().reshape([r, 1, t, 1]);
    let s = Tensor::<B, 1>::from_floats(slopes, &device).reshape([1, slopes.len(), 1, 1]);
    to_dtype((k - q) * s, dtype)
}

/// A decoder block over the whole causal sequence `x` `[B, T, D]`, rotating queries and keys
/// by `rope` where the LM has one.
pub(crate) fn decoder_forward<B: Backend>(
    block: &impl DecoderBlock<B>,
    x: Tensor<B, 3>,
    rope: Option<&RotaryEncoding<B>>,
) -> Tensor<B, 3> {
    let [b, t, _] = x.dims();
    let (q, k, v) = block.qkv_heads(x.clone());
    let [_, h, _, hd] = q.dims();
    let rotate = |y: Tensor<B, 4>| match rope {
        Some(rope) => rotate_part(y, rope.freq_complex.dims()[1], |z| rope.forward(z)),
        None => y,
    };
    let (q, k, v) = (rotate(q), block.shared(rotate(k)), block.shared(v));
    let mut scores = q.matmul(k.swap_dims(2, 3)) / (hd as f32).sqrt();
    if let Some(slopes) = block.alibi() {
        let pos = Tensor::<B, 1, Int>::arange(0..t as i64, &x.device()).reshape([1, t]);
        scores = scores + alibi_bias(&slopes, pos, t, x.dtype()).expand([b, h, t, t]);
    }
    let causal = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &x.device())
        .unsqueeze::<4>()
        .expand([b, h, t, t]);
    let y = softmax(scores.mask_fill(causal, f32::NEG_INFINITY), 3).matmul(v);
    block.finish(x, y.swap_dims(1, 2).reshape([b, t, h * hd]))
}
