//! `rookery eval`: a checkpoint on its own held-out data (CLIP recall and the synthetic
//! labels; a text stage's perplexity and k-shot answers), or any CLIP rookery loads on a set
//! in CLIP_benchmark's layouts (`--task zeroshot|retrieval`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rookery_eval::benchmark::{BenchmarkSet, Runner, Task};
use rookery_train::flamingo_io;
use rookery_train::trainer::TrainStage;

use super::embed::{open_clip, LoadedClip};
use super::train::{backend, open_checkpoint, print_text_report, Inner};

/// What to evaluate, on what.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Checkpoint or run directory (its latest checkpoint); with --task also `rookery
    /// export` output or an open_clip / HF CLIP directory.
    pub checkpoint: PathBuf,
    /// Held-out shards (default: the checkpoint config's data.val); with --task the set:
    /// CLIP_benchmark's export directory, shards, or an image folder (class_name/*.jpg).
    #[arg(long)]
    pub data: Option<String>,
    /// zeroshot (classification: acc1, acc5, mean_per_class_recall) or retrieval
    /// (image_retrieval_recall@k, text_retrieval_recall@k), as CLIP_benchmark scores them.
    #[arg(long)]
    pub task: Option<Task>,
    /// Class names, one a line (default: classnames.txt beside the data).
    #[arg(long, requires = "task")]
    pub classnames: Option<PathBuf>,
    /// Templates with {c}, one a line (default: zeroshot_classification_templates.txt).
    #[arg(long, requires = "task")]
    pub templates: Option<PathBuf>,
    /// The split directory of CLIP_benchmark's layout.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// The k of recall@k.
    #[arg(long, num_args = 1.., default_values_t = [1, 5, 10])]
    pub recall_k: Vec<usize>,
    /// Images (and texts) per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// tokenizer.json (default: the one beside the weights or the run's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Also write the result here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Runs `rookery eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    match args.task {
        Some(task) => benchmark(args, task),
        None => held_out(&args.checkpoint, args.data.clone(), args.json.as_deref()),
    }
}

/// A CLIP on a set the user brings.
fn benchmark(args: &EvalArgs, task: Task) -> Result<()> {
    let Some(data) = &args.data else {
        bail!("--task {task:?} needs --data: the set to evaluate on");
    };
    let set = BenchmarkSet::open(
        data,
        &args.split,
        args.classnames.as_deref(),
        args.templates.as_deref(),
    )?;
    let LoadedClip {
        model,
        tokenizer,
        data: data_cfg,
        ..
    } = open_clip(&args.checkpoint, args.tokenizer.as_deref(), true)?;
    let tokenizer = tokenizer.expect("asked for the tokenizer");
    let device = backend::device();
    let runner = Runner::<Inner> {
        model: &model,
        tokenizer: &tokenizer,
        data: &data_cfg,
        batch: args.batch.max(1),
        device: &device,
    };
    let report = runner.run(task, &set, &args.recall_k)?;
    println!("{}", report.line());
    let json = serde_json::json!({
        "model": args.checkpoint.display().to_string(),
        "report": report,
    });
    write_json(args.json.as_deref(), &json)
}

/// A checkpoint on its own held-out data.
fn held_out(path: &Path, data: Option<String>, json: Option<&Path>) -> Result<()> {
    if flamingo_io::stage_of(path)? != TrainStage::Clip {
        let r = flamingo_io::evaluate_text_checkpoint::<Inner>(path, data, &backend::device())?;
        print_text_report(&r);
        return write_json(json, &serde_json::to_value(&r)?);
    }
    let (_, mut cfg, model) = open_checkpoint(path)?;
    if let Some(d) = data {
        cfg.data.val = d;
    }
    let tokenizer = Arc::new(rookery_data::TextTokenizer::of(&cfg.data)?);
    let r = rookery_eval::clip::evaluate(&model, &cfg.data, tokenizer, &backend::device())?;
    write_json(json, &serde_json::to_value(&r)?)
}

/// Prints `value` and writes it to `path` too when given.
fn write_json(path: Option<&Path>, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    println!("{text}");
    if let Some(p) = path {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
