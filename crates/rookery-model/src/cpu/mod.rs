//! Vectorised CPU kernels for the ops that burn-flex (burn 0.21's CPU backend) runs one scalar
//! at a time, used when the model runs on `Flex` or `Autodiff<Flex>` and the tensor is f32.
//! On every other backend and dtype the functions here are burn's own ops.
//!
//! - [`gelu`]: exact GELU, forward and backward (see [`math`] for how it is computed);
//! - [`softmax`]: softmax over the last dimension, forward and backward;
//! - [`layer_norm`]: LayerNorm with a bias, forward and one backward for input and parameters;
//! - [`linear`]: `x W + b` as one GEMM into a buffer of its own, backward two GEMMs;
//! - [`attention`]: multi-head attention over a packed q/k/v projection, one pass per sequence;
//! - [`add_positions`], [`patchify`]: a broadcast add and the patch layout, as plain loops;
//! - [`flex_primitive`], [`from_flex_primitive`], [`values`], [`contiguous`], [`writable`]: flex
//!   tensors for kernels elsewhere (the optimizer's Adam, in rookery-train).

mod attention;
mod gelu;
mod layer_norm;
mod layout;
mod linear;
pub mod math;
mod node;
mod softmax;

use std::any::Any;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::Autodiff;
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::backend::BackendTypes;
use burn::tensor::{DType, TensorData, TensorMetadata, TensorPrimitive};

/// Exact GELU, `x * Phi(x)`: on flex through [`math::gelu`] (8 or 16 lanes at a time) with a
/// backward of its own; elsewhere [`gelu_by_erf`].
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    on_flex(x, gelu::autodiff, gelu::forward, gelu_by_erf)
}

/// `x * (1 + erf(x / sqrt 2)) / 2` in burn's ops, so that autodiff differentiates it exactly.
/// Not burn's `activation::gelu`: its forward is exact, but the backward burn 0.21 gives every
/// backend that does not override it (burn-ndarray, burn-cubecl: CUDA) is the derivative of the
/// tanh approximation, 3e-4 off in a CLIP step's gradients (tests/backends.rs in rookery-train).
pub fn gelu_by_erf<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let phi = (x.clone() * std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0;
    x * phi * 0.5
}

/// Softmax along `dim`: on flex, when `dim` is the last, one pass per row forward and one
/// backward ([`softmax`](self::softmax)'s module); elsewhere burn's `activation::softmax`.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    if dim != D - 1 {
        return activation::softmax(x, dim);
    }
    on_flex(x, softmax::autodiff, softmax::forward, |x| {
        activation::softmax(x, dim)
    })
}

/// `ln.forward(x)` when `ln`'s epsilon is `eps` (burn keeps it private, so the caller, which
/// built `ln`, says it): on flex with a bias, one pass per row forward and one backward for
/// the input, `gamma` and `beta` together; elsewhere burn's composed `LayerNorm`.
pub fn layer_norm<B: Backend, const D: usize>(
    ln: &LayerNorm<B>,
    x: Tensor<B, D>,
    eps: f64,
) -> Tensor<B, D> {
    let Some(beta) = &ln.beta else {
        return ln.forward(x);
    };
    // Only one closure runs: the one for the backend `x`, and so `ln`, comes from.
    let eps = eps as f32;
    on_flex(
        x,
        |x| {
            layer_norm::autodiff(
                x,
                prim::<B, _, 1>(ln.gamma.val()),
                prim::<B, _, 1>(beta.val()),
                eps,
            )
        },
        |x| {
            layer_norm::plain(
                x,
                prim::<B, _, 1>(ln.gamma.val()),
                prim::<B, _, 1>(beta.val()),
                eps,
            )
        },
        |x| ln.forward(x),
    )
}

/// `layer.forward(x)` for `x` `[N, in]`: on flex, when the layer has a bias, [`affine`];
/// elsewhere burn's.
pub fn linear<B: Backend>(layer: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    match &layer.bias {
        Some(bias) => affine(x, layer.weight.val(), bias.val()),
        None => layer.forward(x),
    }
}

/// `x [N, in] w [in, out] + b [out]`: on flex one GEMM that starts from the bias rows
/// ([`linear`](self::linear)'s module says why); elsewhere burn's `linear` (what `Linear`
/// runs).
pub fn affine<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, b: Tensor<B, 1>) -> Tensor<B, 2> {
    // Only one closure runs: the one for the backend `x`, and so `w` and `b`, come from.
    on_flex(
        x,
        |x| linear::autodiff(x, prim::<B, _, 2>(w.clone()), prim::<B, _, 1>(b.clone())),
        |x| linear::plain(x, prim::<B, _, 2>(w.clone()), prim::<B, _, 1>(b.clone())),
        |x| burn::tensor::module::linear(x, w.clone(), Some(b.clone())),
    )
}

/// `x [B, T, W] + pos [T, W]` (the same positions added to every sequence): on flex one pass,
/// and a backward that sums over the batch in order; elsewhere burn's broadcast add.
pub fn add_positions<B: Backend>(x: Tensor<B, 3>, pos: Tensor<B, 2>) -> Tensor<B, 3> {
    on_flex(
        x,
        |x| layout::add_positions_autodiff(x, prim::<B, _, 2>(pos.clone())),
        |x| layout::add_positions_plain(x, prim::<B, _, 2>(pos.clone())),
        |x| x + pos.clone().unsqueeze(),
    )
}

/// Images `[B, C, H, W]` as the rows of their `p x p` patches, `[B * (H/p) * (W/p), C*p*p]`
/// (patches row-major over the grid; in a row channel, then y, then x, as `conv1`'s kernel
/// flattens): on flex a plain copy each way; elsewhere burn's reshape-permute-reshape.
pub fn patchify<B: Backend>(images: Tensor<B, 4>, p: usize) -> Tensor<B, 2> {
    on_flex(
        images,
        |x| layout::patchify_autodiff(x, p),
        |x| layout::patchify_plain(x, p),
        |x| {
            let [b, c, h, w] = x.dims();
            let (gh, gw) = (h / p, w / p);
            x.reshape([b, c, gh, p, gw, p])
                .permute([0, 2, 4, 1, 3, 5])
                .reshape([b * gh * gw, c * p * p])
        },
    )
}

pub use attention::Spec as AttentionSpec;

/// Multi-head scaled dot-product attention over `qkv` `[B*T, 3D]` (the packed input
/// projection: q, k, v side by side, heads in order within each) -> `[B*Tq, D]`, heads side by
/// side. On flex one fused pass per sequence forward and backward
/// ([`attention`](self::attention)'s module); elsewhere [`attention_composed`].
pub fn attention<B: Backend>(qkv: Tensor<B, 2>, spec: AttentionSpec) -> Tensor<B, 2> {
    let other = spec.clone();
    on_flex(
        qkv,
        |x| attention::autodiff(x, spec.clone()),
        |x| attention::plain(x, spec.clone()),
        |x| attention_composed(x, &other),
    )
}

/// [`attention`] from burn's tensor ops: the reference the fused kernel is tested against.
pub fn attention_composed<B: Backend>(qkv: Tensor<B, 2>, spec: &AttentionSpec) -> Tensor<B, 2> {
    let (b, h) = (spec.batch, spec.heads);
    let [bt, d3] = qkv.dims();
    let (t, d) = (bt / b, d3 / 3);
    let device = qkv.device();
    let split = |x: Tensor<B, 2>, rows: usize| {
        x.reshape([b, rows, 3, h, d / h]).permute([2, 0, 3, 1, 4]) // [3, B, H, rows, Dh]
    };
    let part = |x: Tensor<B, 5>, i: usize| x.slice(s![i..i + 1]).squeeze_dim::<4>(0);
    let (q_src, tq, pos): (Tensor<B, 2>, usize, Vec<usize>) = match &spec.rows {
        Some(rows) => {
            let flat: Vec<i64> = rows
                .iter()
                .enumerate()
                .map(|(i, &r)| (i * t + r) as i64)
                .collect();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [b]), &device);
            (qkv.clone().select(0, idx), 1, rows.clone())
        }
        None => (qkv.clone(), t, (0..b).flat_map(|_| 0..t).collect()),
    };
    let all = split(qkv, t);
    let q = part(split(q_src, tq), 0);
    let scale = ((d / h) as f64).powf(-0.5);
    let mut scores = q.matmul(part(all.clone(), 1).swap_dims(2, 3)) * scale; // [B, H, Tq, T]
    if spec.causal {
        let mask: Vec<f32> = pos
            .iter()
            .flat_map(|&p| (0..t).map(move |j| if j > p { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::<B, 4>::from_data(TensorData::new(mask, [b, 1, tq, t]), &device);
        scores = scores + mask;
    }
    activation::softmax(scores, 3)
        .matmul(part(all, 2))
        .swap_dims(1, 2)
        .reshape([b * tq, d])
}

thread_local! {
    static GENERIC_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the flex kernels are used: the one switch every kernel choice reads (the functions
/// here, attention's fused form, the Adam step). Off with `ROOKERY_GENERIC_KERNELS=1` (read
/// once; the whole process then runs burn's generic ops, the code every other backend runs)
/// or on this thread inside [`generic_kernels`].
pub fn kernels_on() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| {
        std::env::var("ROOKERY_GENERIC_KERNELS").is_ok_and(|v| !v.is_empty() && v != "0")
    });
    !off && !GENERIC_HERE.with(|g| g.get())
}

/// Runs `f` on this thread with burn's generic ops in place of the flex kernels (forward and
/// the backward it records), so that tests compare the two paths in one process.
pub fn generic_kernels<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERIC_HERE.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GENERIC_HERE.with(|g| g.replace(true)));
    f()
}

/// `autodiff(x)` when `x` is an f32 tensor of `Autodiff<Flex>`, `plain(x)` when it is one of
/// `Flex`, `other(x)` on any other backend or dtype, or with the kernels off ([`kernels_on`]).
fn on_flex<B: Backend, const D: usize, const E: usize>(
    x: Tensor<B, D>,
    autodiff: impl FnOnce(ADFlexTensor) -> ADFlexTensor,
    plain: impl FnOnce(FlexTensor) -> FlexTensor,
    other: impl FnOnce(Tensor<B, D>) -> Tensor<B, E>,
) -> Tensor<B, E> {
    if x.dtype() != DType::F32 || !kernels_on() {
        return other(x);
    }
    let p = x.into_primitive().tensor();
    let p = match concrete::<B::FloatTensorPrimitive, ADFlexTensor>(p) {
        Ok(t) => return float::<B, E>(generic(autodiff(t))),
        Err(p) => p,
    };
    let p = match concrete::<B::FloatTensorPrimitive, FlexTensor>(p) {
        Ok(t) => return float::<B, E>(generic(plain(t))),
        Err(p) => p,
    };
    other(float::<B, D>(p))
}

/// Whether `t` is an f32 tensor of the flex backend (not autodiff), which [`flex_primitive`]
/// takes.
pub fn is_flex_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    kernels_on()
        && t.dtype() == DType::F32
        && std::any::TypeId::of::<B::FloatTensorPrimitive>() == std::any::TypeId::of::<FlexTensor>()
}

/// A flex f32 tensor's primitive (see [`is_flex_f32`]; panics on any other), for kernels
/// outside this crate.
pub fn flex_primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    assert!(is_flex_f32(&t), "a flex f32 tensor expected");
    prim(t)
}

/// The inverse of [`flex_primitive`].
pub fn from_flex_primitive<B: Backend, const D: usize>(p: FlexTensor) -> Tensor<B, D> {
    float(generic(p))
}

/// Elements per rayon task: large enough that splitting costs nothing next to the work.
const CHUNK: usize = 1 << 15;

/// The float primitive of `Autodiff<Flex>`, the backend rookery trains with on CPU.
type ADFlexTensor = <Autodiff<Flex, NoCheckpointing> as BackendTypes>::FloatTensorPrimitive;

/// `value` as a `T` when that is its type. Generic code over `B: Backend` reaches the flex
/// kernels this way: Rust has no specialisation, and `B` is a concrete type at run time.
fn concrete<P: Any, T: Any>(value: P) -> Result<T, P> {
    let mut slot = Some(value);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        Some(t) => Ok(t.take().expect("just filled")),
        None => Err(slot.expect("untouched")),
    }
}

/// The inverse of [`concrete`]: a concrete primitive back as the generic one.
fn generic<T: Any, P: Any>(value: T) -> P {
    concrete(value).unwrap_or_else(|_| unreachable!("the primitive came from this backend"))
}

/// A parameter's primitive as the concrete type `T` its backend has.
fn prim<B: Backend, T: Any, const D: usize>(t: Tensor<B, D>) -> T {
    generic(t.into_primitive().tensor())
}

fn float<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The f32 values of a row-major flex tensor (one that went through [`contiguous`]), for
/// kernels outside this crate.
pub fn values(t: &FlexTensor) -> &[f32] {
    slice(t)
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// The f32 values of a flex tensor in row-major order: borrowed when it is laid out that way
/// already, copied otherwise.
pub fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// A gradient as a row-major tensor whose buffer nothing else holds, so a backward can
/// overwrite it: itself when it is one already, else a copy.
pub fn writable(t: FlexTensor) -> FlexTensor {
    let t = contiguous(t);
    if t.layout().start_offset() == 0 && t.is_unique() {
        return t;
    }
    let values = t.as_slice::<f32>().expect("contiguous f32").to_vec();
    FlexTensor::from_data(TensorData::new(values, t.shape()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    fn max_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
        (a - b).abs().max().into_scalar().elem()
    }

    #[test]
    fn gelu_and_its_gradient_match_burns_on_autodiff_flex() {
        let device = Default::default();
        let x = Tensor::<AD, 3>::random([3, 40, 300], Distribution::Normal(0.0, 3.0), &device);
        // One contiguous input and one transposed view (copied before the kernel reads it).
        for x in [x.clone(), x.swap_dims(1, 2)] {
            let (a, b) = (x.clone().detach().require_grad(), x.detach().require_grad());
            let w = Tensor::<AD, 3>::random(a.dims(), Distribution::Default, &device);
            let (ya, yb) = (gelu(a.clone()), activation::gelu(b.clone()));
            assert!(max_diff(ya.clone(), yb.clone()) < 1e-6);
            let (ga, gb) = ((ya * w.clone()).sum().backward(), (yb * w).sum().backward());
            let (ga, gb) = (a.grad(&ga).unwrap(), b.grad(&gb).unwrap());
            assert!(max_diff(ga.clone(), gb) < 1e-6);
            assert!(
                ga.abs().sum().into_scalar() > 1.0,
                "gradients reach the input"
            );
        }
    }

    #[test]
    fn gelu_without_autodiff_or_tracking_matches_burns() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([17, 33], Distribution::Normal(0.0, 2.0), &device);
        assert!(max_diff(gelu(x.clone()), activation::gelu(x)) < 1e-6);
        let x = Tensor::<AD, 2>::random([17, 33], Distribution::Normal(0.0, 2.0), &device);
        assert!(max_diff(gelu(x.clone()), activation::gelu(x)) < 1e-6);
    }

    #[test]
    fn softmax_and_its_gradient_match_burns_with_masked_entries() {
        let device = Default::default();
        // Rows of 13 (not a multiple of the 8 lanes), a -inf mask above the diagonal.
        let x = Tensor::<AD, 3>::random([3, 13, 13], Distribution::Normal(0.0, 4.0), &device);
        let pos = || Tensor::<AD, 1, Int>::arange(0..13, &device);
        let later = pos().reshape([1, 13]).greater(pos().reshape([13, 1]));
        let x = x.mask_fill(
            later.unsqueeze::<3>().expand([3, 13, 13]),
            f32::NEG_INFINITY,
        );
        for x in [x.clone(), x.clone().swap_dims(0, 1)] {
            let (a, b) = (x.clone().detach().require_grad(), x.detach().require_grad());
            let w = Tensor::<AD, 3>::random(a.dims(), Distribution::Default, &device);
            let (ya, yb) = (softmax(a.clone(), 2), activation::softmax(b.clone(), 2));
            assert!(max_diff(ya.clone(), yb.clone()) < 1e-6);
            let (ga, gb) = ((ya * w.clone()).sum().backward(), (yb * w).sum().backward());
            let (ga, gb) = (a.grad(&ga).unwrap(), b.grad(&gb).unwrap());
            assert!(!ga.clone().is_nan().any().into_scalar());
            assert!(max_diff(ga.clone(), gb) < 1e-6);
            assert!(
                ga.abs().sum().into_scalar() > 1.0,
                "gradients reach the input"
            );
        }
        // The first row of each matrix sees one position: weight exactly 1.
        let first = softmax(x.slice(s![.., 0..1, ..]), 2).slice(s![.., .., 0..1]);
        assert_eq!(first.min().into_scalar(), 1.0);
    }

    #[test]
    fn softmax_over_another_dimension_is_burns() {
        let device = Default::default();
        let x = Tensor::<Flex, 3>::random([4, 5, 6], Distribution::Normal(0.0, 2.0), &device);
        assert!(max_diff(softmax(x.clone(), 1), activation::softmax(x.clone(), 1)) < 1e-7);
        assert!(max_diff(softmax(x.clone(), 2), activation::softmax(x, 2)) < 1e-6);
    }

    #[test]
    fn layer_norm_and_its_three_gradients_match_burns() {
        use burn::nn::LayerNormConfig;
        let device = Default::default();
        let mut ln = LayerNormConfig::new(20)
            .with_epsilon(1e-5)
            .init::<AD>(&device);
        // Parameters away from their (1, 0) start, so that each gradient formula shows.
        let normal = |t: Tensor<AD, 1>, mean| {
            t.random_like(Distribution::Normal(mean, 0.5))
                .require_grad()
        };
        ln.gamma = ln.gamma.map(|g| normal(g, 1.0));
        ln.beta = ln.beta.map(|b| b.map(|b| normal(b, 0.0)));
        let x = Tensor::<AD, 3>::random([3, 70, 20], Distribution::Normal(0.5, 2.0), &device);
        let w = Tensor::<AD, 3>::random([3, 70, 20], Distribution::Default, &device);
        // The parameters are shared, and a backward consumes the graph: one pass at a time.
        let run = |ours: bool, swap: bool| {
            let x = x.clone().detach().require_grad();
            let (input, w) = match swap {
                true => (x.clone().swap_dims(0, 1), w.clone().swap_dims(0, 1)),
                false => (x.clone(), w.clone()),
            };
            let y = match ours {
                true => layer_norm(&ln, input, 1e-5),
                false => ln.forward(input),
            };
            let grads = (y.clone() * w).sum().backward();
            let beta = ln.beta.as_ref().unwrap().val();
            let g = |t: &Tensor<AD, 1>| t.grad(&grads).expect("parameter gradient");
            let y = y.inner();
            (
                y,
                x.grad(&grads).expect("input gradient"),
                g(&ln.gamma.val()),
                g(&beta),
            )
        };
        for swap in [false, true] {
            let (ours, burns) = (run(true, swap), run(false, swap));
            assert!(max_diff(ours.0, burns.0) < 1e-5);
            assert!(max_diff(ours.1, burns.1) < 1e-5);
            for (a, b) in [(ours.2, burns.2), (ours.3, burns.3)] {
                let scale: f32 = b.clone().abs().max().into_scalar();
                assert!(scale > 1.0 && max_diff(a, b) < 1e-5 * scale);
            }
        }
        // Without autodiff, and without a bias (burn's own path).
        let x = Tensor::<Flex, 2>::random([9, 20], Distribution::Normal(0.0, 3.0), &device);
        let ln = LayerNormConfig::new(20).init::<Flex>(&device);
        assert!(max_diff(layer_norm(&ln, x.clone(), 1e-5), ln.forward(x.clone())) < 1e-5);
        let ln = LayerNormConfig::new(20)
            .with_bias(false)
            .init::<Flex>(&device);
        assert!(max_diff(layer_norm(&ln, x.clone(), 1e-5), ln.forward(x)) < 1e-6);
    }

    /// Gradients of `sum(y * w)` for the given inputs, `None` where an input has none.
    fn grads_of<const D: usize>(
        y: Tensor<AD, D>,
        w: Tensor<AD, D>,
        inputs: &[Tensor<AD, 2>],
    ) -> Vec<Option<Tensor<Flex, 2>>> {
        let g = (y * w).sum().backward();
        inputs.iter().map(|t| t.grad(&g)).collect()
    }

    #[test]
    fn linear_and_its_three_gradients_match_burns() {
        use burn::nn::LinearConfig;
        let device = Default::default();
        let mut layer = LinearConfig::new(19, 23).init::<AD>(&device);
        layer.bias = layer
            .bias
            .map(|b| b.map(|b| b.random_like(Distribution::Normal(0.0, 1.0)).require_grad()));
        let x = Tensor::<AD, 2>::random([37, 19], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<AD, 2>::random([37, 23], Distribution::Default, &device);
        for transposed in [false, true] {
            let run = |ours: bool| {
                let x = x.clone().detach().require_grad();
                // A transposed view is copied before the GEMM reads it.
                let input = match transposed {
                    true => x.clone().transpose().transpose(),
                    false => x.clone(),
                };
                let y = match ours {
                    true => linear(&layer, input),
                    false => layer.forward(input),
                };
                let g = (y.clone() * w.clone()).sum().backward();
                let bias = layer.bias.as_ref().unwrap().val();
                (
                    y.inner(),
                    x.grad(&g).unwrap(),
                    layer.weight.val().grad(&g).unwrap(),
                    bias.grad(&g).unwrap(),
                )
            };
            let (ours, burns) = (run(true), run(false));
            assert!(max_diff(ours.0, burns.0) < 1e-5);
            assert!(max_diff(ours.1, burns.1) < 1e-5);
            assert!(max_diff(ours.2, burns.2) < 1e-4);
            assert!(max_diff(ours.3, burns.3) < 1e-5);
        }
        // An input that is data (no gradient) still gives the parameters theirs.
        let y = linear(&layer, x.clone());
        let g = (y * w).sum().backward();
        assert!(layer.weight.val().grad(&g).is_some());
        // Without autodiff.
        let plain = LinearConfig::new(19, 23).init::<Flex>(&device);
        let x = Tensor::<Flex, 2>::random([5, 19], Distribution::Normal(0.0, 1.0), &device);
        assert!(max_diff(linear(&plain, x.clone()), plain.forward(x)) < 1e-5);
    }

    #[test]
    fn position_add_and_patch_rows_match_burns_with_gradients() {
        let device = Default::default();
        let x = Tensor::<AD, 3>::random([3, 5, 4], Distribution::Normal(0.0, 1.0), &device);
        let pos = Tensor::<AD, 2>::random([5, 4], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<AD, 3>::random([3, 5, 4], Distribution::Default, &device);
        let run = |ours: bool| {
            let (x, pos) = (x.clone().require_grad(), pos.clone().require_grad());
            let y = match ours {
                true => add_positions(x.clone(), pos.clone()),
                false => x.clone() + pos.clone().unsqueeze(),
            };
            let g = (y.clone() * w.clone()).sum().backward();
            (y.inner(), x.grad(&g).unwrap(), pos.grad(&g).unwrap())
        };
        let (ours, burns) = (run(true), run(false));
        assert_eq!(max_diff(ours.0, burns.0), 0.0);
        assert_eq!(max_diff(ours.1, burns.1), 0.0);
        assert!(max_diff(ours.2, burns.2) < 1e-6);

        let images = Tensor::<AD, 4>::random([2, 3, 8, 12], Distribution::Default, &device);
        let w = Tensor::<AD, 2>::random([2 * 2 * 3, 3 * 16], Distribution::Default, &device);
        let run = |ours: bool| {
            let x = images.clone().require_grad();
            let y = match ours {
                true => patchify(x.clone(), 4),
                false => x
                    .clone()
                    .reshape([2, 3, 2, 4, 3, 4])
                    .permute([0, 2, 4, 1, 3, 5])
                    .reshape([12, 48]),
            };
            let g = (y.clone() * w.clone()).sum().backward();
            (y.inner(), x.grad(&g).unwrap())
        };
        let (ours, burns) = (run(true), run(false));
        assert_eq!(max_diff(ours.0, burns.0), 0.0);
        assert_eq!(max_diff(ours.1, burns.1), 0.0);
        // Pixel (image 1, channel 2, y 5, x 9) is in patch (1, 2) of image 1, at (2, 1, 1).
        let px: f32 = images
            .clone()
            .inner()
            .slice(s![1..2, 2..3, 5..6, 9..10])
            .into_scalar();
        let row = patchify(images.inner(), 4).slice(s![6 + 3 + 2..6 + 3 + 3, 37..38]);
        assert_eq!(row.into_scalar(), px);
    }

    #[test]
    fn fused_attention_and_its_gradient_match_the_composed_form() {
        let device = Default::default();
        // Heads narrower than a vector, and rows of several vectors with a partial one after
        // (the kernel pads both to whole vectors).
        for (t, d, heads) in [(7, 16, 4), (19, 64, 2), (19, 64, 4)] {
            fused_attention_case(t, d, heads, &device);
        }
        fused_attention_is_causal(&device);
    }

    fn fused_attention_case(
        t: usize,
        d: usize,
        heads: usize,
        device: &burn::backend::flex::FlexDevice,
    ) {
        let b = 3;
        let qkv = Tensor::<AD, 2>::random([b * t, 3 * d], Distribution::Normal(0.0, 1.5), device);
        for (causal, rows) in [
            (false, None),
            (true, None),
            (true, Some(vec![t - 1, 0, t / 2])),
            (false, Some(vec![0, 0, 0])),
        ] {
            let spec = AttentionSpec {
                batch: b,
                heads,
                causal,
                rows,
            };
            let tq = if spec.rows.is_some() { 1 } else { t };
            let w = Tensor::<AD, 2>::random([b * tq, d], Distribution::Default, device);
            let (a, c) = (qkv.clone().require_grad(), qkv.clone().require_grad());
            let (ya, yc) = (
                attention(a.clone(), spec.clone()),
                attention_composed(c.clone(), &spec),
            );
            assert_eq!(ya.dims(), [b * tq, d]);
            assert!(max_diff(ya.clone(), yc.clone()) < 1e-5, "{spec:?}");
            let ga = grads_of(ya, w.clone(), &[a])[0].clone().unwrap();
            let gc = grads_of(yc, w, &[c])[0].clone().unwrap();
            assert!(max_diff(ga.clone(), gc) < 1e-5, "{spec:?}");
            assert!(ga.abs().sum().into_scalar() > 1.0, "gradients reach qkv");
        }
    }

    /// A causal query's output does not depend on later keys or values.
    fn fused_attention_is_causal(device: &burn::backend::flex::FlexDevice) {
        let spec = AttentionSpec {
            batch: 1,
            heads: 2,
            causal: true,
            rows: None,
        };
        let x = Tensor::<Flex, 2>::random([5, 24], Distribution::Normal(0.0, 1.0), device);
        let changed = x.clone().slice_assign(
            s![4..5, ..],
            Tensor::random([1, 24], Distribution::Normal(0.0, 1.0), device),
        );
        let (y1, y2) = (attention(x, spec.clone()), attention(changed, spec));
        assert_eq!(
            max_diff(
                y1.clone().slice(s![0..4, ..]),
                y2.clone().slice(s![0..4, ..])
            ),
            0.0
        );
        assert!(max_diff(y1.slice(s![4..5, ..]), y2.slice(s![4..5, ..])) > 1e-3);
    }
}
