//! A GPT-2-style decoder-only language model: token + learned position embeddings, pre-norm
//! causal blocks (the same blocks as CLIP's towers), a final LayerNorm and an LM head. Flamingo
//! freezes it and slips gated cross-attention between its blocks, so the pieces are public.

use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::layers::{linear_3d, Act, ResidualAttentionBlock, Transformer};

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
        }
    }
}

impl LmConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> LanguageModel<B> {
        let t = Transformer::new(
            self.width,
            self.layers,
            self.heads,
            self.mlp_ratio,
            Act::Gelu,
            device,
        );
        LanguageModel {
            wte: EmbeddingConfig::new(self.vocab_size, self.width).init(device),
            wpe: EmbeddingConfig::new(self.context_length, self.width).init(device),
            blocks: t.resblocks,
            ln_f: LayerNormConfig::new(self.width).init(device),
            lm_head: LinearConfig::new(self.width, self.vocab_size)
                .with_bias(false)
                .init(device),
        }
    }
}

#[derive(Module, Debug)]
pub struct LanguageModel<B: Backend> {
    pub wte: Embedding<B>,
    pub wpe: Embedding<B>,
    pub blocks: Vec<ResidualAttentionBlock<B>>,
    pub ln_f: LayerNorm<B>,
    pub lm_head: Linear<B>,
}

impl<B: Backend> LanguageModel<B> {
    /// Token embeddings `[B, T, D]` (positions are added by [`Self::add_positions`]).
    pub fn embed_tokens(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.wte.forward(tokens)
    }

    pub fn add_positions(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let pos = Tensor::<B, 1, Int>::arange(0..t as i64, &x.device())
            .reshape([1, t])
            .expand([b, t]);
        x + self.wpe.forward(pos)
    }

    /// Next-token logits `[B, T, V]` from the last hidden states.
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        linear_3d(&self.lm_head, self.ln_f.forward(x))
    }

    /// The plain language model: logits `[B, T, V]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let mut x = self.add_positions(self.embed_tokens(tokens));
        for block in &self.blocks {
            x = block.forward(x, true);
        }
        self.head(x)
    }
}
