//! The CLIP text tower: token + position embeddings, causal pre-norm blocks, `ln_final`,
//! features at the end-of-text token, `text_projection` (open_clip's `TextTransformer` names).

use burn::module::{Initializer, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::layers::{Act, Transformer};

/// `[model.text]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextConfig {
    /// Vocabulary size; 0 takes it from the tokenizer.
    pub vocab_size: usize,
    pub context_length: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    pub act: Act,
    /// Id of the end-of-text token whose features represent the text; taken from the tokenizer.
    pub eot_token: usize,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 0,
            context_length: 32,
            width: 128,
            layers: 3,
            heads: 4,
            mlp_ratio: 4.0,
            act: Act::Gelu,
            eot_token: 3,
        }
    }
}

impl TextConfig {
    pub fn init<B: Backend>(&self, embed_dim: usize, device: &B::Device) -> TextTransformer<B> {
        let w = self.width;
        TextTransformer {
            token_embedding: EmbeddingConfig::new(self.vocab_size, w)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device),
            positional_embedding: Initializer::Normal {
                mean: 0.0,
                std: 0.01,
            }
            .init([self.context_length, w], device),
            transformer: Transformer::new(
                w,
                self.layers,
                self.heads,
                self.mlp_ratio,
                self.act,
                device,
            ),
            ln_final: LayerNormConfig::new(w).init(device),
            text_projection: Initializer::Normal {
                mean: 0.0,
                std: (w as f64).powf(-0.5),
            }
            .init([w, embed_dim], device),
            eot_token: self.eot_token,
        }
    }
}

#[derive(Module, Debug)]
pub struct TextTransformer<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub positional_embedding: Param<Tensor<B, 2>>,
    pub transformer: Transformer<B>,
    pub ln_final: LayerNorm<B>,
    pub text_projection: Param<Tensor<B, 2>>,
    pub eot_token: usize,
}

impl<B: Backend> TextTransformer<B> {
    /// # Shapes
    /// `tokens`: `[B, T]` -> `[B, embed_dim]` (not normalised).
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = tokens.dims();
        let eot = tokens
            .clone()
            .equal_elem(self.eot_token as i64)
            .int()
            .argmax(1); // [B, 1]: first end token
        let x = self.token_embedding.forward(tokens)
            + self
                .positional_embedding
                .val()
                .slice(s![0..t, ..])
                .unsqueeze::<3>();
        let x = self.ln_final.forward(self.transformer.forward(x, true)); // [B, T, W]
        let w = x.dims()[2];
        let pooled = x
            .gather(1, eot.reshape([b, 1, 1]).expand([b, 1, w]))
            .reshape([b, w]);
        pooled.matmul(self.text_projection.val())
    }
}
