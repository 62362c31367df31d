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
//! Per sequence and head, the keys and values are copied once into buffers padded to whole
//! SIMD vectors, and every row product (scores, outputs; dQ, dK and dV in the backward) sums a
//! few vectors in registers, over its index in order. Rows of 17 or 20 then have no scalar
//! tails, and no step waits on the store of the one before; the bits are those of a plain
//! loop in the same order.
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
        let (tp, dp) = padded::<S>(t, dh);
        let row = |j: usize, part: usize, h: usize| {
            let at = j * 3 * d + part * d + h * dh;
            &self.seq[at..at + dh]
        };
        // One head's keys as columns and values as rows, both zero-padded to whole vectors.
        let (mut k_t, mut v) = (vec![0f32; dh * tp], vec![0f32; t * dp]);
        let (mut w, mut out) = (vec![0f32; tp], vec![0f32; dp]);
        for h in 0..self.spec.heads {
            columns(&mut k_t, tp, t, |j| row(j, 1, h));
            rows(&mut v, dp, t, |j| row(j, 2, h));
            for i in 0..tq {
                let (pos, seen) = self.spec.query(self.b, i, t);
                row_times_columns(simd, &mut w, row(pos, 0, h), &k_t, tp);
                // Masked and padded keys weigh exactly 0: math::exp(-inf) is 0.
                w[seen..].fill(f32::NEG_INFINITY);
                let max = max_of(simd, &w);
                for s in w.iter_mut() {
                    *s = math::exp(scale * (*s - max));
                }
                let total = math::lane_sum([&*w], |[s]| s);
                for s in w.iter_mut() {
                    *s /= total;
                }
                self.p[(h * tq + i) * t..(h * tq + i + 1) * t].copy_from_slice(&w[..t]);
                row_times_columns(simd, &mut out, &w[..seen], &v, dp);
                self.y[i * d + h * dh..i * d + (h + 1) * dh].copy_from_slice(&out[..dh]);
            }
        }
    }
}

/// `(t, dh)` rounded up to whole vectors of `S`, so that every row operation below is whole
/// vectors: with rows of 17 or 20 the scalar tails cost more than the vector work.
#[inline(always)]
fn padded<S: pulp::Simd>(t: usize, dh: usize) -> (usize, usize) {
    (
        t.next_multiple_of(S::F32_LANES),
        dh.next_multiple_of(S::F32_LANES),
    )
}

/// `dst[c * stride + j] = src(j)[c]` for rows `j < t`: the rows as columns, so that a query's
/// dot products with every key are `dh` vector passes over the keys instead of `t` horizontal
/// sums. The padding past `t` stays as it was (zero).
#[inline(always)]
fn columns<'a>(dst: &mut [f32], stride: usize, t: usize, src: impl Fn(usize) -> &'a [f32]) {
    for j in 0..t {
        for (c, &v) in src(j).iter().enumerate() {
            dst[c * stride + j] = v;
        }
    }
}

/// `dst[j * stride..][..dh] = src(j)` for rows `j < t`.
#[inline(always)]
fn rows<'a>(dst: &mut [f32], stride: usize, t: usize, src: impl Fn(usize) -> &'a [f32]) {
    for j in 0..t {
        let r = src(j);
        dst[j * stride..j * stride + r.len()].copy_from_slice(r);
    }
}

/// `out = sum over k of x[k] * m[k * stride..][..out.len()]`, `out` whole vectors of `S`.
/// Each output vector is summed in a register, `k` in order from 0: adding into `out` in
/// memory instead makes every step wait on the store before it.
#[inline(always)]
fn row_times_columns<S: pulp::Simd>(simd: S, out: &mut [f32], x: &[f32], m: &[f32], stride: usize) {
    let (ov, tail) = S::as_mut_simd_f32s(out);
    debug_assert!(tail.is_empty());
    for start in (0..ov.len()).step_by(4) {
        let (col, block) = (start * S::F32_LANES, &mut ov[start..]);
        match block.len() {
            1 => sum_rows::<S, 1>(simd, block, x, m, stride, col),
            2 => sum_rows::<S, 2>(simd, block, x, m, stride, col),
            3 => sum_rows::<S, 3>(simd, block, x, m, stride, col),
            _ => sum_rows::<S, 4>(simd, block, x, m, stride, col),
        }
    }
}

/// [`row_times_columns`] for the `K` vectors from column `col`, accumulated in registers. A
/// multiply and an add, not an FMA, so that every vector width gives the same bits.
#[inline(always)]
fn sum_rows<S: pulp::Simd, const K: usize>(
    simd: S,
    out: &mut [S::f32s],
    x: &[f32],
    m: &[f32],
    stride: usize,
    col: usize,
) {
    let mut acc = [simd.splat_f32s(0.0); K];
    for (k, &xk) in x.iter().enumerate() {
        let a = simd.splat_f32s(xk);
        let at = k * stride + col;
        let (row, _) = S::as_simd_f32s(&m[at..at + K * S::F32_LANES]);
        for (acc, &r) in acc.iter_mut().zip(row) {
            *acc = simd.add_f32s(*acc, simd.mul_f32s(a, r));
        }
    }
    out[..K].copy_from_slice(&acc);
}

/// The largest element of `w` (whole vectors of `S`): the same in any order.
#[inline(always)]
fn max_of<S: pulp::Simd>(simd: S, w: &[f32]) -> f32 {
    let (wv, _) = S::as_simd_f32s(w);
    let m = wv.iter().fold(simd.splat_f32s(f32::NEG_INFINITY), |m, &v| {
        simd.max_f32s(m, v)
    });
    simd.reduce_max_f32s(m)
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
        let (tp, dp) = padded::<S>(t, dh);
        let at = |j: usize, part: usize, h: usize| j * 3 * d + part * d + h * dh;
        let row = |j: usize, part: usize, h: usize| &self.seq[at(j, part, h)..at(j, part, h) + dh];
        // Per head: values as columns and keys as rows for the query loop, which keeps each
        // query's score gradients and weights as rows; dK and dV then come from their columns.
        let (mut v_t, mut k) = (vec![0f32; dh * tp], vec![0f32; t * dp]);
        let (mut q, mut gq) = (vec![0f32; tq * dp], vec![0f32; tq * dp]);
        let (mut w, mut ds) = (vec![0f32; tq * tp], vec![0f32; tq * tp]);
        let (mut col, mut out) = (vec![0f32; tq], vec![0f32; dp]);
        for h in 0..self.spec.heads {
            columns(&mut v_t, tp, t, |j| row(j, 2, h));
            rows(&mut k, dp, t, |j| row(j, 1, h));
            rows(&mut q, dp, tq, |i| {
                row(self.spec.query(self.b, i, t).0, 0, h)
            });
            rows(&mut gq, dp, tq, |i| {
                &self.dy[i * d + h * dh..i * d + (h + 1) * dh]
            });
            for i in 0..tq {
                let (pos, seen) = self.spec.query(self.b, i, t);
                // The weights, 0 where masked and in the padding.
                let w = &mut w[i * tp..(i + 1) * tp];
                w[..t].copy_from_slice(&self.p[(h * tq + i) * t..(h * tq + i + 1) * t]);
                let ds = &mut ds[i * tp..(i + 1) * tp];
                row_times_columns(simd, ds, &gq[i * dp..i * dp + dh], &v_t, tp);
                // Softmax backward, then the scale the scores were multiplied by.
                let mean = math::lane_sum([&w[..seen], &ds[..seen]], |[a, b]| a * b);
                for (s, &wj) in ds.iter_mut().zip(&*w) {
                    *s = scale * wj * (*s - mean);
                }
                row_times_columns(simd, &mut out, &ds[..seen], &k, dp);
                self.dseq[at(pos, 0, h)..at(pos, 0, h) + dh].copy_from_slice(&out[..dh]);
            }
            // dK[j] = sum over queries i of dS[i, j] q_i, and dV[j] = sum of P[i, j] dy_i
            // (masked entries are 0), queries in order.
            for j in 0..t {
                for (grad, part, src) in [(&ds, 1, &q), (&w, 2, &gq)] {
                    for (c, v) in col.iter_mut().enumerate() {
                        *v = grad[c * tp + j];
                    }
                    row_times_columns(simd, &mut out, &col, src, dp);
                    self.dseq[at(j, part, h)..at(j, part, h) + dh].copy_from_slice(&out[..dh]);
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
