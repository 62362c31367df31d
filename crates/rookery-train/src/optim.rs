//! AdamW as CLIP trains it: weight decay on matrices only (not on biases, norms, embeddings or
//! `logit_scale`), global-norm gradient clipping like torch's `clip_grad_norm_`, and a learning
//! rate with linear warmup then a decay to `min_lr`: cosine (CLIP), linear, or held and then
//! cooled down (warmup-stable-decay).
//!
//! burn 0.21 has no parameter groups: one Adam (burn's AdamW without decay, [`crate::adam`])
//! runs over every trainable parameter, decoupled weight decay is applied beside it to the ids
//! [`ParamSplit`] picks, and per-parameter learning-rate multipliers scale those parameters'
//! updates afterwards.

use std::collections::{HashMap, HashSet};

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rookery_model::Clip;

use crate::adam::Adam;
use serde::{Deserialize, Serialize};

/// `[optim]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the decay.
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// How the rate goes from `lr` to `min_lr` after the warmup.
    pub schedule: Schedule,
    /// `schedule = "wsd"`: the share of the steps after the warmup spent in the final linear
    /// decay; the rest hold `lr`.
    pub decay_fraction: f64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0: off).
    pub grad_clip_norm: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_steps: 100,
            schedule: Schedule::Cosine,
            decay_fraction: 0.2,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
            grad_clip_norm: 1.0,
        }
    }
}

/// `optim.schedule`: the decay after the linear warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half a cosine from `lr` to `min_lr` (CLIP, open_clip's default).
    Cosine,
    /// A straight line from `lr` to `min_lr`.
    Linear,
    /// Warmup-stable-decay (open_clip's `const-cooldown`, torchtitan's default): `lr` held, then
    /// a straight line to `min_lr` over the last `decay_fraction` of the steps.
    Wsd,
}

impl OptimConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let checks = [
            (
                self.lr.is_nan() || self.lr <= 0.0,
                "optim.lr",
                "must be > 0",
            ),
            (
                self.min_lr < 0.0 || self.min_lr > self.lr,
                "optim.min_lr",
                "must be in [0, optim.lr]",
            ),
            (
                !(self.decay_fraction > 0.0 && self.decay_fraction <= 1.0),
                "optim.decay_fraction",
                "must be in (0, 1]",
            ),
            (
                !(0.0..1.0).contains(&self.beta1),
                "optim.beta1",
                "must be in [0, 1)",
            ),
            (
                !(0.0..1.0).contains(&self.beta2),
                "optim.beta2",
                "must be in [0, 1)",
            ),
            (
                self.eps.is_nan() || self.eps <= 0.0,
                "optim.eps",
                "must be > 0",
            ),
            (
                self.weight_decay < 0.0,
                "optim.weight_decay",
                "must be >= 0",
            ),
            (
                self.grad_clip_norm < 0.0,
                "optim.grad_clip_norm",
                "must be >= 0",
            ),
        ];
        match checks.iter().find(|c| c.0) {
            Some((_, k, m)) => Err((k.to_string(), m.to_string())),
            None => Ok(()),
        }
    }

    /// Learning rate at optimizer step `step` (1-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step <= self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        // t: how far through the decay, 0 at the end of the warmup, 1 at the last step.
        let t = ((step - self.warmup_steps) as f64
            / (total.saturating_sub(self.warmup_steps)).max(1) as f64)
            .min(1.0);
        let span = self.lr - self.min_lr;
        match self.schedule {
            Schedule::Cosine => self.min_lr + 0.5 * span * (1.0 + (std::f64::consts::PI * t).cos()),
            Schedule::Linear => self.lr - span * t,
            Schedule::Wsd => {
                let d = ((t - (1.0 - self.decay_fraction)) / self.decay_fraction).max(0.0);
                self.lr - span * d
            }
        }
    }
}

/// Parameter ids with and without weight decay, chosen by path as open_clip does: no decay for
/// tensors with fewer than 2 dims, norms, biases, embeddings and `logit_scale`; for Flamingo
/// (as OpenFlamingo) also none for token/position tables, latents and media-time embeddings.
#[derive(Default, Debug)]
pub struct ParamSplit {
    stack: Vec<String>,
    pub decay: Vec<ParamId>,
    pub no_decay: Vec<ParamId>,
}

impl<B: Backend> ModuleVisitor<B> for ParamSplit {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let path = self.stack.join(".");
        let embedding = path.contains("embedding")
            || ["wte", "wpe", "new_tokens", "latents", "media_time"]
                .iter()
                .any(|k| path.contains(k));
        if D < 2
            || path.contains("ln_")
            || path.ends_with("bias")
            || embedding
            || path.ends_with("logit_scale")
        {
            self.no_decay.push(p.id);
        } else {
            self.decay.push(p.id);
        }
    }
}

/// Gives every parameter an id derived from its path, so a model rebuilt from safetensors
/// (which assigns fresh ids) matches optimizer state saved against the original.
#[derive(Default)]
pub struct PathIds {
    stack: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for PathIds {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let id = ParamId::from(rookery_data::rng::hash_str(&self.stack.join(".")) >> 1);
        let require_grad = p.is_require_grad();
        let (_, tensor, _) = p.consume();
        Param::initialized(id, tensor).set_require_grad(require_grad)
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`); returns the norm before clipping. `max_norm == 0` only measures.
pub fn clip_global_norm<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f32,
) -> f32 {
    let mut v = GlobalNorm::<AB::InnerBackend> {
        grads,
        sq: None,
        scale: None,
    };
    model.visit(&mut v);
    let Some(sq) = v.sq.take() else { return 0.0 };
    let norm: f32 = sq.sqrt().into_scalar().elem();
    if max_norm > 0.0 && norm > max_norm {
        v.scale = Some(max_norm / (norm + 1e-6));
        model.visit(&mut v);
    }
    norm
}

struct GlobalNorm<'a, IB: Backend> {
    grads: &'a mut GradientsParams,
    sq: Option<Tensor<IB, 1>>,
    scale: Option<f32>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for GlobalNorm<'_, AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
        match self.scale {
            None => {
                if let Some(g) = self.grads.get::<AB::InnerBackend, D>(p.id) {
                    let s = g.square().sum();
                    self.sq = Some(match self.sq.take() {
                        Some(a) => a + s,
                        None => s,
                    });
                }
            }
            Some(c) => {
                if let Some(g) = self.grads.remove::<AB::InnerBackend, D>(p.id) {
                    self.grads.register::<AB::InnerBackend, D>(p.id, g * c);
                }
            }
        }
    }
}

/// AdamW over a model's parameters (burn keeps state only for parameters that get gradients,
/// so frozen ones never enter it).
pub type AdamWOf<B, M> = OptimizerAdaptor<Adam, M, B>;

/// AdamW over CLIP's parameters.
pub type ClipAdamW<B> = AdamWOf<B, Clip<B>>;

impl OptimConfig {
    /// AdamW with this config's betas and eps; weight decay is applied by [`Updater`] instead,
    /// decoupled and only to the parameters [`ParamSplit`] picks.
    pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> AdamWOf<B, M> {
        OptimizerAdaptor::from(Adam::new(self.beta1, self.beta2, self.eps))
    }
}

/// One optimizer update: global-norm clipping, decoupled weight decay at `lr(step)`, AdamW.
pub struct Updater<B: AutodiffBackend, M: AutodiffModule<B>> {
    pub optim: AdamWOf<B, M>,
    cfg: OptimConfig,
    decay: HashSet<ParamId>,
    lr_mult: HashMap<ParamId, f32>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> Updater<B, M> {
    pub fn new(cfg: &OptimConfig, optim: AdamWOf<B, M>, model: &M) -> Self {
        let mut split = ParamSplit::default();
        model.visit(&mut split);
        Updater {
            optim,
            cfg: cfg.clone(),
            decay: split.decay.into_iter().collect(),
            lr_mult: HashMap::new(),
        }
    }

    /// Trains the listed parameters at `factor` times the learning rate (their weight decay
    /// too). The AdamW update is linear in the learning rate, so scaling a parameter's whole
    /// update after the step is AdamW at `lr * factor` for it.
    pub fn with_lr_mult(mut self, mult: impl IntoIterator<Item = (ParamId, f32)>) -> Self {
        self.lr_mult = mult.into_iter().filter(|(_, k)| *k != 1.0).collect();
        self
    }

    /// The learning rate of optimizer step `step` of `total`.
    pub fn lr(&self, step: usize, total: usize) -> f64 {
        self.cfg.lr_at(step, total)
    }

    /// Applies `grads` as optimizer step `step` of `total`; returns the model, the learning
    /// rate and the gradient norm before clipping. Frozen parameters (no gradient) are neither
    /// decayed nor updated. Gradients with a NaN or infinite value (a non-finite norm) update
    /// nothing: the model comes back as it was and the optimizer state is untouched; the
    /// caller sees the non-finite norm.
    pub fn apply(
        &mut self,
        model: M,
        mut grads: GradientsParams,
        step: usize,
        total: usize,
    ) -> (M, f64, f32) {
        let o = &self.cfg;
        let grad_norm = clip_global_norm(&model, &mut grads, o.grad_clip_norm);
        let lr = o.lr_at(step, total);
        if !grad_norm.is_finite() {
            return (model, lr, grad_norm);
        }
        let mut before = Snapshot::<B::InnerBackend> {
            ids: &self.lr_mult,
            saved: HashMap::new(),
        };
        // Two extra walks over the model only when some parameter has a multiplier.
        if !self.lr_mult.is_empty() {
            model.visit(&mut before);
        }
        let model = model.map(&mut Decay {
            ids: &self.decay,
            factor: 1.0 - (lr as f32) * o.weight_decay,
        });
        let mut model = self.optim.step(lr, model, grads);
        if !self.lr_mult.is_empty() {
            model = model.map(&mut Amplify {
                mult: &self.lr_mult,
                before: before.saved,
            });
        }
        (model, lr, grad_norm)
    }
}

/// The values of the parameters with a learning-rate multiplier, flattened, before a step.
struct Snapshot<'a, IB: Backend> {
    ids: &'a HashMap<ParamId, f32>,
    saved: HashMap<ParamId, Tensor<IB, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Snapshot<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if self.ids.contains_key(&p.id) {
            let t = p.val().inner();
            let n = t.shape().num_elements();
            self.saved.insert(p.id, t.reshape([n]));
        }
    }
}

/// `before + factor * (after - before)` for the parameters with a multiplier.
struct Amplify<'a, IB: Backend> {
    mult: &'a HashMap<ParamId, f32>,
    before: HashMap<ParamId, Tensor<IB, 1>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Amplify<'_, B::InnerBackend> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (Some(&k), Some(old)) = (self.mult.get(&p.id), self.before.remove(&p.id)) else {
            return p;
        };
        p.map(|t| {
            let new = t.inner();
            let old = old.reshape(new.dims());
            Tensor::from_inner(old.clone() + (new - old) * k).require_grad()
        })
    }
}

/// Multiplies the listed parameters by `factor` outside the graph: AdamW's decoupled decay.
struct Decay<'a> {
    ids: &'a HashSet<ParamId>,
    factor: f32,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Decay<'_> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if !self.ids.contains(&p.id) || !p.is_require_grad() {
            return p;
        }
        let factor = self.factor;
        p.map(|t| Tensor::from_inner(t.inner() * factor).require_grad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let c = OptimConfig {
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_steps: 10,
            ..Default::default()
        };
        assert!((c.lr_at(1, 110) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(10, 110) - 1e-3).abs() < 1e-12);
        assert!((c.lr_at(60, 110) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-12);
        assert!((c.lr_at(110, 110) - 1e-5).abs() < 1e-12);
        assert!(
            (c.lr_at(500, 110) - 1e-5).abs() < 1e-12,
            "stays at min after the end"
        );
    }

    #[test]
    fn linear_and_warmup_stable_decay() {
        let c = OptimConfig {
            lr: 1e-3,
            min_lr: 0.0,
            warmup_steps: 10,
            schedule: Schedule::Linear,
            ..Default::default()
        };
        assert!((c.lr_at(5, 110) - 5e-4).abs() < 1e-12);
        assert!((c.lr_at(35, 110) - 7.5e-4).abs() < 1e-12);
        assert!((c.lr_at(85, 110) - 2.5e-4).abs() < 1e-12);
        assert!(c.lr_at(110, 110).abs() < 1e-12);
        let w = OptimConfig {
            schedule: Schedule::Wsd,
            decay_fraction: 0.2,
            ..c
        };
        // 100 steps after the warmup: held for 80 (steps 11-90), then down over 20.
        assert!((w.lr_at(10, 110) - 1e-3).abs() < 1e-12);
        assert!((w.lr_at(90, 110) - 1e-3).abs() < 1e-12);
        assert!((w.lr_at(100, 110) - 5e-4).abs() < 1e-12);
        assert!(w.lr_at(110, 110).abs() < 1e-12);
        assert!(
            w.lr_at(200, 110).abs() < 1e-12,
            "stays at min after the end"
        );
    }

    /// A learning-rate multiplier on one parameter is AdamW at `lr * k` for it and leaves the
    /// others as at `lr`. The loss `sum(x W + b) + sum(b^2)` keeps the gradients of W and b
    /// apart, so the three runs can be compared parameter by parameter.
    #[test]
    fn lr_multiplier_is_adamw_at_the_scaled_rate() {
        use burn::backend::{Autodiff, Flex};
        use burn::nn::{Linear, LinearConfig};
        type A = Autodiff<Flex>;
        let dev = Default::default();
        A::seed(&dev, 3);
        // Initialised now (burn initialises lazily, and each clone would draw its own).
        let start: Linear<A> = LinearConfig::new(4, 3)
            .init(&dev)
            .map(&mut PathIds::default());
        let x = Tensor::<A, 2>::from_floats([[0.5, -1.0, 2.0, 0.25], [1.5, 0.5, -0.5, 1.0]], &dev);
        let run = |lr: f64, mult: f32| {
            let o = OptimConfig {
                lr,
                min_lr: lr / 10.0,
                warmup_steps: 2,
                weight_decay: 0.1,
                // Clipping by the global norm would couple W and b.
                grad_clip_norm: 0.0,
                ..Default::default()
            };
            let mut model = start.clone();
            let bias = model.bias.as_ref().unwrap().id;
            let mut up = Updater::new(&o, o.adamw::<A, _>(), &model).with_lr_mult([(bias, mult)]);
            for step in 1..=6 {
                let b = model.bias.as_ref().unwrap().val();
                let loss = model.forward(x.clone()).sum() + (b.clone() * b).sum();
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = up.apply(model, grads, step, 6).0;
            }
            let get = |t: Tensor<A, 1>| t.into_data().to_vec::<f32>().unwrap();
            let w = model.weight.val().reshape([12]);
            (get(w), get(model.bias.unwrap().val()))
        };
        let (w_mult, b_mult) = run(1e-2, 7.0);
        let (w_base, b_base) = run(1e-2, 1.0);
        let (_, b_scaled) = run(7e-2, 1.0);
        assert!(
            w_mult == w_base,
            "a multiplier on the bias moved the weight"
        );
        let start_b = start
            .bias
            .unwrap()
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert!(b_base != start_b && b_mult != b_base);
        for (m, s) in b_mult.iter().zip(&b_scaled) {
            assert!((m - s).abs() < 1e-6, "{b_mult:?} vs {b_scaled:?}");
        }
    }
}
