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

use super::{contiguous, math, slice, ADFlexTensor};

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
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let (t, tq, d, dh, scale) = self.dims.all();
        let row = |j: usize, part: usize, h: usize| {
            let at = j * 3 * d + part * d + h * dh;
            &self.seq[at..at + dh]
        };
        let mut k_t = vec![0f32; dh * t];
        for h in 0..self.spec.heads {
            columns(&mut k_t, t, |j| row(j, 1, h));
            for i in 0..tq {
                let (pos, seen) = self.spec.query(self.b, i, t);
                let w = &mut self.p[(h * tq + i) * t..(h * tq + i) * t + seen];
                row_times_columns(simd, w, row(pos, 0, h), &k_t, t);
                let max = w.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                for s in w.iter_mut() {
                    *s = math::exp(scale * (*s - max));
                }
                let total = math::lane_sum([&*w], |[v]| v);
                let out = &mut self.y[i * d + h * dh..i * d + (h + 1) * dh];
                for (j, s) in w.iter_mut().enumerate() {
                    *s /= total;
                    axpy(simd, out, *s, row(j, 2, h));
                }
            }
        }
    }
}

/// `dst[c * t + j] = rows(j)[c]`: the rows `0..t`, each `dh` long, as `dh` columns of `t`,
/// so that a query's dot products with every key are `dh` vectorised passes over `t` lanes
/// instead of `t` horizontal sums.
#[inline(always)]
fn columns<'a>(dst: &mut [f32], t: usize, rows: impl Fn(usize) -> &'a [f32]) {
    for j in 0..t {
        for (c, &v) in rows(j).iter().enumerate() {
            dst[c * t + j] = v;
        }
    }
}

/// `out[j] = sum over c of x[c] * cols[c * t + j]` for `j < out.len()`.
#[inline(always)]
fn row_times_columns<S: pulp::Simd>(simd: S, out: &mut [f32], x: &[f32], cols: &[f32], t: usize) {
    out.fill(0.0);
    let n = out.len();
    for (c, &xc) in x.iter().enumerate() {
        axpy(simd, out, xc, &cols[c * t..c * t + n]);
    }
}

/// `y += a x` in whole vectors of `S`'s width, then the tail one by one: LLVM's own
/// vectorisation unrolls for long loops and leaves rows of 17 or 32 scalar. A multiply and
/// an add, not an FMA, so that the tail and every vector width give the same bits.
#[inline(always)]
fn axpy<S: pulp::Simd>(simd: S, y: &mut [f32], a: f32, x: &[f32]) {
    let x = &x[..y.len()];
    let (yv, yt) = S::as_mut_simd_f32s(y);
    let (xv, xt) = S::as_simd_f32s(x);
    let av = simd.splat_f32s(a);
    for (y, &x) in yv.iter_mut().zip(xv) {
        *y = simd.add_f32s(*y, simd.mul_f32s(av, x));
    }
    for (y, &x) in yt.iter_mut().zip(xt) {
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
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let (t, tq, d, dh, scale) = self.dims.all();
        let at = |j: usize, part: usize, h: usize| j * 3 * d + part * d + h * dh;
        let row = |j: usize, part: usize, h: usize| &self.seq[at(j, part, h)..at(j, part, h) + dh];
        let (mut dp, mut v_t) = (vec![0f32; t], vec![0f32; dh * t]);
        for h in 0..self.spec.heads {
            columns(&mut v_t, t, |j| row(j, 2, h));
            for i in 0..tq {
                let (pos, seen) = self.spec.query(self.b, i, t);
                let w = &self.p[(h * tq + i) * t..(h * tq + i) * t + seen];
                let g = &self.dy[i * d + h * dh..i * d + (h + 1) * dh];
                let dp = &mut dp[..seen];
                row_times_columns(simd, dp, g, &v_t, t);
                // Softmax backward, then the scale the scores were multiplied by.
                let mean = math::lane_sum([w, &*dp], |[a, b]| a * b);
                for (ds, &wj) in dp.iter_mut().zip(w) {
                    *ds = scale * wj * (*ds - mean);
                }
                let q = row(pos, 0, h);
                for (j, (&wj, &ds)) in w.iter().zip(&*dp).enumerate() {
                    axpy(
                        simd,
                        &mut self.dseq[at(pos, 0, h)..at(pos, 0, h) + dh],
                        ds,
                        row(j, 1, h),
                    );
                    axpy(simd, &mut self.dseq[at(j, 1, h)..at(j, 1, h) + dh], ds, q);
                    axpy(simd, &mut self.dseq[at(j, 2, h)..at(j, 2, h) + dh], wj, g);
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
