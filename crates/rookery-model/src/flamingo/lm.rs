//! A decoder-only language model in one of four styles:
//! - `gpt2`: token + learned position embeddings, pre-norm causal blocks with LayerNorm and a
//!   GELU MLP (the same blocks as CLIP's towers);
//! - `llama`: no position embeddings but rotary ones (RoPE) on queries and keys, RMSNorm, and a
//!   SwiGLU feed-forward `down(silu(gate(x)) * up(x))`, all without biases;
//! - `neox` (GPT-NeoX: Pythia, RedPajama-INCITE): RoPE on a share of each head, LayerNorm,
//!   a GELU MLP, biases everywhere, and attention and MLP side by side on the same input
//!   (`x + attn(ln_1(x)) + mlp(ln_2(x))`) or one after the other ([`super::neox`]);
//! - `mpt` (MosaicML's MPT): no positions but ALiBi's per-head bias on the attention scores,
//!   LayerNorm without bias, a GELU MLP, no biases ([`super::mpt`]).
//!
//! then a final norm and an LM head. Flamingo freezes it and slips gated cross-attention
//! between its blocks, so the pieces are public.

use burn::nn::{
    Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig, RmsNorm,
    RmsNormConfig, RotaryEncoding, RotaryEncodingConfig,
};
use burn::prelude::*;
use burn::tensor::activation::silu;

use crate::cpu::softmax;
use crate::precision::to_dtype;
use burn::tensor::DType;
use serde::{Deserialize, Serialize};

use super::mpt::MptBlock;
use super::neox::NeoxBlock;
use crate::layers::{linear_3d, Act, ResidualAttentionBlock, Transformer};

/// The layout of a causal LM (`lm.style`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LmStyle {
    /// GPT-2: learned positions, LayerNorm, GELU MLP, fused q/k/v.
    Gpt2,
    /// Llama (and Mistral, Qwen2, SmolLM, TinyLlama): RoPE, RMSNorm, SwiGLU, grouped-query
    /// attention.
    Llama,
    /// GPT-NeoX (Pythia, RedPajama-INCITE): partial RoPE, LayerNorm, GELU MLP, biases,
    /// parallel residual.
    Neox,
    /// MPT (MPT-7B, MPT-1B): ALiBi, LayerNorm without bias, GELU MLP, no biases.
    Mpt,
}

impl LmStyle {
    /// Whether positions enter through RoPE (llama, neox).
    pub fn rotary(self) -> bool {
        matches!(self, LmStyle::Llama | LmStyle::Neox)
    }
}

/// `[lm]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmConfig {
    /// 0: taken from the tokenizer.
    pub vocab_size: usize,
    pub context_length: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    /// "gpt2", "llama", "neox" or "mpt".
    pub style: LmStyle,
    /// llama: key/value heads (grouped-query attention; 0: `heads`).
    pub kv_heads: usize,
    /// llama: width of a head (0: `width / heads`).
    pub head_dim: usize,
    /// The feed-forward's hidden width (0: `width * mlp_ratio`); imported models state it.
    pub hidden: usize,
    /// llama, neox: RoPE's base.
    pub rope_theta: f64,
    /// llama: Llama 3's RoPE frequency scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// llama, neox: the share of each head's width RoPE rotates (its leading dimensions; HF
    /// `rotary_pct` / `partial_rotary_factor`: Pythia 0.25).
    pub rotary_pct: f64,
    /// neox: attention and MLP both read the block's input and add to it (HF
    /// `use_parallel_residual`), instead of the MLP reading the attention's output.
    pub parallel_residual: bool,
    /// mpt: ALiBi's largest slope exponent (MPT's `alibi_bias_max`, 8).
    pub alibi_bias_max: f64,
    /// llama: RMSNorm's epsilon; neox, mpt: LayerNorm's.
    pub norm_eps: f64,
    /// llama: biases on the query, key and value projections (Qwen2).
    pub qkv_bias: bool,
    /// gpt2: the MLP's activation (GPT-2 itself: `"gelutanh"`).
    pub act: Act,
    /// The LM head is the token embedding (HF `tie_word_embeddings`): a Flamingo's trained
    /// rows for its new tokens then also score those tokens.
    pub tie_embeddings: bool,
}

/// Llama 3's RoPE scaling (`rope_type = "llama3"`): wavelengths longer than
/// `original_context / low_freq_factor` slowed by `factor`, shorter than
/// `original_context / high_freq_factor` kept, a smooth blend between.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_context: f64,
}

impl RopeScaling {
    /// The scaled inverse frequency of one rotary pair.
    pub fn scale(&self, inv_freq: f64) -> f64 {
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        let (low, high) = (
            self.original_context / self.low_freq_factor,
            self.original_context / self.high_freq_factor,
        );
        if wavelen < high {
            inv_freq
        } else if wavelen > low {
            inv_freq / self.factor
        } else {
            let s = (self.original_context / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - s) * inv_freq / self.factor + s * inv_freq
        }
    }
}

impl Default for LmConfig {
    fn default() -> Self {
        LmConfig {
            vocab_size: 0,
            context_length: 128,
            width: 128,
            layers: 4,
            heads: 4,
            mlp_ratio: 4.0,
            style: LmStyle::Gpt2,
            kv_heads: 0,
            head_dim: 0,
            hidden: 0,
            rope_theta: 10000.0,
            rope_scaling: None,
            rotary_pct: 1.0,
            parallel_residual: false,
            alibi_bias_max: 8.0,
            norm_eps: 1e-5,
            qkv_bias: false,
            act: Act::Gelu,
            tie_embeddings: false,
        }
    }
}

impl LmConfig {
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (self.width == 0, "`lm.width` must be > 0"),
            (
                self.heads == 0 || !self.width.is_multiple_of(self.heads),
                "`lm.heads` must divide lm.width",
            ),
            (self.layers == 0, "`lm.layers` must be > 0"),
            (
                self.kv_heads > 0 && !self.heads.is_multiple_of(self.kv_heads),
                "`lm.kv_heads` must divide lm.heads",
            ),
            (
                matches!(self.style, LmStyle::Neox | LmStyle::Mpt) && self.kv() != self.heads,
                "`lm.kv_heads`: neox and mpt LMs have as many key/value heads as query heads",
            ),
            (
                !(self.alibi_bias_max.is_finite() && self.alibi_bias_max > 0.0),
                "`lm.alibi_bias_max` must be a number > 0",
            ),
            (
                !(self.rotary_pct > 0.0 && self.rotary_pct <= 1.0),
                "`lm.rotary_pct` must be in (0, 1]",
            ),
            (
                self.style.rotary()
                    && (self.rotary_dim() == 0 || !self.rotary_dim().is_multiple_of(2)),
                "`lm.head_dim * lm.rotary_pct` must be even and > 0 (RoPE rotates pairs)",
            ),
            (
                !(self.rope_theta.is_finite() && self.rope_theta > 0.0),
                "`lm.rope_theta` must be a number > 0",
            ),
            (self.context_length < 2, "`lm.context_length` must be >= 2"),
            (
                !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0),
                "`lm.mlp_ratio` must be a number > 0",
            ),
        ];
        match checks.iter().find(|c| c.0) {
            Some((_, why)) => Err(why.to_string()),
            None => Ok(()),
        }
    }

    /// Key/value heads.
    pub fn kv(&self) -> usize {
        if self.kv_heads == 0 {
            self.heads
        } else {
            self.kv_heads
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        match self.head_dim {
            0 => self.width / self.heads.max(1),
            d => d,
        }
    }

    /// The feed-forward's hidden width.
    pub fn hidden(&self) -> usize {
        match self.hidden {
            0 => (self.width as f64 * self.mlp_ratio) as usize,
            h => h,
        }
    }

    /// How many leading dimensions of a head RoPE rotates (HF: `int(head_dim * rotary_pct)`).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.rotary_pct) as usize
    }

    fn rope<B: Backend>(&self, device: &B::Device) -> RotaryEncoding<B> {
        let cfg = RotaryEncodingConfig::new(self.context_length, self.rotary_dim())
            .with_theta(self.rope_theta as f32);
        match &self.rope_scaling {
            None => cfg.init(device),
            Some(s) => cfg.init_with_frequency_scaling(
                |f: Tensor<B, 1>| {
                    let dev = f.device();
                    let v: Vec<f32> = f.into_data().convert::<f32>().to_vec().expect("f32");
                    let scaled: Vec<f32> = v.iter().map(|&x| s.scale(x as f64) as f32).collect();
                    Tensor::from_floats(scaled.as_slice(), &dev)
                },
                device,
            ),
        }
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> LanguageModel<B> {
        let (w, rotary) = (self.width, self.style.rotary());
        let blocks = match self.style {
            LmStyle::Llama => (0..self.layers)
                .map(|_| LmBlock::Llama(self.llama_block(device)))
                .collect(),
            LmStyle::Neox => (0..self.layers)
                .map(|_| LmBlock::Neox(NeoxBlock::new(self, device)))
                .collect(),
            LmStyle::Mpt => (0..self.layers)
                .map(|_| LmBlock::Mpt(MptBlock::new(self, device)))
                .collect(),
            LmStyle::Gpt2 => {
                Transformer::new(w, self.layers, self.heads, self.mlp_ratio, self.act, device)
                    .resblocks
                    .into_iter()
                    .map(LmBlock::Gpt2)
                    .collect()
            }
        };
        let eps = self.norm_eps;
        let learned = self.style == LmStyle::Gpt2;
        LanguageModel {
            wte: EmbeddingConfig::new(self.vocab_size, w).init(device),
            wpe: learned.then(|| EmbeddingConfig::new(self.context_length, w).init(device)),
            blocks,
            norm_f: match self.style {
                LmStyle::Llama => LmNorm::Rms(RmsNormConfig::new(w).with_epsilon(eps).init(device)),
                LmStyle::Neox => {
                    LmNorm::Layer(LayerNormConfig::new(w).with_epsilon(eps).init(device))
                }
                LmStyle::Mpt => LmNorm::Layer(
                    LayerNormConfig::new(w)
                        .with_epsilon(eps)
                        .with_bias(false)
                        .init(device),
                ),
                LmStyle::Gpt2 => LmNorm::Layer(LayerNormConfig::new(w).init(device)),
            },
            lm_head: LinearConfig::new(w, self.vocab_size)
                .with_bias(false)
                .init(device),
            rope: rotary.then(|| self.rope(device)),
            context_length: self.context_length,
        }
    }

    fn llama_block<B: Backend>(&self, device: &B::Device) -> LlamaBlock<B> {
        let (w, hidden, hd) = (self.width, self.hidden(), self.head_dim());
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let rms = || {
            RmsNormConfig::new(w)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        LlamaBlock {
            attn_norm: rms(),
            qkv: LinearConfig::new(w, (self.heads + 2 * self.kv()) * hd)
                .with_bias(self.qkv_bias)
                .init(device),
            out: lin(self.heads * hd, w),
            ffn_norm: rms(),
            gate: lin(w, hidden),
            up: lin(w, hidden),
            down: lin(hidden, w),
            heads: self.heads,
            kv_heads: self.kv(),
        }
    }
}

/// A Llama decoder block: `x + attn(rms(x))` with RoPE, then `x + swiglu(rms(x))`.
#[derive(Module, Debug)]
pub struct LlamaBlock<B: Backend> {
    pub attn_norm: RmsNorm<B>,
    pub qkv: Linear<B>,
    pub out: Linear<B>,
    pub ffn_norm: RmsNorm<B>,
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
    pub heads: usize,
    /// Key/value heads; each serves `heads / kv_heads` query heads (grouped-query attention).
    pub kv_heads: usize,
}

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
fn decoder_forward<B: Backend>(
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

impl<B: Backend> DecoderBlock<B> for LlamaBlock<B> {
    fn qkv_heads(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        LlamaBlock::qkv_heads(self, x)
    }
    fn shared(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        LlamaBlock::shared(self, x)
    }
    fn finish(&self, x: Tensor<B, 3>, y: Tensor<B, 3>) -> Tensor<B, 3> {
        self.ffn_residual(x + linear_3d(&self.out, y))
    }
}

impl<B: Backend> LlamaBlock<B> {
    /// The packed projection of `rms(x)` (`x` `[B, T, D]`) as query, key and value heads
    /// ([`split_qkv`]).
    pub(crate) fn qkv_heads(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let qkv = linear_3d(&self.qkv, self.attn_norm.forward(x));
        split_qkv(qkv, self.heads, self.kv_heads)
    }

    /// Key or value heads `[B, kv, T, Dh]` for every query head `[B, h, T, Dh]`: each serves
    /// the `h / kv` query heads after it (HF's `repeat_kv`).
    pub(crate) fn shared(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, kv, t, hd] = x.dims();
        let h = self.heads;
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv, h / kv, t, hd])
            .reshape([b, h, t, hd])
    }

    /// `x + swiglu(rms(x))`, the block's second half.
    pub fn ffn_residual(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let n = self.ffn_norm.forward(x.clone());
        let g = silu(linear_3d(&self.gate, n.clone())) * linear_3d(&self.up, n);
        x + linear_3d(&self.down, g)
    }
}

/// One decoder block of any style.
#[derive(Module, Debug)]
pub enum LmBlock<B: Backend> {
    Gpt2(ResidualAttentionBlock<B>),
    Llama(LlamaBlock<B>),
    Neox(NeoxBlock<B>),
    Mpt(MptBlock<B>),
}

#[derive(Module, Debug)]
pub enum LmNorm<B: Backend> {
    Layer(LayerNorm<B>),
    Rms(RmsNorm<B>),
}

#[derive(Module, Debug)]
pub struct LanguageModel<B: Backend> {
    pub wte: Embedding<B>,
    /// Learned positions (gpt2 only).
    pub wpe: Option<Embedding<B>>,
    pub blocks: Vec<LmBlock<B>>,
    pub norm_f: LmNorm<B>,
    pub lm_head: Linear<B>,
    /// Rotary position encoding (llama, neox) over a head's rotated dimensions.
    pub rope: Option<RotaryEncoding<B>>,
    /// The longest sequence it takes (the size of its position table).
    #[module(skip)]
    pub context_length: usize,
}

/// The LM's parts run in the dtype its weights are held in ([`LanguageModel::dtype`]: bf16
/// when stage 2 holds it so, [`crate::precision`]) and take and give the residual stream in
/// the caller's dtype (f32): each casts its input on entry and its output on exit.
impl<B: Backend> LanguageModel<B> {
    /// The dtype its weights are held in.
    pub fn dtype(&self) -> DType {
        self.wte.weight.val().dtype()
    }

    /// Token embeddings `[B, T, D]` in f32 (positions are added by [`Self::add_positions`]).
    pub fn embed_tokens(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        to_dtype(self.wte.forward(tokens), DType::F32)
    }

    /// Adds learned positions (gpt2); the other styles' enter in each block (RoPE, ALiBi).
    pub fn add_positions(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let Some(wpe) = &self.wpe else { return x };
        let [b, t, _] = x.dims();
        let pos = Tensor::<B, 1, Int>::arange(0..t as i64, &x.device())
            .reshape([1, t])
            .expand([b, t]);
        let dt = x.dtype();
        x + to_dtype(wpe.forward(pos), dt)
    }

    /// `f(x)` in the LM's dtype, returned in `x`'s.
    pub(crate) fn in_own_dtype(
        &self,
        x: Tensor<B, 3>,
        f: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let io = x.dtype();
        to_dtype(f(to_dtype(x, self.dtype())), io)
    }

    /// Causal block `i` of the stack.
    pub fn block(&self, i: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let rope = || self.rope.as_ref().expect("a rotary style has rope");
        self.in_own_dtype(x, |x| match &self.blocks[i] {
            LmBlock::Gpt2(b) => b.forward(x, true),
            LmBlock::Llama(b) => decoder_forward(b, x, Some(rope())),
            LmBlock::Neox(b) => decoder_forward(b, x, Some(rope())),
            LmBlock::Mpt(b) => decoder_forward(b, x, None),
        })
    }

    /// Next-token logits `[B, T, V]` from the last hidden states.
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.logits(self.final_norm(x))
    }

    /// The final norm of the last hidden states.
    pub fn final_norm(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.in_own_dtype(x, |x| match &self.norm_f {
            LmNorm::Layer(n) => n.forward(x),
            LmNorm::Rms(n) => n.forward(x),
        })
    }

    /// Logits `[B, T, V]` of normed hidden states.
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        self.in_own_dtype(h, |h| linear_3d(&self.lm_head, h))
    }

    /// The plain language model: logits `[B, T, V]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let mut x = self.add_positions(self.embed_tokens(tokens));
        for i in 0..self.blocks.len() {
            x = self.block(i, x);
        }
        self.head(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// Changing token t changes no logit before t, in every style.
    #[test]
    fn every_style_is_causal() {
        let dev = Default::default();
        for style in [LmStyle::Gpt2, LmStyle::Llama, LmStyle::Neox, LmStyle::Mpt] {
            Flex::seed(&dev, 3);
            let cfg = LmConfig {
                vocab_size: 16,
                context_length: 8,
                width: 16,
                layers: 2,
                heads: 2,
                style,
                rotary_pct: if style == LmStyle::Neox { 0.5 } else { 1.0 },
                parallel_residual: style == LmStyle::Neox,
                ..Default::default()
            };
            cfg.validate().unwrap();
            let lm = cfg.init::<Flex>(&dev);
            let ids = |last: i64| {
                Tensor::<Flex, 2, Int>::from_data(
                    TensorData::new(vec![1i64, 5, 7, 2, 9, last], [1, 6]),
                    &dev,
                )
            };
            let a: Vec<f32> = lm.forward(ids(3)).into_data().to_vec().unwrap();
            let b: Vec<f32> = lm.forward(ids(11)).into_data().to_vec().unwrap();
            assert_eq!(
                a[..5 * 16],
                b[..5 * 16],
                "{style:?}: earlier positions saw a later token"
            );
            assert_ne!(
                a[5 * 16..],
                b[5 * 16..],
                "{style:?}: the last position ignores its token"
            );
        }
    }
}
