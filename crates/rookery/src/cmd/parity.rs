//! `rookery doctor --parity CONFIG`: one training step of CONFIG's model (CLIP, or stage 2's
//! Flamingo) on the backend this build trains on and on the CPU reference (flex with
//! rookery's kernels), from the same weights and batch ([`rookery_train::parity`]). On a CUDA build that is the first proof a
//! GPU computes what the CPU does (TF32 matmuls: 2e-2 allowed); on a CPU build it compares
//! burn's generic ops (what CUDA runs) with the flex kernels (1e-4 allowed).

use std::path::Path;

use anyhow::{bail, Result};
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::module::Param;
use burn::prelude::Backend;
use burn::prelude::Tensor;
use burn::tensor::DType;
use rookery_dist::Single;
use rookery_train::parity::{
    clip_step, compare, copy_weights, flamingo_step, host_batch, host_pages, ParityDiff,
};
use rookery_train::stage::flamingo::frozen_dtype;
use rookery_train::trainer::TrainStage;
use rookery_train::RunConfig;
use serde::Serialize;

use super::train::backend;

/// What `--parity` found, as `--json` writes it.
#[derive(Serialize)]
pub struct Parity {
    pub config: String,
    pub batch: usize,
    pub reference: &'static str,
    pub target: String,
    pub tolerance: f64,
    pub passed: bool,
    #[serde(flatten)]
    pub diff: ParityDiff,
}

#[cfg(feature = "cuda")]
const TARGET: (&str, f64) = ("burn-cuda (TF32 matmuls)", 2e-2);
#[cfg(not(feature = "cuda"))]
const TARGET: (&str, f64) = ("burn-flex, generic ops (what CUDA runs)", 1e-4);
/// With stage 2's frozen towers in bf16 (8 bits of mantissa), on any backend: measured on the
/// CPU, 6e-3 in the logits and up to 1.3e-2 in the trained gradients.
const BF16_TOLERANCE: f64 = 5e-2;

/// Runs the comparison for CONFIG's stage (CLIP, or stage 2 as `flamingo.frozen_dtype` holds
/// its towers on this build's device), prints a line, writes `json` if given; fails past the
/// tolerance.
pub fn run(config: &Path, overrides: &[String], batch: usize, json: Option<&Path>) -> Result<()> {
    let cfg = RunConfig::load(config, overrides)?;
    let (diff, target, tol) = match cfg.train.stage {
        TrainStage::Flamingo => flamingo(&cfg, batch)?,
        TrainStage::Clip | TrainStage::Lm => (clip(&cfg, batch)?, TARGET.0.to_string(), TARGET.1),
    };
    let p = Parity {
        config: config.display().to_string(),
        batch,
        reference: "burn-flex with rookery's CPU kernels",
        target,
        tolerance: tol,
        passed: diff.within(tol),
        diff,
    };
    println!(
        "parity {} at batch {batch}: {} vs {}: loss {:.3e}, gradients {:.3e} (worst {} {:.3e}), updated weights {:.3e} (updates {:.3e}) over {} tensors: {}",
        p.config, p.target, p.reference, p.diff.loss, p.diff.grads, p.diff.worst_grad.0,
        p.diff.worst_grad.1, p.diff.weights, p.diff.updates, p.diff.tensors,
        if p.passed { format!("within {tol:e}") } else { format!("NOT within {tol:e}") }
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&p)?)?;
    }
    if !p.passed {
        bail!(
            "{} differs from the CPU reference by more than {tol:e}",
            p.target
        );
    }
    Ok(())
}

/// One CLIP step of `[model]`.
fn clip(cfg: &RunConfig, batch: usize) -> Result<ParityDiff> {
    let mut m = cfg.model.clone();
    // Random tokens need no tokenizer: a config that takes its vocabulary from one gets 64.
    if m.text.vocab_size == 0 {
        m.text.vocab_size = 64;
    }
    m.text.eot_token = m.text.eot_token.min(m.text.vocab_size - 1);
    let data = host_batch(&m, batch, 1);
    let cpu = Default::default();
    <Autodiff<Flex> as Backend>::seed(&cpu, 1);
    // Mapped once so the weights are drawn now (burn draws lazily, per clone).
    let reference = m
        .init::<Autodiff<Flex>>(&cpu)
        .map(&mut rookery_train::optim::PathIds::default());
    let device = backend::device();
    let target = copy_weights(&reference, m.init::<backend::Train>(&device));
    let want = clip_step(reference, &data, &Single::new(cpu), &cpu)?;
    let got = on_target(|| clip_step(target, &data, &Single::new(backend::device()), &device))?;
    compare(&got, &want)
}

/// One stage-2 step of `[flamingo.model]` as written (its sources are not read: random
/// towers of its shapes, a vocabulary of 64 when it takes one from a tokenizer), the gates
/// half open so that the image path reaches the loss; the target holds the frozen towers as
/// `flamingo.frozen_dtype` says on its device (bf16 on CUDA), the reference in f32.
fn flamingo(cfg: &RunConfig, batch: usize) -> Result<(ParityDiff, String, f64)> {
    let mut m = cfg.flamingo.model.clone();
    if m.lm.vocab_size == 0 {
        m.lm.vocab_size = 64;
    }
    (m.image_token, m.eoc_token) = (m.lm.vocab_size - 2, m.lm.vocab_size - 1);
    let data = host_pages(&m, batch, 1);
    let cpu = Default::default();
    <Autodiff<Flex> as Backend>::seed(&cpu, 1);
    let mut reference = m.init::<Autodiff<Flex>>(&cpu);
    for x in reference.xattn.iter_mut() {
        let half =
            |p: &Param<Tensor<Autodiff<Flex>, 1>>| Param::from_tensor(p.val().ones_like() * 0.5);
        (x.attn_gate, x.ff_gate) = (half(&x.attn_gate), half(&x.ff_gate));
    }
    let reference = reference.map(&mut rookery_train::optim::PathIds::default());
    let device = backend::device();
    let dtype = frozen_dtype::<backend::Train>(cfg, &device)?;
    let target =
        copy_weights(&reference, m.init::<backend::Train>(&device)).with_frozen_dtype(dtype);
    let want = flamingo_step(reference, &data, &Single::new(cpu), &cpu)?;
    let got = on_target(|| flamingo_step(target, &data, &Single::new(backend::device()), &device))?;
    let (name, tol) = match dtype {
        DType::F32 => (TARGET.0.to_string(), TARGET.1),
        _ => (
            format!("{}, frozen towers in {dtype:?}", TARGET.0),
            BF16_TOLERANCE,
        ),
    };
    Ok((compare(&got, &want)?, name, tol))
}

/// `step` as the target runs: on CUDA as it is; on a CPU build through burn's generic ops.
fn on_target<T>(step: impl FnOnce() -> T) -> T {
    match cfg!(feature = "cuda") {
        true => step(),
        false => rookery_model::cpu::generic_kernels(step),
    }
}
