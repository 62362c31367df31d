//! `[B*T, D]` rows to `[B, D, T]` (each sequence's rows as columns: attention's keys, transposed
//! for `q @ k^T`), materialised, with a backward that transposes the gradient back. burn's
//! `reshape` + `swap_dims` is a view forward, but its backward hands a `[B, T, D]` view with a
//! unit stride in the middle to a reshape, which burn-flex copies element by element through
//! its generic strided iterator (3% of a CPU step); here both directions are a plain loop.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Shape, TensorData};

use super::{contiguous, ADFlexTensor};

/// `[b, r, c]` (row-major in `src`) to `[b, c, r]`.
fn swap_last_two(src: &[f32], [b, r, c]: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    for (o, s) in out
        .chunks_exact_mut(r * c)
        .zip(src.chunks_exact(r * c))
        .take(b)
    {
        for (i, row) in s.chunks_exact(c).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                o[j * r + i] = v;
            }
        }
    }
    out
}

fn apply(x: FlexTensor, from: [usize; 3]) -> FlexTensor {
    let x = contiguous(x);
    let out = swap_last_two(x.as_slice::<f32>().expect("contiguous f32"), from);
    FlexTensor::from_data(TensorData::new(
        out,
        Shape::new([from[0], from[2], from[1]]),
    ))
}

/// `x` `[B*T, D]` -> `[B, D, T]`.
pub(super) fn forward(x: FlexTensor, b: usize) -> FlexTensor {
    let [bt, d] = x.layout().shape().dims();
    apply(x, [b, bt / b, d])
}

#[derive(Debug)]
struct RowsToColumns;

impl Backward<Flex, 1> for RowsToColumns {
    type State = [usize; 3]; // B, T, D

    fn backward(self, ops: Ops<[usize; 3], 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [b, t, d] = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            apply(g, [b, d, t]).reshape(Shape::new([b * t, d]))
        });
    }
}

pub(super) fn autodiff(x: ADFlexTensor, b: usize) -> ADFlexTensor {
    let [bt, d] = x.primitive.layout().shape().dims();
    match RowsToColumns
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish([b, bt / b, d], forward(x.primitive, b)),
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, b)),
    }
}
