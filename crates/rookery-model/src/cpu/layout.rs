//! Two data movements that burn-flex runs through its generic strided iterator, one element at
//! a time (6% of a clip-tiny CPU step together), as plain loops with their autodiff nodes:
//!
//! - [`add_positions`]: `x [B, T, W] + pos [T, W]`, the same positions for every sequence;
//!   backward: `dx = dy`, `dpos` = the sum of `dy` over the batch;
//! - [`patchify`]: images `[B, C, H, W]` to the rows of their `p x p` patches
//!   `[B * H/p * W/p, C*p*p]` (row-major over the patch grid, each row ordered as the patch
//!   embedding's kernel: channel, then y, then x); backward: the inverse move.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Shape, TensorData, TensorMetadata};

use super::{contiguous, slice, ADFlexTensor};

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

pub(super) fn add_positions_plain(x: FlexTensor, pos: FlexTensor) -> FlexTensor {
    let (x, pos) = (contiguous(x), contiguous(pos));
    let p = slice(&pos);
    let mut y = slice(&x).to_vec();
    for row in y.chunks_exact_mut(p.len()) {
        for (v, &q) in row.iter_mut().zip(p) {
            *v += q;
        }
    }
    tensor(y, x.shape())
}

#[derive(Debug)]
struct AddPositions;

impl Backward<Flex, 2> for AddPositions {
    type State = Shape; // of pos

    fn backward(self, ops: Ops<Shape, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let [x_node, pos_node] = ops.parents;
        if let Some(node) = pos_node {
            let n = ops.state.num_elements();
            // Sequence by sequence, in order: the same bits on every machine.
            let mut dpos = vec![0f32; n];
            for row in slice(&dy).chunks_exact(n) {
                for (acc, &g) in dpos.iter_mut().zip(row) {
                    *acc += g;
                }
            }
            grads.register::<Flex>(node.id, tensor(dpos, ops.state));
        }
        if let Some(node) = x_node {
            grads.register::<Flex>(node.id, dy);
        }
    }
}

pub(super) fn add_positions_autodiff(x: ADFlexTensor, pos: ADFlexTensor) -> ADFlexTensor {
    let nodes = [x.node.clone(), pos.node.clone()];
    let pos_shape = pos.primitive.shape();
    let y = add_positions_plain(x.primitive, pos.primitive);
    match AddPositions
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(pos_shape, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// `[B, C, H, W]` with patch size `p`, as the six sizes of its patch view `[B, C, gh, p, gw, p]`.
fn patch_dims(shape: &Shape, p: usize) -> [usize; 6] {
    let [b, c, h, w] = shape.dims();
    [b, c, h / p, p, w / p, p]
}

/// Moves each element between its place in the image (`to_rows`) and in the patch rows (the
/// other way), for the dims of [`patch_dims`].
fn move_patches(src: &[f32], [b, c, gh, p, gw, _]: [usize; 6], to_rows: bool) -> Vec<f32> {
    let (h, w, row) = (gh * p, gw * p, c * p * p);
    let mut dst = vec![0f32; src.len()];
    for n in 0..b {
        for ch in 0..c {
            for y in 0..h {
                let image_at = ((n * c + ch) * h + y) * w;
                let (gy, py) = (y / p, y % p);
                for gx in 0..gw {
                    let patch = (n * gh + gy) * gw + gx;
                    let rows_at = patch * row + (ch * p + py) * p;
                    let (i, r) = (image_at + gx * p, rows_at);
                    if to_rows {
                        dst[r..r + p].copy_from_slice(&src[i..i + p]);
                    } else {
                        dst[i..i + p].copy_from_slice(&src[r..r + p]);
                    }
                }
            }
        }
    }
    dst
}

pub(super) fn patchify_plain(images: FlexTensor, p: usize) -> FlexTensor {
    let images = contiguous(images);
    let dims = patch_dims(&images.shape(), p);
    let [b, c, gh, _, gw, _] = dims;
    let rows = move_patches(slice(&images), dims, true);
    tensor(rows, Shape::new([b * gh * gw, c * p * p]))
}

#[derive(Debug)]
struct Patchify;

impl Backward<Flex, 1> for Patchify {
    type State = (Shape, usize); // the images' shape, the patch size

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (shape, p) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let g = contiguous(g);
            tensor(move_patches(slice(&g), patch_dims(&shape, p), false), shape)
        });
    }
}

pub(super) fn patchify_autodiff(images: ADFlexTensor, p: usize) -> ADFlexTensor {
    let shape = images.primitive.shape();
    match Patchify
        .prepare::<NoCheckpointing>([images.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((shape, p), patchify_plain(images.primitive, p)),
        OpsKind::UnTracked(prep) => prep.finish(patchify_plain(images.primitive, p)),
    }
}
