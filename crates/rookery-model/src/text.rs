//! The CLIP text tower: token + position embeddings, causal pre-norm blocks, `ln_final`,
//! features at the end-of-text token, `text_projection` (open_clip's `TextTransformer` names).

use burn::module::{Initializer, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::layers::{layer_norm, norm, Act, Transformer};

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
    /// Runs the tower on this many groups of the batch's rows, sorted by caption length, each
    /// cut after its longest caption (1: the whole batch at its longest). The features are the
    /// same (see [`TextTransformer::forward`]); short captions then cost what their length
    /// costs. How the tower is run, not its shape: a checkpoint resumes with another value.
    /// It reads the end positions back to the host once a batch (a sync on a GPU backend).
    pub length_buckets: usize,
    /// Train with this tower frozen: no gradient, no optimizer state.
    pub locked: bool,
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
            length_buckets: 1,
            locked: false,
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
            ln_final: layer_norm(w, device),
            text_projection: Initializer::Normal {
                mean: 0.0,
                std: (w as f64).powf(-0.5),
            }
            .init([w, embed_dim], device),
            eot_token: self.eot_token,
            length_buckets: self.length_buckets,
        }
    }
}

/// How many leading positions of a `[rows, context_length]` batch of token ids the text tower
/// needs: up to and including the last row's first end token (the whole context for a row
/// without one). Feeding only these is exact, not an approximation: attention is causal and
/// the features are read at the end token, so nothing after it in any row reaches an output,
/// and `forward` takes any length up to the context. Short captions in a long context then
/// cost what their length costs (clip-tiny: about 20 of 32 positions).
pub fn used_context(ids: &[i64], context_length: usize, eot_token: usize) -> usize {
    ids.chunks(context_length)
        .map(|row| {
            row.iter()
                .position(|&t| t == eot_token as i64)
                .map_or(context_length, |p| p + 1)
        })
        .max()
        .unwrap_or(0)
}

/// The first `keep` columns of row-major `[rows, context_length]` ids.
pub fn trim_context(ids: &[i64], context_length: usize, keep: usize) -> Vec<i64> {
    ids.chunks(context_length)
        .flat_map(|row| row[..keep].iter().copied())
        .collect()
}

#[derive(Module, Debug)]
pub struct TextTransformer<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub positional_embedding: Param<Tensor<B, 2>>,
    pub transformer: Transformer<B>,
    pub ln_final: LayerNorm<B>,
    pub text_projection: Param<Tensor<B, 2>>,
    pub eot_token: usize,
    pub length_buckets: usize,
}

impl<B: Backend> TextTransformer<B> {
    /// # Shapes
    /// `tokens`: `[B, T]` -> `[B, embed_dim]` (not normalised).
    ///
    /// With `length_buckets` k > 1 the rows are sorted by the position of their first end token
    /// and run in k groups, each cut after its last row's end token, and the features are put
    /// back in row order. This is exact for the same reason as [`used_context`]: a row's
    /// features depend only on its tokens up to its end token. Only the GEMMs' row blocking
    /// differs, so values agree to float rounding, not bit for bit.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let b = tokens.dims()[0];
        if self.length_buckets < 2 || b < 2 * self.length_buckets {
            return self.forward_rows(tokens);
        }
        let device = tokens.device();
        let ends = self.end_positions(tokens.clone());
        let mut order: Vec<usize> = (0..b).collect();
        order.sort_by_key(|&i| ends[i]); // stable: equal lengths keep their order
        if ends[order[0]] == ends[order[b - 1]] {
            // One length (the bench's random captions): groups would save nothing and cost
            // their selects and smaller GEMMs.
            return self.forward_rows(tokens);
        }
        let index = |rows: &[usize]| {
            let ids = rows.iter().map(|&i| i as i64).collect::<Vec<_>>();
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [rows.len()]), &device)
        };
        let parts = order
            .chunks(b.div_ceil(self.length_buckets))
            .map(|rows| {
                let keep = ends[*rows.last().expect("chunks are not empty")] + 1;
                let group = tokens.clone().select(0, index(rows)).slice(s![.., 0..keep]);
                self.forward_rows(group)
            })
            .collect();
        let mut back = vec![0; b]; // row i's place in `order`
        for (place, &row) in order.iter().enumerate() {
            back[row] = place;
        }
        Tensor::cat(parts, 0).select(0, index(&back))
    }

    /// Each row's first end-token position (0 for a row without one, as `forward` reads it).
    fn end_positions(&self, tokens: Tensor<B, 2, Int>) -> Vec<usize> {
        let first = tokens.equal_elem(self.eot_token as i64).int().argmax(1);
        first
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .expect("int data")
            .into_iter()
            .map(|p| p as usize)
            .collect()
    }

    /// [`forward`](Self::forward) on the whole batch at its length.
    fn forward_rows(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = tokens.dims();
        let eot = tokens
            .clone()
            .equal_elem(self.eot_token as i64)
            .int()
            .argmax(1)
            .reshape([b]); // first end token
        let pos = self.positional_embedding.val().slice(s![0..t, ..]);
        let x = crate::cpu::add_positions(self.token_embedding.forward(tokens), pos);
        // Only the end token's features are read: the last block computes that row alone.
        let x = self.transformer.forward_rows(x, eot, true); // [B, 1, W]
        let w = x.dims()[2];
        let pooled = norm(&self.ln_final, x.reshape([b, w]));
        pooled.matmul(self.text_projection.val())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    type B = Autodiff<Flex>;

    #[test]
    fn used_context_reaches_the_last_first_end_token() {
        // Rows of context 6, end token 3: ends at 2 and 4; a row without one needs all 6.
        assert_eq!(used_context(&[1, 5, 3, 0, 0, 0, 1, 5, 6, 7, 3, 0], 6, 3), 5);
        assert_eq!(used_context(&[1, 3, 0, 3, 0, 0], 6, 3), 2);
        assert_eq!(used_context(&[1, 5, 3, 0, 0, 0, 1, 5, 6, 7, 8, 9], 6, 3), 6);
        assert_eq!(used_context(&[], 6, 3), 0);
        assert_eq!(
            trim_context(&[1, 5, 3, 0, 0, 0, 1, 5, 6, 7, 3, 0], 6, 5),
            vec![1, 5, 3, 0, 0, 1, 5, 6, 7, 3]
        );
    }

    /// Cutting the padding after the last end token changes neither the features nor any
    /// gradient beyond float rounding: the tower never lets it reach an output.
    #[test]
    fn trimmed_context_gives_the_same_features_and_gradients() {
        let device = Default::default();
        let tower = tiny_tower(10);
        // End tokens at positions 3, 6 and 1; the padding ids are not zero on purpose, so a
        // leak of later positions would show.
        let ids: Vec<i64> = vec![
            1, 4, 5, 3, 7, 7, 7, 7, 7, 7, //
            1, 6, 8, 9, 10, 11, 3, 2, 2, 2, //
            1, 3, 4, 4, 4, 4, 4, 4, 4, 4,
        ];
        let keep = used_context(&ids, 10, 3);
        assert_eq!(keep, 7);
        let full = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [3, 10]), &device);
        let cut = trim_context(&ids, 10, keep);
        let cut = Tensor::<B, 2, Int>::from_data(TensorData::new(cut, [3, keep]), &device);
        let (a, b) = (tower.forward(full), tower.forward(cut));
        assert_same_features_and_gradients(&tower, a, b, 1e-6);
    }

    /// Running the rows in groups sorted by length gives the features and gradients of one
    /// padded batch, rows in their order; with a row that has no end token (read at position
    /// 0) and groups of unequal size.
    #[test]
    fn length_buckets_give_the_same_features_and_gradients() {
        let device = Default::default();
        let tower = tiny_tower(8);
        let ids: Vec<i64> = vec![
            1, 4, 5, 3, 7, 7, 7, 7, //
            1, 6, 8, 9, 10, 11, 3, 2, //
            1, 3, 4, 4, 4, 4, 4, 4, //
            1, 5, 5, 5, 5, 5, 5, 5, // no end token
            1, 9, 3, 0, 0, 0, 0, 0, //
            1, 8, 8, 8, 8, 3, 0, 0, //
            1, 7, 7, 7, 7, 7, 7, 3,
        ];
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [7, 8]), &device);
        // Parameters are initialised on first use; a clone before that would draw its own.
        let a = tower.forward(tokens.clone());
        let mut bucketed = tower.clone();
        bucketed.length_buckets = 3;
        let b = bucketed.forward(tokens);
        assert_same_features_and_gradients(&tower, a, b, 1e-5);
        // Rows of one length run as one group, in their order.
        let same: Vec<i64> = (0..4).flat_map(|r| [1, 4 + r, 6, 3, 0, 0, 0, 0]).collect();
        let same = Tensor::<B, 2, Int>::from_data(TensorData::new(same, [4, 8]), &device);
        let diff: f32 = (tower.forward(same.clone()) - bucketed.forward(same))
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-6, "features differ by {diff}");
    }

    /// A tower of width 16, 2 layers of 2 heads, 12 token ids, 8-dimensional features.
    fn tiny_tower(context_length: usize) -> TextTransformer<B> {
        let cfg = TextConfig {
            vocab_size: 12,
            context_length,
            width: 16,
            layers: 2,
            heads: 2,
            ..Default::default()
        };
        cfg.init::<B>(8, &Default::default())
    }

    /// `a` and `b` (`[3.., 8]` features of `tower`'s parameters) agree to `tol`, and so do the
    /// gradients of a fixed weighting of them.
    fn assert_same_features_and_gradients(
        tower: &TextTransformer<B>,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
        tol: f32,
    ) {
        let diff: f32 = (a.clone() - b.clone()).abs().max().into_scalar();
        assert!(diff < tol, "features differ by {diff}");
        let n = a.dims()[0] * 8;
        let weights = Tensor::<B, 2>::from_data(
            TensorData::new((0..n).map(|i| (i as f32 * 0.37).sin()).collect(), a.dims()),
            &a.device(),
        );
        let ga = (a * weights.clone()).sum().backward();
        let gb = (b * weights).sum().backward();
        let block = &tower.transformer.resblocks[0].attn.in_proj.weight;
        let pairs = [
            (
                "token_embedding",
                tower.token_embedding.weight.grad(&ga).unwrap(),
                tower.token_embedding.weight.grad(&gb).unwrap(),
            ),
            (
                "positional_embedding",
                tower.positional_embedding.grad(&ga).unwrap(),
                tower.positional_embedding.grad(&gb).unwrap(),
            ),
            (
                "text_projection",
                tower.text_projection.grad(&ga).unwrap(),
                tower.text_projection.grad(&gb).unwrap(),
            ),
            (
                "in_proj (block 0)",
                block.grad(&ga).unwrap(),
                block.grad(&gb).unwrap(),
            ),
        ];
        for (name, ga, gb) in pairs {
            let scale: f32 = ga.clone().abs().max().into_scalar();
            assert!(scale > 0.0, "{name}: no gradient");
            let diff: f32 = (ga - gb).abs().max().into_scalar();
            assert!(
                diff < tol * scale.max(1.0),
                "{name}: gradients differ by {diff}"
            );
        }
    }
}
