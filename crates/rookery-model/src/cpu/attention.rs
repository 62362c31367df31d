//! Multi-head scaled dot-product attention over a packed `[B*T, 3D]` projection (q, k, v side by
//! side, head `h` in columns `h*Dh..(h+1)*Dh` of each third), with its autodiff node.
//!
//! Composed from tensor ops, attention costs per head and layer a q, k and v slice of the
//! projection, a transposed copy of k, two batched GEMMs, a mask add, a softmax and an output
//! slice, each with its own buffer and backward step; with 17 tokens and 32-wide heads those
//! ops are tiny and their overhead dominates. Here one pass per sequence reads q, k and v in
//! place and writes the heads' outputs side by side (`[B*Tq, D]`, ready for `out_proj`); the
//! backward is one pass too and writes the gradient of the packed projection.
//!
//! Queries: every position, or one row per sequence (`rows`, for a tower that reads one token
//! of its last block). Causal: a query at position p sees keys 0..=p.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Shape, TensorData};
use rayon::prelude::*;

use super::{contiguous, math, ADFlexTensor};

/// The shape of one attention call.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Sequences in the batch.
    pub batch: usize,
    pub heads: usize,
    pub causal: bool,
    /// One query row per sequence, or `None` for all rows.
    pub rows: Option<Vec<usize>>,
}

/// Sizes derived from a [`Spec`] and the projection's shape.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    tq: usize,
    d: usize,
    dh: usize,
    scale: f32,
}

impl Dims {
    fn all(self) -> (usize, usize, usize, usize, f32) {
        (self.t, self.tq, self.d, self.dh, self.scale)
    }
}

impl Spec {
    fn dims(&self, qkv: &FlexTensor) -> Dims {
        let [bt, d3] = qkv.layout().shape().dims();
        let (t, d) = (bt / self.batch, d3 / 3);
        assert!(
            bt == t * self.batch && d3 == 3 * d && d.is_multiple_of(self.heads),
            "attention: qkv [{bt}, {d3}] does not split into {} sequences x 3 x {} heads",
            self.batch,
            self.heads
        );
        let tq = if self.rows.is_some() { 1 } else { t };
        let dh = d / self.heads;
        let scale = (dh as f32).powf(-0.5);
        Dims {
            t,
            tq,
            d,
            dh,
            scale,
        }
    }

    /// `(position, keys seen)` of query `i` of sequence `b`.
    fn query(&self, b: usize, i: usize, t: usize) -> (usize, usize) {
        let pos = self.rows.as_ref().map_or(i, |r| r[b]);
        (pos, if self.causal { pos + 1 } else { t })
    }
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// `(y [B*Tq, D], p [B, H, Tq, T])`: the output and the attention weights (0 where masked).
fn forward(qkv: &FlexTensor, spec: &Spec) -> (FlexTensor, FlexTensor) {
    let dims = spec.dims(qkv);
    let Dims { t, tq, d, .. } = dims;
    let src = slice(qkv);
    let mut y = vec![0f32; spec.batch * tq * d];
    let mut p = vec![0f32; spec.batch * spec.heads * tq * t];
    y.par_chunks_mut(tq * d)
        .zip(p.par_chunks_mut(spec.heads * tq * t))
        .enumerate()
        .for_each(|(b, (y, p))| {
            let seq = &src[b * t * 3 * d..(b + 1) * t * 3 * d];
            pulp::Arch::new().dispatch(Forward {
                spec,
                dims,
                b,
                seq,
                y,
                p,
            })
        });
    let p_shape = Shape::new([spec.batch, spec.heads, tq, t]);
    (
        FlexTensor::from_data(TensorData::new(y, Shape::new([spec.batch * tq, d]))),
        FlexTensor::from_data(TensorData::new(p, p_shape)),
    )
}

/// One sequence forward.
struct Forward<'a> {
    spec: &'a Spec,
    dims: Dims,
    b: usize,
    seq: &'a [f32],
    y: &'a mut [f32],
    p: &'a mut [f32],
}

impl pulp::WithSimd for Forward<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (t, tq, d, dh, scale) = self.dims.all();
        let row = |j: usize, part: usize, h: usize| {
            let at = j * 3 * d + part * d + h * dh;
            &self.seq[at..at + dh]
        };
        for h in 0..self.spec.heads {
            for i in 0..tq {
                let (pos, seen) = self.spec.query(self.b, i, t);
                let q = row(pos, 0, h);
                let w = &mut self.p[(h * tq + i) * t..(h * tq + i + 1) * t];
                for (j, s) in w[..seen].iter_mut().enumerate() {
                    *s = scale * math::lane_sum([q, row(j, 1, h)], |[a, b]| a * b);
                }
                let max = w[..seen].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                for s in &mut w[..seen] {
                    *s = math::exp(*s - max);
                }
                let total = math::lane_sum([&w[..seen]], |[v]| v);
                let out = &mut self.y[i * d + h * dh..i * d + (h + 1) * dh];
                for (j, s) in w[..seen].iter_mut().enumerate() {
                    *s /= total;
                    axpy(out, *s, row(j, 2, h));
                }
            }
        }
    }
}

/// `y += a x`.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// The gradient of the packed projection `[B*T, 3D]` from the output's `dy` `[B*Tq, D]`.
fn backward(qkv: &FlexTensor, p: &FlexTensor, dy: &FlexTensor, spec: &Spec) -> FlexTensor {
    let dims = spec.dims(qkv);
    let Dims { t, tq, d, .. } = dims;
    let (src, p, g) = (slice(qkv), slice(p), slice(dy));
    let mut dqkv = vec![0f32; src.len()];
    dqkv.par_chunks_mut(t * 3 * d)
        .enumerate()
        .for_each(|(b, dseq)| {
            pulp::Arch::new().dispatch(Backward1 {
                spec,
                dims,
                b,
                seq: &src[b * t * 3 * d..(b + 1) * t * 3 * d],
                p: &p[b * spec.heads * tq * t..(b + 1) * spec.heads * tq * t],
                dy: &g[b * tq * d..(b + 1) * tq * d],
                dseq,
            })
        });
    FlexTensor::from_data(TensorData::new(dqkv, qkv.layout().shape().clone()))
}

/// One sequence backward.
struct Backward1<'a> {
    spec: &'a Spec,
    dims: Dims,
    b: usize,
    seq: &'a [f32],
    p: &'a [f32],
    dy: &'a [f32],
    dseq: &'a mut [f32],
}

impl pulp::WithSimd for Backward1<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (t, tq, d, dh, scale) = self.dims.all();
        let at = |j: usize, part: usize, h: usize| j * 3 * d + part * d + h * dh;
        let mut dp = vec![0f32; t];
        for h in 0..self.spec.heads {
            for i in 0..tq {
                let (pos, seen) = self.spec.query(self.b, i, t);
                let w = &self.p[(h * tq + i) * t..(h * tq + i) * t + seen];
                let g = &self.dy[i * d + h * dh..i * d + (h + 1) * dh];
                for (j, dp) in dp[..seen].iter_mut().enumerate() {
                    let v = &self.seq[at(j, 2, h)..at(j, 2, h) + dh];
                    *dp = math::lane_sum([g, v], |[a, b]| a * b);
                }
                let mean = math::lane_sum([w, &dp[..seen]], |[a, b]| a * b);
                let q = &self.seq[at(pos, 0, h)..at(pos, 0, h) + dh];
                for (j, (&wj, &dpj)) in w.iter().zip(&dp[..seen]).enumerate() {
                    let ds = scale * wj * (dpj - mean);
                    let k = &self.seq[at(j, 1, h)..at(j, 1, h) + dh];
                    axpy(&mut self.dseq[at(pos, 0, h)..at(pos, 0, h) + dh], ds, k);
                    axpy(&mut self.dseq[at(j, 1, h)..at(j, 1, h) + dh], ds, q);
                    axpy(&mut self.dseq[at(j, 2, h)..at(j, 2, h) + dh], wj, g);
                }
            }
        }
    }
}

#[derive(Debug)]
struct Attention {
    spec: Spec,
}

impl Backward<Flex, 1> for Attention {
    type State = (FlexTensor, FlexTensor); // qkv, p

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ((qkv, p), spec) = (ops.state, self.spec);
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
            backward(&qkv, &p, &contiguous(dy), &spec)
        });
    }
}

pub(super) fn autodiff(qkv: ADFlexTensor, spec: Spec) -> ADFlexTensor {
    let node = qkv.node.clone();
    let qkv = contiguous(qkv.primitive);
    let (y, p) = forward(&qkv, &spec);
    match (Attention { spec })
        .prepare::<NoCheckpointing>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((qkv, p), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

pub(super) fn plain(qkv: FlexTensor, spec: Spec) -> FlexTensor {
    forward(&contiguous(qkv), &spec).0
}
