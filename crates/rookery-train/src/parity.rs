//! One training step (CLIP: forward, global-negatives backward, clipping, AdamW; stage 2: the
//! next-token loss through the trainer's own path, the same optimizer) run on two backends from
//! the same weights and the same batch, and the differences of the loss, every gradient and
//! every updated weight. This is how a backend nobody has run yet is trusted: `rookery doctor
//! --parity` runs the build's backend (CUDA; stage 2 with its frozen towers in bf16) against
//! the CPU reference (flex), and the tests run burn-ndarray, the generic path and bf16 frozen
//! towers against the flex kernels.

use anyhow::Result;
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rookery_data::loader::LoaderPosition;
use rookery_data::pages::PageBatch;
use rookery_data::stream::StreamPosition;
use rookery_dist::Communicator;
use rookery_eval::input::page_logits;
use rookery_model::flamingo::{Flamingo, FlamingoConfig};
use rookery_model::{Clip, ClipConfig};
use serde::Serialize;

use crate::causal::causal_local;

use crate::optim::{OptimConfig, Updater};
use crate::stage::clip::kept_patches;
use crate::step::{contrastive_grads, Micro, Negatives};

/// A batch held on the host, so that every backend gets the same numbers.
#[derive(Clone, Debug)]
pub struct HostBatch {
    /// `[batch, 3, size, size]`, f32.
    pub images: TensorData,
    /// `[batch, context]`, i64, the end token at varied places.
    pub tokens: TensorData,
    /// `[batch, kept]` patch indices when the config drops patches.
    pub patches: Option<TensorData>,
}

/// A deterministic batch for `cfg` from `seed` (its own generator: a backend's RNG differs by
/// backend): uniform pixels in [-1.7, 1.7], tokens above the special ids with the end token
/// at a place that varies by row.
pub fn host_batch(cfg: &ClipConfig, batch: usize, seed: u64) -> HostBatch {
    let mut next = numbers(seed);
    let s = cfg.vision.image_size;
    let pixels = pixels(&mut next, batch * 3 * s * s);
    let (ctx, vocab, eot) = (
        cfg.text.context_length,
        cfg.text.vocab_size,
        cfg.text.eot_token,
    );
    let low = 4.min(vocab - 1);
    let mut ids: Vec<i64> = (0..batch * ctx)
        .map(|_| (low + next() as usize % (vocab - low)) as i64)
        .collect();
    for (i, row) in ids.chunks_mut(ctx).enumerate() {
        // Never the end token by chance before its place: pooling takes the first.
        row.iter_mut()
            .filter(|t| **t == eot as i64)
            .for_each(|t| *t = low as i64);
        row[2.min(ctx - 1) + i % (ctx - 2).max(1)] = eot as i64;
    }
    let keys: Vec<String> = (0..batch).map(|j| format!("parity-{j}")).collect();
    let patches = kept_patches(&keys, &vec![seed; batch], &cfg.vision, seed).map(|p| {
        let k = p.len() / batch;
        TensorData::new(p, [batch, k])
    });
    HostBatch {
        images: TensorData::new(pixels, [batch, 3, s, s]),
        tokens: TensorData::new(ids, [batch, ctx]),
        patches,
    }
}

/// A deterministic stream of numbers from `seed` (its own generator: a backend's RNG differs
/// by backend).
fn numbers(seed: u64) -> impl FnMut() -> u32 {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        (state >> 33) as u32
    }
}

/// `n` pixels uniform in [-1.7, 1.7] (normalised images' range).
fn pixels(next: &mut impl FnMut() -> u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (next() as f32 / u32::MAX as f32 - 0.5) * 3.4)
        .collect()
}

/// A deterministic page batch for a Flamingo of `cfg`: `batch` rows of random text tokens (at
/// most 32) with `<image>` at the second place and midway, two single-frame images per row,
/// the loss on every text token.
pub fn host_pages(cfg: &FlamingoConfig, batch: usize, seed: u64) -> PageBatch {
    let mut next = numbers(seed);
    let (s, t) = (cfg.image_size(), cfg.lm.context_length.min(32));
    let vocab = cfg.lm.vocab_size;
    let (image, eoc) = (cfg.image_token as i64, cfg.eoc_token as i64);
    let mut tokens = Vec::with_capacity(batch * t);
    let mut targets = Vec::with_capacity(batch * t);
    for _ in 0..batch {
        for i in 0..t {
            let id = match i == 1 || i == t / 2 {
                true => image,
                false => {
                    let id = (next() as usize % vocab) as i64;
                    if id == image || id == eoc {
                        0
                    } else {
                        id
                    }
                }
            };
            tokens.push(id);
            targets.push(if id == image { 0.0 } else { 1.0 });
        }
    }
    let n = 2;
    PageBatch {
        tokens,
        targets,
        images: pixels(&mut next, batch * n * 3 * s * s),
        n_images: vec![n; batch],
        frames: vec![1; batch * n],
        batch_size: batch,
        max_images: n,
        max_frames: 1,
        context_length: t,
        image_size: s,
        keys: (0..batch).map(|j| format!("parity-{j}")).collect(),
        json: vec![serde_json::Value::Null; batch],
        epochs: vec![0; batch],
        position: LoaderPosition {
            stream: StreamPosition {
                workers: vec![],
                next_worker: 0,
                skip: Default::default(),
            },
            counts: Default::default(),
            batches: 0,
        },
    }
}

/// What one step gave: the loss, and every gradient and weight by parameter path.
#[derive(Clone, Debug)]
pub struct StepTrace {
    pub loss: f32,
    pub grads: Vec<(String, Vec<f32>)>,
    /// The weights before the step and after it.
    pub before: Vec<(String, Vec<f32>)>,
    pub weights: Vec<(String, Vec<f32>)>,
}

/// The optimizer of the parity step: the trainer's (clipping at 1, decay 0.1, AdamW) at a
/// learning rate that moves the weights visibly in one step.
fn optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-3,
        warmup_steps: 0,
        grad_clip_norm: 1.0,
        weight_decay: 0.1,
        ..Default::default()
    }
}

/// One training step of `model` on this rank's rows of `batch` (all of them with one rank):
/// the loss over the global batch, the all-reduced gradients, the weights after AdamW.
pub fn clip_step<B: AutodiffBackend>(
    model: Clip<B>,
    batch: &HostBatch,
    comm: &dyn Communicator<B::InnerBackend>,
    device: &B::Device,
) -> Result<StepTrace> {
    let n = batch.images.shape[0];
    let (w, r) = (comm.world_size(), comm.rank());
    let rows = r * n / w..(r + 1) * n / w;
    let images = Tensor::<B, 4>::from_data(batch.images.clone(), device);
    let tokens = Tensor::<B, 2, Int>::from_data(batch.tokens.clone(), device);
    let patches = batch
        .patches
        .clone()
        .map(|p| Tensor::<B, 2, Int>::from_data(p, device).slice(s![rows.clone(), ..]));
    let micro = vec![Micro {
        images: images.slice(s![rows.clone(), .., .., ..]),
        tokens: tokens.slice(s![rows, ..]),
        neg_tokens: None,
        patches,
    }];
    let before = named_weights(&model);
    let g = contrastive_grads(&model, micro, comm, Negatives::Global, 1 << 20)?;
    Ok(update(model, before, g.loss, g.grads))
}

/// The trace of a step whose loss and gradients are `loss` and `grads`: the gradients by
/// path, and `model` (whose weights were `before`) after AdamW.
fn update<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: M,
    before: Vec<(String, Vec<f32>)>,
    loss: f32,
    grads: GradientsParams,
) -> StepTrace {
    let named = named_grads(&model, &grads);
    let o = optim();
    let mut up = Updater::new(&o, o.adamw::<B, _>(), &model);
    let (model, _, _) = up.apply(model, grads, 1, 10);
    StepTrace {
        loss,
        grads: named,
        before,
        weights: named_weights(&model),
    }
}

/// One stage-2 training step of `model` on `batch` as the trainer takes it (`causal_local`
/// over `page_logits`): the next-token loss, the trained parameters' gradients (frozen ones
/// have none), every weight after AdamW.
pub fn flamingo_step<B: AutodiffBackend>(
    model: Flamingo<B>,
    batch: &PageBatch,
    comm: &dyn Communicator<B::InnerBackend>,
    device: &B::Device,
) -> Result<StepTrace> {
    let before = named_weights(&model);
    let g = causal_local(&model, vec![batch.clone()], comm, |m, b, tokens| {
        page_logits(m, tokens, b, device)
    })?;
    Ok(update(model, before, g.loss_share, g.grads))
}

/// Every float parameter's values by dotted path, sorted by path.
fn named_weights<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, Vec<f32>)> {
    rookery_interop::tensors::of_module(model)
        .into_iter()
        .map(|(path, (_, values))| (path, values))
        .collect()
}

/// Every gradient by path (a parameter without one is left out: frozen ones have none).
fn named_grads<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    grads: &GradientsParams,
) -> Vec<(String, Vec<f32>)> {
    struct Grads<'a> {
        stack: Vec<String>,
        grads: &'a GradientsParams,
        out: Vec<(String, Vec<f32>)>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) {
                let v = g.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
                self.out.push((self.stack.join("."), v));
            }
        }
    }
    let mut v = Grads {
        stack: vec![],
        grads,
        out: vec![],
    };
    model.visit(&mut v);
    v.out.sort_by(|a, b| a.0.cmp(&b.0));
    v.out
}

/// `to` with every float parameter's values taken from `from` (the same module on another
/// backend: parameters match by path), keeping `to`'s ids and whether each trains.
pub fn copy_weights<A: Backend, B: Backend, M: Module<A>, N: Module<B>>(from: &M, to: N) -> N {
    struct Take {
        stack: Vec<String>,
        from: rookery_interop::tensors::Tensors,
    }
    impl<B: Backend> ModuleMapper<B> for Take {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let path = self.stack.join(".");
            let (shape, values) = self.from.remove(&path).expect("the same module on both");
            let require_grad = p.is_require_grad();
            let (id, t, _) = p.consume();
            assert_eq!(shape, t.dims(), "{path}");
            let t = Tensor::from_data(TensorData::new(values, shape), &t.device());
            Param::initialized(id, t).set_require_grad(require_grad)
        }
    }
    let from = rookery_interop::tensors::of_module(from);
    to.map(&mut Take {
        stack: vec![],
        from,
    })
}

/// How far `target` is from `reference`: the loss's relative difference; the relative L2
/// difference of all gradients together, of all updated weights together, and of all weight
/// updates (after minus before) together; and the single tensor that differs most in
/// gradient and update, to say where to look. Per tensor, a small gradient (a LayerNorm
/// bias's) or Adam's step on a near-zero gradient (about `lr * sign(g)`) differs far more
/// than the step as a whole. [`ParityDiff::within`] judges loss, gradients and updated
/// weights; the updates, far stricter (a weight moves by about `lr`), are for tests on CPU.
#[derive(Clone, Debug, Serialize)]
pub struct ParityDiff {
    pub loss_reference: f32,
    pub loss_target: f32,
    pub loss: f64,
    pub grads: f64,
    pub weights: f64,
    pub updates: f64,
    pub worst_grad: (String, f64),
    pub worst_update: (String, f64),
    pub tensors: usize,
}

impl ParityDiff {
    pub fn within(&self, tol: f64) -> bool {
        self.loss <= tol && self.grads <= tol && self.weights <= tol
    }
}

pub fn compare(target: &StepTrace, reference: &StepTrace) -> Result<ParityDiff> {
    let updates = |t: &StepTrace| -> Vec<(String, Vec<f32>)> {
        t.weights
            .iter()
            .zip(&t.before)
            .map(|((p, after), (_, before))| {
                let d = after.iter().zip(before).map(|(a, b)| a - b).collect();
                (p.clone(), d)
            })
            .collect()
    };
    let (grads, worst_grad) = differences(&target.grads, &reference.grads)?;
    let (upd, worst_update) = differences(&updates(target), &updates(reference))?;
    let (weights, _) = differences(&target.weights, &reference.weights)?;
    Ok(ParityDiff {
        loss_reference: reference.loss,
        loss_target: target.loss,
        loss: ((target.loss - reference.loss) / reference.loss).abs() as f64,
        grads,
        weights,
        updates: upd,
        worst_grad,
        worst_update,
        tensors: reference.grads.len(),
    })
}

/// The relative L2 difference of all tensors together, and the tensor with the largest one.
fn differences(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> Result<(f64, (String, f64))> {
    anyhow::ensure!(
        a.len() == b.len(),
        "{} tensors against {}",
        a.len(),
        b.len()
    );
    let mut worst = (String::new(), 0.0);
    for ((pa, va), (pb, vb)) in a.iter().zip(b) {
        anyhow::ensure!(pa == pb && va.len() == vb.len(), "{pa} against {pb}");
        let d = rel_l2(va, vb);
        if d > worst.1 || d.is_nan() {
            worst = (pa.clone(), d);
        }
    }
    let all = |x: &[(String, Vec<f32>)]| -> Vec<f32> {
        x.iter().flat_map(|(_, v)| v.iter().copied()).collect()
    };
    Ok((rel_l2(&all(a), &all(b)), worst))
}

/// `|a - b| / |b|` in f64 (0 when both are zero; NaN anywhere stays NaN).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    match (d, n) {
        (0.0, _) => 0.0,
        _ => (d / n).sqrt(),
    }
}
