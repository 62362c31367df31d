//! `rookery train` and `rookery eval`: pick the backend, prepare data, run.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rookery_train::RunConfig;

#[cfg(not(feature = "cuda"))]
mod backend {
    pub type Train = burn::backend::Autodiff<burn::backend::Flex>;
    pub fn device() -> burn::prelude::Device<Train> {
        Default::default()
    }
}

#[cfg(feature = "cuda")]
mod backend {
    pub type Train = burn::backend::Autodiff<burn::backend::Cuda>;
    pub fn device() -> burn::prelude::Device<Train> {
        burn::backend::cuda::CudaDevice::new(0)
    }
}

/// Loads and checks the config, synthesizes the embedded data if needed, and trains.
pub fn run(config: &Path, overrides: &[String], resume: bool) -> Result<()> {
    let mut cfg = RunConfig::load(config, overrides)?;
    if resume {
        cfg.train.resume = "auto".into();
    }
    ensure_data(&cfg)?;
    cfg.check_shards().map_err(|(key, msg)| anyhow::anyhow!("{}: key `{key}`: {msg}", config.display()))?;
    let summary = rookery_train::train::<backend::Train>(&cfg, &backend::device())?;
    println!("trained {} steps in {:.0} s, final loss {:.4}", summary.steps, summary.wall_s, summary.final_loss);
    if let Some(e) = &summary.eval {
        println!(
            "held-out ({} pairs): image->text R@1 {:.3} R@5 {:.3} R@10 {:.3}; text->image R@1 {:.3}; chance R@1 {:.4}",
            e.n, e.i2t_r1, e.i2t_r5, e.i2t_r10, e.t2i_r1, e.chance_r1
        );
        for (label, (acc, chance)) in &e.zero_shot {
            println!("zero-shot {label}: {acc:.3} (chance {chance:.3})");
        }
    }
    println!("checkpoint: {}", summary.model_dir.display());
    Ok(())
}

/// Writes the synthetic shards when the config asks for them and they are absent or stale.
fn ensure_data(cfg: &RunConfig) -> Result<()> {
    let d = &cfg.data;
    if !d.synthesize_if_missing || d.synth.is_complete() {
        return Ok(());
    }
    let uses_synth = d.train == d.synth.train_pattern();
    if !uses_synth {
        return Ok(());
    }
    tracing::info!(out = %d.synth.out.display(), "synthetic shards are absent: generating them first");
    let t = std::time::Instant::now();
    let s = rookery_data::synth::generate(&d.synth)?;
    tracing::info!(train = s.train, val = s.val, seconds = t.elapsed().as_secs_f64(), "synthetic shards written");
    Ok(())
}

/// Evaluates a checkpoint (or a run directory's latest one).
pub fn eval(path: &Path, data: Option<String>) -> Result<()> {
    let dir = if path.join("manifest.json").exists() { path.to_path_buf() } else { rookery_train::checkpoint::latest(path).context("no checkpoint found")? };
    let mut cfg = RunConfig::load(&dir.join("config.toml"), &[])?;
    if let Some(d) = data {
        cfg.data.val = d;
    }
    let tokenizer = Arc::new(rookery_data::TextTokenizer::from_file(&cfg.data.tokenizer)?);
    let device = backend::device();
    type Inner = <backend::Train as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    let model = cfg.model.init::<Inner>(&device);
    let model = rookery_train::checkpoint::load_weights(model, &dir.join("model.safetensors"))?;
    let r = rookery_train::eval::evaluate(&model, &cfg.data, tokenizer, &device)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
