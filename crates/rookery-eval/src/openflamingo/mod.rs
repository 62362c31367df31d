//! Few-shot VQA and captioning the way OpenFlamingo's evaluation runs them: its data layouts
//! ([`data`]), its prompts, its demonstration sampling and its metrics (VQA accuracy,
//! CIDEr-D).
//!
//! A k-shot prompt is k demonstrations drawn from the support set with a seed, or chosen by
//! image similarity ([`rices`]) (never the query's own image), each `<image>Question:{question} Short answer:{answer}<|endofchunk|>` (captions:
//! `<image>Output:{caption}<|endofchunk|>`, the first reference as the answer), then the query
//! with an empty answer. With 0 shots OpenFlamingo still shows two demonstrations, text only
//! (their `<image>` removed, their images not passed). The model continues greedily up to a
//! length, stopping at `<|endofchunk|>`; the continuation is cut as OpenFlamingo cuts it
//! (before `Question`/`Answer`/`Short` and the first `", "`; captions before `Output`, quotes
//! removed) and scored.

pub mod data;
pub mod model;
pub mod rices;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result};
use rookery_data::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::cider::{cider_d, tokenize};
use crate::vqa;
pub use data::Example;
pub use rices::Rices;

/// Which few-shot task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FewShotTask {
    Vqa,
    Captioning,
}

impl FromStr for FewShotTask {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vqa" => Ok(FewShotTask::Vqa),
            "captioning" => Ok(FewShotTask::Captioning),
            _ => Err(format!("unknown task {s:?}: expected vqa or captioning")),
        }
    }
}

/// Prompt formats, `{question}` and `{answer}` filled in (OpenFlamingo's by default).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prompts {
    pub vqa: String,
    pub caption: String,
}

impl Default for Prompts {
    fn default() -> Self {
        Prompts {
            vqa: "<image>Question:{question} Short answer:{answer}".into(),
            caption: "<image>Output:{answer}".into(),
        }
    }
}

impl Prompts {
    fn format(&self, task: FewShotTask, ex: &Example, answer: Option<&str>) -> String {
        let f = match task {
            FewShotTask::Vqa => &self.vqa,
            FewShotTask::Captioning => &self.caption,
        };
        let text = f
            .replace("{question}", ex.question.as_deref().unwrap_or(""))
            .replace("{answer}", answer.unwrap_or(""));
        match answer {
            Some(_) => text + "<|endofchunk|>",
            None => text,
        }
    }

    /// A demonstration: the example with its first reference as the answer.
    pub fn demo(&self, task: FewShotTask, ex: &Example) -> String {
        self.format(task, ex, Some(ex.answers[0].trim()))
    }

    /// The query: the example with the answer left for the model.
    pub fn query(&self, task: FewShotTask, ex: &Example) -> String {
        self.format(task, ex, None)
    }
}

/// Runs the model: prompts (with `<image>` where each image goes) and each prompt's image
/// files, in order; returns each prompt's continuation as text.
pub trait Generate {
    fn generate(&mut self, prompts: &[String], images: &[Vec<PathBuf>]) -> Result<Vec<String>>;
}

/// How to run an evaluation.
#[derive(Clone, Debug)]
pub struct FewShotConfig {
    pub task: FewShotTask,
    pub shots: Vec<usize>,
    pub seed: u64,
    /// Prompts per forward pass.
    pub batch: usize,
    pub prompts: Prompts,
    /// Demonstrations by image similarity ([`Rices`]) instead of drawn at random.
    pub rices: Option<Rices>,
}

/// The scores per shot count: `vqa_accuracy_{k}shot` (and per answer type
/// `vqa_accuracy_{k}shot_{type}`) or `cider_{k}shot` (pycocoevalcap's CIDEr-D, not x100).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FewShotReport {
    pub examples: usize,
    pub scores: BTreeMap<String, f64>,
    /// The first few predictions of each shot count, for a look.
    pub samples: BTreeMap<String, Vec<(String, String)>>,
}

/// Scores `queries` with demonstrations from `support` (which may be the same set: a
/// demonstration never shows the query's own image).
pub fn evaluate(
    cfg: &FewShotConfig,
    queries: &[Example],
    support: &[Example],
    model: &mut dyn Generate,
) -> Result<FewShotReport> {
    let mut report = FewShotReport {
        examples: queries.len(),
        ..Default::default()
    };
    for &k in &cfg.shots {
        let shown = if k == 0 { 2 } else { k };
        let mut predictions = Vec::with_capacity(queries.len());
        for (start, chunk) in queries
            .chunks(cfg.batch.max(1))
            .enumerate()
            .map(|(i, c)| (i * cfg.batch.max(1), c))
        {
            let (mut prompts, mut images) = (Vec::new(), Vec::new());
            for (j, q) in chunk.iter().enumerate() {
                let demos = match &cfg.rices {
                    Some(r) => r.demos(start + j, shown, support, &q.image),
                    None => {
                        let seed = [cfg.seed, k as u64, (start + j) as u64];
                        draw_demos(support, shown, &q.image, &seed)?
                    }
                };
                let mut text = String::new();
                let mut files = Vec::new();
                for &d in &demos {
                    let demo = cfg.prompts.demo(cfg.task, &support[d]);
                    match k {
                        0 => text.push_str(&demo.replace("<image>", "")),
                        _ => {
                            text.push_str(&demo);
                            files.push(support[d].image.clone());
                        }
                    }
                }
                text.push_str(&cfg.prompts.query(cfg.task, q));
                files.push(q.image.clone());
                prompts.push(text);
                images.push(files);
            }
            let out = model
                .generate(&prompts, &images)
                .with_context(|| format!("{k}-shot prompts"))?;
            predictions.extend(out);
        }
        score(cfg.task, k, queries, &predictions, &mut report);
    }
    Ok(report)
}

/// `n` distinct support indices for one query, drawn from the seeds, none showing `image`.
pub fn draw_demos(support: &[Example], n: usize, image: &Path, seed: &[u64]) -> Result<Vec<usize>> {
    let eligible = support.iter().filter(|e| e.image != image).count();
    anyhow::ensure!(
        eligible >= n,
        "{n} demonstrations needed, but the support set has {eligible} examples of other images"
    );
    let mut rng = Rng::derive(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = rng.below(support.len());
        if support[d].image != image && !out.contains(&d) {
            out.push(d);
        }
    }
    Ok(out)
}

/// A continuation as OpenFlamingo cuts it before scoring.
pub fn postprocess(task: FewShotTask, text: &str) -> String {
    match task {
        FewShotTask::Vqa => vqa::postprocess_generation(text).to_string(),
        FewShotTask::Captioning => text.split("Output").next().unwrap_or("").replace('"', ""),
    }
}

fn score(
    task: FewShotTask,
    k: usize,
    queries: &[Example],
    raw: &[String],
    report: &mut FewShotReport,
) {
    let preds: Vec<String> = raw.iter().map(|t| postprocess(task, t)).collect();
    let look: Vec<(String, String)> = queries
        .iter()
        .zip(&preds)
        .take(5)
        .map(|(q, p)| {
            (
                q.question.clone().unwrap_or_else(|| q.id.clone()),
                p.clone(),
            )
        })
        .collect();
    report.samples.insert(format!("{k}shot"), look);
    match task {
        FewShotTask::Vqa => {
            let mut by_type: BTreeMap<String, (f64, usize)> = BTreeMap::new();
            let mut total = 0.0;
            for (q, p) in queries.iter().zip(&preds) {
                let acc = vqa::accuracy(p, &q.answers);
                total += acc;
                if let Some(t) = &q.kind {
                    let e = by_type.entry(t.clone()).or_default();
                    e.0 += acc;
                    e.1 += 1;
                }
            }
            report.scores.insert(
                format!("vqa_accuracy_{k}shot"),
                total / queries.len().max(1) as f64,
            );
            for (t, (sum, n)) in by_type {
                report
                    .scores
                    .insert(format!("vqa_accuracy_{k}shot_{t}"), sum / n as f64);
            }
        }
        FewShotTask::Captioning => {
            let cands: Vec<String> = preds.iter().map(|p| tokenize(p)).collect();
            let refs: Vec<Vec<String>> = queries
                .iter()
                .map(|q| q.answers.iter().map(|a| tokenize(a)).collect())
                .collect();
            let (corpus, _) = cider_d(&cands, &refs);
            report.scores.insert(format!("cider_{k}shot"), corpus);
        }
    }
}
