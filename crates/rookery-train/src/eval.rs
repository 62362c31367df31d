//! Held-out evaluation of CLIP: image->text and text->image recall@{1,5,10} over the whole
//! held-out set, with chance level, and zero-shot classification from class prompts (several
//! templates and phrasings, embeddings averaged) on the labels stored in the samples' `.json`.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use burn::prelude::*;
use rookery_data::loader::Mode;
use rookery_data::synth::scene::{plural, COLORS, COUNT_WORDS, MAX_COUNT, SHAPES, SIZES};
use rookery_data::{DataConfig, ImageTextBatch, Loader, TextTokenizer};
use rookery_model::clip::l2_normalize;
use rookery_model::text::{trim_context, used_context};
use rookery_model::Clip;
use serde::Serialize;

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
    /// How many images zero-shot scores: those whose scene has a single group.
    #[serde(default)]
    pub zero_shot_images: usize,
    /// Image->text top-1 mistakes by what the wrong caption's scene changes (shape, color,
    /// count, size, relation; [`crate::confusion`]); empty without scene labels.
    #[serde(default)]
    pub i2t_confusions: BTreeMap<String, usize>,
}

/// Zero-shot prompt templates, in the captions' own words (they carry no final period).
const TEMPLATES: [&str; 3] = ["a photo of {}", "an image with {}", "{}"];

/// The batch as tensors, its tokens cut to the positions the text tower uses.
pub fn batch_tensors<B: Backend>(
    b: &ImageTextBatch,
    eot_token: usize,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 2, Int>) {
    let images = image_tensor(b, device);
    let keep = used_context(&b.tokens, b.context_length, eot_token);
    let tokens = token_tensor(&b.tokens, b.batch_size, b.context_length, keep, device);
    (images, tokens)
}

/// The batch's images `[N, 3, S, S]`.
pub fn image_tensor<B: Backend>(b: &ImageTextBatch, device: &B::Device) -> Tensor<B, 4> {
    let s = b.image_size;
    let data = TensorData::new(b.images.clone(), [b.batch_size, 3, s, s]);
    Tensor::from_data(data, device)
}

/// `[rows, ctx]` token ids as a tensor of their first `keep` positions: from
/// [`used_context`], this is exact (see there).
pub fn token_tensor<B: Backend>(
    ids: &[i64],
    rows: usize,
    ctx: usize,
    keep: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let ids = trim_context(ids, ctx, keep);
    Tensor::from_data(TensorData::new(ids, [rows, keep]), device)
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
        zero_shot_images: 0,
        i2t_confusions: BTreeMap::new(),
    };
    let top1: Vec<usize> = argmax_rows(sim.clone());
    report.i2t_confusions = crate::confusion::top1_confusions(&labels, &top1);
    for (label, classes) in [("shape", &SHAPES[..]), ("color", &COLORS[..])] {
        let truth = zero_shot_truth(&labels, label, classes);
        let scored = truth.iter().flatten().count();
        if scored == 0 {
            continue;
        }
        report.zero_shot_images = report.zero_shot_images.max(scored);
        let prompts: Vec<Vec<String>> = classes.iter().map(|c| class_prompts(label, c)).collect();
        let class_emb = class_embeddings(model, &tokenizer, data.context_length, &prompts, device)?;
        if let Some(acc) = zero_shot(&img, class_emb, &truth) {
            report
                .zero_shot
                .insert(label.to_string(), (acc, 1.0 / classes.len() as f64));
        }
    }
    Ok(report)
}

/// For each row, the rank of its diagonal entry (0 = best): entries strictly greater than it.
fn ranks<B: Backend>(sim: Tensor<B, 2>) -> Vec<usize> {
    let [n, _] = sim.dims();
    let diag = sim.clone().mul(Tensor::eye(n, &sim.device())).sum_dim(1); // [N, 1]
    indices(sim.greater(diag).int().sum_dim(1))
}

/// For each row, the column of its largest entry.
fn argmax_rows<B: Backend>(sim: Tensor<B, 2>) -> Vec<usize> {
    indices(sim.argmax(1))
}

/// An `[N, 1]` int tensor's entries as indices.
fn indices<B: Backend>(t: Tensor<B, 2, Int>) -> Vec<usize> {
    t.into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("int data")
        .into_iter()
        .map(|x| x as usize)
        .collect()
}

/// Each image's class for `label` where it has one: images whose scene holds a single group
/// (the stored label names the first group, and a second group would make another class
/// right too); without a `scene` in the labels, every image with the label.
fn zero_shot_truth(
    labels: &[Option<serde_json::Value>],
    label: &str,
    classes: &[&str],
) -> Vec<Option<usize>> {
    labels
        .iter()
        .map(|j| {
            let j = j.as_ref()?;
            let groups = j["scene"]["groups"].as_array().map_or(1, Vec::len);
            (groups == 1).then_some(())?;
            let v = j[label].as_str()?;
            classes.iter().position(|c| *c == v)
        })
        .collect()
}

/// The prompts for one class (CLIP's prompt ensembling): every template with every value of
/// the attributes the class does not name, as the captions phrase them ("a small red circle"),
/// so that the class embedding averages over them instead of meeting a phrase no caption has.
fn class_prompts(label: &str, class: &str) -> Vec<String> {
    // Every (size, other attribute, count) as a caption says it: "three small red circles".
    let phrase = |size: &str, color: &str, shape: &str, count: u8| {
        let n = if count == 1 {
            "a"
        } else {
            COUNT_WORDS[count as usize]
        };
        format!("{n} {size} {color} {}", plural(shape, count))
    };
    let mut phrases = Vec::new();
    for size in SIZES {
        for count in 1..=MAX_COUNT {
            match label {
                "shape" => phrases.extend(COLORS.iter().map(|c| phrase(size, c, class, count))),
                _ => phrases.extend(SHAPES.iter().map(|s| phrase(size, class, s, count))),
            }
        }
    }
    TEMPLATES
        .iter()
        .flat_map(|t| phrases.iter().map(move |p| t.replace("{}", p)))
        .collect()
}

/// One unit-length embedding per class: the mean of its prompts' text embeddings, `[C, E]`.
fn class_embeddings<B: Backend>(
    model: &Clip<B>,
    tokenizer: &TextTokenizer,
    ctx: usize,
    prompts: &[Vec<String>],
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let mut class_emb = Vec::new();
    for class in prompts {
        let mut tokens = vec![0i64; class.len() * ctx];
        for (p, chunk) in class.iter().zip(tokens.chunks_mut(ctx)) {
            tokenizer
                .encode_into(p, chunk)
                .map_err(anyhow::Error::msg)?;
        }
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens, [class.len(), ctx]), device);
        class_emb.push(model.encode_text(t).mean_dim(0));
    }
    Ok(l2_normalize(Tensor::cat(class_emb, 0)))
}

/// Accuracy of predicting each image's class by its nearest class embedding, over the images
/// that have a class; `None` when none has.
fn zero_shot<B: Backend>(
    img: &Tensor<B, 2>,
    class_emb: Tensor<B, 2>,
    truth: &[Option<usize>],
) -> Option<f64> {
    let pred = indices(img.clone().matmul(class_emb.transpose()).argmax(1));
    let scored: Vec<bool> = pred
        .iter()
        .zip(truth)
        .filter_map(|(p, t)| t.map(|t| *p == t))
        .collect();
    (!scored.is_empty()).then(|| scored.iter().filter(|&&r| r).count() as f64 / scored.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

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
    fn zero_shot_scores_single_group_scenes_only() {
        let g = |shape: &str| serde_json::json!({"shape": shape, "color": "red"});
        let labels = vec![
            Some(serde_json::json!({"shape": "star", "scene": {"groups": [g("star")]}})),
            Some(
                serde_json::json!({"shape": "star", "scene": {"groups": [g("star"), g("cross")]}}),
            ),
            Some(serde_json::json!({"shape": "cross"})),
            Some(serde_json::json!({"shape": "blob", "scene": {"groups": [g("blob")]}})),
            None,
        ];
        let truth = zero_shot_truth(&labels, "shape", &SHAPES);
        assert_eq!(truth, vec![Some(3), None, Some(5), None, None]);
        let dev = Default::default();
        let img = Tensor::<Flex, 2>::from_data(
            [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]],
            &dev,
        );
        // Six classes; the star (image 0, class 3) and the cross without a scene (image 2,
        // class 5) are scored, the rest not. Classes 3 and 5 where those images point: both right.
        let mut rows = [[0.0f32, 0.0]; 6];
        rows[3] = [1.0, 0.0];
        rows[5] = [0.0, 1.0];
        let classes = Tensor::<Flex, 2>::from_data(TensorData::new(rows.concat(), [6, 2]), &dev);
        assert_eq!(zero_shot(&img, classes, &truth), Some(1.0));
        // Now class 1, not 5, points where the cross does: only the star is right.
        let mut rows = [[0.0f32, 0.0]; 6];
        rows[3] = [1.0, 0.0];
        rows[1] = [0.0, 1.0];
        let classes = Tensor::<Flex, 2>::from_data(TensorData::new(rows.concat(), [6, 2]), &dev);
        assert_eq!(zero_shot(&img, classes, &truth), Some(0.5));
        assert_eq!(
            zero_shot(&img, Tensor::zeros([6, 2], &dev), &[None; 5]),
            None
        );
    }

    #[test]
    fn class_prompts_range_over_the_attributes_the_class_does_not_name() {
        let star = class_prompts("shape", "star");
        let counts = MAX_COUNT as usize;
        assert_eq!(
            star.len(),
            TEMPLATES.len() * SIZES.len() * COLORS.len() * counts
        );
        assert!(star
            .iter()
            .all(|p| p.ends_with(" star") || p.ends_with(" stars")));
        assert!(star.contains(&"a photo of a small purple star".to_string()));
        assert!(star.contains(&"three large white stars".to_string()));
        assert!(COLORS.iter().all(|c| star.iter().any(|p| p.contains(c))));
        let red = class_prompts("color", "red");
        assert_eq!(
            red.len(),
            TEMPLATES.len() * SIZES.len() * SHAPES.len() * counts
        );
        assert!(red.contains(&"an image with two large red crosses".to_string()));
        assert!(red.iter().all(|p| p.contains(" red ")));
    }
}
