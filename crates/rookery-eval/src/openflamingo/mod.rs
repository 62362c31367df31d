//! Few-shot VQA and captioning the way OpenFlamingo's evaluation runs them: its data layouts
//! ([`data`]), its prompts, its demonstration sampling and its metrics (VQA accuracy,
//! CIDEr-D).
//!
//! A k-shot prompt is k demonstrations drawn from the support set with a seed (never the query
//! itself), each `<image>Question:{question} Short answer:{answer}<|endofchunk|>` (captions:
//! `<image>Output:{caption}<|endofchunk|>`, the first reference as the answer), then the query
//! with an empty answer. With 0 shots OpenFlamingo still shows two demonstrations, text only
//! (their `<image>` removed, their images not passed). The model continues greedily up to a
//! length, stopping at `<|endofchunk|>`; the continuation is cut as OpenFlamingo cuts it
//! (before `Question`/`Answer`/`Short` and the first `", "`; captions before `Output`, quotes
//! removed) and scored.

pub mod data;
pub mod model;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Result;
use rookery_data::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::cider::{cider_d, tokenize};
use crate::vqa;
pub use data::Example;

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

/// Scores `queries` with demonstrations from `support` (the same set: the query is never its
/// own demonstration).
pub fn evaluate(
    cfg: &FewShotConfig,
    queries: &[Example],
    support: &[Example],
    same_set: bool,
    model: &mut dyn Generate,
) -> Result<FewShotReport> {
    let mut report = FewShotReport {
        examples: queries.len(),
        ..Default::default()
    };
    for &k in &cfg.shots {
        let shown = if k == 0 { 2 } else { k };
        anyhow::ensure!(
            support.len() > shown,
            "{k} shots need more than {shown} support examples; there are {}",
            support.len()
        );
        let mut predictions = Vec::with_capacity(queries.len());
        for (start, chunk) in queries
            .chunks(cfg.batch.max(1))
            .enumerate()
            .map(|(i, c)| (i * cfg.batch.max(1), c))
        {
            let (mut prompts, mut images) = (Vec::new(), Vec::new());
            for (j, q) in chunk.iter().enumerate() {
                let own = same_set.then_some(start + j);
                let demos = draw_demos(
                    support.len(),
                    shown,
                    own,
                    &[cfg.seed, k as u64, (start + j) as u64],
                );
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
            predictions.extend(model.generate(&prompts, &images)?);
        }
        score(cfg.task, k, queries, &predictions, &mut report);
    }
    Ok(report)
}

/// `n` distinct support indices for one query, drawn from the seeds, never `own`.
pub fn draw_demos(support: usize, n: usize, own: Option<usize>, seed: &[u64]) -> Vec<usize> {
    let mut rng = Rng::derive(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = rng.below(support);
        if Some(d) != own && !out.contains(&d) {
            out.push(d);
        }
    }
    out
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
