//! `rookery bench`: the time of one CLIP training step as the trainer runs it (forward,
//! gathered-loss backward, clipping, decoupled decay, AdamW) on random inputs, without the
//! loader, for comparison with PyTorch eager (benches/reference/clip_step.py builds the same
//! model). With several ranks the global batch is split across thread ranks exactly as
//! `[dist] world_size` does in training, each on a rayon pool of its own.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use rookery_dist::{Communicator, LocalGroup, Single};
use rookery_model::ClipConfig;

use rookery_train::optim::{OptimConfig, Updater};
use rookery_train::stage::clip::kept_patches;
use rookery_train::step::{contrastive_grads, Micro, Negatives};
use rookery_train::RunConfig;

use crate::cmd::train::backend;

/// `rookery bench`: training-step time on random inputs, with machine and load recorded.
pub fn bench(
    config: &Path,
    overrides: &[String],
    batch: usize,
    steps: usize,
    ranks: usize,
    vocab: usize,
) -> Result<()> {
    let cfg = RunConfig::load(config, overrides)?;
    let mut model = cfg.model.clone();
    model.text.vocab_size = vocab;
    let threads = rayon::current_num_threads();
    let times = step_times::<backend::Train>(&model, batch, ranks, 2, steps, &backend::device())?;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "rookery clip step: batch {batch} over {ranks} rank(s), {threads} threads: median {:.3} s, min {:.3} s over {steps} steps; cpu {cpu}; loadavg {}",
        sorted[sorted.len() / 2], sorted[0], load.trim()
    );
    Ok(())
}

/// Seconds per step (as rank 0 saw it: the collectives keep ranks in step) for `steps` timed
/// steps after `warmup` untimed ones, at `global_batch` split over `ranks` thread ranks that
/// share the current rayon pool's threads.
pub fn step_times<B: AutodiffBackend>(
    model_cfg: &ClipConfig,
    global_batch: usize,
    ranks: usize,
    warmup: usize,
    steps: usize,
    device: &B::Device,
) -> Result<Vec<f64>> {
    if ranks <= 1 {
        let comm = Single::<B::InnerBackend>::new(device.clone());
        return rank_step_times::<B>(model_cfg, global_batch, &comm, device, warmup, steps);
    }
    if !global_batch.is_multiple_of(ranks) {
        return Err(anyhow!(
            "--batch {global_batch} does not split evenly over {ranks} ranks"
        ));
    }
    let timeout = std::time::Duration::from_secs(600);
    let results = LocalGroup::run::<B::InnerBackend, _, _, _>(
        ranks,
        |_| device.clone(),
        timeout,
        |comm| {
            rookery_train::trainer::on_rank_pool(ranks, || {
                let b = global_batch / ranks;
                rank_step_times::<B>(model_cfg, b, comm, device, warmup, steps)
            })
        },
    );
    results
        .into_iter()
        .next()
        .expect("rank 0")
        .map_err(anyhow::Error::msg)
}

/// One rank's step times at its own `batch`.
fn rank_step_times<B: AutodiffBackend>(
    model_cfg: &ClipConfig,
    batch: usize,
    comm: &dyn Communicator<B::InnerBackend>,
    device: &B::Device,
    warmup: usize,
    steps: usize,
) -> Result<Vec<f64>> {
    B::seed(device, comm.rank() as u64);
    let mut model = model_cfg.init::<B>(device);
    let o = OptimConfig {
        lr: 1e-4,
        warmup_steps: 0,
        ..Default::default()
    };
    let mut up = Updater::new(&o, o.adamw::<B, _>(), &model);
    let s = model_cfg.vision.image_size;
    let (ctx, vocab) = (model_cfg.text.context_length, model_cfg.text.vocab_size);
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let images =
            Tensor::<B, 4>::random([batch, 3, s, s], Distribution::Normal(0.0, 1.0), device);
        let mut ids: Vec<i64> = (0..batch * ctx)
            .map(|k| 4 + (k * 7919 % (vocab - 4)) as i64)
            .collect();
        for row in ids.chunks_mut(ctx) {
            row[ctx - 1] = model_cfg.text.eot_token as i64;
        }
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, ctx]), device);
        // Patch dropout as training draws it, from made-up sample keys.
        let keys: Vec<String> = (0..batch).map(|j| format!("{}-{j}", comm.rank())).collect();
        let patches = kept_patches(&keys, &vec![i as u64; batch], &model_cfg.vision, 0).map(|p| {
            let k = p.len() / batch;
            Tensor::<B, 2, Int>::from_data(TensorData::new(p, [batch, k]), device)
        });
        let t = Instant::now();
        let micro = vec![Micro {
            images,
            tokens,
            neg_tokens: None,
            patches,
        }];
        let g = contrastive_grads(&model, micro, comm, Negatives::Global, 1 << 22)?;
        model = up
            .apply(model, g.grads, i + 1, warmup + steps)
            .0
            .clamp_logit_scale();
        let _ = model.logit_scale.val().into_scalar(); // wait for the step to finish
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}
