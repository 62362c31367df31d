//! The pre-norm transformer shared by both CLIP towers, named as open_clip names it
//! (`transformer.resblocks.N.{ln_1, attn.in_proj, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`).

use burn::module::Initializer;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::cpu::AttentionSpec;
use serde::{Deserialize, Serialize};

/// MLP activation: exact GELU (open_clip's own runs), QuickGELU `x * sigmoid(1.702 x)`
/// (OpenAI), or GELU's tanh approximation (GPT-2's `gelu_new`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Act {
    #[default]
    Gelu,
    QuickGelu,
    GeluTanh,
}

impl Act {
    pub(crate) fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Act::Gelu => crate::cpu::gelu(x),
            Act::QuickGelu => x.clone() * activation::sigmoid(x * 1.702),
            Act::GeluTanh => {
                let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715)
                    * (2.0 / std::f64::consts::PI).sqrt();
                x * 0.5 * (inner.tanh() + 1.0)
            }
        }
    }
}

/// LayerNorm's epsilon in both towers (open_clip's and HF CLIP's 1e-5).
pub const LN_EPS: f64 = 1e-5;

/// A LayerNorm over `width` features with [`LN_EPS`].
pub fn layer_norm<B: Backend>(width: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(width)
        .with_epsilon(LN_EPS)
        .init(device)
}

/// `ln.forward(x)` for a LayerNorm built by [`layer_norm`], through the fused CPU kernel on
/// flex ([`crate::cpu::layer_norm`]).
pub fn norm<B: Backend, const D: usize>(ln: &LayerNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    crate::cpu::layer_norm(ln, x, LN_EPS)
}

/// A `Linear` over the last dim of `[B, T, D]`, as one `[B*T, D]` GEMM ([`crate::cpu::linear`]
/// on flex): burn's `Linear` on a 3-D input runs B small broadcast GEMMs, each below flex's
/// threshold for going multi-threaded.
pub fn linear_3d<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let y = crate::cpu::linear(layer, x.reshape([b * t, d]));
    let out = y.dims()[1];
    y.reshape([b, t, out])
}

/// Multi-head self-attention with a packed input projection (`in_proj`: width -> 3 x width).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub in_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub n_heads: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// `x`: `[B, T, D]` -> `[B, T, D]`.
    pub fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        if fused_on_cpu(&x) {
            self.forward_fused(x, causal, None)
        } else {
            self.forward_split(x, causal)
        }
    }

    /// The textbook form: one projection to `[B, T, 3D]`, split into q, k, v of `[B, H, T, Dh]`,
    /// burn's scaled dot-product attention. Under autodiff burn 0.21 composes it from matmul,
    /// softmax and matmul (`attention_fallback`), on GPU too: the scores are materialised.
    pub fn forward_split(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let h = self.n_heads;
        let qkv = linear_3d(&self.in_proj, x)
            .reshape([b, t, 3, h, d / h])
            .permute([2, 0, 3, 1, 4]); // [3, B, H, T, Dh]
        let part = |i: usize| qkv.clone().slice(s![i..i + 1]).squeeze_dim::<4>(0);
        let opts = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        };
        let y = attention(part(0), part(1), part(2), None, None, opts); // [B, H, T, Dh]
        linear_3d(&self.out_proj, y.swap_dims(1, 2).reshape([b, t, d]))
    }

    /// The same maths through rookery's CPU kernels: the packed projection as one GEMM, then
    /// every head of a sequence in one pass that reads q, k and v where the projection left
    /// them ([`crate::cpu::attention`]). On flex the split form copies its 4-D/5-D views
    /// element by element, forward and backward. `rows`: one query row per sequence, giving
    /// `[B, 1, D]`.
    pub fn forward_fused(
        &self,
        x: Tensor<B, 3>,
        causal: bool,
        rows: Option<Vec<usize>>,
    ) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let tq = if rows.is_some() { 1 } else { t };
        // Every row is projected, queries too: keys and values need all rows, and the query
        // columns of the rows not asked for cost a third of one GEMM, in the last block only.
        let qkv = crate::cpu::linear(&self.in_proj, x.reshape([b * t, d]));
        let spec = AttentionSpec {
            batch: b,
            heads: self.n_heads,
            causal,
            rows,
        };
        let y = crate::cpu::attention(qkv, spec);
        crate::cpu::linear(&self.out_proj, y).reshape([b, tq, d])
    }

    /// Attention output at one query position per sequence, `rows` `[B]`, with keys and
    /// values from all of `x` (causal: only those up to the row). Equals
    /// `forward(x)[b, rows[b]]`, at the cost of one query instead of T.
    ///
    /// # Shapes
    /// `x`: `[B, T, D]`, `rows`: `[B]` -> `[B, 1, D]`.
    pub fn forward_rows(
        &self,
        x: Tensor<B, 3>,
        rows: Tensor<B, 1, Int>,
        causal: bool,
    ) -> Tensor<B, 3> {
        if !fused_on_cpu(&x) {
            let b = rows.dims()[0];
            return select_rows(self.forward(x, causal), rows.reshape([b, 1]));
        }
        let rows = rows.into_data().iter::<i64>().map(|r| r as usize).collect();
        self.forward_fused(x, causal, Some(rows))
    }
}

/// Whole rows picked per sequence, `x[b, rows[b, j]]`: `[B, T, D]`, `[B, K]` -> `[B, K, D]`.
pub fn select_rows<B: Backend>(x: Tensor<B, 3>, rows: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let k = rows.dims()[1];
    let start = Tensor::<B, 1, Int>::arange(0..b as i64, &x.device())
        .mul_scalar(t as i64)
        .reshape([b, 1]);
    // `rows` may come from argmax, whose int type can differ from arange's.
    let flat = (start.clone() + rows.cast(start.dtype())).reshape([b * k]);
    x.reshape([b * t, d]).select(0, flat).reshape([b, k, d])
}

/// Whether attention takes [`Attention::forward_fused`]: on burn-flex (the CPU backend, alone
/// or under autodiff) in f32 with the kernels on ([`crate::cpu::kernels_on`]); elsewhere
/// (CUDA, a bf16 frozen tower) the split form.
fn fused_on_cpu<B: Backend>(x: &Tensor<B, 3>) -> bool {
    let name = B::name(&x.device());
    crate::cpu::kernels_on()
        && x.dtype() == burn::tensor::DType::F32
        && (name == "flex" || name.ends_with("<flex>"))
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub c_fc: Linear<B>,
    pub c_proj: Linear<B>,
    #[module(skip)]
    pub act: Act,
}

/// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Module, Debug)]
pub struct ResidualAttentionBlock<B: Backend> {
    pub ln_1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub ln_2: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> ResidualAttentionBlock<B> {
    pub fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let x = x.clone() + self.attn.forward(norm(&self.ln_1, x), causal);
        self.mlp_residual(x)
    }

    /// `x + mlp(ln_2(x))`, the block's second half.
    pub fn mlp_residual(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = linear_3d(&self.mlp.c_fc, norm(&self.ln_2, x.clone()));
        x + linear_3d(&self.mlp.c_proj, self.mlp.act.forward(h))
    }

    /// `forward(x)[b, rows[b]]`: every position feeds the keys and values, but only the rows
    /// asked for go through the query, the residuals and the MLP.
    ///
    /// # Shapes
    /// `x`: `[B, T, D]`, `rows`: `[B]` -> `[B, 1, D]`.
    pub fn forward_rows(
        &self,
        x: Tensor<B, 3>,
        rows: Tensor<B, 1, Int>,
        causal: bool,
    ) -> Tensor<B, 3> {
        let b = rows.dims()[0];
        let mine = select_rows(x.clone(), rows.clone().reshape([b, 1]));
        let x = mine + self.attn.forward_rows(norm(&self.ln_1, x), rows, causal);
        self.mlp_residual(x)
    }
}

/// A stack of residual attention blocks.
#[derive(Module, Debug)]
pub struct Transformer<B: Backend> {
    pub resblocks: Vec<ResidualAttentionBlock<B>>,
}

impl<B: Backend> Transformer<B> {
    /// open_clip's initialisation: attention and MLP weights scaled by width and depth.
    pub fn new(
        width: usize,
        layers: usize,
        heads: usize,
        mlp_ratio: f64,
        act: Act,
        device: &B::Device,
    ) -> Self {
        let normal = |std: f64| Initializer::Normal { mean: 0.0, std };
        let attn_std = (width as f64).powf(-0.5);
        let proj_std = attn_std * ((2 * layers) as f64).powf(-0.5);
        let fc_std = ((2 * width) as f64).powf(-0.5);
        let hidden = (width as f64 * mlp_ratio) as usize;
        let linear = |i, o, std| {
            LinearConfig::new(i, o)
                .with_initializer(normal(std))
                .init(device)
        };
        let resblocks = (0..layers)
            .map(|_| ResidualAttentionBlock {
                ln_1: layer_norm(width, device),
                attn: Attention {
                    in_proj: linear(width, 3 * width, attn_std),
                    out_proj: linear(width, width, proj_std),
                    n_heads: heads,
                },
                ln_2: layer_norm(width, device),
                mlp: Mlp {
                    c_fc: linear(width, hidden, fc_std),
                    c_proj: linear(hidden, width, proj_std),
                    act,
                },
            })
            .collect();
        Transformer { resblocks }
    }

    pub fn forward(&self, mut x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        for block in &self.resblocks {
            x = block.forward(x, causal);
        }
        x
    }

    /// `forward(x)[b, rows[b]]`, when only one output row per sequence is read (CLIP's class
    /// token, the text's end token): the last block computes just those rows. Exact, and the
    /// last block costs about a sixth of a full one (its keys and values).
    ///
    /// # Shapes
    /// `x`: `[B, T, D]`, `rows`: `[B]` -> `[B, 1, D]`.
    pub fn forward_rows(
        &self,
        mut x: Tensor<B, 3>,
        rows: Tensor<B, 1, Int>,
        causal: bool,
    ) -> Tensor<B, 3> {
        let (last, rest) = self.resblocks.split_last().expect("at least one block");
        for block in rest {
            x = block.forward(x, causal);
        }
        last.forward_rows(x, rows, causal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::Param;
    use burn::tensor::Distribution;

    type B = Autodiff<Flex>;

    fn max_abs_diff<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The CPU backend takes the fused form in f32, with and without autodiff; bf16 (a frozen
    /// tower held so) takes burn's ops.
    #[test]
    fn flex_takes_the_fused_kernels_in_f32() {
        let dev = Default::default();
        assert!(fused_on_cpu(&Tensor::<Flex, 3>::zeros([1, 2, 2], &dev)));
        assert!(fused_on_cpu(&Tensor::<B, 3>::zeros([1, 2, 2], &dev)));
        let bf16 = Tensor::<B, 3>::zeros([1, 2, 2], (&dev, burn::tensor::DType::BF16));
        assert!(!fused_on_cpu(&bf16));
    }

    /// Fused attention equals the split-heads form, outputs and every gradient.
    #[test]
    fn fused_attention_matches_split_heads() {
        let device = Default::default();
        let block = &Transformer::<B>::new(16, 1, 4, 4.0, Act::Gelu, &device).resblocks[0];
        let attn = &block.attn;
        for causal in [false, true] {
            let x0 = Tensor::<B, 3>::random([3, 7, 16], Distribution::Normal(0.0, 1.0), &device);
            let r = Tensor::<B, 3>::random([3, 7, 16], Distribution::Normal(0.0, 1.0), &device);
            // A backward consumes the graph, and the parameters are shared: one pass at a time.
            let run = |fused: bool| {
                let x = x0.clone().require_grad();
                let y = match fused {
                    true => attn.forward_fused(x.clone(), causal, None),
                    false => attn.forward_split(x.clone(), causal),
                };
                let g = (y.clone() * r.clone()).sum().backward();
                let bias = attn.in_proj.bias.as_ref().unwrap().val();
                (
                    y.inner(),
                    x.grad(&g).unwrap(),
                    attn.in_proj.weight.grad(&g).unwrap().unsqueeze::<3>(),
                    attn.out_proj.weight.grad(&g).unwrap().unsqueeze::<3>(),
                    bias.grad(&g).unwrap(),
                )
            };
            let (ours, theirs) = (run(true), run(false));
            let diff = max_abs_diff(ours.0, theirs.0);
            assert!(diff < 1e-5, "causal={causal}: outputs differ by {diff}");
            let grads = [
                ("x", ours.1, theirs.1),
                ("in_proj.weight", ours.2, theirs.2),
                ("out_proj.weight", ours.3, theirs.3),
            ];
            for (name, a, b) in grads {
                let scale: f32 = b.clone().abs().max().into_scalar();
                let diff = max_abs_diff(a, b);
                assert!(
                    diff < 1e-5 * scale.max(1.0),
                    "causal={causal}: d{name} differs by {diff}"
                );
            }
            let diff = max_abs_diff(ours.4, theirs.4);
            assert!(
                diff < 1e-5,
                "causal={causal}: d in_proj.bias differs by {diff}"
            );
        }
    }

    /// Computing only the rows that are read in the last block gives those rows of the full
    /// forward, and the same gradients, causal (varied rows) or not (the class token).
    #[test]
    fn last_block_on_read_rows_only_matches_the_full_forward() {
        let device = Default::default();
        let net = Transformer::<B>::new(16, 2, 4, 4.0, Act::Gelu, &device);
        for (causal, rows) in [(true, vec![6i64, 0, 3]), (false, vec![0, 0, 0])] {
            let x0 = Tensor::<B, 3>::random([3, 7, 16], Distribution::Normal(0.0, 1.0), &device);
            let r = Tensor::<B, 3>::random([3, 1, 16], Distribution::Normal(0.0, 1.0), &device);
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows.clone(), [3]), &device);
            let (last, first) = (&net.resblocks[1], &net.resblocks[0]);
            // One pass at a time: a backward consumes the graph, and the parameters are shared.
            let run = |rows_only: bool| {
                let x = x0.clone().require_grad();
                let y = match rows_only {
                    true => net.forward_rows(x.clone(), idx.clone(), causal),
                    false => {
                        select_rows(net.forward(x.clone(), causal), idx.clone().reshape([3, 1]))
                    }
                };
                let g = (y.clone() * r.clone()).sum().backward();
                let w = |p: &Param<Tensor<B, 2>>| p.grad(&g).unwrap().unsqueeze::<3>();
                (
                    y.inner(),
                    [
                        ("x", x.grad(&g).unwrap()),
                        ("last in_proj.weight", w(&last.attn.in_proj.weight)),
                        ("last mlp.c_fc.weight", w(&last.mlp.c_fc.weight)),
                        ("first out_proj.weight", w(&first.attn.out_proj.weight)),
                    ],
                )
            };
            let ((ours, g1), (full, g2)) = (run(true), run(false));
            let diff = max_abs_diff(ours, full);
            assert!(diff < 1e-5, "causal={causal}: outputs differ by {diff}");
            let grads = g1
                .into_iter()
                .zip(g2)
                .map(|((name, a), (_, b))| (name, a, b));
            for (name, a, b) in grads {
                let scale: f32 = b.clone().abs().max().into_scalar();
                assert!(scale > 0.0, "{name}: no gradient");
                let diff = max_abs_diff(a, b);
                assert!(
                    diff < 1e-5 * scale.max(1.0),
                    "causal={causal}: d{name} differs by {diff}"
                );
            }
        }
    }

    /// The causal mask hides exactly the future: changing the last token leaves earlier outputs.
    #[test]
    fn causal_attention_ignores_later_tokens() {
        let device = Default::default();
        let block = &Transformer::<Flex>::new(8, 1, 2, 4.0, Act::Gelu, &device).resblocks[0];
        let x = Tensor::<Flex, 3>::random([1, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        let changed = x.clone().slice_assign(
            s![.., 4..5, ..],
            Tensor::random([1, 1, 8], Distribution::Normal(0.0, 1.0), &device),
        );
        let (a, b) = (
            block.attn.forward(x, true),
            block.attn.forward(changed, true),
        );
        let early = max_abs_diff(
            a.clone().slice(s![.., 0..4, ..]),
            b.clone().slice(s![.., 0..4, ..]),
        );
        assert_eq!(early, 0.0);
        assert!(max_abs_diff(a.slice(s![.., 4..5, ..]), b.slice(s![.., 4..5, ..])) > 1e-3);
    }
}
