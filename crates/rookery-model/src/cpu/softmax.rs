//! Softmax over the last dimension of a flex tensor, row by row, and its autodiff node. burn
//! builds softmax from five tensor ops (max, subtract, scalar `exp`, sum, divide), each a pass
//! over memory with a backward of its own; here a row is read once forward and once backward.

use burn::backend::flex::FlexTensor;
use burn::tensor::{TensorData, TensorMetadata};
use rayon::prelude::*;

use super::node::{unary_node, Keep};
use super::{contiguous, math, writable, ADFlexTensor, CHUNK};

/// `exp(x - max) / sum exp(x - max)` along the last dimension.
pub(super) fn forward(x: FlexTensor) -> FlexTensor {
    let x = contiguous(x);
    let shape = x.shape();
    let n = shape[shape.num_dims() - 1];
    let src = x.as_slice::<f32>().expect("contiguous f32");
    let mut out = vec![0f32; src.len()];
    let task = (CHUNK / n).max(1) * n; // whole rows per rayon task
    out.par_chunks_mut(task)
        .zip(src.par_chunks(task))
        .for_each(|(y, x)| {
            pulp::Arch::new().dispatch(Rows {
                a: x,
                b: y,
                n,
                grad: false,
            })
        });
    FlexTensor::from_data(TensorData::new(out, shape))
}

/// `y * (g - sum(g * y))` along the last dimension, `y` the forward's output, into `g`.
fn backward(y: FlexTensor, g: FlexTensor) -> FlexTensor {
    let y = contiguous(y);
    let n = y.shape()[y.shape().num_dims() - 1];
    let src = y.as_slice::<f32>().expect("contiguous f32");
    let mut g = writable(g);
    let task = (CHUNK / n).max(1) * n;
    g.storage_mut::<f32>()[..src.len()]
        .par_chunks_mut(task)
        .zip(src.par_chunks(task))
        .for_each(|(g, y)| {
            pulp::Arch::new().dispatch(Rows {
                a: y,
                b: g,
                n,
                grad: true,
            })
        });
    g
}

/// Rows of `n` values: forward writes softmax(`a`) into `b`; `grad` turns `b` (the incoming
/// gradient) into the input's gradient given the output `a`.
struct Rows<'a> {
    a: &'a [f32],
    b: &'a mut [f32],
    n: usize,
    grad: bool,
}

impl pulp::WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let rows = self
            .a
            .chunks_exact(self.n)
            .zip(self.b.chunks_exact_mut(self.n));
        for (a, b) in rows {
            if self.grad {
                let dot = math::lane_sum([a, &*b], |[y, g]| y * g);
                for (g, &y) in b.iter_mut().zip(a) {
                    *g = y * (*g - dot);
                }
            } else {
                let max = a
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
                for (y, &x) in b.iter_mut().zip(a) {
                    *y = math::exp(x - max);
                }
                let total = math::lane_sum([&*b], |[y]| y);
                for y in b.iter_mut() {
                    *y /= total;
                }
            }
        }
    }
}

/// Softmax as a node of `x`'s graph; the backward reads the output.
pub(super) fn autodiff(x: ADFlexTensor) -> ADFlexTensor {
    unary_node(x, forward, Keep::Output, backward)
}
