//! `rookery doctor --parity CONFIG`: one CLIP training step of CONFIG's model on the backend
//! this build trains on and on the CPU reference (flex with rookery's kernels), from the same
//! weights and batch ([`rookery_train::parity`]). On a CUDA build that is the first proof a
//! GPU computes what the CPU does (TF32 matmuls: 2e-2 allowed); on a CPU build it compares
//! burn's generic ops (what CUDA runs) with the flex kernels (1e-4 allowed).

use std::path::Path;

use anyhow::{bail, Result};
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::prelude::Backend;
use rookery_dist::Single;
use rookery_train::parity::{clip_step, compare, copy_weights, host_batch, ParityDiff, StepTrace};
use rookery_train::RunConfig;
use serde::Serialize;

use super::train::backend;

/// What `--parity` found, as `--json` writes it.
#[derive(Serialize)]
pub struct Parity {
    pub config: String,
    pub batch: usize,
    pub reference: &'static str,
    pub target: &'static str,
    pub tolerance: f64,
    pub passed: bool,
    #[serde(flatten)]
    pub diff: ParityDiff,
}

#[cfg(feature = "cuda")]
const TARGET: (&str, f64) = ("burn-cuda (TF32 matmuls)", 2e-2);
#[cfg(not(feature = "cuda"))]
const TARGET: (&str, f64) = ("burn-flex, generic ops (what CUDA runs)", 1e-4);

/// Runs the comparison, prints a line, writes `json` if given; fails past the tolerance.
pub fn run(config: &Path, overrides: &[String], batch: usize, json: Option<&Path>) -> Result<()> {
    let cfg = RunConfig::load(config, overrides)?;
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
    let got = target_step(target, &data, &device)?;
    let diff = compare(&got, &want)?;
    let (name, tol) = TARGET;
    let p = Parity {
        config: config.display().to_string(),
        batch,
        reference: "burn-flex with rookery's CPU kernels",
        target: name,
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
        bail!("{name} differs from the CPU reference by more than {tol:e}");
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn target_step(
    model: rookery_model::Clip<backend::Train>,
    data: &rookery_train::parity::HostBatch,
    device: &burn::prelude::Device<backend::Train>,
) -> Result<StepTrace> {
    clip_step(model, data, &Single::new(device.clone()), device)
}

#[cfg(not(feature = "cuda"))]
fn target_step(
    model: rookery_model::Clip<backend::Train>,
    data: &rookery_train::parity::HostBatch,
    device: &burn::prelude::Device<backend::Train>,
) -> Result<StepTrace> {
    rookery_model::cpu::generic_kernels(|| clip_step(model, data, &Single::new(*device), device))
}
