//! The Adam part of [`crate::optim`]'s AdamW: burn's `AdamW` math with weight decay 0 (the
//! [`crate::optim::Updater`] decays beside it), run on flex as one pass per parameter
//! ([`crate::adam_kernel::adam_step`]) and as burn's own ops on every other backend. The state
//! is burn's `AdamWState`, so checkpoints keep the same records and load either way.

use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer,
};
use burn::prelude::*;
use rookery_model::cpu::is_flex_f32;

use crate::adam_kernel::{adam_step, AdamStep};

/// Adam without weight decay, bit for bit burn's `AdamW` with `weight_decay = 0`.
#[derive(Clone)]
pub struct Adam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    /// burn's, for the backends the one-pass kernel does not cover.
    burn: AdamW,
}

impl Adam {
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32) -> Self {
        let burn = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(0.0)
            .build();
        Adam {
            beta_1,
            beta_2,
            epsilon,
            burn,
        }
    }
}

impl<B: Backend> SimpleOptimizer<B> for Adam {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        // The kernel covers flex f32 values without AMSGrad's extra moment (which this config
        // never makes; a state from elsewhere might carry it, or other dtypes).
        let plain = state.as_ref().is_none_or(|s| {
            let m = &s.momentum;
            m.max_moment_2.is_none() && is_flex_f32(&m.moment_1) && is_flex_f32(&m.moment_2)
        });
        if !(plain && is_flex_f32(&tensor) && is_flex_f32(&grad)) {
            return self.burn.step(lr, tensor, grad, state);
        }
        let time = state.as_ref().map_or(0, |s| s.momentum.time) + 1;
        let moments = state.map(|s| (s.momentum.moment_1, s.momentum.moment_2));
        let step = AdamStep {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            lr: lr as f32,
            time: time as i32,
        };
        let (tensor, m, v) = adam_step(tensor, grad, moments, &step);
        let momentum = AdaptiveMomentumState::new(time, m, v);
        (tensor, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::adaptor::OptimizerAdaptor;
    use burn::optim::{GradientsParams, Optimizer};
    use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
    use burn::tensor::Distribution;

    use super::*;

    type A = Autodiff<Flex>;

    fn burn_adamw() -> OptimizerAdaptor<AdamW, Linear<A>, A> {
        AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.98)
            .with_epsilon(1e-6)
            .with_weight_decay(0.0)
            .init()
    }

    /// `model` after a step of `optim` on the gradient of `sum((x W + b)^2)`.
    fn step<O: Optimizer<Linear<A>, A>>(
        optim: &mut O,
        model: Linear<A>,
        x: &Tensor<A, 2>,
        lr: f64,
    ) -> Linear<A> {
        let grads = model.forward(x.clone()).powi_scalar(2).sum().backward();
        let grads = GradientsParams::from_grads(grads, &model);
        optim.step(lr, model, grads)
    }

    fn bits(l: &Linear<A>) -> Vec<u32> {
        let w: Vec<f32> = l.weight.val().into_data().to_vec().unwrap();
        let b: Vec<f32> = l.bias.as_ref().unwrap().val().into_data().to_vec().unwrap();
        w.iter().chain(&b).map(|x| x.to_bits()).collect()
    }

    /// Five steps of the one-pass kernel and of burn's AdamW (decay 0), from the same start on
    /// the same inputs, end on the same bits. Then the kernel's optimizer state, saved and
    /// loaded into burn's AdamW, takes a sixth step to the same bits as burn's own state does:
    /// the moments and step count match, and a checkpoint reads the same either way.
    #[test]
    fn same_bits_and_state_as_burn_adamw() {
        let dev = Default::default();
        A::seed(&dev, 11);
        // Initialised now (burn initialises lazily, and each clone would draw its own).
        let start: Linear<A> = LinearConfig::new(37, 19)
            .init(&dev)
            .map(&mut crate::optim::PathIds::default());
        let mut ours = OptimizerAdaptor::from(Adam::new(0.9, 0.98, 1e-6));
        let mut theirs = burn_adamw();
        let (mut a, mut b) = (start.clone(), start);
        for i in 0..5 {
            let x = Tensor::<A, 2>::random([8, 37], Distribution::Normal(0.0, 1.0), &dev);
            let lr = 1e-2 / (1 + i) as f64;
            a = step(&mut ours, a, &x, lr);
            b = step(&mut theirs, b, &x, lr);
            assert!(bits(&a) == bits(&b), "step {} differs", i + 1);
        }
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let saved = recorder.record(ours.to_record(), ()).unwrap();
        let mut loaded = burn_adamw().load_record(recorder.load(saved, &dev).unwrap());
        let x = Tensor::<A, 2>::random([8, 37], Distribution::Normal(0.0, 1.0), &dev);
        let a = step(&mut loaded, a, &x, 1e-3);
        let b = step(&mut theirs, b, &x, 1e-3);
        assert!(bits(&a) == bits(&b), "step 6 from the loaded state differs");
    }
}
