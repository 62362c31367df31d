//! The tiny stage-2 recipe of the integration tests: a synthetic set, a CLIP and a language
//! model trained a few steps on it, and the Flamingo configuration over them. With
//! `video = true` the pages are the set's video pages.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use rookery_data::synth::{generate, SynthConfig};
use rookery_train::stage::Report;
use rookery_train::{train, RunConfig};

pub type B = Autodiff<Flex>;
pub type IB = Flex;

/// The tiny set under `dir/synth` (written once): pairs and interleaved pages.
pub fn synth(dir: &Path) -> SynthConfig {
    written(SynthConfig {
        out: dir.join("synth"),
        interleaved: true,
        page_shards: 2,
        pages_per_shard: 48,
        val_page_shards: 1,
        ..small()
    })
}

/// The tiny set under `dir/synth-video` (written once): pairs and video pages.
pub fn video_synth(dir: &Path) -> SynthConfig {
    written(SynthConfig {
        out: dir.join("synth-video"),
        video: true,
        video_shards: 2,
        video_pages_per_shard: 32,
        val_video_shards: 1,
        ..small()
    })
}

fn small() -> SynthConfig {
    SynthConfig {
        train_shards: 1,
        train_samples_per_shard: 128,
        val_shards: 1,
        val_samples_per_shard: 32,
        image_size: 32,
        ..Default::default()
    }
}

fn written(s: SynthConfig) -> SynthConfig {
    if !s.is_complete() {
        generate(&s).unwrap();
    }
    s
}

pub fn common(s: &SynthConfig, run: &Path) -> Vec<String> {
    vec![
        format!("data.tokenizer={}", s.tokenizer_path().display()),
        format!("train.run_dir={}", run.display()),
        "data.batch_size=4".into(),
        "data.image_size=32".into(),
        "data.shuffle_buffer=16".into(),
        "data.decode_threads=1".into(),
        "data.interleaved.max_tokens=64".into(),
        "optim.warmup_steps=1".into(),
        "optim.lr=3e-3".into(),
        "log.every=1".into(),
        "log.progress=false".into(),
        "train.eval_every=0".into(),
        "checkpoint.every=2".into(),
    ]
}

pub fn load(sets: Vec<String>) -> RunConfig {
    RunConfig::load(Path::new(""), &sets).unwrap()
}

pub fn clip_cfg(s: &SynthConfig, run: &Path) -> RunConfig {
    let mut sets = common(s, run);
    sets.extend(
        [
            format!("data.train={}", s.train_pattern()),
            "data.val=".into(),
            "data.context_length=16".into(),
            "model.embed_dim=16".into(),
            "model.vision.image_size=32".into(),
            "model.vision.patch_size=8".into(),
            "model.vision.width=32".into(),
            "model.vision.layers=1".into(),
            "model.vision.heads=2".into(),
            "model.text.context_length=16".into(),
            "model.text.width=32".into(),
            "model.text.layers=1".into(),
            "model.text.heads=2".into(),
            "train.steps=2".into(),
        ]
        .map(String::from),
    );
    load(sets)
}

/// Stage "lm" or "flamingo" on the set's pages (video pages for a video set).
pub fn pages_sets(s: &SynthConfig, run: &Path) -> Vec<String> {
    let (train, val) = match s.video {
        true => (s.videos_train_pattern(), s.videos_val_pattern()),
        false => (s.pages_train_pattern(), s.pages_val_pattern()),
    };
    let mut sets = common(s, run);
    sets.extend([
        format!("data.train={train}"),
        format!("data.val={val}"),
        "eval.pages=8".into(),
    ]);
    sets
}

pub fn lm_cfg(s: &SynthConfig, run: &Path) -> RunConfig {
    let mut sets = pages_sets(s, run);
    sets.extend(
        [
            "train.stage=\"lm\"",
            "train.steps=3",
            "lm.style=\"llama\"",
            "lm.context_length=64",
            "lm.width=32",
            "lm.layers=2",
            "lm.heads=2",
            "data.interleaved.mask_before_first_image=false",
        ]
        .map(String::from),
    );
    load(sets)
}

pub fn flamingo_cfg(
    s: &SynthConfig,
    run: &Path,
    clip: &Path,
    lm: &Path,
    steps: usize,
) -> RunConfig {
    let mut sets = pages_sets(s, run);
    sets.extend([
        "train.stage=\"flamingo\"".into(),
        format!("train.steps={steps}"),
        format!("flamingo.vision_from={}", clip.display()),
        format!("flamingo.lm_from={}", lm.display()),
        "flamingo.model.resampler.latents=4".into(),
        "flamingo.model.resampler.depth=1".into(),
        "flamingo.model.resampler.heads=2".into(),
        "flamingo.model.resampler.dim_head=8".into(),
        "flamingo.model.xattn_heads=2".into(),
        "flamingo.model.xattn_dim_head=8".into(),
        "flamingo.model.xattn_ff_mult=2".into(),
        // As flamingo-tiny: the gates train faster than the rest (checked below).
        "flamingo.gate_lr_mult=50".into(),
        "eval.questions=6".into(),
        "eval.shots=[0, 2]".into(),
        "eval.batch=4".into(),
        "eval.vqa_prompt=\"<image>{question} a: {answer}\"".into(),
    ]);
    load(sets)
}

/// Trains the tiny CLIP and LM once; returns their run directories.
pub fn sources(dir: &Path, s: &SynthConfig) -> (PathBuf, PathBuf) {
    let (clip, lm) = (dir.join("clip"), dir.join("lm"));
    train::<B>(&clip_cfg(s, &clip), &Default::default()).unwrap();
    let summary = train::<B>(&lm_cfg(s, &lm), &Default::default()).unwrap();
    let Some(Report::Text(r)) = summary.eval else {
        panic!("the LM stage reports perplexity")
    };
    assert!(r.perplexity.is_finite() && r.perplexity > 1.0, "{r:?}");
    (clip, lm)
}
