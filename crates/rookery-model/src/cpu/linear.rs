//! `y = x W + b` on flex tensors as one GEMM with the bias folded in, and its autodiff node,
//! whose backward is two GEMMs (`dx = dy W^T`, `dW = x^T dy`) and a column sum (`db`).
//!
//! burn composes a linear layer from a matmul and a broadcast add. burn-flex allocates each
//! GEMM's output as zeroed bytes and then copies them into an aligned buffer (its
//! `FlexTensor::empty`), and the bias add is one more pass and buffer: together 15% of a
//! clip-tiny CPU step. Here every output is a fresh `Vec<f32>` that the GEMM writes once.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Shape, TensorData};

use super::{contiguous, slice, ADFlexTensor};

/// A row-major matrix operand for [`gemm`]: its first element and its two strides.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl Mat {
    /// `data` read as an `[rows, cols]` row-major matrix.
    fn rows(data: &[f32], cols: usize) -> Self {
        Mat {
            ptr: data.as_ptr(),
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    /// The transpose of `data` read as `[rows, cols]` row-major: `[cols, rows]`.
    fn transposed(data: &[f32], cols: usize) -> Self {
        Mat {
            ptr: data.as_ptr(),
            row_stride: 1,
            col_stride: cols as isize,
        }
    }
}

/// `out[m, n] (+)= a[m, k] b[k, n]` into the row-major `out`; `accumulate` adds to what `out`
/// holds instead of overwriting it. The caller keeps `a` and `b` alive and sized for the
/// shapes given.
#[allow(unsafe_code)]
fn gemm(out: &mut [f32], [m, n, k]: [usize; 3], a: Mat, b: Mat, accumulate: bool) {
    assert!(out.len() >= m * n, "gemm output too small");
    // SAFETY: `out` holds m x n initialised elements (asserted).
    unsafe { gemm_raw(out.as_mut_ptr(), [m, n, k], a, b, accumulate) }
}

/// A fresh row-major `[m, n]` product `a b`. The GEMM writes every element and reads none when
/// it does not accumulate, so the buffer is not zeroed first (zeroing the gradients' buffers
/// was a pass over memory per GEMM in the backward).
#[allow(unsafe_code)]
fn product([m, n, k]: [usize; 3], a: Mat, b: Mat) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: the buffer has room for m x n elements; with `accumulate` false gemm stores each
    // of them without reading it (alpha is set to zero), so all are initialised after the call.
    unsafe {
        gemm_raw(out.as_mut_ptr(), [m, n, k], a, b, false);
        out.set_len(m * n);
    }
    out
}

/// [`gemm`] into a raw buffer of at least m x n elements.
#[allow(unsafe_code)]
unsafe fn gemm_raw(out: *mut f32, [m, n, k]: [usize; 3], a: Mat, b: Mat, accumulate: bool) {
    // Worth splitting over threads only when the product is large (burn-flex's threshold).
    let parallelism = if m * n * k >= 192 * 192 * 192 && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller gives room for m x n elements at `out`; the callers build `a` and `b`
    // from slices of m x k and k x n elements with the strides given, and they outlive the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            n as isize,
            accumulate,
            a.ptr,
            a.col_stride,
            a.row_stride,
            b.ptr,
            b.col_stride,
            b.row_stride,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `x [N, in] W [in, out] + b [out]`.
fn forward(x: &FlexTensor, w: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let [rows, d_in] = x.layout().shape().dims();
    let d_out = w.layout().shape()[1];
    let mut y = slice(b).repeat(rows);
    gemm(
        &mut y,
        [rows, d_out, d_in],
        Mat::rows(slice(x), d_in),
        Mat::rows(slice(w), d_out),
        true,
    );
    FlexTensor::from_data(TensorData::new(y, Shape::new([rows, d_out])))
}

/// `(dx, dW, db)` from `dy` `[N, out]`; `dx` only when `want_dx` (an input that is data, like
/// the pixels of the patch embedding, needs none).
fn backward(
    x: &FlexTensor,
    w: &FlexTensor,
    dy: &FlexTensor,
    want_dx: bool,
) -> (Option<FlexTensor>, FlexTensor, FlexTensor) {
    let [rows, d_in] = x.layout().shape().dims();
    let d_out = w.layout().shape()[1];
    let g = slice(dy);
    let dx = want_dx.then(|| {
        let w_t = Mat::transposed(slice(w), d_out);
        let dx = product([rows, d_in, d_out], Mat::rows(g, d_out), w_t);
        FlexTensor::from_data(TensorData::new(dx, Shape::new([rows, d_in])))
    });
    let x_t = Mat::transposed(slice(x), d_in);
    let dw = product([d_in, d_out, rows], x_t, Mat::rows(g, d_out));
    // Column sums row by row, in row order: the same bits on every machine.
    let mut db = vec![0f32; d_out];
    for row in g.chunks_exact(d_out) {
        for (acc, v) in db.iter_mut().zip(row) {
            *acc += v;
        }
    }
    let dw = FlexTensor::from_data(TensorData::new(dw, Shape::new([d_in, d_out])));
    let db = FlexTensor::from_data(TensorData::new(db, Shape::new([d_out])));
    (dx, dw, db)
}

#[derive(Debug)]
struct Linear;

impl Backward<Flex, 3> for Linear {
    type State = (FlexTensor, FlexTensor); // x, W

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (x, w) = ops.state;
        let [x_node, w_node, b_node] = ops.parents;
        let (dx, dw, db) = backward(&x, &w, &dy, x_node.is_some());
        if let (Some(node), Some(dx)) = (x_node, dx) {
            grads.register::<Flex>(node.id, dx);
        }
        for (parent, grad) in [(w_node, dw), (b_node, db)] {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

pub(super) fn autodiff(x: ADFlexTensor, w: ADFlexTensor, b: ADFlexTensor) -> ADFlexTensor {
    let nodes = [x.node.clone(), w.node.clone(), b.node.clone()];
    let (xp, wp, bp) = (
        contiguous(x.primitive),
        contiguous(w.primitive),
        contiguous(b.primitive),
    );
    let y = forward(&xp, &wp, &bp);
    match Linear
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xp, wp), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

pub(super) fn plain(x: FlexTensor, w: FlexTensor, b: FlexTensor) -> FlexTensor {
    forward(&contiguous(x), &contiguous(w), &contiguous(b))
}
