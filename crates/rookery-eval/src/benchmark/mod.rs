//! CLIP evaluated the way CLIP_benchmark evaluates it, on sets the user brings
//! ([`data`] finds them): zero-shot classification (templates averaged in embedding space,
//! `acc1` / `acc5` / `mean_per_class_recall`) and image-text retrieval with several captions
//! per image (`image_retrieval_recall@k`, `text_retrieval_recall@k`). Scores come from ranks
//! ([`crate::metrics`]), so nothing of size images x classes or images x captions is kept.

pub mod data;
mod read;

use std::collections::BTreeMap;
use std::str::FromStr;

use anyhow::{bail, Result};
use burn::prelude::*;
use rookery_data::DataConfig;
use serde::{Deserialize, Serialize};

use crate::clip::ensure_finite;
use crate::embed::{class_embeddings, Towers};
use crate::metrics::{classification, rank_of_best, retrieval};
pub use data::BenchmarkSet;
use read::{for_each_batch, Want};

/// What to measure on a set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Zero-shot classification (CLIP_benchmark's `zeroshot_classification`).
    Zeroshot,
    /// Image-text retrieval (CLIP_benchmark's `zeroshot_retrieval`).
    Retrieval,
}

impl FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zeroshot" => Ok(Task::Zeroshot),
            "retrieval" => Ok(Task::Retrieval),
            _ => Err(format!(
                "unknown task {s:?}: expected zeroshot or retrieval"
            )),
        }
    }
}

/// One set's figures, under CLIP_benchmark's metric names.
#[derive(Clone, Debug, Serialize)]
pub struct BenchmarkReport {
    pub dataset: String,
    pub task: Task,
    /// Images scored.
    pub images: usize,
    /// Captions (retrieval) or class prompts (zero-shot) embedded.
    pub texts: usize,
    /// Samples left out: undecodable, or without the label or captions the task needs.
    pub skipped: usize,
    pub metrics: BTreeMap<String, f64>,
}

impl BenchmarkReport {
    /// One line: the set, the task and its figures.
    pub fn line(&self) -> String {
        let figs: Vec<String> = self
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        format!(
            "{} {:?}: {} ({} images, {} skipped)",
            self.dataset,
            self.task,
            figs.join(", "),
            self.images,
            self.skipped
        )
    }
}

/// How to run the model: its towers, image preparation and batch size.
pub struct Runner<'a, B: Backend> {
    /// A CLIP ([`crate::embed::TextEncoder`]) or a SigLIP ([`crate::embed::SiglipTowers`]).
    pub towers: &'a dyn Towers<B>,
    /// `image_size` and `image_norm` prepare the images (center crop, as for held-out data).
    pub data: &'a DataConfig,
    pub batch: usize,
    pub device: &'a B::Device,
}

impl<B: Backend> Runner<'_, B> {
    /// Runs `task` on `set`.
    pub fn run(&self, task: Task, set: &BenchmarkSet, ks: &[usize]) -> Result<BenchmarkReport> {
        match (task, set.dataset_type.as_deref()) {
            (Task::Zeroshot, Some("retrieval")) => {
                bail!(
                    "{}: dataset_type.txt says retrieval; use --task retrieval",
                    set.name
                )
            }
            (Task::Zeroshot, Some("multilabel")) => {
                bail!("{}: multi-label classification is not supported", set.name)
            }
            (Task::Zeroshot, _) => self.zero_shot(set),
            (Task::Retrieval, _) => self.retrieval(set, ks),
        }
    }

    /// Zero-shot classification: each image's rank of its class among all classes.
    fn zero_shot(&self, set: &BenchmarkSet) -> Result<BenchmarkReport> {
        let (Some(classes), Some(templates)) = (&set.classnames, &set.templates) else {
            bail!(
                "{}: zero-shot needs classnames.txt and zeroshot_classification_templates.txt beside the data, or --classnames and --templates",
                set.name
            );
        };
        let prompts: Vec<Vec<String>> = classes
            .iter()
            .map(|c| templates.iter().map(|t| data::fill(t, c)).collect())
            .collect();
        let weights = class_embeddings(self.towers, &prompts)?; // [C, E]
        ensure_finite(&weights, "class embeddings")?;
        let (mut ranks, mut targets) = (Vec::new(), Vec::new());
        let c = classes.len();
        let skipped = for_each_batch(set, Want::Class(c), self.data, self.batch, |batch| {
            let img = self.towers.images(batch.images::<B>(self.device));
            ensure_finite(&img, "image embeddings")?;
            let scores = host(img.matmul(weights.clone().transpose()));
            for (row, &t) in scores.chunks(c).zip(&batch.classes) {
                ranks.push(rank_of_best(row, &[t]).expect("one positive"));
                targets.push(t);
            }
            Ok(())
        })?;
        ensure_some(set, ranks.len())?;
        Ok(BenchmarkReport {
            dataset: set.name.clone(),
            task: Task::Zeroshot,
            images: ranks.len(),
            texts: c * templates.len(),
            skipped,
            metrics: classification(&ranks, &targets, c),
        })
    }

    /// Retrieval: each caption's rank of its image, each image's rank of its best caption.
    fn retrieval(&self, set: &BenchmarkSet, ks: &[usize]) -> Result<BenchmarkReport> {
        let (mut img, mut captions, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        let mut images = 0usize;
        let skipped = for_each_batch(set, Want::Captions, self.data, self.batch, |batch| {
            let e = self.towers.images(batch.images::<B>(self.device));
            ensure_finite(&e, "image embeddings")?;
            for caps in batch.captions {
                owner.extend(std::iter::repeat_n(images, caps.len()));
                captions.extend(caps);
                images += 1;
            }
            img.push(e);
            Ok(())
        })?;
        ensure_some(set, img.len())?;
        let img = Tensor::cat(img, 0); // [N, E]
        let txt = self.towers.texts(&captions)?; // [M, E]
        ensure_finite(&txt, "caption embeddings")?;
        let n = img.dims()[0];
        let mut texts_of = vec![Vec::new(); n];
        for (t, &i) in owner.iter().enumerate() {
            texts_of[i].push(t);
        }
        let text_ranks = block_ranks(&txt, &img, self.batch, |t| vec![owner[t]]);
        let image_ranks = block_ranks(&img, &txt, self.batch, |i| texts_of[i].clone());
        Ok(BenchmarkReport {
            dataset: set.name.clone(),
            task: Task::Retrieval,
            images: n,
            texts: captions.len(),
            skipped,
            metrics: retrieval(&text_ranks, &image_ranks, ks),
        })
    }
}

/// For each row of `queries` `[Q, E]`, the rank of its best positive among `candidates`
/// `[K, E]`, `block` queries at a time.
fn block_ranks<B: Backend>(
    queries: &Tensor<B, 2>,
    candidates: &Tensor<B, 2>,
    block: usize,
    positives: impl Fn(usize) -> Vec<usize>,
) -> Vec<usize> {
    let [q, _] = queries.dims();
    let k = candidates.dims()[0];
    let cand_t = candidates.clone().transpose();
    let mut ranks = Vec::with_capacity(q);
    for start in (0..q).step_by(block.max(1)) {
        let end = (start + block.max(1)).min(q);
        let scores = host(queries.clone().slice(start..end).matmul(cand_t.clone()));
        for (j, row) in scores.chunks(k).enumerate() {
            ranks.push(rank_of_best(row, &positives(start + j)).unwrap_or(k));
        }
    }
    ranks
}

fn host<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 scores")
}

fn ensure_some(set: &BenchmarkSet, n: usize) -> Result<()> {
    anyhow::ensure!(n > 0, "{}: no usable sample to score", set.name);
    Ok(())
}
