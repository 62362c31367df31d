//! The captioning and VQA metrics against the reference implementations' own numbers
//! (fixtures/generate_captioning.py: pycocoevalcap's Java PTBTokenizer and CIDEr-D,
//! OpenFlamingo's vqa_metric.py) on the same inputs.

use std::path::Path;

use rookery_eval::cider::{cider_d, tokenize};
use rookery_eval::vqa::{accuracy, postprocess_generation};
use serde_json::Value;

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/captioning_vqa_metrics.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn tokenisation_matches_pycocoevalcaps_ptb_tokenizer() {
    for case in fixture()["tokenize"].as_array().unwrap() {
        let (caption, want) = (
            case["caption"].as_str().unwrap(),
            case["tokens"].as_str().unwrap(),
        );
        assert_eq!(tokenize(caption), want, "caption {caption:?}");
    }
}

#[test]
fn cider_d_matches_pycocoevalcap() {
    let f = &fixture()["cider"];
    let refs: Vec<Vec<String>> = f["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(strings)
        .collect();
    let cands = strings(&f["candidates"]);
    let (corpus, per_image) = cider_d(&cands, &refs);
    for (i, (got, want)) in per_image
        .iter()
        .zip(f["per_image"].as_array().unwrap())
        .enumerate()
    {
        let want = want.as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-9,
            "image {i}: {got} vs pycocoevalcap {want}"
        );
    }
    let want = f["corpus"].as_f64().unwrap();
    assert!(
        (corpus - want).abs() < 1e-9,
        "corpus {corpus} vs pycocoevalcap {want}"
    );
}

#[test]
fn vqa_accuracy_matches_open_flamingos_vqa_metric() {
    for q in fixture()["vqa"].as_array().unwrap() {
        let raw = q["generation"].as_str().unwrap();
        let cut = postprocess_generation(raw);
        assert_eq!(cut, q["answer"].as_str().unwrap(), "cutting {raw:?}");
        let got = accuracy(cut, &strings(&q["answers"]));
        let want = q["accuracy"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-9,
            "{raw:?}: {got} vs OpenFlamingo {want}"
        );
    }
}
