//! A lower bound of the host memory a run needs, from the config's shapes alone, checked before
//! any work: absurd image sizes or context lengths used to abort on a failed allocation after
//! the run directory was written.
//!
//! It counts only what must exist: weights (f32; stage 2's frozen towers in bf16 when
//! `flamingo.frozen_dtype` says so, "auto" meaning bf16 in a CUDA build), the gradients and Adam's two moments for the
//! trained parameters, the tensors each transformer layer keeps for its backward (the inputs
//! of its linear layers and norms; not attention probabilities, which the CPU kernels
//! recompute), and the loader's decoded batches. A run under this bound may still not fit; a
//! run over it cannot.

use anyhow::{bail, Result};
use rookery_model::flamingo::LmStyle;

use crate::config::RunConfig;
use crate::parallel::DistBackend;
use crate::trainer::TrainStage;
use rookery_model::precision::FrozenDtype;

const F32: f64 = 4.0;
const BF16: f64 = 2.0;
const GIB: f64 = (1u64 << 30) as f64;

/// What the bound is made of, in bytes, for every rank this process holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Estimate {
    /// Parameters of one replica.
    pub params: f64,
    /// Weights of every replica in this process.
    pub weights: f64,
    /// Gradients and Adam's two moments of the trained parameters.
    pub optimizer: f64,
    /// What the forward keeps for the backward, one micro-batch per rank.
    pub activations: f64,
    /// Decoded batches queued by the loaders (`data.prefetch` + the one in use).
    pub batches: f64,
    /// Stage 2's frozen towers are counted in bf16.
    pub frozen_bf16: bool,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.weights + self.optimizer + self.activations + self.batches
    }
}

/// Parameters of one pre-norm transformer block of width `w` with an MLP of `ratio * w`.
fn block(w: f64, ratio: f64) -> f64 {
    4.0 * w * w + 2.0 * ratio * w * w
}

/// Floats one block keeps per token for its backward: its input, the norms' outputs, q/k/v,
/// the attention output and the MLP's hidden layer before and after its activation.
fn kept_per_token(w: f64, ratio: f64) -> f64 {
    7.0 * w + 2.0 * ratio * w
}

/// The lower bound for `cfg` (a resolved config: stage 2's shapes filled in).
pub fn estimate(cfg: &RunConfig) -> Estimate {
    let m = cfg.data.batch_size as f64;
    // Thread ranks share this process's memory; other ranks have processes of their own.
    let ranks = match cfg.dist.backend {
        DistBackend::Local => cfg.dist.world_size.max(1) as f64,
        DistBackend::Mpi | DistBackend::Nccl => 1.0,
    };
    let s = cfg.data.image_size as f64;
    let pages = &cfg.data.interleaved;
    let batch_floats = match cfg.train.stage {
        TrainStage::Lm => 0.0,
        TrainStage::Clip => 3.0 * s * s,
        // A page holds up to max_images media of up to max_frames frames each.
        TrainStage::Flamingo => (pages.max_images * pages.max_frames) as f64 * 3.0 * s * s,
    };
    let (params, trained, per_sample) = match cfg.train.stage {
        TrainStage::Lm => {
            let l = &cfg.lm;
            let (p, kept) = lm_shapes(l, seq(cfg, l));
            (p, p, kept)
        }
        TrainStage::Flamingo => {
            let f = &cfg.flamingo.model;
            let (lm, kept) = lm_shapes(&f.lm, seq(cfg, &f.lm));
            let vision = match &f.siglip {
                Some(s) => siglip_params(s),
                None => vit_shapes(&f.vision, 0).0,
            };
            let new = flamingo_new(f);
            (lm + vision + new, new, kept)
        }
        TrainStage::Clip => {
            let c = &cfg.model;
            let (vision, v_kept) = vit_shapes(&c.vision, c.embed_dim);
            let t = &c.text;
            let (w, ctx) = (t.width as f64, t.context_length as f64);
            let text = t.vocab_size as f64 * w
                + ctx * w
                + t.layers as f64 * block(w, t.mlp_ratio)
                + w * c.embed_dim as f64;
            let t_kept = ctx * t.layers as f64 * kept_per_token(w, t.mlp_ratio);
            (vision + text, vision + text, v_kept + t_kept)
        }
    };
    let frozen_bf16 = cfg.train.stage == TrainStage::Flamingo
        && match cfg.flamingo.frozen_dtype {
            FrozenDtype::Bf16 => true,
            FrozenDtype::Auto => cfg!(feature = "cuda"),
            FrozenDtype::F32 => false,
        };
    let frozen_bytes = if frozen_bf16 { BF16 } else { F32 };
    Estimate {
        frozen_bf16,
        params,
        weights: ranks * (trained * F32 + (params - trained) * frozen_bytes),
        optimizer: ranks * trained * 3.0 * F32,
        activations: ranks * m * per_sample * F32,
        batches: ranks * (cfg.data.prefetch as f64 + 1.0) * m * batch_floats * F32,
    }
}

/// A ViT's parameters (with a projection to `embed_dim`) and the floats one image keeps.
fn vit_shapes(v: &rookery_model::vit::VitConfig, embed_dim: usize) -> (f64, f64) {
    let (w, p) = (v.width as f64, v.patch_size.max(1) as f64);
    let grid = v.image_size as f64 / p;
    let tokens = grid * grid + 1.0;
    let stem = match v.stem_patch {
        0 => 0.0,
        sp => {
            let (sp, sw) = (sp as f64, v.stem_width as f64);
            3.0 * sp * sp * sw + (p / sp).powi(2) * sw * w
        }
    };
    let params = 3.0 * p * p * w
        + stem
        + tokens * w
        + v.layers as f64 * block(w, v.mlp_ratio)
        + w * embed_dim as f64;
    (
        params,
        tokens * v.layers as f64 * kept_per_token(w, v.mlp_ratio),
    )
}

/// A SigLIP vision tower's parameters (head included, norms not).
fn siglip_params(s: &rookery_model::siglip::SiglipConfig) -> f64 {
    let v = &s.vision;
    let (w, p) = (v.width as f64, s.patch_size as f64);
    let n = (s.grid() * s.grid()) as f64;
    let ratio = v.hidden as f64 / w;
    let head = if s.vision_head {
        w + block(w, ratio)
    } else {
        0.0
    };
    3.0 * p * p * w + n * w + v.layers as f64 * block(w, ratio) + head
}

/// Tokens per training sequence: the interleaved budget, at most the LM's context.
fn seq(cfg: &RunConfig, l: &rookery_model::flamingo::LmConfig) -> f64 {
    cfg.data.interleaved.max_tokens.min(l.context_length) as f64
}

/// A causal LM's parameters (embedding and head counted apart: rookery holds both, tied or
/// not) and the floats one sequence of `seq` tokens keeps, logits included.
fn lm_shapes(l: &rookery_model::flamingo::LmConfig, seq: f64) -> (f64, f64) {
    let (w, vocab) = (l.width as f64, l.vocab_size as f64);
    let per_layer = match l.style {
        LmStyle::Llama => {
            let (q, kv) = (
                (l.heads * l.head_dim()) as f64,
                (l.kv() * l.head_dim()) as f64,
            );
            w * (q + 2.0 * kv) + q * w + 3.0 * w * l.hidden() as f64
        }
        // q/k/v and out with biases, a 2-matrix MLP with biases, two LayerNorms.
        LmStyle::Neox => {
            let (a, h) = ((l.heads * l.head_dim()) as f64, l.hidden() as f64);
            4.0 * w * a + 3.0 * a + w + 2.0 * w * h + h + w + 4.0 * w
        }
        // q/k/v and out, a 2-matrix MLP, two LayerNorms' weights; no biases.
        LmStyle::Mpt => {
            let (a, h) = ((l.heads * l.head_dim()) as f64, l.hidden() as f64);
            4.0 * w * a + 2.0 * w * h + 2.0 * w
        }
        LmStyle::Gpt2 => block(w, l.mlp_ratio),
    };
    let positions = match l.style {
        LmStyle::Llama | LmStyle::Neox | LmStyle::Mpt => 0.0,
        LmStyle::Gpt2 => l.context_length as f64 * w,
    };
    let params = 2.0 * vocab * w + positions + l.layers as f64 * per_layer;
    let ratio = l.hidden() as f64 / w;
    let kept = seq * (l.layers as f64 * kept_per_token(w, ratio) + vocab);
    (params, kept)
}

/// Parameters of what stage 2 adds and trains: the Perceiver Resampler over the vision
/// width, one gated cross-attention block per n-th LM layer, the two new token rows.
fn flamingo_new(f: &rookery_model::flamingo::FlamingoConfig) -> f64 {
    let (dv, w) = (f.vision.width as f64, f.lm.width as f64);
    let r = &f.resampler;
    let inner = (r.heads * r.dim_head) as f64;
    let ff = |d: f64, mult: usize| 2.0 * mult as f64 * d * d;
    let resampler = r.latents as f64 * dv
        + r.depth as f64 * (4.0 * dv * inner + ff(dv, r.ff_mult))
        + r.max_frames as f64 * dv;
    let x_inner = (f.xattn_heads * f.xattn_dim_head) as f64;
    let xattn = 2.0 * w * x_inner + 2.0 * dv * x_inner + ff(w, f.xattn_ff_mult);
    let blocks = (f.lm.layers / f.cross_attn_every_n_layers.max(1)) as f64;
    resampler + blocks * xattn + 2.0 * w
}

/// Memory the kernel says can be allocated without swapping (`MemAvailable`), if known.
pub fn available() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// Refuses a run whose lower bound exceeds `available` bytes, with the estimate's parts.
pub fn check_fits(cfg: &RunConfig, available: Option<f64>) -> Result<()> {
    let (e, Some(avail)) = (estimate(cfg), available) else {
        return Ok(());
    };
    if e.total() <= avail {
        return Ok(());
    }
    bail!(
        "this run needs at least {:.1} GiB of memory, {:.1} GiB are available: weights {:.1} GiB ({:.3e} parameters per replica), gradients and optimizer state {:.1} GiB, activations kept for the backward {:.1} GiB (data.batch_size = {} per rank), decoded batches {:.1} GiB (data.prefetch = {}, data.image_size = {}). Lower data.batch_size (train.accum_steps keeps the global batch), data.prefetch, or the model's sizes",
        e.total() / GIB,
        avail / GIB,
        e.weights / GIB,
        e.params,
        e.optimizer / GIB,
        e.activations / GIB,
        cfg.data.batch_size,
        e.batches / GIB,
        cfg.data.prefetch,
        cfg.data.image_size,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(sets: &[&str]) -> RunConfig {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::load(std::path::Path::new(""), &sets).unwrap()
    }

    #[test]
    fn the_bound_counts_clip_parameters_and_refuses_absurd_sizes() {
        // A ViT-B/32-shaped vision tower: open_clip counts 87.8M parameters in it.
        let b32 = cfg(&[
            "model.vision.width=768",
            "model.vision.layers=12",
            "model.vision.heads=12",
            "model.vision.patch_size=32",
            "model.vision.image_size=224",
            "data.image_size=224",
        ]);
        let (vision, _) = vit_shapes(&b32.model.vision, 512);
        assert!((vision / 87.8e6 - 1.0).abs() < 0.01, "{vision}");
        let tiny = cfg(&[]);
        check_fits(&tiny, Some(8.0 * GIB)).unwrap();
        let huge = cfg(&["model.vision.image_size=65536", "data.image_size=65536"]);
        let err = check_fits(&huge, Some(8.0 * GIB)).unwrap_err().to_string();
        assert!(
            err.contains("GiB are available") && err.contains("data.image_size = 65536"),
            "{err}"
        );
        let long = cfg(&[
            "model.text.context_length=100000000",
            "data.context_length=100000000",
        ]);
        assert!(check_fits(&long, Some(8.0 * GIB)).is_err());
        assert!(
            check_fits(&huge, None).is_ok(),
            "no check where the memory is unknown"
        );
    }

    /// Stage 2's frozen towers held in bf16 weigh two bytes a parameter, the trained parts
    /// four; "auto" counts what it means in this build (f32 without CUDA).
    #[test]
    fn bf16_frozen_towers_halve_their_weights() {
        let stage2 = |dtype: &str| {
            let dtype = format!("flamingo.frozen_dtype=\"{dtype}\"");
            estimate(&cfg(&["train.stage=\"flamingo\"", dtype.as_str()]))
        };
        let (full, auto, half) = (stage2("f32"), stage2("auto"), stage2("bf16"));
        assert_eq!(full.weights == auto.weights, !cfg!(feature = "cuda"));
        let trained = flamingo_new(&cfg(&[]).flamingo.model);
        let frozen = full.params - trained;
        assert!(frozen > trained, "{frozen} {trained}");
        assert_eq!(full.weights, trained * F32 + frozen * F32);
        assert_eq!(half.weights, trained * F32 + frozen * BF16);
        assert_eq!(half.optimizer, full.optimizer);
    }
}
