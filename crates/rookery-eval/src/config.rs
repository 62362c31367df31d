//! `[eval]`: what an evaluation runs, beside the code that runs it.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::benchmark::{BenchmarkSet, Task};
use crate::openflamingo::Prompts;

/// `[eval]`: what each evaluation runs besides the held-out data's own figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Held-out pages scored for perplexity.
    pub pages: usize,
    /// Held-out questions asked per shot count (stage 2).
    pub questions: usize,
    /// Demonstrations per prompt, one evaluation each.
    pub shots: Vec<usize>,
    /// Prompts per forward pass.
    pub batch: usize,
    /// Stage 2's question prompt, `{question}` and `{answer}` filled in; a demonstration adds
    /// `<|endofchunk|>` (default: OpenFlamingo's VQA prompt).
    pub vqa_prompt: String,
    /// New tokens at most per answer (OpenFlamingo: 5).
    pub max_new_tokens: usize,
    /// Stage "clip": sets in CLIP_benchmark's layouts scored at every evaluation
    /// (`[[eval.tasks]]`), their figures in metrics.jsonl as `NAME/METRIC`.
    pub tasks: Vec<BenchmarkTask>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            pages: 256,
            questions: 240,
            shots: vec![0, 4, 8],
            batch: 16,
            vqa_prompt: Prompts::default().vqa,
            max_new_tokens: 5,
            tasks: Vec::new(),
        }
    }
}

impl EvalConfig {
    /// The checks of `[eval]` (`(key, reason)`), for the stages that evaluate on pages.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.batch == 0 {
            return Err(("eval.batch".into(), "must be at least 1".into()));
        }
        if !self.vqa_prompt.contains("{question}") || !self.vqa_prompt.contains("{answer}") {
            let msg = format!(
                "{:?} needs both {{question}} and {{answer}}",
                self.vqa_prompt
            );
            return Err(("eval.vqa_prompt".into(), msg));
        }
        Ok(())
    }

    /// Stage "clip": every `[[eval.tasks]]` set opens (its files read, its shards found).
    pub fn open_tasks(&self) -> Result<Vec<(BenchmarkTask, BenchmarkSet)>, (String, String)> {
        let mut out = Vec::with_capacity(self.tasks.len());
        for (i, t) in self.tasks.iter().enumerate() {
            let set = t
                .open()
                .map_err(|e| (format!("eval.tasks[{i}].data"), format!("{e:#}")))?;
            out.push((t.clone(), set));
        }
        Ok(out)
    }
}

/// One `[[eval.tasks]]` entry: a set the user brings, scored as CLIP_benchmark scores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkTask {
    /// `zeroshot` or `retrieval`.
    pub task: Task,
    /// CLIP_benchmark's export directory, shards, or an image folder (zero-shot).
    pub data: String,
    /// The prefix of its figures in metrics.jsonl (default: the set's directory name).
    #[serde(default)]
    pub name: String,
    /// The split directory of CLIP_benchmark's layout.
    #[serde(default = "default_split")]
    pub split: String,
    /// Class names file (default: classnames.txt beside the data).
    #[serde(default)]
    pub classnames: String,
    /// Templates file (default: zeroshot_classification_templates.txt beside the data).
    #[serde(default)]
    pub templates: String,
    /// The k of recall@k (retrieval).
    #[serde(default = "default_recall_k")]
    pub recall_k: Vec<usize>,
}

fn default_split() -> String {
    "test".into()
}

fn default_recall_k() -> Vec<usize> {
    vec![1, 5, 10]
}

impl BenchmarkTask {
    /// The set this task names, its files read.
    pub fn open(&self) -> Result<BenchmarkSet> {
        let file = |s: &String| (!s.is_empty()).then(|| Path::new(s.as_str()).to_path_buf());
        let mut set = BenchmarkSet::open(
            &self.data,
            &self.split,
            file(&self.classnames).as_deref(),
            file(&self.templates).as_deref(),
        )?;
        if !self.name.is_empty() {
            set.name = self.name.clone();
        }
        Ok(set)
    }
}
