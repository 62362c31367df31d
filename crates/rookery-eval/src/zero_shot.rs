//! Zero-shot classification on the synthetic labels (`shape`, `color` in the samples' `.json`).
//!
//! Two figures per label, over the held-out images whose scene has a single group (the label
//! names the first group, and a second group would make another class right too):
//! - **accuracy**: CLIP's prompt ensembling. Each class embedding is the mean over three
//!   templates, each with every value of the attributes the class does not name, phrased as the
//!   captions phrase them ("three small red circles"); the nearest class is the prediction.
//! - **given the rest**: the prompts differ in that label only, every other attribute (size,
//!   count, the other of shape and color) being the image's own. It asks whether the embeddings
//!   hold the attribute at all; the averaged prompts can miss it when the towers bind it to the
//!   others.

use std::collections::BTreeMap;

use anyhow::Result;
use burn::prelude::*;
use rookery_data::synth::scene::{group_words, COLORS, COUNT_WORDS, MAX_COUNT, SHAPES, SIZES};
use rookery_data::TextTokenizer;
use rookery_model::clip::l2_normalize;
use rookery_model::Clip;
use serde_json::Value;

use crate::clip::indices;
use crate::embed::{class_embeddings, TextEncoder};

/// Prompt templates, in the captions' own words (they carry no final period).
const TEMPLATES: [&str; 3] = ["a photo of {}", "an image with {}", "{}"];

/// What [`evaluate`] measures.
pub struct ZeroShot {
    /// Per label: accuracy of the averaged class prompts, and chance.
    pub accuracy: BTreeMap<String, (f64, f64)>,
    /// Per label: accuracy among prompts that differ in that label only.
    pub given_rest: BTreeMap<String, f64>,
    /// Images scored.
    pub images: usize,
}

/// Both figures for `shape` and `color` on the image embeddings `img` `[N, E]` (unit length)
/// and their `labels`; labels the samples do not carry are left out.
pub fn evaluate<B: Backend>(
    model: &Clip<B>,
    tokenizer: &TextTokenizer,
    ctx: usize,
    img: &Tensor<B, 2>,
    labels: &[Option<Value>],
    device: &B::Device,
) -> Result<ZeroShot> {
    let text = TextEncoder {
        model,
        tokenizer,
        ctx,
        device,
    };
    let mut out = ZeroShot {
        accuracy: BTreeMap::new(),
        given_rest: BTreeMap::new(),
        images: 0,
    };
    for (label, classes) in [("shape", &SHAPES[..]), ("color", &COLORS[..])] {
        let truth = truth(labels, label, classes);
        let scored = truth.iter().flatten().count();
        if scored == 0 {
            continue;
        }
        out.images = out.images.max(scored);
        let prompts: Vec<Vec<String>> = classes.iter().map(|c| class_prompts(label, c)).collect();
        let class_emb = class_embeddings(&text, &prompts)?;
        if let Some(acc) = accuracy(img, class_emb, &truth) {
            let chance = 1.0 / classes.len() as f64;
            out.accuracy.insert(label.to_string(), (acc, chance));
        }
        if let Some(acc) = given_rest(&text, img, labels, &truth, label)? {
            out.given_rest.insert(label.to_string(), acc);
        }
    }
    Ok(out)
}

/// Each image's class for `label` where it has one: images whose scene holds a single group
/// (the stored label names the first group, and a second group would make another class
/// right too); without a `scene` in the labels, every image with the label.
fn truth(labels: &[Option<Value>], label: &str, classes: &[&str]) -> Vec<Option<usize>> {
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

/// One group as a caption says it: "three small red circles", "a large blue star".
fn phrase(size: &str, color: &str, shape: &str, count: u8) -> String {
    let n = if count == 1 {
        "a"
    } else {
        COUNT_WORDS[count as usize]
    };
    group_words(n, size, color, shape, count)
}

/// Accuracy of predicting each image's class by its nearest class embedding, over the images
/// that have a class; `None` when none has.
fn accuracy<B: Backend>(
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

/// The prompts for one image that differ in `label` only, one per class, the rest (size,
/// count, the other attribute) taken from its labels; `None` when a label is missing.
fn rest_prompts(j: &Value, label: &str) -> Option<Vec<String>> {
    let (size, color, shape) = (
        j["size"].as_str()?,
        j["color"].as_str()?,
        j["shape"].as_str()?,
    );
    let count = u8::try_from(j["count"].as_u64()?).ok()?;
    Some(match label {
        "shape" => SHAPES
            .iter()
            .map(|s| phrase(size, color, s, count))
            .collect(),
        _ => COLORS
            .iter()
            .map(|c| phrase(size, c, shape, count))
            .collect(),
    })
}

/// Accuracy of picking each scored image's class among its [`rest_prompts`] (the bare phrase);
/// `None` when no scored image has all the labels.
fn given_rest<B: Backend>(
    text: &TextEncoder<B>,
    img: &Tensor<B, 2>,
    labels: &[Option<Value>],
    truth: &[Option<usize>],
    label: &str,
) -> Result<Option<f64>> {
    let mut rows = Vec::new(); // (image, its class, its prompts)
    for (i, t) in truth.iter().enumerate() {
        let prompts = labels[i].as_ref().and_then(|j| rest_prompts(j, label));
        if let (Some(t), Some(p)) = (t, prompts) {
            rows.push((i, *t, p));
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let classes = rows[0].2.len();
    let prompts: Vec<&String> = rows.iter().flat_map(|r| &r.2).collect();
    let emb = l2_normalize(text.embed(&prompts)?); // [R * C, E]
    let ids: Vec<i64> = rows.iter().map(|r| r.0 as i64).collect();
    let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [rows.len()]), text.device);
    let pred = best_of_own(img.clone().select(0, ids), emb, classes);
    let right = rows.iter().zip(&pred).filter(|(r, p)| r.1 == **p).count();
    Ok(Some(right as f64 / rows.len() as f64))
}

/// For each of the R images `[R, E]`, which of its own C prompts `[R * C, E]` (image r's are
/// rows r*C..(r+1)*C) it is nearest to.
fn best_of_own<B: Backend>(img: Tensor<B, 2>, prompts: Tensor<B, 2>, classes: usize) -> Vec<usize> {
    let [r, e] = img.dims();
    let scores = (prompts.reshape([r, classes, e]) * img.reshape([r, 1, e])).sum_dim(2);
    indices(scores.reshape([r, classes]).argmax(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use serde_json::json;

    #[test]
    fn zero_shot_scores_single_group_scenes_only() {
        let g = |shape: &str| json!({"shape": shape, "color": "red"});
        let labels = vec![
            Some(json!({"shape": "star", "scene": {"groups": [g("star")]}})),
            Some(json!({"shape": "star", "scene": {"groups": [g("star"), g("cross")]}})),
            Some(json!({"shape": "cross"})),
            Some(json!({"shape": "blob", "scene": {"groups": [g("blob")]}})),
            None,
        ];
        let truth = truth(&labels, "shape", &SHAPES);
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
        assert_eq!(accuracy(&img, classes, &truth), Some(1.0));
        // Now class 1, not 5, points where the cross does: only the star is right.
        let mut rows = [[0.0f32, 0.0]; 6];
        rows[3] = [1.0, 0.0];
        rows[1] = [0.0, 1.0];
        let classes = Tensor::<Flex, 2>::from_data(TensorData::new(rows.concat(), [6, 2]), &dev);
        assert_eq!(accuracy(&img, classes, &truth), Some(0.5));
        assert_eq!(
            accuracy(&img, Tensor::zeros([6, 2], &dev), &[None; 5]),
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

    #[test]
    fn each_image_picks_among_its_own_prompts() {
        let dev = Default::default();
        let img = Tensor::<Flex, 2>::from_data([[1.0, 0.0], [0.0, 1.0]], &dev);
        let prompts = Tensor::<Flex, 2>::from_data(
            [
                [0.0, 1.0], // image 0's
                [1.0, 0.0],
                [0.6, 0.6],
                [0.0, 1.0], // image 1's
                [1.0, 0.0],
                [0.0, -1.0],
            ],
            &dev,
        );
        assert_eq!(best_of_own(img, prompts, 3), vec![1, 0]);
    }

    #[test]
    fn rest_prompts_change_one_attribute_and_keep_the_images_others() {
        let j = json!({"shape": "cross", "color": "blue", "size": "large", "count": 2});
        let p = rest_prompts(&j, "shape").unwrap();
        assert_eq!(p.len(), SHAPES.len());
        assert_eq!(p[5], "two large blue crosses");
        assert_eq!(p[0], "two large blue circles");
        let p = rest_prompts(&j, "color").unwrap();
        assert_eq!(p.len(), COLORS.len());
        assert_eq!(p[0], "two large red crosses");
        assert!(rest_prompts(&json!({"shape": "cross"}), "shape").is_none());
    }
}
