//! Fresh parameter leaves for a tracked forward that follows a backward in the same step
//! (gradient accumulation), so that rank threads cannot lose each other's gradients.
//!
//! burn 0.21's autodiff keeps the graphs of the whole process in one global locator, and every
//! `backward()` ends by sweeping each graph that no live tensor refers to
//! (tracel-ai/burn#5573, fixed after 0.21). A backward also drops its parameters' leaves from
//! the locator, so in the next forward the first op on a parameter starts a small graph of its
//! own. For as long as an op runs on that graph's only tensor (moved into the op), nothing
//! refers to the graph; a backward finishing on another rank thread in that moment deletes its
//! step, and the gradient through it never reaches the parameter. Nothing fails: the step just
//! goes on without that part of the gradient (seen as 2 MPI processes and 2 thread ranks
//! ending with different weights, about one run in 40 under load).
//!
//! A parameter made a new leaf here is registered in a graph whose node its `Param` holds, so
//! every graph its ops join stays referenced and a sweep passes it by. The optimizer makes new
//! leaves after each step anyway (burn's `OptimizerAdaptor`), so only forwards after a backward
//! within one step need this. Gradients are keyed by `ParamId`, which a new leaf keeps.

use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

/// `model` with every trainable parameter a new autodiff leaf (same values, same `ParamId`);
/// frozen parameters stay as they are. Read gradients with the returned module.
pub fn fresh_leaves<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> M {
    model.clone().map(&mut Fresh)
}

struct Fresh;

impl<B: AutodiffBackend> ModuleMapper<B> for Fresh {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if !p.is_require_grad() {
            return p;
        }
        p.map(|t| Tensor::from_inner(t.inner()).require_grad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;
    use burn::optim::GradientsParams;
    use std::sync::atomic::{AtomicBool, Ordering};

    type B = Autodiff<Flex>;

    #[derive(Module, Debug)]
    struct Tiny<B: Backend> {
        token: Param<Tensor<B, 2>>,
        weight: Param<Tensor<B, 2>>,
    }

    impl<B: Backend> Tiny<B> {
        fn new(device: &B::Device) -> Self {
            let ramp = |n: usize, k: f32| {
                let v: Vec<f32> = (0..n * n).map(|i| ((i % 97) as f32 - 48.0) * k).collect();
                Param::from_tensor(Tensor::from_data(TensorData::new(v, [n, n]), device))
            };
            Tiny {
                token: ramp(N, 1e-3),
                weight: ramp(N, 2e-3),
            }
        }

        /// Like a class token: a parameter reshaped, then concatenated with the data's rows.
        fn loss(&self, x: Tensor<B, 2>) -> Tensor<B, 1> {
            let token = self.token.val().reshape([N, N]);
            Tensor::cat(vec![token, x], 0)
                .matmul(self.weight.val())
                .powf_scalar(2.0)
                .sum()
        }
    }

    const N: usize = 192;

    /// Gradients of two micro-batches, the second forward after the first backward.
    fn accumulate(model: &Tiny<B>, fresh: bool) -> Vec<f32> {
        let x = Tensor::<B, 2>::ones([N, N], &Default::default());
        let g1 = GradientsParams::from_grads(model.loss(x.clone()).backward(), model);
        let second = if fresh {
            fresh_leaves(model)
        } else {
            model.clone()
        };
        let g2 = GradientsParams::from_grads(second.loss(x).backward(), &second);
        let mut v = Vec::new();
        for g in [g1, g2] {
            for id in [model.token.id, model.weight.id] {
                let t = g
                    .get::<Flex, 2>(id)
                    .map(|t| t.into_data().to_vec::<f32>().unwrap());
                v.extend(t.unwrap_or_default());
            }
        }
        v
    }

    /// Rounds, on one thread, whose gradients differ from `want` while another thread runs
    /// small backwards (the sweeps) all the time.
    fn lost_rounds(fresh: bool, rounds: usize) -> usize {
        let device = Default::default();
        let want = accumulate(&Tiny::<B>::new(&device), true);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let a = Tensor::<B, 1>::ones([8], &device).require_grad();
                    let _ = (a * 2.0).sum().backward();
                }
            });
            let lost = (0..rounds)
                .filter(|_| accumulate(&Tiny::<B>::new(&device), fresh) != want)
                .count();
            stop.store(true, Ordering::Relaxed);
            lost
        })
    }

    #[test]
    fn fresh_leaves_keep_every_gradient_under_concurrent_backwards() {
        assert_eq!(lost_rounds(true, 300), 0);
    }

    /// The race itself, shown on the same rounds without fresh leaves (not run by default:
    /// how often it hits depends on the machine's timing).
    #[test]
    #[ignore]
    fn without_fresh_leaves_a_concurrent_backward_loses_gradients() {
        let lost = lost_rounds(false, 300);
        println!("lost {lost} of 300 rounds");
        assert!(lost > 0);
    }
}
