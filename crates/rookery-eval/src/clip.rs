//! Held-out evaluation of CLIP: image->text and text->image recall@{1,5,10} over the whole
//! held-out set, with chance level, and zero-shot classification on the labels stored in the
//! samples' `.json` ([`crate::zero_shot`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use burn::prelude::*;
use rookery_data::loader::Mode;
use rookery_data::{DataConfig, Loader, TextTokenizer};
use rookery_model::Clip;
use serde::Serialize;

use crate::input::batch_tensors;

/// Recall figures over `n` held-out pairs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalReport {
    pub n: usize,
    pub i2t_r1: f64,
    pub i2t_r5: f64,
    pub i2t_r10: f64,
    pub t2i_r1: f64,
    pub t2i_r5: f64,
    pub t2i_r10: f64,
    /// Recall@1 of a random ranking: 1 / n.
    pub chance_r1: f64,
    /// Zero-shot accuracy per label (`shape`, `color`), with its chance level.
    pub zero_shot: BTreeMap<String, (f64, f64)>,
    /// Accuracy per label when the prompts differ in that label only, every other attribute
    /// being the image's own ([`crate::zero_shot`]).
    #[serde(default)]
    pub zero_shot_given_rest: BTreeMap<String, f64>,
    /// How many images zero-shot scores: those whose scene has a single group.
    #[serde(default)]
    pub zero_shot_images: usize,
    /// Image->text top-1 mistakes by what the wrong caption's scene changes (shape, color,
    /// count, size, relation; [`crate::confusion`]); empty without scene labels.
    #[serde(default)]
    pub i2t_confusions: BTreeMap<String, usize>,
    /// `[[eval.tasks]]` figures, `NAME/METRIC` (e.g. `cifar10/acc1`), filled in by the caller.
    #[serde(flatten)]
    pub benchmarks: BTreeMap<String, f64>,
}

/// Evaluates `model` on the `data.val` shards (one pass, center crops, no shuffle).
pub fn evaluate<B: Backend>(
    model: &Clip<B>,
    data: &DataConfig,
    tokenizer: Arc<TextTokenizer>,
    device: &B::Device,
) -> Result<EvalReport> {
    let shards = rookery_data::expand_shards(&data.val)?;
    let loader = Loader::new(data, tokenizer.clone(), shards, 0, 1, Mode::Eval, None)?;
    let (mut img, mut txt, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for batch in loader {
        let batch = batch?;
        let (images, tokens) = batch_tensors::<B>(&batch, model.text.eot_token, device);
        img.push(model.encode_image(images));
        txt.push(model.encode_text(tokens));
        labels.extend(batch.json);
    }
    anyhow::ensure!(
        !img.is_empty(),
        "data.val `{}` holds no usable sample",
        data.val
    );
    let (img, txt) = (Tensor::cat(img, 0), Tensor::cat(txt, 0));
    ensure_finite(&img, "image embeddings")?;
    ensure_finite(&txt, "text embeddings")?;
    let sim = img.clone().matmul(txt.clone().transpose()); // [N, N]
    let n = sim.dims()[0];
    let i2t = ranks(sim.clone());
    let t2i = ranks(sim.clone().transpose());
    let recall = |r: &[usize], k: usize| r.iter().filter(|&&x| x < k).count() as f64 / n as f64;
    let mut report = EvalReport {
        n,
        i2t_r1: recall(&i2t, 1),
        i2t_r5: recall(&i2t, 5),
        i2t_r10: recall(&i2t, 10),
        t2i_r1: recall(&t2i, 1),
        t2i_r5: recall(&t2i, 5),
        t2i_r10: recall(&t2i, 10),
        chance_r1: 1.0 / n as f64,
        zero_shot: BTreeMap::new(),
        zero_shot_given_rest: BTreeMap::new(),
        zero_shot_images: 0,
        i2t_confusions: BTreeMap::new(),
        benchmarks: BTreeMap::new(),
    };
    let top1: Vec<usize> = argmax_rows(sim.clone());
    report.i2t_confusions = crate::confusion::top1_confusions(&labels, &top1);
    let zs = crate::zero_shot::evaluate(
        model,
        &tokenizer,
        data.context_length,
        &img,
        &labels,
        device,
    )?;
    report.zero_shot = zs.accuracy;
    report.zero_shot_given_rest = zs.given_rest;
    report.zero_shot_images = zs.images;
    Ok(report)
}

/// Refuses embeddings with a NaN or infinity: ranks count entries strictly above the
/// diagonal, and every comparison with NaN is false, so a diverged model would score R@1 = 1.
pub fn ensure_finite<B: Backend, const D: usize>(t: &Tensor<B, D>, what: &str) -> Result<()> {
    let bad: i64 = t
        .clone()
        .is_finite()
        .bool_not()
        .int()
        .sum()
        .into_scalar()
        .elem();
    anyhow::ensure!(
        bad == 0,
        "{what}: {bad} of {} values are NaN or infinite (diverged weights?); refusing to score them",
        t.shape().num_elements()
    );
    Ok(())
}

/// For each row, the rank of its diagonal entry (0 = best): entries greater than it, and
/// entries equal to it in an earlier column (ties broken by position, as torch's argmax: a
/// collapsed model whose embeddings are all alike must not score R@1 = 1).
fn ranks<B: Backend>(sim: Tensor<B, 2>) -> Vec<usize> {
    let [n, _] = sim.dims();
    let device = sim.device();
    let diag = sim.clone().mul(Tensor::eye(n, &device)).sum_dim(1); // [N, 1]
    let col = Tensor::<B, 1, Int>::arange(0..n as i64, &device);
    let before = col.clone().reshape([1, n]).lower(col.reshape([n, 1])); // column < row
    let ties = sim.clone().equal(diag.clone()).bool_and(before);
    indices(sim.greater(diag).int().add(ties.int()).sum_dim(1))
}

/// For each row, the column of its largest entry.
fn argmax_rows<B: Backend>(sim: Tensor<B, 2>) -> Vec<usize> {
    indices(sim.argmax(1))
}

/// An `[N, 1]` int tensor's entries as indices.
pub(crate) fn indices<B: Backend>(t: Tensor<B, 2, Int>) -> Vec<usize> {
    t.into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("int data")
        .into_iter()
        .map(|x| x as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn non_finite_embeddings_are_refused_by_name() {
        let dev = Default::default();
        let ok = Tensor::<Flex, 2>::from_data([[0.5, 0.1], [0.2, 0.3]], &dev);
        assert!(ensure_finite(&ok, "image embeddings").is_ok());
        for bad in [f32::NAN, f32::INFINITY] {
            let t = Tensor::<Flex, 2>::from_data([[0.5, bad], [0.2, 0.3]], &dev);
            let err = ensure_finite(&t, "image embeddings")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("image embeddings") && err.contains("1 of 4"),
                "{err}"
            );
        }
    }

    #[test]
    fn ranks_count_entries_above_the_diagonal() {
        let dev = Default::default();
        let sim = Tensor::<Flex, 2>::from_data(
            [[0.9, 0.1, 0.95], [0.2, 0.5, 0.1], [0.3, 0.8, 0.7]],
            &dev,
        );
        assert_eq!(ranks(sim.clone()), vec![1, 0, 1]);
        assert_eq!(ranks(sim.transpose()), vec![0, 1, 1]);
    }

    #[test]
    fn a_collapsed_model_ranks_by_position_not_first() {
        // Every image equally similar to every caption: row i's own caption has i ahead of it,
        // so R@1 is 1/n (it was 1 when only strictly greater entries counted).
        let sim = Tensor::<Flex, 2>::ones([4, 4], &Default::default());
        assert_eq!(ranks(sim), vec![0, 1, 2, 3]);
    }
}
