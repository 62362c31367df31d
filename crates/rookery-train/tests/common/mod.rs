//! Helpers shared by the integration tests (each test file uses some of them).
#![allow(dead_code)]

pub mod recipe;

use std::path::Path;

use burn::backend::Flex;
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::{Backend, Tensor};
use rookery_data::pages::PageBatch;
use rookery_data::synth::{generate, SynthConfig};
use rookery_train::{checkpoint, RunConfig};

/// Copies the files of directory `from` into `to` (created).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Copies `run`'s step-2 checkpoint into `rest`'s run directory as its latest and resumes
/// `rest` from it (a run stopped at step 2, then continued).
pub fn resume_from_step_2(run: &Path, mut rest: RunConfig) {
    rest.train.resume = rookery_train::trainer::Resume::Auto;
    let ck = rest.run_dir().join("checkpoints");
    copy_dir(
        &run.join("checkpoints/step-00000002"),
        &ck.join("step-00000002"),
    );
    std::fs::write(ck.join("latest"), "step-00000002").unwrap();
    rookery_train::train::<burn::backend::Autodiff<Flex>>(&rest, &Default::default()).unwrap();
}

/// A tiny CLIP run on a tiny synthetic set under `dir` (written once), run directory
/// `dir/run`, with `extra` overrides.
pub fn tiny(dir: &Path, run: &str, extra: &[&str]) -> RunConfig {
    let synth = SynthConfig {
        out: dir.join("synth"),
        train_shards: 2,
        train_samples_per_shard: 256,
        val_shards: 1,
        val_samples_per_shard: 48,
        image_size: 32,
        ..Default::default()
    };
    if !synth.is_complete() {
        generate(&synth).unwrap();
    }
    let mut sets: Vec<String> = [
        format!("data.train={}", synth.train_pattern()),
        format!("data.val={}", synth.val_pattern()),
        format!("data.tokenizer={}", synth.tokenizer_path().display()),
        format!("train.run_dir={}", dir.join(run).display()),
        "data.batch_size=16".into(),
        "data.image_size=32".into(),
        "data.context_length=16".into(),
        "data.shuffle_buffer=32".into(),
        "data.decode_threads=1".into(),
        "model.embed_dim=32".into(),
        "model.vision.image_size=32".into(),
        "model.vision.width=32".into(),
        "model.vision.layers=1".into(),
        "model.vision.heads=2".into(),
        "model.text.context_length=16".into(),
        "model.text.width=32".into(),
        "model.text.layers=1".into(),
        "model.text.heads=2".into(),
        "optim.warmup_steps=2".into(),
        "optim.lr=2e-3".into(),
        "log.every=1".into(),
        "log.progress=false".into(),
        "train.eval_every=0".into(),
    ]
    .into();
    sets.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::load(Path::new(""), &sets).unwrap()
}

pub fn losses(run_dir: &Path) -> Vec<f64> {
    rookery_train::metrics::read_metrics(run_dir)
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["loss"].as_f64().unwrap_or(f64::NAN)) // null: NaN
        .collect()
}

/// Every parameter's values of the CLIP checkpoint `path`, in module order.
pub fn weights(cfg: &RunConfig, path: &Path) -> Vec<Vec<f32>> {
    let mut m = cfg.model.clone();
    m.text.vocab_size = rookery_data::TextTokenizer::from_file(&cfg.data.tokenizer)
        .unwrap()
        .vocab_size;
    floats(&checkpoint::load_weights(m.init::<Flex>(&Default::default()), path).unwrap())
}

/// Every float parameter of `m`, in module order.
pub fn floats<Bk: Backend, M: Module<Bk>>(m: &M) -> Vec<Vec<f32>> {
    struct Flat(Vec<Vec<f32>>);
    impl<Bk: Backend> ModuleVisitor<Bk> for Flat {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
            self.0.push(
                p.val()
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .unwrap(),
            );
        }
    }
    let mut f = Flat(Vec::new());
    m.visit(&mut f);
    f.0
}

/// Rows `r` of a page batch, as a batch of their own.
pub fn rows(b: &PageBatch, r: std::ops::Range<usize>) -> PageBatch {
    let (t, n) = (b.context_length, b.max_images);
    let per = n * b.max_frames * 3 * b.image_size * b.image_size;
    PageBatch {
        tokens: b.tokens[r.start * t..r.end * t].to_vec(),
        targets: b.targets[r.start * t..r.end * t].to_vec(),
        images: b.images[r.start * per..r.end * per].to_vec(),
        n_images: b.n_images[r.clone()].to_vec(),
        frames: b.frames[r.start * n..r.end * n].to_vec(),
        batch_size: r.len(),
        keys: b.keys[r.clone()].to_vec(),
        json: b.json[r.clone()].to_vec(),
        epochs: b.epochs[r].to_vec(),
        ..b.clone()
    }
}

/// The gradients of a model's parameters that have one (frozen ones have none), in module
/// order.
pub fn grads_of<M: Module<recipe::B>>(
    m: &M,
    grads: &burn::optim::GradientsParams,
) -> Vec<Vec<f32>> {
    struct Flat<'a>(Vec<Vec<f32>>, &'a burn::optim::GradientsParams);
    impl ModuleVisitor<recipe::B> for Flat<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<recipe::B, D>>) {
            if let Some(g) = self.1.get::<Flex, D>(p.id) {
                self.0.push(g.into_data().to_vec::<f32>().unwrap());
            }
        }
    }
    let mut f = Flat(Vec::new(), grads);
    m.visit(&mut f);
    f.0
}

/// `|a - b| / |b|` over all the vectors together.
pub fn rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den).sqrt()
}
