//! Exact GELU on flex tensors, and its autodiff node: the input is kept for the backward, which
//! multiplies the incoming gradient by `Phi(x) + x phi(x)` in place.

use burn::backend::flex::FlexTensor;
use burn::tensor::{TensorData, TensorMetadata};
use rayon::prelude::*;

use super::node::{unary_node, Keep};
use super::{contiguous, math, writable, ADFlexTensor, CHUNK};

pub(super) fn forward(x: FlexTensor) -> FlexTensor {
    let x = contiguous(x);
    let src = x.as_slice::<f32>().expect("contiguous f32");
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(o, s)| math::map(s, o, math::gelu));
    FlexTensor::from_data(TensorData::new(out, x.shape()))
}

/// `grad * gelu'(x)`, written into `grad`'s buffer when nothing else holds it.
fn backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let x = contiguous(x);
    let src = x.as_slice::<f32>().expect("contiguous f32");
    let mut grad = writable(grad);
    grad.storage_mut::<f32>()[..src.len()]
        .par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(g, s)| math::scale_by(s, g, math::gelu_grad));
    grad
}

/// GELU as a node of `x`'s graph; the backward reads the input.
pub(super) fn autodiff(x: ADFlexTensor) -> ADFlexTensor {
    unary_node(x, forward, Keep::Input, backward)
}
