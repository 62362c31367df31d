//! `rookery train`, `export` and `generate`: pick the backend, prepare data, run.

use std::path::Path;

use anyhow::{Context, Result};
use rookery_train::flamingo_io;
use rookery_train::parallel::DistBackend;
use rookery_train::stage::Report;
use rookery_train::trainer::{Resume, TrainStage};
use rookery_train::RunConfig;

#[cfg(not(feature = "cuda"))]
pub(crate) mod backend {
    pub type Train = burn::backend::Autodiff<burn::backend::Flex>;
    pub fn device() -> burn::prelude::Device<Train> {
        Default::default()
    }
    /// Every CPU rank shares the one CPU device.
    pub fn device_of(_local_rank: usize) -> burn::prelude::Device<Train> {
        Default::default()
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod backend {
    pub type Train = burn::backend::Autodiff<burn::backend::Cuda>;
    pub fn device() -> burn::prelude::Device<Train> {
        device_of(0)
    }
    /// One GPU per rank on a node; wrapped to the GPUs this process sees
    /// ([`rookery_dist::launch::gpu_index`]).
    pub fn device_of(local_rank: usize) -> burn::prelude::Device<Train> {
        let visible = rookery_dist::nccl::visible_gpus();
        burn::backend::cuda::CudaDevice::new(rookery_dist::launch::gpu_index(local_rank, visible))
    }
}

/// Loads and checks the config, synthesizes the embedded data if needed, and trains.
pub fn run(config: &Path, overrides: &[String], resume: bool, overwrite: bool) -> Result<()> {
    let mut cfg = RunConfig::load(config, overrides)?;
    if resume {
        cfg.train.resume = Resume::Auto;
    }
    cfg.train.overwrite |= overwrite;
    if cfg.dist.backend == DistBackend::Nccl && !cfg!(feature = "cuda") {
        anyhow::bail!("{}: dist.backend = \"nccl\" needs a build with the `cuda` feature (cargo build --release --features cuda)", config.display());
    }
    let env = rookery_dist::launch::RankEnv::detect().map_err(anyhow::Error::msg)?;
    match env.as_ref().filter(|e| e.rank > 0) {
        None => ensure_data(&cfg)?,
        Some(_) => wait_for_data(&cfg)?,
    }
    cfg.check_shards()
        .map_err(|(key, msg)| anyhow::anyhow!("{}: key `{key}`: {msg}", config.display()))?;
    #[cfg(feature = "cuda")]
    {
        let missing = rookery_dist::libs::cuda_runtime_missing();
        if !missing.is_empty() {
            anyhow::bail!("this is a CUDA build (it trains on GPUs only) and this machine lacks: {}. `rookery doctor` lists what is here", missing.join("; "));
        }
        ensure_nccl(&cfg)?;
    }
    stop_on_signals()?;
    let summary = rookery_train::train_on::<backend::Train>(&cfg, backend::device_of)?;
    if summary.rank != 0 {
        return Ok(());
    }
    if summary.stopped {
        println!(
            "stopped by a signal after step {} of {}; checkpoint: {}\ncontinue with: rookery train {} --resume{}",
            summary.steps,
            cfg.train.steps,
            summary.model_dir.display(),
            config.display(),
            overrides.iter().map(|s| format!(" --set {s}")).collect::<String>()
        );
        return Ok(());
    }
    println!(
        "trained {} steps in {:.0} s, final loss {:.4}",
        summary.steps, summary.wall_s, summary.final_loss
    );
    match &summary.eval {
        Some(Report::Clip(e)) => print_clip_report(e),
        Some(Report::Text(t)) => print_text_report(t),
        None => {}
    }
    println!("checkpoint: {}", summary.model_dir.display());
    Ok(())
}

/// Makes NCCL loadable before any rank starts ([`rookery_dist::libs`]): when cudarc cannot
/// open it but it is there under its versioned name (`libnccl.so.2`), this process starts
/// again (same pid, same arguments) with a directory holding a `libnccl.so` link first on
/// `LD_LIBRARY_PATH`, which the loader reads only at start; when it is nowhere, an error that
/// says where it was looked for and where it comes from.
#[cfg(feature = "cuda")]
fn ensure_nccl(cfg: &RunConfig) -> Result<()> {
    use std::os::unix::process::CommandExt;
    const AGAIN: &str = "ROOKERY_NCCL_LINKED";
    if cfg.dist.backend != DistBackend::Nccl || rookery_dist::nccl::library_loadable() {
        return Ok(());
    }
    let Some(found) = rookery_dist::libs::find_library("libnccl.so") else {
        let dirs: Vec<String> = rookery_dist::libs::search_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        anyhow::bail!("dist.backend = \"nccl\": no NCCL library (libnccl.so*) in {}: install Debian's libnccl2 or pip's nvidia-nccl-cu12, or put its directory on LD_LIBRARY_PATH", dirs.join(":"));
    };
    if std::env::var_os(AGAIN).is_some() {
        anyhow::bail!("dist.backend = \"nccl\": {} was found but does not load (built for another CUDA or machine?)", found.display());
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("rookery");
    let dir = rookery_dist::libs::nccl_link_dir(&found, &cache)
        .with_context(|| format!("linking {} under {}", found.display(), cache.display()))?;
    tracing::info!(nccl = %found.display(), link = %dir.display(), "cudarc opens libnccl.so only: starting again with a link to it on LD_LIBRARY_PATH");
    let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let err = std::process::Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", format!("{}:{path}", dir.display()))
        .env(AGAIN, "1")
        .exec();
    Err(err).context("starting again with NCCL on LD_LIBRARY_PATH")
}

/// `rookery train --dry-run`: the resolved shapes' parameter counts and the memory a rank
/// needs at least ([`rookery_train::memory`]), without touching the run directory.
pub fn dry_run(config: &Path, overrides: &[String]) -> Result<()> {
    let cfg = RunConfig::load(config, overrides)?;
    let (cfg, note) = match cfg.train.stage {
        TrainStage::Flamingo => rookery_train::stage::flamingo::resolve_dry(&cfg)?,
        TrainStage::Clip | TrainStage::Lm => (cfg, None),
    };
    if let Some(n) = note {
        println!("note: {n}");
    }
    let e = rookery_train::memory::estimate(&cfg);
    let gib = |b: f64| b / (1u64 << 30) as f64;
    println!(
        "{}: stage \"{}\", config valid",
        config.display(),
        cfg.train.stage
    );
    println!(
        "parameters        {:.3e} ({:.3e} trained)",
        e.params,
        e.optimizer / 12.0
    );
    let dtype = match e.frozen_bf16 {
        true => "f32, frozen towers bf16",
        false => "f32",
    };
    println!("weights           {:.1} GiB ({dtype})", gib(e.weights));
    println!("gradients + Adam  {:.1} GiB", gib(e.optimizer));
    println!(
        "activations       {:.1} GiB (data.batch_size = {} per rank)",
        gib(e.activations),
        cfg.data.batch_size
    );
    println!("decoded batches   {:.1} GiB", gib(e.batches));
    println!(
        "at least          {:.1} GiB per process (attention maps and allocator slack not counted)",
        gib(e.total())
    );
    Ok(())
}

/// SIGTERM, SIGINT and SIGUSR1 (what Slurm sends before a time limit or preemption with
/// `--signal`) ask the trainer to checkpoint after the current step and stop; a second one
/// CLIP's final evaluation: `[[eval.tasks]]` figures, then the held-out ones.
fn print_clip_report(e: &rookery_eval::clip::EvalReport) {
    for (k, v) in &e.benchmarks {
        println!("{k}: {v:.4}");
    }
    if e.n == 0 {
        return; // no held-out data: [[eval.tasks]] only
    }
    println!(
        "held-out ({} pairs): image->text R@1 {:.3} R@5 {:.3} R@10 {:.3}; text->image R@1 {:.3}; chance R@1 {:.4}",
        e.n, e.i2t_r1, e.i2t_r5, e.i2t_r10, e.t2i_r1, e.chance_r1
    );
    for (label, (acc, chance)) in &e.zero_shot {
        let rest = e
            .zero_shot_given_rest
            .get(label)
            .copied()
            .unwrap_or(f64::NAN);
        println!(
            "zero-shot {label}: {acc:.3}, {rest:.3} given the rest (chance {chance:.3}; {} single-group images)",
            e.zero_shot_images
        );
    }
    if !e.i2t_confusions.is_empty() {
        println!(
            "image->text top-1 mistakes by what differs: {:?}",
            e.i2t_confusions
        );
    }
}

/// ends the process at once (exit status 130).
fn stop_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let flag = rookery_train::trainer::stop_flag();
    for sig in [SIGTERM, SIGINT, SIGUSR1] {
        // Registered first, so it sees the flag as the earlier signal left it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(())
}

pub fn print_text_report(t: &rookery_eval::fewshot::TextReport) {
    println!(
        "held-out perplexity {:.3} over {} tokens",
        t.perplexity, t.tokens
    );
    for (k, v) in &t.acc {
        println!("{k}: {v:.3} ({} questions)", t.questions);
    }
}

/// Writes the synthetic shards when the config asks for them and they are absent or stale.
fn ensure_data(cfg: &RunConfig) -> Result<()> {
    let d = &cfg.data;
    if !d.synthesize_if_missing || d.synth.is_complete() {
        return Ok(());
    }
    if !uses_synth(d) {
        return Ok(());
    }
    let out = d.synth.out.display();
    match d.synth.out.join("synth.json").exists() {
        // Regenerated in place: a run trained on the old set keeps its tokenizer's copy in its
        // checkpoints, and refuses the new one if its ids differ.
        true => {
            tracing::warn!(%out, "synthetic shards were written with other [data.synth] settings (or an older version): generating them again")
        }
        false => tracing::info!(%out, "synthetic shards are absent: generating them first"),
    }
    let t = std::time::Instant::now();
    let s = rookery_data::synth::generate(&d.synth)?;
    tracing::info!(
        train = s.train,
        val = s.val,
        seconds = %format!("{:.1}", t.elapsed().as_secs_f64()),
        "synthetic shards written"
    );
    Ok(())
}

/// Whether the training shards are the synthetic set's pairs, pages or video pages.
fn uses_synth(d: &rookery_data::DataConfig) -> bool {
    d.train == d.synth.train_pattern()
        || (d.synth.interleaved && d.train == d.synth.pages_train_pattern())
        || (d.synth.video && d.train == d.synth.videos_train_pattern())
}

/// Other processes of a job wait while rank 0 synthesizes the embedded data.
fn wait_for_data(cfg: &RunConfig) -> Result<()> {
    let d = &cfg.data;
    if !d.synthesize_if_missing || !uses_synth(d) {
        return Ok(());
    }
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs_f64(cfg.dist.eval_timeout_s);
    while !d.synth.is_complete() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("rank 0 did not finish writing the synthetic shards in {} within dist.eval_timeout_s", d.synth.out.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}

pub(crate) type Inner = <backend::Train as burn::tensor::backend::AutodiffBackend>::InnerBackend;

/// A checkpoint directory and its model, from a checkpoint or a run directory (its latest).
pub(crate) fn open_checkpoint(
    path: &Path,
) -> Result<(std::path::PathBuf, RunConfig, rookery_model::Clip<Inner>)> {
    let dir = rookery_train::checkpoint::resolve(path)?;
    let mut cfg = RunConfig::load(&dir.join("config.toml"), &[])?;
    cfg.data.tokenizer = rookery_train::checkpoint::tokenizer_of(&dir, &cfg);
    let model = cfg.model.init::<Inner>(&backend::device());
    let model = rookery_train::checkpoint::load_weights(model, &dir.join("model.safetensors"))?;
    Ok((dir, cfg, model))
}

/// `rookery export`; `format` is `open_clip`, `hf` or `open_flamingo`.
pub fn export(path: &Path, out: &Path, bf16: bool, format: &str, full: bool) -> Result<()> {
    let flamingo = flamingo_io::stage_of(path)? == TrainStage::Flamingo;
    match (flamingo, format) {
        (true, "open_flamingo") => flamingo_io::export_open_flamingo(path, out, bf16)?,
        (true, "hf") => anyhow::bail!("{}: a Flamingo checkpoint exports with --format open_flamingo (OpenFlamingo's names) or open_clip (rookery's names, the default)", path.display()),
        (true, _) => flamingo_io::export_flamingo(path, out, full, bf16)?,
        (false, "open_flamingo") => anyhow::bail!("{}: --format open_flamingo takes a Flamingo (stage 2) checkpoint", path.display()),
        (false, _) => {}
    }
    if flamingo {
        println!("exported {} to {}", path.display(), out.display());
        return Ok(());
    }
    let hf = format == "hf";
    let (dir, cfg, model) = open_checkpoint(path)?;
    if hf {
        rookery_interop::hf_clip_export::export_hf(&model, &cfg.model, out, bf16)?;
        std::fs::copy(&cfg.data.tokenizer, out.join("tokenizer.json"))
            .context("copying tokenizer.json")?;
    } else {
        rookery_interop::open_clip::export(
            &model,
            &cfg.model,
            Some(&cfg.data.tokenizer),
            out,
            bf16,
        )?;
    }
    println!(
        "exported {} to {} ({})",
        dir.display(),
        out.display(),
        if bf16 { "bf16" } else { "f32" }
    );
    Ok(())
}

/// `rookery generate`: prints the continuation.
pub fn generate(weights: &Path, args: &flamingo_io::GenerateArgs) -> Result<()> {
    if rookery_interop::is_lm(weights) {
        let (_, _, text) =
            rookery_train::lm_io::generate_lm::<Inner>(weights, args, &backend::device())?;
        println!("{text}");
        return Ok(());
    }
    let text = flamingo_io::generate_text::<Inner>(weights, args, &backend::device())?;
    println!("{text}");
    Ok(())
}
