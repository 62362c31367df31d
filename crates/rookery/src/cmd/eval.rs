//! `rookery eval`: a checkpoint on its own held-out data (CLIP recall and the synthetic
//! labels; a text stage's perplexity and k-shot answers), any CLIP rookery loads on a set in
//! CLIP_benchmark's layouts (`--task zeroshot|retrieval`), or a Flamingo few-shot on a set in
//! OpenFlamingo's layouts (`--task vqa|captioning`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rookery_eval::benchmark::{BenchmarkReport, BenchmarkSet, Runner, Task};
use rookery_eval::embed::{SiglipTowers, TextEncoder};
use rookery_eval::openflamingo::data::{load_captions, load_vqa};
use rookery_eval::openflamingo::model::FlamingoGenerator;
use rookery_eval::openflamingo::{FewShotConfig, FewShotTask, Prompts, Rices};
use rookery_train::flamingo_io;
use rookery_train::trainer::TrainStage;

use super::embed::{open_clip, open_siglip};
use super::train::{backend, open_checkpoint, print_text_report, Inner};

/// What to evaluate, on what.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Checkpoint or run directory (its latest checkpoint); with --task zeroshot|retrieval
    /// also `rookery export` output, an open_clip, HF CLIP or HF SigLIP directory.
    pub checkpoint: PathBuf,
    /// Held-out shards (default: the checkpoint config's data.val); with --task the set:
    /// CLIP_benchmark's export directory, shards, or an image folder (class_name/*.jpg).
    #[arg(long)]
    pub data: Option<String>,
    /// CLIP: zeroshot (acc1, acc5, mean_per_class_recall) or retrieval
    /// (image_retrieval_recall@k, text_retrieval_recall@k), as CLIP_benchmark scores them.
    /// Flamingo: vqa (VQA accuracy) or captioning (CIDEr-D), k-shot as OpenFlamingo runs them.
    #[arg(long)]
    pub task: Option<EvalTask>,
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
    #[command(flatten)]
    pub few_shot: FewShotArgs,
}

/// `--task vqa|captioning`: the set (`--data`: questions or captions JSON) and its support set.
#[derive(clap::Args)]
pub struct FewShotArgs {
    /// VQA: the annotations JSON of --data's questions.
    #[arg(long)]
    pub annotations: Option<PathBuf>,
    /// The directory of --data's images.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Where demonstrations come from (default: --data itself, never the query).
    #[arg(long)]
    pub support_data: Option<PathBuf>,
    #[arg(long)]
    pub support_annotations: Option<PathBuf>,
    #[arg(long)]
    pub support_images: Option<PathBuf>,
    /// Karpathy's split for demonstrations (queries: --split).
    #[arg(long, default_value = "train")]
    pub support_split: String,
    /// Demonstrations per prompt, one evaluation each.
    #[arg(long, num_args = 1.., default_values_t = [0, 4])]
    pub shots: Vec<usize>,
    /// Seed of the demonstrations drawn (default: the run's data.seed, as its training-time
    /// evaluation draws them).
    #[arg(long)]
    pub seed: Option<u64>,
    /// New tokens at most (default: 5 for vqa, 20 for captioning, as OpenFlamingo).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Score the first N queries only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Choose demonstrations by image similarity under this CLIP (RICES; any CLIP `rookery
    /// eval --task zeroshot` reads, e.g. an open_clip ViT-B-32 as OpenFlamingo uses) instead of
    /// at random.
    #[arg(long, value_name = "CLIP")]
    pub rices: Option<PathBuf>,
    /// Show every video (a directory of frames in place of an image) as its first frame only,
    /// to measure what the other frames add.
    #[arg(long)]
    pub first_frame: bool,
}

/// Every task `rookery eval --task` runs.
#[derive(Clone, Copy, Debug)]
pub enum EvalTask {
    Clip(Task),
    Flamingo(FewShotTask),
}

impl std::str::FromStr for EvalTask {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match (s.parse::<Task>(), s.parse::<FewShotTask>()) {
            (Ok(t), _) => Ok(EvalTask::Clip(t)),
            (_, Ok(t)) => Ok(EvalTask::Flamingo(t)),
            _ => Err(format!(
                "unknown task {s:?}: expected zeroshot, retrieval, vqa or captioning"
            )),
        }
    }
}

/// Runs `rookery eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    match args.task {
        Some(EvalTask::Clip(task)) => benchmark(args, task),
        Some(EvalTask::Flamingo(task)) => few_shot(args, task),
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
    let report = match rookery_interop::is_siglip(&args.checkpoint) {
        true => siglip_benchmark(args, task, &set)?,
        false => clip_benchmark(args, task, &set)?,
    };
    println!("{}", report.line());
    let json = serde_json::json!({
        "model": args.checkpoint.display().to_string(),
        "report": report,
    });
    write_json(args.json.as_deref(), &json)
}

/// `task` on `set` with an HF SigLIP.
fn siglip_benchmark(args: &EvalArgs, task: Task, set: &BenchmarkSet) -> Result<BenchmarkReport> {
    let device = backend::device();
    let s = open_siglip(&args.checkpoint, args.tokenizer.as_deref(), true)?;
    let towers = SiglipTowers {
        model: &s.model,
        tokenizer: s.tokenizer.as_ref(),
        device: &device,
    };
    let runner = Runner::<Inner> {
        towers: &towers,
        data: &s.data,
        batch: args.batch.max(1),
        device: &device,
    };
    runner.run(task, set, &args.recall_k)
}

/// `task` on `set` with any CLIP rookery loads.
fn clip_benchmark(args: &EvalArgs, task: Task, set: &BenchmarkSet) -> Result<BenchmarkReport> {
    let device = backend::device();
    let c = open_clip(&args.checkpoint, args.tokenizer.as_deref(), true)?;
    let towers = TextEncoder {
        model: &c.model,
        tokenizer: c.tokenizer.as_ref().expect("asked for the tokenizer"),
        ctx: c.cfg.text.context_length,
        device: &device,
    };
    let runner = Runner::<Inner> {
        towers: &towers,
        data: &c.data,
        batch: args.batch.max(1),
        device: &device,
    };
    runner.run(task, set, &args.recall_k)
}

/// A Flamingo few-shot on a set in OpenFlamingo's layouts.
fn few_shot(args: &EvalArgs, task: FewShotTask) -> Result<()> {
    let f = &args.few_shot;
    let (Some(data), Some(images)) = (&args.data, &f.images) else {
        bail!("--task {task:?} needs --data (the questions or captions JSON) and --images");
    };
    let load = |data: &Path, ann: Option<&PathBuf>, images: &Path, split: &str| match task {
        FewShotTask::Vqa => {
            let Some(ann) = ann else {
                bail!("--task vqa needs the annotations of {} (--annotations / --support-annotations)", data.display());
            };
            load_vqa(data, ann, images)
        }
        FewShotTask::Captioning => load_captions(data, images, split),
    };
    let mut queries = load(Path::new(data), f.annotations.as_ref(), images, &args.split)?;
    queries.truncate(f.limit.unwrap_or(usize::MAX));
    let support = match &f.support_data {
        None if task == FewShotTask::Captioning => {
            load(Path::new(data), None, images, &f.support_split)?
        }
        None => queries.clone(),
        Some(s) => {
            let imgs = f.support_images.as_deref().unwrap_or(images);
            load(s, f.support_annotations.as_ref(), imgs, &f.support_split)?
        }
    };
    let device = backend::device();
    let (cfg, tk_path, model) = flamingo_io::open_flamingo::<Inner>(&args.checkpoint, &device)?;
    let tokenizer = rookery_data::TextTokenizer::load(&tk_path, &cfg.data.special_tokens)?;
    let rices = match &f.rices {
        None => None,
        Some(clip) => {
            let c = open_clip(clip, None, false)?;
            let batch = args.batch.max(1);
            Some(Rices::embed(
                &c.model, &c.data, &queries, &support, batch, &device,
            )?)
        }
    };
    let max_new = f.max_new_tokens.unwrap_or(match task {
        FewShotTask::Vqa => 5,
        FewShotTask::Captioning => 20,
    });
    let mut generator = FlamingoGenerator::<Inner> {
        model: &model,
        tokenizer: &tokenizer,
        data: &cfg.data,
        max_new,
        first_frame_only: f.first_frame,
        device: &device,
    };
    let run = FewShotConfig {
        task,
        shots: f.shots.clone(),
        seed: f.seed.unwrap_or(cfg.data.seed),
        batch: args.batch.max(1),
        // The run's own question prompt ([eval] vqa_prompt: OpenFlamingo's unless it says).
        prompts: Prompts {
            vqa: cfg.eval.vqa_prompt.clone(),
            ..Default::default()
        },
        rices,
    };
    let report = rookery_eval::openflamingo::evaluate(&run, &queries, &support, &mut generator)?;
    for (k, v) in &report.scores {
        println!("{k}: {v:.4}");
    }
    let json = serde_json::json!({
        "model": args.checkpoint.display().to_string(),
        "task": task,
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
