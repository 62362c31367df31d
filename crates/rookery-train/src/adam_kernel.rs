//! Adam's moment update and parameter step for one flex tensor in one pass over its values.
//! burn's `AdamW` takes about a dozen element-wise ops per parameter, each a full-size buffer;
//! this reads the parameter, gradient and both moments once and writes the three back in place.
//! Every value goes through the same f32 operations in the same order as burn's, so the result
//! is the same bits (the test in [`crate::adam`] checks it). It lives beside the optimizer;
//! the flex plumbing (primitives in and out, row-major and writable buffers) is
//! [`rookery_model::cpu`]'s.

use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::{TensorData, TensorMetadata};
use rookery_model::cpu::{
    contiguous, flex_primitive, from_flex_primitive, is_flex_f32, values, writable,
};

/// One step's constants: `time` counts this step (1 on the first).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub lr: f32,
    pub time: i32,
}

/// Adam's step for one parameter of a flex model (see [`is_flex_f32`]; panics on any other):
/// `(param, moment_1, moment_2)` after it, with `moments` `None` on the first step. The same
/// bits as burn's `AdamW` without weight decay, in one pass instead of a dozen ops.
pub fn adam_step<B: Backend, const D: usize>(
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
    step: &AdamStep,
) -> (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>) {
    assert!(
        is_flex_f32(&param),
        "adam_step runs on flex f32 tensors only"
    );
    let moments = moments.map(|(m, v)| (flex_primitive(m), flex_primitive(v)));
    let (p, m, v) = update(flex_primitive(param), flex_primitive(grad), moments, step);
    (
        from_flex_primitive(p),
        from_flex_primitive(m),
        from_flex_primitive(v),
    )
}

/// `(param, moment_1, moment_2)` after one step; `moments` is `None` on the first step.
fn update(
    param: FlexTensor,
    grad: FlexTensor,
    moments: Option<(FlexTensor, FlexTensor)>,
    s: &AdamStep,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let grad = contiguous(grad);
    let g = values(&grad);
    let n = g.len();
    let mut param = writable(param);
    let (mut m, mut v) = match moments {
        Some((m, v)) => (writable(m), writable(v)),
        // Zeros: then `m * beta_1 + g * (1 - beta_1)` below is burn's first step, `g * (1 -
        // beta_1)`, exactly (0 + x is x), up to the sign of an exact zero.
        None => {
            let zeros = || FlexTensor::from_data(TensorData::new(vec![0f32; n], grad.shape()));
            (zeros(), zeros())
        }
    };
    let (f1, f2) = (1.0 - s.beta_1, 1.0 - s.beta_2);
    let (c1, c2) = (1f32 - s.beta_1.powi(s.time), 1f32 - s.beta_2.powi(s.time));
    let (p, m1, m2) = (
        &mut param.storage_mut::<f32>()[..n],
        &mut m.storage_mut::<f32>()[..n],
        &mut v.storage_mut::<f32>()[..n],
    );
    for i in 0..n {
        m1[i] = m1[i] * s.beta_1 + g[i] * f1;
        m2[i] = m2[i] * s.beta_2 + (g[i] * g[i]) * f2;
        let delta = (m1[i] / c1) / ((m2[i] / c2).sqrt() + s.epsilon);
        p[i] -= delta * s.lr;
    }
    (param, m, v)
}
