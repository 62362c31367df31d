//! A decoder-only language model in one of four styles:
//! - `gpt2`: token + learned position embeddings, pre-norm causal blocks with LayerNorm and a
//!   GELU MLP (the same blocks as CLIP's towers);
//! - `llama`: no position embeddings but rotary ones (RoPE) on queries and keys, RMSNorm, and a
//!   SwiGLU feed-forward `down(silu(gate(x)) * up(x))`, all without biases ([`super::llama`]);
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

use crate::precision::to_dtype;
use burn::tensor::DType;
use serde::{Deserialize, Serialize};

use super::decoder::decoder_forward;
use super::llama::LlamaBlock;
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
                .map(|_| LmBlock::Llama(LlamaBlock::new(self, device)))
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
