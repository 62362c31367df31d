//! What the binary's tests share: a tiny CLIP run's `--set` overrides over a tiny synthetic
//! set, and running `rookery` from the repository root.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use rookery_data::synth::{generate, SynthConfig};

pub const BIN: &str = env!("CARGO_BIN_EXE_rookery");

pub fn sets(dir: &Path, run: &str, extra: &[&str]) -> Vec<String> {
    let synth = SynthConfig {
        out: dir.join("synth"),
        train_shards: 4,
        train_samples_per_shard: 64,
        val_shards: 1,
        val_samples_per_shard: 32,
        image_size: 32,
        ..Default::default()
    };
    if !synth.is_complete() {
        generate(&synth).unwrap();
    }
    let mut s: Vec<String> = vec![
        format!("data.train={}", synth.train_pattern()),
        "data.val=".into(),
        format!("data.tokenizer={}", synth.tokenizer_path().display()),
        format!("data.synth.out={}", synth.out.display()),
        "data.synthesize_if_missing=false".into(),
        format!("train.run_dir={}", dir.join(run).display()),
        "data.batch_size=8".into(),
        "data.image_size=32".into(),
        "data.context_length=16".into(),
        "data.shuffle_buffer=16".into(),
        "data.workers=1".into(),
        "model.embed_dim=32".into(),
        "model.vision.image_size=32".into(),
        "model.vision.width=32".into(),
        "model.vision.layers=1".into(),
        "model.vision.heads=2".into(),
        "model.text.context_length=16".into(),
        "model.text.width=32".into(),
        "model.text.layers=1".into(),
        "model.text.heads=2".into(),
        "log.every=1".into(),
        "log.progress=false".into(),
    ];
    s.extend(extra.iter().map(|x| x.to_string()));
    s
}

pub fn rookery(args: &[&str], set: &[String]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    for s in set {
        c.arg("--set").arg(s);
    }
    c
}

pub fn check(out: Output) -> Output {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tensor `name` of the safetensors file `path` (f32, `[N, E]`) as rows.
pub fn rows(path: &Path, name: &str) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    v.chunks(t.shape()[1]).map(|r| r.to_vec()).collect()
}
