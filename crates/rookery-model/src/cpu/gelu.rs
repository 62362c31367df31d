//! Exact GELU on flex tensors, and its autodiff node: the input is kept for the backward, which
//! multiplies the incoming gradient by `Phi(x) + x phi(x)` in place.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{TensorData, TensorMetadata};
use rayon::prelude::*;

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

#[derive(Debug)]
struct Gelu;

impl Backward<Flex, 1> for Gelu {
    type State = FlexTensor; // the input

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| backward(x, grad));
    }
}

pub(super) fn autodiff(x: ADFlexTensor) -> ADFlexTensor {
    match Gelu
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = forward(x.primitive.clone());
            prep.finish(x.primitive, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive)),
    }
}
