//! Texts and prompt ensembles through a CLIP's (or a SigLIP's) towers, the way every zero-shot
//! and retrieval figure here embeds them.

use anyhow::Result;
use burn::prelude::*;
use rookery_data::{PromptTokenizer, TextTokenizer};
use rookery_model::clip::l2_normalize;
use rookery_model::siglip::Siglip;
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
}

/// An image-text dual encoder as the evaluations use one: unit-length embeddings of images
/// (prepared by the caller) and of texts (tokenized here, as the model was trained).
pub trait Towers<B: Backend> {
    /// `[N, 3, S, S]` images to `[N, E]`.
    fn images(&self, images: Tensor<B, 4>) -> Tensor<B, 2>;
    /// Texts to `[T, E]`.
    fn texts(&self, texts: &[String]) -> Result<Tensor<B, 2>>;
}

/// CLIP's prompt ensembling over any [`Towers`]: per class, the renormalised mean of its
/// prompts' unit embeddings, `[C, E]`.
pub fn class_embeddings<B: Backend>(
    towers: &dyn Towers<B>,
    prompts: &[Vec<String>],
) -> Result<Tensor<B, 2>> {
    let mut classes = Vec::with_capacity(prompts.len());
    for class in prompts {
        classes.push(towers.texts(class)?.mean_dim(0));
    }
    Ok(l2_normalize(Tensor::cat(classes, 0)))
}

impl<B: Backend> Towers<B> for TextEncoder<'_, B> {
    fn images(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.model.encode_image(images)
    }

    fn texts(&self, texts: &[String]) -> Result<Tensor<B, 2>> {
        self.embed(texts)
    }
}

/// An HF SigLIP: texts padded with its pad token to the length it was trained at and read at
/// the last position (its tokenizer, [`PromptTokenizer`], fixed to that length), images through
/// the attention-pooling head.
pub struct SiglipTowers<'a, B: Backend> {
    pub model: &'a Siglip<B>,
    /// `None` when only images are embedded.
    pub tokenizer: Option<&'a PromptTokenizer>,
    pub device: &'a B::Device,
}

impl<B: Backend> Towers<B> for SiglipTowers<'_, B> {
    fn images(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        l2_normalize(self.model.vision.forward(images))
    }

    fn texts(&self, texts: &[String]) -> Result<Tensor<B, 2>> {
        let (Some(text), Some(tokenizer)) = (&self.model.text, self.tokenizer) else {
            anyhow::bail!("a SigLIP without its text tower or tokenizer embeds no text");
        };
        let vocab = text.token_embedding.weight.val().dims()[0];
        let mut out = Vec::new();
        for chunk in texts.chunks(CHUNK) {
            let mut ids = Vec::new();
            for t in chunk {
                let row = tokenizer
                    .encode(t)
                    .map_err(|e| anyhow::anyhow!("tokenizing {t:?}: {e}"))?;
                if let Some(bad) = row.iter().find(|&&i| i as usize >= vocab) {
                    anyhow::bail!(
                        "token id {bad} for a vocabulary of {vocab}: not this model's tokenizer"
                    );
                }
                ids.extend(row.into_iter().map(i64::from));
            }
            let len = ids.len() / chunk.len();
            let tokens = Tensor::from_data(TensorData::new(ids, [chunk.len(), len]), self.device);
            out.push(l2_normalize(text.forward(tokens)));
        }
        anyhow::ensure!(!out.is_empty(), "no text to embed");
        Ok(Tensor::cat(out, 0))
    }
}
