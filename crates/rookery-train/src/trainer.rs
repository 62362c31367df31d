//! The training loop, the only one: batch, forward, InfoNCE, backward (accumulated over
//! micro-batches), global-norm clipping, decoupled weight decay + AdamW at `lr(step)`,
//! `logit_scale` clamp; then logging, evaluation and checkpoints when due.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use rookery_data::loader::Mode;
use rookery_data::{Loader, TextTokenizer};
use rookery_model::loss::clip_loss;
use rookery_model::Clip;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint::{self, TrainState};
use crate::config::RunConfig;
use crate::eval::{batch_tensors, evaluate, EvalReport};
use crate::metrics::MetricsWriter;
use crate::optim::{clip_global_norm, ParamSplit, PathIds};

/// `[train]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps; samples seen = steps x batch_size x accum_steps x ranks.
    pub steps: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub accum_steps: usize,
    /// Evaluate on `data.val` every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Run directory: resolved config, metrics, plots, checkpoints.
    pub run_dir: PathBuf,
    /// Seed of the weight initialisation.
    pub seed: u64,
    /// Continue from the run directory's latest checkpoint: "never", "auto" (when one exists).
    pub resume: String,
    /// Training stage; "clip" is the one implemented.
    pub stage: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            accum_steps: 1,
            eval_every: 250,
            run_dir: PathBuf::from("runs/clip-tiny"),
            seed: 0,
            resume: "never".into(),
            stage: "clip".into(),
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let checks = [
            (self.steps == 0, "train.steps", "must be at least 1"),
            (
                self.accum_steps == 0,
                "train.accum_steps",
                "must be at least 1",
            ),
            (
                !["never", "auto"].contains(&self.resume.as_str()),
                "train.resume",
                "must be \"never\" or \"auto\"",
            ),
            (
                self.stage != "clip",
                "train.stage",
                "must be \"clip\" (the only stage implemented so far)",
            ),
        ];
        match checks.iter().find(|c| c.0) {
            Some((_, k, m)) => Err((k.to_string(), m.to_string())),
            None => Ok(()),
        }
    }
}

/// What a finished run reports.
#[derive(Debug)]
pub struct TrainSummary {
    pub steps: usize,
    pub final_loss: f32,
    pub eval: Option<EvalReport>,
    pub wall_s: f64,
    pub model_dir: PathBuf,
}

/// Multiplies the listed parameters by `factor` outside the graph: AdamW's decoupled decay.
struct Decay<'a> {
    ids: &'a HashSet<ParamId>,
    factor: f32,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Decay<'_> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if !self.ids.contains(&p.id) {
            return p;
        }
        let factor = self.factor;
        p.map(|t| Tensor::from_inner(t.inner() * factor).require_grad())
    }
}

/// Trains CLIP as `cfg` says, on `device`.
pub fn train<B: AutodiffBackend>(cfg: &RunConfig, device: &B::Device) -> Result<TrainSummary> {
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("creating run directory {}", run_dir.display()))?;
    let tokenizer = Arc::new(TextTokenizer::from_file(&cfg.data.tokenizer)?);
    let cfg = &with_tokenizer(cfg, &tokenizer);
    std::fs::write(run_dir.join("config.toml"), cfg.to_toml())?;
    B::seed(device, cfg.train.seed);
    let mut model: Clip<B> = cfg.model.init(device).map(&mut PathIds::default());
    if !cfg.model.init_from.is_empty() {
        model = crate::export::load_exported(model, Path::new(&cfg.model.init_from))
            .context("model.init_from")?;
        tracing::info!(from = %cfg.model.init_from, "initialised from exported weights");
    }
    let mut split = ParamSplit::default();
    model.visit(&mut split);
    let decay: HashSet<ParamId> = split.decay.iter().copied().collect();
    let o = &cfg.optim;
    let mut optim = AdamWConfig::new()
        .with_beta_1(o.beta1)
        .with_beta_2(o.beta2)
        .with_epsilon(o.eps)
        .with_weight_decay(0.0)
        .init::<B, Clip<B>>();
    let mut state = TrainState {
        step: 0,
        samples_seen: 0,
        loader: None,
    };
    let mut position = None;
    if cfg.train.resume == "auto" {
        if let Some(dir) = checkpoint::latest(&run_dir) {
            let (m, op, st) = checkpoint::load(&dir, cfg, model, optim, device)?;
            tracing::info!(checkpoint = %dir.display(), step = st.step, "resuming");
            (model, optim, position, state) = (m, op, st.loader.clone(), st);
        }
    }
    let shards = rookery_data::expand_shards(&cfg.data.train)?;
    let mut loader = Loader::new(
        &cfg.data,
        tokenizer.clone(),
        shards,
        0,
        1,
        Mode::Train,
        position,
    )?;
    let mut metrics = MetricsWriter::open(&run_dir)?;
    let bar = progress_bar(cfg, state.step);
    let (start, total) = (Instant::now(), cfg.train.steps);
    let (mut last_loss, mut last_eval) = (f32::NAN, None);
    let (mut wait_s, mut compute_s, mut window_samples) = (0.0, 0.0, 0u64);
    let mut epoch = 0u64;
    while state.step < total {
        let t0 = Instant::now();
        let mut acc = GradientsAccumulator::<Clip<B>>::new();
        let mut loss_sum = 0.0;
        for _ in 0..cfg.train.accum_steps {
            let tw = Instant::now();
            let batch = loader.next().context("the training stream ended")??;
            wait_s += tw.elapsed().as_secs_f64();
            let (images, tokens) = batch_tensors::<B>(&batch, device);
            let loss = clip_loss(
                model.encode_image(images),
                model.encode_text(tokens),
                model.logit_scale.val(),
            ) / cfg.train.accum_steps as f32;
            loss_sum += loss.clone().into_scalar().elem::<f32>();
            acc.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
            state.samples_seen += batch.batch_size as u64;
            window_samples += batch.batch_size as u64;
            epoch = batch.epochs.last().copied().unwrap_or(epoch);
            state.loader = Some(batch.position);
        }
        let mut grads = acc.grads();
        let grad_norm = clip_global_norm(&model, &mut grads, o.grad_clip_norm);
        state.step += 1;
        let lr = o.lr_at(state.step, total);
        model = model.map(&mut Decay {
            ids: &decay,
            factor: 1.0 - (lr as f32) * o.weight_decay,
        });
        model = optim.step(lr, model, grads).clamp_logit_scale();
        last_loss = loss_sum;
        compute_s += t0.elapsed().as_secs_f64();
        bar.inc(1);
        if state.step.is_multiple_of(cfg.log.every) || state.step == total {
            let scale: f32 = model.logit_scale.val().into_scalar().elem();
            let rec = json!({"kind": "train", "step": state.step, "epoch": epoch, "samples": state.samples_seen, "loss": loss_sum, "lr": lr,
                "logit_scale": scale.exp(), "grad_norm": grad_norm, "samples_per_s": window_samples as f64 / compute_s,
                "data_wait_share": wait_s / compute_s, "step_s": compute_s / cfg.log.every as f64, "bad_samples": state.loader.as_ref().map_or(0, |p| p.counts.bad)});
            tracing::info!(
                step = state.step,
                loss = loss_sum,
                lr,
                logit_scale = scale.exp(),
                grad_norm,
                "train"
            );
            bar.set_message(format!("loss {loss_sum:.3}"));
            metrics.write(&rec)?;
            (wait_s, compute_s, window_samples) = (0.0, 0.0, 0);
        }
        let due = |every: usize| every > 0 && state.step.is_multiple_of(every);
        if !cfg.data.val.is_empty() && (due(cfg.train.eval_every) || state.step == total) {
            let report = evaluate(&model.valid(), &cfg.data, tokenizer.clone(), device)?;
            log_eval(&mut metrics, state.step, &report)?;
            let _ = crate::plot::plot_run(&run_dir, &run_dir.join("metrics.png"));
            last_eval = Some(report);
        }
        if due(cfg.checkpoint.every) || state.step == total {
            checkpoint::save(&run_dir, cfg, &model, &optim, &state)?;
        }
    }
    bar.finish();
    let model_dir = checkpoint::latest(&run_dir).unwrap_or_default();
    Ok(TrainSummary {
        steps: state.step,
        final_loss: last_loss,
        eval: last_eval,
        wall_s: start.elapsed().as_secs_f64(),
        model_dir,
    })
}

/// The config with the text vocabulary and end token taken from the tokenizer.
fn with_tokenizer(cfg: &RunConfig, tk: &TextTokenizer) -> RunConfig {
    let mut cfg = cfg.clone();
    if cfg.model.text.vocab_size == 0 {
        cfg.model.text.vocab_size = tk.vocab_size;
    }
    cfg.model.text.eot_token = tk.eot as usize;
    cfg
}

fn log_eval(metrics: &mut MetricsWriter, step: usize, r: &EvalReport) -> Result<()> {
    tracing::info!(step, n = r.n, i2t_r1 = r.i2t_r1, t2i_r1 = r.t2i_r1, chance = r.chance_r1, zero_shot = ?r.zero_shot, "eval");
    let mut rec = serde_json::to_value(r)?;
    rec["kind"] = json!("eval");
    rec["step"] = json!(step);
    metrics.write(&rec)?;
    Ok(())
}

fn progress_bar(cfg: &RunConfig, done: usize) -> ProgressBar {
    if !cfg.log.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(cfg.train.steps as u64).with_position(done as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps {per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar
}
