//! LayerNorm over the last dimension of a flex tensor, with its autodiff node. burn composes it
//! from nine tensor ops (two means, subtract, square, add, sqrt, divide, scale, shift), each a
//! pass over memory with a backward of its own; here a row is read once forward and once
//! backward, and the backward gives the input, `gamma` and `beta` gradients together:
//!
//! `x^ = (x - mean) / sqrt(var + eps)`, `y = x^ * gamma + beta`;
//! `dx = (gx - mean(gx) - x^ * mean(gx * x^)) / sqrt(var + eps)` with `gx = dy * gamma`,
//! `dgamma = sum over rows of dy * x^`, `dbeta = sum over rows of dy`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Shape, TensorData, TensorMetadata};
use rayon::prelude::*;

use super::{contiguous, math, slice, ADFlexTensor, CHUNK};

/// What the backward needs: the normalised input, each row's `1 / sqrt(var + eps)`, `gamma`.
#[derive(Clone, Debug)]
struct Saved {
    x_hat: FlexTensor,
    inv_std: FlexTensor,
    gamma: FlexTensor,
}

/// `(y, saved)`. `x`: `[..., n]`, `gamma`, `beta`: `[n]`.
fn forward(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, eps: f32) -> (FlexTensor, Saved) {
    let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
    let shape = x.shape();
    let n = shape[shape.num_dims() - 1];
    let src = x.as_slice::<f32>().expect("contiguous f32");
    let (g, b) = (slice(&gamma), slice(&beta));
    let rows = src.len() / n;
    let (mut y, mut x_hat, mut inv_std) = (
        vec![0f32; src.len()],
        vec![0f32; src.len()],
        vec![0f32; rows],
    );
    let task = (CHUNK / n).max(1);
    y.par_chunks_mut(task * n)
        .zip(x_hat.par_chunks_mut(task * n))
        .zip(inv_std.par_chunks_mut(task))
        .zip(src.par_chunks(task * n))
        .for_each(|(((y, x_hat), inv_std), x)| {
            let rows = ForwardRows {
                x,
                gamma: g,
                beta: b,
                y,
                x_hat,
                inv_std,
                eps,
            };
            pulp::Arch::new().dispatch(rows)
        });
    let row_shape = Shape::new([rows]);
    let saved = Saved {
        x_hat: FlexTensor::from_data(TensorData::new(x_hat, shape.clone())),
        inv_std: FlexTensor::from_data(TensorData::new(inv_std, row_shape)),
        gamma,
    };
    (FlexTensor::from_data(TensorData::new(y, shape)), saved)
}

/// `(dx, dgamma, dbeta)` from the output gradient `dy`.
fn backward(saved: Saved, dy: FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor) {
    let dy = contiguous(dy);
    let shape = saved.x_hat.shape();
    let n = shape[shape.num_dims() - 1];
    let (x_hat, inv_std, g) = (
        slice(&saved.x_hat),
        slice(&saved.inv_std),
        slice(&saved.gamma),
    );
    let dy_s = dy.as_slice::<f32>().expect("contiguous f32");
    let mut dx = vec![0f32; dy_s.len()];
    let task = (CHUNK / n).max(1);
    // Each task also sums its rows' dgamma and dbeta; the partial sums are added in task
    // order, so the result does not depend on the number of threads.
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(task * n)
        .zip(dy_s.par_chunks(task * n))
        .zip(x_hat.par_chunks(task * n))
        .zip(inv_std.par_chunks(task))
        .map(|(((dx, dy), x_hat), inv_std)| {
            let mut acc = vec![0f32; 2 * n]; // dgamma, then dbeta
            let rows = BackwardRows {
                dy,
                x_hat,
                inv_std,
                gamma: g,
                dx,
                acc: &mut acc,
            };
            pulp::Arch::new().dispatch(rows);
            acc
        })
        .collect();
    let mut acc = vec![0f32; 2 * n];
    for p in partial {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    let dbeta = acc.split_off(n);
    let param = |v: Vec<f32>| FlexTensor::from_data(TensorData::new(v, Shape::new([n])));
    (
        FlexTensor::from_data(TensorData::new(dx, shape)),
        param(acc),
        param(dbeta),
    )
}

/// A task's rows forward: `y`, `x_hat` and `inv_std` from `x`.
struct ForwardRows<'a> {
    x: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    y: &'a mut [f32],
    x_hat: &'a mut [f32],
    inv_std: &'a mut [f32],
    eps: f32,
}

impl pulp::WithSimd for ForwardRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let n = self.gamma.len();
        let rows = self.x.chunks_exact(n).zip(self.y.chunks_exact_mut(n));
        let rows = rows
            .zip(self.x_hat.chunks_exact_mut(n))
            .zip(self.inv_std.iter_mut());
        for (((x, y), x_hat), inv_std) in rows {
            let mean = math::lane_sum([x], |[v]| v) / n as f32;
            let var = math::lane_sum([x], |[v]| (v - mean) * (v - mean)) / n as f32;
            *inv_std = 1.0 / (var + self.eps).sqrt();
            let params = self.gamma.iter().zip(self.beta);
            for (((y, h), &v), (&g, &b)) in y.iter_mut().zip(x_hat).zip(x).zip(params) {
                *h = (v - mean) * *inv_std;
                *y = *h * g + b;
            }
        }
    }
}

/// A task's rows backward: `dx`, and the rows' `dgamma` and `dbeta` added into `acc`.
struct BackwardRows<'a> {
    dy: &'a [f32],
    x_hat: &'a [f32],
    inv_std: &'a [f32],
    gamma: &'a [f32],
    dx: &'a mut [f32],
    acc: &'a mut [f32],
}

impl pulp::WithSimd for BackwardRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (n, g) = (self.gamma.len(), self.gamma);
        let (dgamma, dbeta) = self.acc.split_at_mut(n);
        let rows = self.dy.chunks_exact(n).zip(self.x_hat.chunks_exact(n));
        let rows = rows.zip(self.dx.chunks_exact_mut(n)).zip(self.inv_std);
        for (((dy, xh), dx), &s) in rows {
            for (((dg, db), &d), &h) in dgamma.iter_mut().zip(dbeta.iter_mut()).zip(dy).zip(xh) {
                *dg += d * h;
                *db += d;
            }
            let mean_gx = math::lane_sum([dy, g], |[d, g]| d * g) / n as f32;
            let mean_gxh = math::lane_sum([dy, g, xh], |[d, g, h]| d * g * h) / n as f32;
            for (((o, &d), &g), &h) in dx.iter_mut().zip(dy).zip(g).zip(xh) {
                *o = (d * g - mean_gx - h * mean_gxh) * s;
            }
        }
    }
}

#[derive(Debug)]
struct LayerNorm;

impl Backward<Flex, 3> for LayerNorm {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let (dx, dgamma, dbeta) = backward(ops.state, dy);
        let [x, gamma, beta] = ops.parents;
        for (parent, grad) in [(x, dx), (gamma, dgamma), (beta, dbeta)] {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

pub(super) fn autodiff(
    x: ADFlexTensor,
    gamma: ADFlexTensor,
    beta: ADFlexTensor,
    eps: f32,
) -> ADFlexTensor {
    let nodes = [x.node.clone(), gamma.node.clone(), beta.node.clone()];
    let (y, saved) = forward(x.primitive, gamma.primitive, beta.primitive, eps);
    match LayerNorm
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(saved, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

pub(super) fn plain(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, eps: f32) -> FlexTensor {
    forward(x, gamma, beta, eps).0
}
