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

/// A row-major matrix operand for [`gemm`]: its first element, its two strides, and how many
/// elements the slice it was made from holds (checked against the shape before each GEMM).
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
    len: usize,
}

impl Mat {
    /// `data` read as an `[rows, cols]` row-major matrix.
    fn rows(data: &[f32], cols: usize) -> Self {
        Mat {
            ptr: data.as_ptr(),
            row_stride: cols as isize,
            col_stride: 1,
            len: data.len(),
        }
    }

    /// The transpose of `data` read as `[rows, cols]` row-major: `[cols, rows]`.
    fn transposed(data: &[f32], cols: usize) -> Self {
        Mat {
            ptr: data.as_ptr(),
            row_stride: 1,
            col_stride: cols as isize,
            len: data.len(),
        }
    }

    /// Panics unless every element of a `[rows, cols]` read lies inside the slice: the GEMM
    /// would read out of bounds otherwise.
    fn check(&self, [rows, cols]: [usize; 2], what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.row_stride as usize + (cols - 1) * self.col_stride as usize;
        assert!(
            last < self.len,
            "gemm operand {what} read as [{rows}, {cols}] needs element {last}, holds {}",
            self.len
        );
    }
}

/// The operands' sizes against `[m, n, k]` (the safe wrappers' guard for [`gemm_raw`]).
fn check_operands([m, n, k]: [usize; 3], a: &Mat, b: &Mat) {
    a.check([m, k], "a");
    b.check([k, n], "b");
}

/// `out[m, n] (+)= a[m, k] b[k, n]` into the row-major `out`; `accumulate` adds to what `out`
/// holds instead of overwriting it. The caller keeps `a` and `b` alive and sized for the
/// shapes given.
#[allow(unsafe_code)]
fn gemm(out: &mut [f32], [m, n, k]: [usize; 3], a: Mat, b: Mat, accumulate: bool) {
    assert!(out.len() >= m * n, "gemm output too small");
    check_operands([m, n, k], &a, &b);
    // SAFETY: `out` holds m x n initialised elements and `a`, `b` cover their shapes
    // (asserted).
    unsafe { gemm_raw(out.as_mut_ptr(), [m, n, k], a, b, accumulate) }
}

/// A fresh row-major `[m, n]` product `a b`. The GEMM writes every element and reads none when
/// it does not accumulate, so the buffer is not zeroed first (zeroing the gradients' buffers
/// was a pass over memory per GEMM in the backward).
#[allow(unsafe_code)]
fn product([m, n, k]: [usize; 3], a: Mat, b: Mat) -> Vec<f32> {
    check_operands([m, n, k], &a, &b);
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: `a` and `b` cover their shapes (asserted); the buffer has room for m x n elements; with `accumulate` false gemm stores each
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
    // SAFETY: the caller gives room for m x n elements at `out`; `a` and `b` were checked to
    // cover m x k and k x n elements with the strides given, and they outlive the call.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_multiplies_and_refuses_short_operands() {
        // [2, 3] x [3, 2]
        let (a, b) = (
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            [1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        );
        let out = product([2, 2, 3], Mat::rows(&a, 3), Mat::rows(&b, 2));
        assert_eq!(out, vec![4.0, 5.0, 10.0, 11.0]);
        let short = [1.0f32; 5];
        for (x, y) in [(&short[..], &b[..]), (&a[..], &short[..])] {
            let r = std::panic::catch_unwind(|| {
                product([2, 2, 3], Mat::rows(x, 3), Mat::rows(y, 2));
            });
            assert!(
                r.is_err(),
                "a 5-element operand read as 6 elements was accepted"
            );
        }
        let mut small = vec![0.0f32; 4];
        let r = std::panic::catch_unwind(move || {
            gemm(
                &mut small,
                [2, 2, 3],
                Mat::transposed(&short, 2),
                Mat::rows(&b, 2),
                false,
            )
        });
        assert!(r.is_err());
    }
}
