//! Data-parallel equivalence: 2 ranks x batch B give the loss and the gradients (before any
//! optimizer) of 1 rank x batch 2B at every step, and end with the same weights after plain
//! SGD without clipping (InfoNCE and SigLIP, with and without accumulation), while the cheaper
//! local-negatives variant does not. Adam's first step (`lr * sign(g)`) and global-norm
//! clipping would hide a uniform gradient scale (a sum over ranks instead of a mean): neither
//! is in the loop these tests compare.

use std::sync::Mutex;
use std::time::Duration;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use rookery_dist::{Communicator, LocalGroup, Single};
use rookery_model::ContrastiveLoss::{self, Infonce, Siglip};
use rookery_model::{Clip, ClipConfig};
use rookery_train::optim::PathIds;
use rookery_train::step::{contrastive_grads, Micro, Negatives};

type B = Autodiff<Flex>;
type IB = Flex;

const STEPS: usize = 3;

/// The backend's RNG is process-wide: tests that seed it run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());
const VOCAB: usize = 40;
const CTX: usize = 8;

fn config(loss: ContrastiveLoss) -> ClipConfig {
    let mut c = ClipConfig {
        embed_dim: 16,
        loss,
        ..Default::default()
    };
    if loss == Siglip {
        // The paper's bias of -10 makes negatives' gradients tiny at first (sigmoid(-10) is
        // 5e-5): a milder start lets the test see what dropping negatives does in 3 steps.
        (c.init_logit_scale, c.init_logit_bias) = (10f32.ln(), -1.0);
    }
    (c.vision.image_size, c.vision.patch_size, c.vision.width) = (16, 8, 32);
    (c.vision.layers, c.vision.heads) = (1, 2);
    (c.text.context_length, c.text.vocab_size, c.text.width) = (CTX, VOCAB, 32);
    (c.text.layers, c.text.heads) = (1, 2);
    c
}

/// Images, captions, hard-negative captions and kept patches (2 of the 4) of one global batch.
type Batch = (
    Tensor<B, 4>,
    Tensor<B, 2, Int>,
    Tensor<B, 2, Int>,
    Tensor<B, 2, Int>,
);

/// What the batches bring besides images and captions.
#[derive(Clone, Copy, Debug, Default)]
struct Variant {
    /// Hard-negative captions (NegCLIP).
    hard: bool,
    /// Patch dropout: each image keeps 2 of its 4 patches.
    patches: bool,
}

/// A global batch for every step: images, and two sets of tokens with the end token (3) at
/// varied places.
fn batches(n: usize) -> Vec<Batch> {
    let dev = Default::default();
    B::seed(&dev, 42);
    (0..STEPS)
        .map(|_| {
            let images = Tensor::random([n, 3, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
            (
                images,
                tokens(n, &dev),
                tokens(n, &dev),
                kept_patches(n, &dev),
            )
        })
        .collect()
}

/// Two distinct patches of the four per image, ascending, varied over the batch.
fn kept_patches(n: usize, dev: &burn::tensor::Device<B>) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = (0..n)
        .flat_map(|i| {
            let a = i % 4;
            let b = (a + 1 + (i / 4) % 3) % 4;
            [a.min(b) as i64, a.max(b) as i64]
        })
        .collect();
    Tensor::from_data(TensorData::new(ids, [n, 2]), dev)
}

fn tokens(n: usize, dev: &burn::tensor::Device<B>) -> Tensor<B, 2, Int> {
    let mut ids: Vec<i64> =
        Tensor::<B, 2, Int>::random([n, CTX], Distribution::Uniform(6.0, VOCAB as f64), dev)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
    for i in 0..n {
        ids[i * CTX + 2 + i % (CTX - 2)] = 3;
    }
    Tensor::from_data(TensorData::new(ids, [n, CTX]), dev)
}

/// Plain SGD's learning rate: large enough that the weights move visibly in 3 steps.
const LR: f64 = 0.5;

/// What a run saw at each step (the loss, every gradient flattened in module order) and its
/// final weights.
#[derive(Clone, Debug, PartialEq)]
struct Trace {
    losses: Vec<f32>,
    grads: Vec<Vec<f32>>,
    weights: Vec<f32>,
}

/// Trains `STEPS` steps of plain SGD (no clipping, no weight decay) on this rank's rows of
/// each global batch, split into `accum` micro-batches.
fn run(
    init: &Clip<B>,
    data: &[Batch],
    comm: &dyn Communicator<IB>,
    accum: usize,
    negatives: Negatives,
    v: Variant,
) -> Trace {
    let model = init.clone();
    let mut model = rookery_train::parallel::broadcast_weights(model, comm, 1 << 20).unwrap();
    let mut sgd = SgdConfig::new().init::<B, Clip<B>>();
    let mut trace = Trace {
        losses: vec![],
        grads: vec![],
        weights: vec![],
    };
    let (w, r) = (comm.world_size(), comm.rank());
    for (images, tokens, neg, kept) in data {
        let per_rank = images.dims()[0] / w;
        let m = per_rank / accum;
        let micro = (0..accum)
            .map(|j| {
                let rows = r * per_rank + j * m..r * per_rank + (j + 1) * m;
                Micro {
                    images: images.clone().slice(s![rows.clone(), .., .., ..]),
                    tokens: tokens.clone().slice(s![rows.clone(), ..]),
                    neg_tokens: v.hard.then(|| neg.clone().slice(s![rows.clone(), ..])),
                    patches: v.patches.then(|| kept.clone().slice(s![rows, ..])),
                }
            })
            .collect();
        let g = contrastive_grads(&model, micro, comm, negatives, 1 << 12).unwrap();
        trace.losses.push(g.loss);
        trace.grads.push(flatten_grads(&model, &g.grads));
        model = sgd.step(LR, model, g.grads).clamp_logit_scale();
    }
    trace.weights = flatten(&model);
    trace
}

fn flatten(model: &Clip<B>) -> Vec<f32> {
    struct Flat(Vec<f32>);
    impl ModuleVisitor<B> for Flat {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0.extend(p.val().into_data().to_vec::<f32>().unwrap());
        }
    }
    let mut f = Flat(Vec::new());
    model.visit(&mut f);
    f.0
}

/// Every parameter's gradient in module order (a missing one fails: all are trained).
fn flatten_grads(model: &Clip<B>, grads: &GradientsParams) -> Vec<f32> {
    struct Flat<'a>(Vec<f32>, &'a GradientsParams);
    impl ModuleVisitor<B> for Flat<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let g = self
                .1
                .get::<IB, D>(p.id)
                .expect("every parameter has a gradient");
            self.0.extend(g.into_data().to_vec::<f32>().unwrap());
        }
    }
    let mut f = Flat(Vec::new(), grads);
    model.visit(&mut f);
    f.0
}

/// Relative differences of two traces: the largest over the steps' losses, the largest over
/// the steps' gradients, and the final weights'.
fn trace_diff(a: &Trace, b: &Trace) -> [f64; 3] {
    let loss = a
        .losses
        .iter()
        .zip(&b.losses)
        .map(|(x, y)| ((x - y) / y).abs() as f64)
        .fold(0.0, f64::max);
    let grads = a
        .grads
        .iter()
        .zip(&b.grads)
        .map(|(x, y)| rel_diff(x, y))
        .fold(0.0, f64::max);
    [loss, grads, rel_diff(&a.weights, &b.weights)]
}

/// The gradients' tolerance: f32 reductions in another order (each rank's GEMMs over half the
/// rows, then a sum) leave 1-3e-6 relative on the whole gradient vector (measured); a wrong
/// scale (a sum over ranks instead of a mean, a micro-batch normalised by its own size) shows
/// as 1e-2 and more.
const GRAD_TOL: f64 = 1e-5;

/// Asserts `a` and `b` agree to 1e-6 relative in loss, gradients and weights.
fn assert_same(a: &Trace, b: &Trace, what: &str) {
    let [loss, grads, weights] = trace_diff(a, b);
    eprintln!(
        "{what}: relative differences: loss {loss:e}, gradients {grads:e}, weights {weights:e}"
    );
    assert_eq!(a.losses.len(), STEPS);
    assert!(
        loss < 1e-6 && grads < GRAD_TOL && weights < 1e-6,
        "{what}: loss {loss:e}, gradients {grads:e}, weights {weights:e} (1e-6, {GRAD_TOL:e}, 1e-6 allowed)"
    );
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The initial model, built once (weights are drawn when built, so clones are equal).
fn init(cfg: &ClipConfig) -> Clip<B> {
    let dev = Default::default();
    B::seed(&dev, 7);
    cfg.init(&dev).map(&mut PathIds::default())
}

fn two_ranks(
    init: &Clip<B>,
    data: &[Batch],
    accum: usize,
    negatives: Negatives,
    v: Variant,
) -> Trace {
    let out = LocalGroup::run::<IB, _, String, _>(
        2,
        |_| Default::default(),
        Duration::from_secs(120),
        |comm| Ok(run(init, data, comm, accum, negatives, v)),
    );
    let mut out: Vec<Trace> = out.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(out[0], out[1], "replicas must stay identical");
    out.remove(0)
}

fn check(loss: ContrastiveLoss, v: Variant) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let cfg = init(&config(loss));
    let data = batches(8);
    let one_rank = |v| {
        let one = Single::new(Default::default());
        run(&cfg, &data, &one, 1, Negatives::Global, v)
    };
    let single = one_rank(v);
    if v.hard || v.patches {
        // The variant must change the training, or this test would prove nothing about it.
        let plain = one_rank(Variant::default());
        let d = rel_diff(&plain.weights, &single.weights);
        assert!(d > 1e-4, "{v:?} changed nothing: {d:e}");
    }
    for accum in [1, 2] {
        let dp = two_ranks(&cfg, &data, accum, Negatives::Global, v);
        assert_same(
            &dp,
            &single,
            &format!("{loss:?} {v:?}, accum {accum}: 2 ranks vs 1 rank"),
        );
    }
    let local = two_ranks(&cfg, &data, 2, Negatives::Local, v);
    let d = rel_diff(&local.weights, &single.weights);
    eprintln!("{loss:?}: local negatives vs 1 rank: relative difference {d:e}");
    assert!(
        d > 1e-4,
        "{loss:?}: local negatives should differ from the global batch, {d:e}"
    );
}

#[test]
fn two_ranks_equal_one_rank_with_twice_the_batch_infonce() {
    check(Infonce, Variant::default());
}

/// NegCLIP's hard-negative captions travel with the captions through gather and scatter.
#[test]
fn two_ranks_equal_one_rank_with_twice_the_batch_hard_negatives() {
    check(
        Infonce,
        Variant {
            hard: true,
            ..Default::default()
        },
    );
}

/// Patch dropout's kept patches travel with their images through every micro-batch.
#[test]
fn two_ranks_equal_one_rank_with_twice_the_batch_patch_dropout() {
    check(
        Infonce,
        Variant {
            patches: true,
            ..Default::default()
        },
    );
}

#[test]
fn two_ranks_equal_one_rank_with_twice_the_batch_siglip() {
    check(Siglip, Variant::default());
}

#[test]
fn accumulation_equals_the_full_batch_on_one_rank() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let cfg = init(&config(Infonce));
    let data = batches(8);
    let one = Single::new(Default::default());
    for (hard, patches) in [(false, false), (true, false), (false, true)] {
        let v = Variant { hard, patches };
        let full = run(&cfg, &data, &one, 1, Negatives::Global, v);
        let accum = run(&cfg, &data, &one, 4, Negatives::Global, v);
        assert_same(
            &accum,
            &full,
            &format!("4 micro-batches vs one batch ({v:?})"),
        );
    }
}

/// The generic path (burn's own ops: what CUDA and every backend but flex run, switched on
/// with `rookery_model::cpu::generic_kernels`) gives the flex kernels' losses (1e-5) and
/// gradients (1e-4) at every step, and the same weights after SGD, from the same weights and
/// batches: InfoNCE and SigLIP, one and two micro-batches, hard negatives, patch dropout, the
/// patch stem; and the two data-parallel ranks over it equal one rank with twice the batch.
#[test]
fn the_generic_path_gives_the_flex_kernels_losses_and_gradients() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let data = batches(8);
    let one = Single::new(Default::default());
    let cases = [
        (Infonce, 1, Variant::default(), false),
        (Infonce, 2, Variant::default(), false),
        (Siglip, 2, Variant::default(), false),
        (
            Infonce,
            1,
            Variant {
                hard: true,
                ..Default::default()
            },
            false,
        ),
        (
            Infonce,
            2,
            Variant {
                patches: true,
                ..Default::default()
            },
            false,
        ),
        (Infonce, 1, Variant::default(), true),
    ];
    for (loss, accum, v, stem) in cases {
        let mut c = config(loss);
        if stem {
            (c.vision.stem_patch, c.vision.stem_width) = (4, 8);
        }
        let model = init(&c);
        let flex = run(&model, &data, &one, accum, Negatives::Global, v);
        let generic = rookery_model::cpu::generic_kernels(|| {
            run(&model, &data, &one, accum, Negatives::Global, v)
        });
        let [l, g, w] = trace_diff(&generic, &flex);
        let what = format!("{loss:?} accum {accum} {v:?} stem {stem}");
        eprintln!("{what}: generic vs flex: loss {l:e}, gradients {g:e}, weights {w:e}");
        assert!(
            l < 1e-5 && g < 1e-4 && w < 1e-4,
            "{what}: loss {l:e}, gradients {g:e}, weights {w:e}"
        );
        assert!(
            l > 0.0 || g > 0.0,
            "{what}: bit-identical: the switch changed nothing"
        );
    }
    // Data-parallel over the generic path: each rank's thread switches on its own.
    let model = init(&config(Infonce));
    let single = rookery_model::cpu::generic_kernels(|| {
        run(
            &model,
            &data,
            &one,
            1,
            Negatives::Global,
            Variant::default(),
        )
    });
    let out = LocalGroup::run::<IB, _, String, _>(
        2,
        |_| Default::default(),
        Duration::from_secs(120),
        |comm| {
            Ok(rookery_model::cpu::generic_kernels(|| {
                run(
                    &model,
                    &data,
                    comm,
                    1,
                    Negatives::Global,
                    Variant::default(),
                )
            }))
        },
    );
    let dp: Vec<Trace> = out.into_iter().map(|r| r.unwrap()).collect();
    assert_same(&dp[0], &single, "generic path: 2 ranks vs 1 rank");
}

/// Ranks whose models differ (another text depth, or the same shapes with a tower locked on one
/// rank only) are refused before any weights or gradients cross, both ranks naming what differs;
/// ranks with the same model pass.
#[test]
fn ranks_holding_different_models_are_refused_before_any_exchange() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let base = config(Infonce);
    let mut deeper = base.clone();
    deeper.text.layers = 2;
    let locked = init(&base).no_grad();
    let check = |other: Clip<B>| {
        let models = [init(&base), other];
        LocalGroup::run::<IB, _, String, _>(
            2,
            |_| Default::default(),
            Duration::from_secs(60),
            |comm| {
                let m = &models[comm.rank()];
                rookery_train::parallel::check_same_layout(m, comm, 1 << 20)
                    .map_err(|e| e.to_string())
            },
        )
    };
    for r in check(init(&base)) {
        r.unwrap();
    }
    for other in [init(&deeper), locked] {
        for r in check(other) {
            let e = r.unwrap_err();
            assert!(e.contains("rank 1 has") && e.contains("parameters"), "{e}");
        }
    }
}
