//! The training loop, the only one, for every stage ([`crate::stage`]): batches, the stage's
//! gradients (accumulated over micro-batches, summed over ranks), global-norm clipping,
//! decoupled weight decay + AdamW at `lr(step)`, the stage's constraints (CLIP's
//! `logit_scale` clamp); then logging, evaluation and checkpoints when due.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use burn::module::{AutodiffModule, Module};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use rookery_data::loader::Batched;
use rookery_data::loader::Mode;
use rookery_data::rng::hash_str;
use rookery_data::{Loader, LoaderPosition, TextTokenizer};
use rookery_dist::comm::all_gather_bytes;
use rookery_dist::launch::RankEnv;
use rookery_dist::{check_same, Communicator, LocalGroup, Single};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint::{self, TrainState};
use crate::config::RunConfig;
use crate::metrics::MetricsWriter;
use crate::optim::{AdamWOf, PathIds, Updater};
use crate::parallel::{broadcast_weights, check_same_layout, DistBackend, GradSync};
use crate::stage::clip::ClipStage;
use crate::stage::flamingo::FlamingoStage;
use crate::stage::lm::LmStage;
use crate::stage::{Report, Stage};
use crate::step::Negatives;

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
    pub resume: Resume,
    /// Training stage: "clip" (stage 1), "lm" (a language model on the pages' text) or
    /// "flamingo" (stage 2).
    pub stage: TrainStage,
    /// Evaluate once before the first step too (stage 2: the frozen-LM baseline).
    pub eval_at_start: bool,
    /// Negatives of each pair: "global" (every rank's and every micro-batch's samples, exact
    /// full-batch gradients) or "local" (only its own micro-batch on its own rank; cheaper).
    pub negatives: Negatives,
    /// Start over in a run directory that holds an earlier run: delete its checkpoints,
    /// metrics, plot and config first (`rookery train --overwrite`). Without it (or a resume),
    /// such a directory is refused.
    pub overwrite: bool,
    /// A step whose loss or gradients hold a NaN or infinity updates nothing and is counted
    /// (`skipped_steps` in metrics.jsonl); this many such steps in a row stop the run.
    pub max_bad_steps: usize,
}

/// Which model a run trains (`train.stage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainStage {
    /// Stage 1: a CLIP (or SigLIP-loss) model on image-text pairs.
    Clip,
    /// A causal language model on the pages' text (the LM stage 2 freezes).
    Lm,
    /// Stage 2: the Perceiver Resampler and gated cross-attention over frozen towers.
    Flamingo,
}

impl std::fmt::Display for TrainStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrainStage::Clip => "clip",
            TrainStage::Lm => "lm",
            TrainStage::Flamingo => "flamingo",
        })
    }
}

/// Whether a run continues from its directory's latest checkpoint (`train.resume`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resume {
    /// Start from the initial weights; a directory with checkpoints is refused.
    Never,
    /// Continue from the newest checkpoint that verifies, if there is one (`--resume`).
    Auto,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            accum_steps: 1,
            eval_every: 250,
            run_dir: PathBuf::from("runs/clip-tiny"),
            seed: 0,
            resume: Resume::Never,
            stage: TrainStage::Clip,
            eval_at_start: false,
            negatives: Negatives::Global,
            overwrite: false,
            max_bad_steps: 10,
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
                self.max_bad_steps == 0,
                "train.max_bad_steps",
                "must be at least 1",
            ),
        ];
        match checks.iter().find(|c| c.0) {
            Some((_, k, m)) => Err((k.to_string(), m.to_string())),
            None => Ok(()),
        }
    }
}

/// Set when the process is asked to stop (the `rookery` binary sets it on SIGTERM, SIGINT and
/// SIGUSR1): the loop finishes the current step, writes a checkpoint and returns.
pub fn stop_flag() -> Arc<AtomicBool> {
    static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    STOP.get_or_init(Default::default).clone()
}

/// Whether any rank was asked to stop (every rank takes part, so all stop after the same step;
/// the loop asks on steps every rank agrees on).
fn stop_requested(comm: &dyn Communicator<impl Backend>) -> Result<bool> {
    let mine = stop_flag().load(Ordering::Relaxed);
    if comm.world_size() == 1 {
        return Ok(mine);
    }
    Ok(sum_over_ranks(comm, u64::from(mine))? > 0)
}

/// What a finished run reports.
#[derive(Debug)]
pub struct TrainSummary {
    /// The rank that reports (0 in a single process; each process's own under MPI).
    pub rank: usize,
    pub steps: usize,
    pub final_loss: f32,
    pub eval: Option<Report>,
    pub wall_s: f64,
    pub model_dir: PathBuf,
    /// The run stopped before `train.steps` because it was asked to ([`stop_flag`]), after
    /// writing a checkpoint.
    pub stopped: bool,
}

/// Trains CLIP as `cfg` says: one rank, several ranks as threads of this process (all on
/// `device`), or this process's rank of an MPI job.
pub fn train<B: AutodiffBackend>(cfg: &RunConfig, device: &B::Device) -> Result<TrainSummary> {
    train_on::<B>(cfg, |_| device.clone())
}

/// As [`train`], with rank r of an in-process group on `device(r)` (one GPU each).
pub fn train_on<B: AutodiffBackend>(
    cfg: &RunConfig,
    device: impl Fn(usize) -> B::Device + Sync,
) -> Result<TrainSummary> {
    let d = &cfg.dist;
    if d.backend != DistBackend::Local {
        // One rank per process (MPI, NCCL): rookery-dist makes its communicator.
        let (comm, dev) =
            rookery_dist::connect::<B::InnerBackend>(d, &device).map_err(anyhow::Error::msg)?;
        return run_rank::<B>(cfg, &dev, comm.as_ref());
    }
    if let Some(env) = RankEnv::detect().map_err(anyhow::Error::msg)? {
        if env.world_size > 1 {
            bail!("this process was launched as rank {} of {} ({}), but dist.backend = \"local\" runs ranks as threads of one process: set dist.backend = \"mpi\" (under mpirun/srun) or dist.world_size = {} without a launcher", env.rank, env.world_size, env.source, env.world_size);
        }
    }
    if d.world_size == 1 {
        let dev = device(0);
        return run_rank::<B>(cfg, &dev, &Single::new(dev.clone()));
    }
    let results =
        LocalGroup::run::<B::InnerBackend, _, _, _>(d.world_size, &device, d.timeout(), |comm| {
            on_rank_pool(d.world_size, || {
                run_rank::<B>(cfg, &device(comm.rank()), comm)
            })
        });
    collect_ranks(results)
}

/// Runs `f` on a rayon pool of this thread rank's own, its share of the current pool's threads
/// (of `ranks`). The CPU backend's parallel kernels run on the current pool: ranks sharing one
/// steal each other's work, which changes float reduction splits, so runs would not be
/// bit-reproducible.
pub fn on_rank_pool<T>(ranks: usize, f: impl FnOnce() -> Result<T> + Send) -> Result<T>
where
    T: Send,
{
    let threads = (rayon::current_num_threads() / ranks.max(1)).max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("rank-compute-{i}"))
        .build()
        .map_err(|e| anyhow::anyhow!("rank compute pool: {e}"))?;
    pool.install(f)
}

/// Rank 0's summary, or every failed rank's error (the rank that failed first is named by the
/// others' errors too).
fn collect_ranks(results: Vec<Result<TrainSummary, String>>) -> Result<TrainSummary> {
    // A refusal rank 0 shared ("rank 0: ...") is said once, not once per rank.
    let mut seen = std::collections::HashSet::new();
    let errors: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(r, res)| res.as_ref().err().map(|e| (r, e)))
        .filter(|(_, e)| seen.insert(e.strip_prefix("rank 0: ").unwrap_or(e).to_string()))
        .map(|(r, e)| format!("rank {r}: {e}"))
        .collect();
    if !errors.is_empty() {
        bail!("training failed:\n  {}", errors.join("\n  "));
    }
    Ok(results
        .into_iter()
        .next()
        .expect("rank 0")
        .expect("no error"))
}

/// One rank's run of the configured stage.
fn run_rank<B: AutodiffBackend>(
    cfg: &RunConfig,
    device: &B::Device,
    comm: &dyn Communicator<B::InnerBackend>,
) -> Result<TrainSummary> {
    match cfg.train.stage {
        TrainStage::Clip => train_rank::<B, ClipStage>(cfg, device, comm),
        TrainStage::Lm => train_rank::<B, LmStage>(cfg, device, comm),
        TrainStage::Flamingo => train_rank::<B, FlamingoStage>(cfg, device, comm),
    }
}

/// One rank's run: identical model and optimizer on every rank, this rank's part of the data.
fn train_rank<B: AutodiffBackend, S: Stage<B>>(
    cfg: &RunConfig,
    device: &B::Device,
    comm: &dyn Communicator<B::InnerBackend>,
) -> Result<TrainSummary> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    let run_dir = cfg.run_dir();
    let cfg = &crate::stage::flamingo::with_lm_tokenizer(cfg)?;
    let tokenizer = Arc::new(TextTokenizer::of(&cfg.data)?);
    let stage = S::new(cfg, tokenizer)?;
    let cfg = stage.config();
    let mut resolved = cfg.clone();
    resolved.dist.world_size = world;
    // What this start did to the directory, not what the run is: the recorded config must
    // resume (`--resume` with `overwrite` is refused).
    resolved.train.overwrite = false;
    check_same(comm, "the resolved config", hash_str(&resolved.to_toml()))?;
    let ready = match lead {
        true => host_memory_fits(&resolved).and_then(|_| {
            checkpoint::prepare_run_dir(
                &run_dir,
                cfg.train.resume == Resume::Auto,
                cfg.train.overwrite,
            )
        }),
        false => Ok(()),
    };
    lead_result(comm, ready)?;
    if lead {
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating run directory {}", run_dir.display()))?;
        std::fs::write(run_dir.join("config.toml"), resolved.to_toml())?;
    }
    let (mut model, optim, mut state) = build::<B, S>(&stage, device, comm)?;
    let mut updater = Updater::new(&cfg.optim, optim, &model).with_lr_mult(stage.lr_mult(&model));
    let shards = rookery_data::expand_shards(&cfg.data.train)?;
    let position = state.loaders.get(rank).cloned();
    let mut loader = Loader::start(
        &cfg.data,
        stage.prepare(Mode::Train)?,
        shards,
        rank,
        world,
        Mode::Train,
        position,
    )?;
    let mut metrics = if lead {
        let m = MetricsWriter::open(&run_dir, state.step);
        Some(m.with_context(|| format!("opening {}", run_dir.join("metrics.jsonl").display()))?)
    } else {
        None
    };
    let (start, total) = (Instant::now(), cfg.train.steps);
    let (mut last_loss, mut last_eval) = (f32::NAN, None);
    if lead && cfg.train.eval_at_start && state.step == 0 && cfg.evaluates() {
        let report = stage.evaluate(&model.valid(), device)?;
        log_eval(metrics.as_mut().expect("rank 0 logs"), 0, &report)?;
    }
    if cfg.train.eval_at_start && world > 1 {
        comm.barrier_timeout(Duration::from_secs_f64(cfg.dist.eval_timeout_s))?;
    }
    let bar = if lead {
        progress_bar(cfg, state.step)
    } else {
        ProgressBar::hidden()
    };
    let mut win = Window::default();
    let mut epoch = 0u64;
    let mut stopped = false;
    let mut bad = BadSteps {
        total: state.skipped_steps,
        ..Default::default()
    };
    while state.step < total {
        let t0 = Instant::now();
        let mut micro = Vec::with_capacity(cfg.train.accum_steps);
        for _ in 0..cfg.train.accum_steps {
            let tw = Instant::now();
            let batch = loader.next().context("the training stream ended")??;
            win.wait_s += tw.elapsed().as_secs_f64();
            state.samples_seen += (batch.size() * world) as u64;
            win.samples += (batch.size() * world) as u64;
            epoch = batch.last_epoch().unwrap_or(epoch);
            state.loader = Some(batch.position().clone());
            micro.push(batch);
        }
        // The stage computes this rank's part; data parallelism sums it over ranks.
        let mut sync = GradSync::new(comm, cfg.dist.bucket_elems());
        let local = stage.grads(&model, micro, comm, &mut sync, device)?;
        let mut step = sync.finish(&model, local)?;
        state.step += 1;
        inject_non_finite(&mut step, state.step);
        inject_panic(rank, state.step);
        // The loss and the gradient norm are global (equal on every rank), so every rank
        // skips the same steps.
        let (m, lr, grad_norm) = match step.loss.is_finite() {
            true => updater.apply(model, step.grads, state.step, total),
            false => (model, updater.lr(state.step, total), f32::NAN),
        };
        model = stage.after_update(m);
        bad.record(state.step, step.loss, grad_norm, cfg.train.max_bad_steps)?;
        last_loss = step.loss;
        win.compute_s += t0.elapsed().as_secs_f64();
        win.comm_s += step.comm_s;
        bar.inc(1);
        let log_due = state.step.is_multiple_of(cfg.log.every) || state.step == total;
        // Every rank's bad samples, summed (a collective: every rank takes part on log steps).
        let bad_samples = match log_due {
            true => sum_over_ranks(comm, state.loader.as_ref().map_or(0, |p| p.counts.bad))?,
            false => 0,
        };
        state.skipped_steps = bad.total;
        if let Some(m) = metrics.as_mut().filter(|_| log_due) {
            let line = TrainLine {
                epoch,
                loss: step.loss,
                lr,
                grad_norm,
                bad_samples,
                skipped_steps: state.skipped_steps,
                extra: stage.log_fields(&model),
            };
            log_train(m, &bar, cfg, &state, line, &mut win)?;
        }
        let due = |every: usize| every > 0 && state.step.is_multiple_of(every);
        let eval_due = cfg.evaluates() && (due(cfg.train.eval_every) || state.step == total);
        let ckpt_due = due(cfg.checkpoint.every) || state.step == total;
        if ckpt_due {
            save_checkpoint(comm, &resolved, &model, &updater.optim, &state)?;
        }
        if eval_due && lead {
            // Test-only: a slow evaluation (`sleep(ms)`), which other ranks wait out.
            fail::fail_point!("train.evaluate");
            let report = stage.evaluate(&model.valid(), device)?;
            log_eval(metrics.as_mut().expect("rank 0 logs"), state.step, &report)?;
            let _ = crate::plot::plot_run(&run_dir, &run_dir.join("metrics.png"));
            last_eval = Some(report);
        }
        if (eval_due || ckpt_due) && world > 1 {
            comm.barrier_timeout(Duration::from_secs_f64(cfg.dist.eval_timeout_s))?;
        }
        // Agreeing costs a collective: several ranks agree on log and checkpoint steps only.
        let may_stop = world == 1 || log_due || ckpt_due;
        if state.step < total && may_stop && stop_requested(comm)? {
            if !ckpt_due {
                save_checkpoint(comm, &resolved, &model, &updater.optim, &state)?;
            }
            tracing::warn!(step = state.step, "asked to stop: checkpoint written");
            stopped = true;
            break;
        }
    }
    bar.finish();
    Ok(TrainSummary {
        rank,
        steps: state.step,
        final_loss: last_loss,
        eval: last_eval,
        wall_s: start.elapsed().as_secs_f64(),
        model_dir: checkpoint::latest(&run_dir).unwrap_or_default(),
        stopped,
    })
}

static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

type Built<B, S> = (
    <S as Stage<B>>::Model,
    AdamWOf<B, <S as Stage<B>>::Model>,
    TrainState,
);

/// Model and optimizer, from the latest checkpoint when resuming, else freshly initialised
/// (plus the stage's starting weights) and made identical across ranks.
fn build<B: AutodiffBackend, S: Stage<B>>(
    stage: &S,
    device: &B::Device,
    comm: &dyn Communicator<B::InnerBackend>,
) -> Result<Built<B, S>> {
    let cfg = stage.config();
    let model = {
        // The backend's RNG is process-wide: ranks that are threads take turns, so each draws
        // the same weights a lone process would (PathIds forces the lazy initialisation).
        let _turn = INIT.lock().unwrap_or_else(|p| p.into_inner());
        B::seed(device, cfg.train.seed);
        stage.init(device).map(&mut PathIds::default())
    };
    let model = stage.load_start(model)?;
    check_same_layout(&model, comm, cfg.dist.bucket_elems())?;
    let model = broadcast_weights(model, comm, cfg.dist.bucket_elems())?;
    let optim = cfg.optim.adamw::<B, S::Model>();
    let fresh = TrainState::default();
    let latest = match cfg.train.resume == Resume::Auto {
        true => checkpoint::newest_verified(&cfg.run_dir())?,
        false => None,
    };
    let Some(dir) = latest else {
        return Ok((stage.place(model, device)?, optim, fresh));
    };
    let mut resolved = cfg.clone();
    resolved.dist.world_size = comm.world_size();
    let (model, optim, mut state) = checkpoint::load(&dir, &resolved, model, optim, device)?;
    let model = stage.place(stage.after_load(model), device)?;
    let world = comm.world_size();
    if state.loaders.len() != world {
        let old = std::mem::take(&mut state.loaders);
        tracing::warn!(
            from = old.len(),
            to = world,
            "resuming on another number of ranks: finished shards are neither repeated nor skipped; partly read ones are read again from their start"
        );
        let shards = rookery_data::expand_shards(&cfg.data.train)?;
        state.loaders = (0..world)
            .map(|r| LoaderPosition::resplit(&cfg.data, shards.clone(), &old, r, world))
            .collect::<Result<_, _>>()?;
    }
    tracing::info!(checkpoint = %dir.display(), step = state.step, rank = comm.rank(), "resuming");
    Ok((model, optim, state))
}

/// Gathers every rank's loader position; rank 0 writes the checkpoint of `state`.
fn save_checkpoint<B: AutodiffBackend, M: AutodiffModule<B>, O: burn::optim::Optimizer<M, B>>(
    comm: &dyn Communicator<B::InnerBackend>,
    resolved: &RunConfig,
    model: &M,
    optim: &O,
    state: &TrainState,
) -> Result<()> {
    let positions = gather_positions(comm, state.loader.as_ref())?;
    if comm.rank() == 0 {
        let mut full = state.clone();
        full.loaders = positions;
        checkpoint::save(&resolved.run_dir(), resolved, model, optim, &full)?;
    }
    Ok(())
}

/// Every rank's loader position, in rank order (each rank gets all of them; rank 0 saves them).
fn gather_positions(
    comm: &dyn Communicator<impl Backend>,
    mine: Option<&LoaderPosition>,
) -> Result<Vec<LoaderPosition>> {
    let bytes = serde_json::to_vec(&mine.context("no batch read yet")?)?;
    all_gather_bytes(comm, &bytes)?
        .iter()
        .map(|b| serde_json::from_slice(b).context("a rank's loader position"))
        .collect()
}

/// Rank 0's outcome on every rank: an error rank 0 alone can see (its file system) reaches
/// the others at once instead of leaving them in the next collective until it times out.
fn lead_result(comm: &dyn Communicator<impl Backend>, mine: Result<()>) -> Result<()> {
    let msg = match (&mine, comm.rank()) {
        (Err(e), 0) => format!("{e:#}"),
        _ => String::new(),
    };
    let all = all_gather_bytes(comm, msg.as_bytes())?;
    mine?;
    if !all[0].is_empty() {
        bail!("rank 0: {}", String::from_utf8_lossy(&all[0]));
    }
    Ok(())
}

/// Refuses a CPU run that cannot fit this machine's memory ([`crate::memory`]); on GPUs the
/// model lives in device memory, which this bound does not know.
fn host_memory_fits(cfg: &RunConfig) -> Result<()> {
    if cfg!(feature = "cuda") {
        return Ok(());
    }
    crate::memory::check_fits(cfg, crate::memory::available())
}

/// `x` summed over every rank.
fn sum_over_ranks(comm: &dyn Communicator<impl Backend>, x: u64) -> Result<u64> {
    let t = Tensor::from_floats([x as f32], comm.device());
    let sum: f32 = comm.all_reduce_sum(t)?.into_scalar().elem();
    Ok(sum.round() as u64)
}

/// Steps whose loss or gradient norm was not finite (their update was skipped).
#[derive(Default)]
struct BadSteps {
    /// Since the run began (checkpointed).
    total: u64,
    /// The current run of consecutive ones.
    in_a_row: usize,
}

impl BadSteps {
    /// Counts step `step`; fails after `max` skipped steps in a row.
    fn record(&mut self, step: usize, loss: f32, grad_norm: f32, max: usize) -> Result<()> {
        if loss.is_finite() && grad_norm.is_finite() {
            self.in_a_row = 0;
            return Ok(());
        }
        self.total += 1;
        self.in_a_row += 1;
        tracing::warn!(
            step,
            loss,
            grad_norm,
            "non-finite loss or gradients: update skipped"
        );
        if self.in_a_row >= max {
            bail!(
                "the loss or gradients were NaN or infinite for {max} steps in a row (steps {}-{step}; train.max_bad_steps = {max}): the run diverged; no update was applied on those steps and no checkpoint holds their values. Lower optim.lr, raise optim.warmup_steps or check the data, then resume from the last checkpoint",
                step + 1 - max
            );
        }
        Ok(())
    }
}

/// Test-only fault: the failpoint `train.non_finite_loss`, set to `return(N)`, makes step N's
/// loss NaN on every rank.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn inject_non_finite(step: &mut crate::step::StepGrads, at: usize) {
    fail::fail_point!("train.non_finite_loss", |s: Option<String>| {
        if s.and_then(|s| s.parse::<usize>().ok()) == Some(at) {
            step.loss = f32::NAN;
        }
    });
}

/// Test-only fault: the failpoint `train.rank_panic`, set to `return(R:N)`, makes rank R panic
/// at step N.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn inject_panic(rank: usize, at: usize) {
    fail::fail_point!("train.rank_panic", |s: Option<String>| {
        if s.as_deref() == Some(&format!("{rank}:{at}")) {
            panic!("injected panic of rank {rank} at step {at}");
        }
    });
}

/// What the logging window accumulated since the last log line.
#[derive(Default)]
struct Window {
    wait_s: f64,
    compute_s: f64,
    comm_s: f64,
    samples: u64,
}

/// What one training log line reports besides the window's rates.
struct TrainLine {
    epoch: u64,
    loss: f32,
    lr: f64,
    grad_norm: f32,
    /// Every rank's bad samples so far.
    bad_samples: u64,
    skipped_steps: u64,
    extra: serde_json::Map<String, serde_json::Value>,
}

fn log_train(
    metrics: &mut MetricsWriter,
    bar: &ProgressBar,
    cfg: &RunConfig,
    state: &TrainState,
    l: TrainLine,
    w: &mut Window,
) -> Result<()> {
    let steps = cfg.log.every as f64;
    let mut rec = json!({"kind": "train", "step": state.step, "epoch": l.epoch, "samples": state.samples_seen, "loss": l.loss, "lr": l.lr,
        "grad_norm": l.grad_norm, "samples_per_s": w.samples as f64 / w.compute_s,
        "data_wait_share": w.wait_s / w.compute_s, "comm_share": w.comm_s / w.compute_s, "step_s": w.compute_s / steps,
        "bad_samples": l.bad_samples, "skipped_steps": l.skipped_steps});
    for (k, v) in l.extra {
        rec[k] = v;
    }
    // One readable line per log step, progress bar or not (a batch job's log has none).
    let step_s = w.compute_s / steps;
    let eta_s = step_s * cfg.train.steps.saturating_sub(state.step) as f64;
    tracing::info!(
        step = %format!("{}/{}", state.step, cfg.train.steps),
        loss = %format!("{:.4}", l.loss),
        lr = %format!("{:.3e}", l.lr),
        grad_norm = %format!("{:.3}", l.grad_norm),
        samples_per_s = %format!("{:.0}", w.samples as f64 / w.compute_s),
        eta = %format!("{}m{:02}s", (eta_s / 60.0) as u64, eta_s as u64 % 60),
        "train"
    );
    bar.set_message(format!("loss {:.3}", l.loss));
    metrics.write(&rec)?;
    *w = Window::default();
    Ok(())
}

fn log_eval(metrics: &mut MetricsWriter, step: usize, r: &Report) -> Result<()> {
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
