//! A Flamingo's trained parts under the names OpenFlamingo's checkpoints use
//! (`train_utils.filter_state_dict_to_trainable`), so that `open_flamingo`'s model, built on the
//! same vision encoder and LM, takes them with `load_state_dict(sd, strict=False)`:
//!
//! ```text
//! resampler.latents                          -> perceiver.latents
//! resampler.frame_embs (only if trained)     -> perceiver.frame_embs
//! resampler.layers.N.{norm_media,norm_latents,to_q,to_kv,to_out}
//!                                            -> perceiver.layers.N.0.{same}
//! resampler.layers.N.{ff_norm,ff_in,ff_out}  -> perceiver.layers.N.1.{0,1,3}
//! resampler.norm                             -> perceiver.norm
//! xattn.K (before decoder layer i)           -> lang_encoder.<layers>.i.gated_cross_attn_layer.
//!     {attn_gate, ff_gate, norm -> attn.norm, to_q|to_kv|to_out -> attn.*, ff_norm|ff_in|ff_out -> ff.{0,1,3}}
//! lm.wte with the new rows (tokenizer's length) -> lang_encoder.<embed>.weight
//!                                            (and lang_encoder.lm_head.weight when tied)
//! ```
//!
//! `<layers>` / `<embed>`: `model.layers` / `model.embed_tokens` for Llama-style LMs,
//! `transformer.h` / `transformer.wte` for GPT-2, `gpt_neox.layers` / `gpt_neox.embed_in` for
//! GPT-NeoX (OpenFlamingo's `_infer_decoder_layers_attr_name` names the same). Linear
//! weights are written `[out, in]`, as PyTorch holds them; LayerNorm's `gamma`/`beta` as
//! `weight`/`bias`.

use std::path::Path;

use anyhow::{bail, Result};
use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use rookery_model::flamingo::LmStyle;
use rookery_model::flamingo::{Flamingo, FlamingoConfig};

use crate::tensors::{transpose, Tensors};

/// The file an export writes.
pub const FILE: &str = "checkpoint.safetensors";

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    let v = t.into_data().convert::<f32>().to_vec().expect("f32 values");
    (shape, v)
}

fn param<B: Backend, const D: usize>(p: &Param<Tensor<B, D>>) -> (Vec<usize>, Vec<f32>) {
    values(p.val())
}

struct Out(Tensors);

impl Out {
    fn put(&mut self, name: String, t: (Vec<usize>, Vec<f32>)) {
        self.0.insert(name, t);
    }
    fn linear<B: Backend>(&mut self, name: String, l: &Linear<B>) {
        self.put(format!("{name}.weight"), transpose(param(&l.weight)));
    }
    fn norm<B: Backend>(&mut self, name: String, n: &LayerNorm<B>) {
        self.put(format!("{name}.weight"), param(&n.gamma));
        if let Some(b) = &n.beta {
            self.put(format!("{name}.bias"), param(b));
        }
    }
}

/// The decoder-layer and embedding paths of the LM inside `lang_encoder`.
fn lm_paths(cfg: &FlamingoConfig) -> (&'static str, &'static str) {
    match cfg.lm.style {
        LmStyle::Gpt2 => ("transformer.h", "transformer.wte"),
        LmStyle::Llama => ("model.layers", "model.embed_tokens"),
        LmStyle::Neox => ("gpt_neox.layers", "gpt_neox.embed_in"),
    }
}

/// The trained parts of `model` under OpenFlamingo's names; `vocab` is the length of the
/// run's tokenizer (OpenFlamingo resizes the embedding to it).
pub fn trained_tensors<B: Backend>(
    model: &Flamingo<B>,
    cfg: &FlamingoConfig,
    vocab: usize,
) -> Result<Tensors> {
    let mut o = Out(Tensors::new());
    let r = &model.resampler;
    o.put("perceiver.latents".into(), param(&r.latents));
    let frames = param(&r.frame_embs);
    if frames.1.iter().any(|&x| x != 0.0) {
        o.put("perceiver.frame_embs".into(), frames);
    }
    for (n, l) in r.layers.iter().enumerate() {
        let p = format!("perceiver.layers.{n}");
        o.norm(format!("{p}.0.norm_media"), &l.norm_media);
        o.norm(format!("{p}.0.norm_latents"), &l.norm_latents);
        o.linear(format!("{p}.0.to_q"), &l.to_q);
        o.linear(format!("{p}.0.to_kv"), &l.to_kv);
        o.linear(format!("{p}.0.to_out"), &l.to_out);
        o.norm(format!("{p}.1.0"), &l.ff_norm);
        o.linear(format!("{p}.1.1"), &l.ff_in);
        o.linear(format!("{p}.1.3"), &l.ff_out);
    }
    o.norm("perceiver.norm".into(), &r.norm);
    let (layers, embed) = lm_paths(cfg);
    let every = cfg.cross_attn_every_n_layers.max(1);
    let placed = (0..cfg.lm.layers).filter(|i| (i + 1) % every == 0);
    for (x, i) in model.xattn.iter().zip(placed) {
        let p = format!("lang_encoder.{layers}.{i}.gated_cross_attn_layer");
        o.put(format!("{p}.attn_gate"), param(&x.attn_gate));
        o.put(format!("{p}.ff_gate"), param(&x.ff_gate));
        o.norm(format!("{p}.attn.norm"), &x.norm);
        o.linear(format!("{p}.attn.to_q"), &x.to_q);
        o.linear(format!("{p}.attn.to_kv"), &x.to_kv);
        o.linear(format!("{p}.attn.to_out"), &x.to_out);
        o.norm(format!("{p}.ff.0"), &x.ff_norm);
        o.linear(format!("{p}.ff.1"), &x.ff_in);
        o.linear(format!("{p}.ff.3"), &x.ff_out);
    }
    let (shape, mut rows) = param(&model.lm.wte.weight);
    let d = shape[1];
    if vocab > shape[0] {
        bail!(
            "the tokenizer has {vocab} tokens, the embedding {} rows",
            shape[0]
        );
    }
    rows.truncate(vocab * d);
    let (_, new) = param(&model.new_tokens);
    for (k, id) in [model.image_token, model.eoc_token].into_iter().enumerate() {
        let id = id as usize;
        rows[id * d..(id + 1) * d].copy_from_slice(&new[k * d..(k + 1) * d]);
    }
    let table = (vec![vocab, d], rows);
    if model.tied {
        o.put("lang_encoder.lm_head.weight".into(), table.clone());
    }
    o.put(format!("lang_encoder.{embed}.weight"), table);
    Ok(o.0)
}

/// The settings of `cfg` in which it differs from the model `open_flamingo`'s factory builds
/// (its resampler and gated layers have fixed sizes): each such difference must be passed to
/// `Flamingo(...)` by hand, or the weights do not fit.
pub fn differs_from_factory(cfg: &FlamingoConfig) -> Vec<String> {
    let r = &cfg.resampler;
    let factory = [
        ("resampler.depth", r.depth, 6),
        ("resampler.heads", r.heads, 8),
        ("resampler.dim_head", r.dim_head, 64),
        ("resampler.latents", r.latents, 64),
        ("resampler.ff_mult", r.ff_mult, 4),
        ("xattn_heads", cfg.xattn_heads, 8),
        ("xattn_dim_head", cfg.xattn_dim_head, 64),
        ("xattn_ff_mult", cfg.xattn_ff_mult, 4),
    ];
    factory
        .iter()
        .filter(|(_, ours, theirs)| ours != theirs)
        .map(|(k, ours, theirs)| format!("{k} = {ours} (open_flamingo: {theirs})"))
        .collect()
}

/// Writes [`trained_tensors`] to `out/`[`FILE`] (f32 or bf16).
pub fn export<B: Backend>(
    model: &Flamingo<B>,
    cfg: &FlamingoConfig,
    vocab: usize,
    out: &Path,
    bf16: bool,
) -> Result<()> {
    let tensors = trained_tensors(model, cfg, vocab)?;
    crate::tensors::write(&tensors, &out.join(FILE), bf16)
}
