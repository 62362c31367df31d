//! Texts and prompt ensembles through a CLIP's text tower, the way every zero-shot and
//! retrieval figure here embeds them.

use anyhow::Result;
use burn::prelude::*;
use rookery_data::TextTokenizer;
use rookery_model::clip::l2_normalize;
use rookery_model::text::used_context;
use rookery_model::Clip;

use crate::input::token_tensor;

/// Text-tower rows per forward pass.
const CHUNK: usize = 256;

/// The text tower and what it needs to embed text.
pub struct TextEncoder<'a, B: Backend> {
    pub model: &'a Clip<B>,
    pub tokenizer: &'a TextTokenizer,
    /// The text tower's context length: longer texts are cut, keeping the end token.
    pub ctx: usize,
    pub device: &'a B::Device,
}

impl<B: Backend> TextEncoder<'_, B> {
    /// Unit-length embeddings `[P, E]` of `texts`, [`CHUNK`] rows a pass, each pass cut to the
    /// positions its rows use (exact: see [`used_context`]).
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Tensor<B, 2>> {
        let mut emb = Vec::new();
        for chunk in texts.chunks(CHUNK) {
            let mut ids = vec![0i64; chunk.len() * self.ctx];
            for (t, row) in chunk.iter().zip(ids.chunks_mut(self.ctx)) {
                self.tokenizer
                    .encode_into(t.as_ref(), row)
                    .map_err(|e| anyhow::anyhow!("tokenizing {:?}: {e}", t.as_ref()))?;
            }
            let keep = used_context(&ids, self.ctx, self.model.text.eot_token);
            let tokens = token_tensor::<B>(&ids, chunk.len(), self.ctx, keep, self.device);
            emb.push(self.model.encode_text(tokens));
        }
        anyhow::ensure!(!emb.is_empty(), "no text to embed");
        Ok(Tensor::cat(emb, 0))
    }

    /// One unit-length embedding per class `[C, E]`: CLIP's prompt ensembling, the mean of the
    /// class's unit-length prompt embeddings, normalised again.
    pub fn class_embeddings(&self, prompts: &[Vec<String>]) -> Result<Tensor<B, 2>> {
        let mut classes = Vec::with_capacity(prompts.len());
        for class in prompts {
            classes.push(self.embed(class)?.mean_dim(0));
        }
        Ok(l2_normalize(Tensor::cat(classes, 0)))
    }
}
