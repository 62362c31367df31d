//! A Flamingo's trained parts under the names OpenFlamingo's checkpoints use
//! ([`crate::open_flamingo_names`]), so that `open_flamingo`'s model, built on the same vision
//! encoder and LM, takes them with `load_state_dict(sd, strict=False)`. The embedding is cut
//! to the tokenizer's length with the trained rows of `<image>` and `<|endofchunk|>` in place
//! (and written as `lang_encoder.lm_head.weight` too when the head is tied to it).

use std::path::Path;

use anyhow::{bail, Result};
use burn::prelude::*;
use rookery_model::flamingo::{Flamingo, FlamingoConfig};

use crate::open_flamingo_names::{embedding, trained, Layout};
use crate::tensors::{of_module, shapes_of, transpose, Tensors};

/// The file an export writes.
pub const FILE: &str = "checkpoint.safetensors";

/// The trained parts' tensors under rookery's module paths (`resampler.*`, `xattn.K.*`).
pub fn trained_of<B: Backend>(model: &Flamingo<B>) -> Tensors {
    trained_with(model, true)
}

/// [`trained_of`]'s shapes only (no values copied).
pub fn trained_shapes<B: Backend>(model: &Flamingo<B>) -> Tensors {
    trained_with(model, false)
}

fn trained_with<B: Backend>(model: &Flamingo<B>, values: bool) -> Tensors {
    let mut out = Tensors::new();
    let resampler = match values {
        true => of_module(&model.resampler),
        false => shapes_of(&model.resampler),
    };
    for (k, t) in resampler {
        out.insert(format!("resampler.{k}"), t);
    }
    for (i, x) in model.xattn.iter().enumerate() {
        let gated = match values {
            true => of_module(x),
            false => shapes_of(x),
        };
        for (k, t) in gated {
            out.insert(format!("xattn.{i}.{k}"), t);
        }
    }
    out
}

/// The trained parts of `model` under OpenFlamingo's names; `vocab` is the length of the
/// run's tokenizer (OpenFlamingo resizes the embedding to it).
pub fn trained_tensors<B: Backend>(
    model: &Flamingo<B>,
    cfg: &FlamingoConfig,
    vocab: usize,
) -> Result<Tensors> {
    let mut ours = trained_of(model);
    let mut out = Tensors::new();
    for name in trained(cfg) {
        let t = ours
            .remove(&name.ours)
            .unwrap_or_else(|| panic!("the model has no {}", name.ours));
        // An untrained frame embedding (one frame per image) is left out: OpenFlamingo's
        // resampler has none unless it is given frames.
        if name.ours == "resampler.frame_embs" && t.1.iter().all(|&x| x == 0.0) {
            continue;
        }
        let t = match name.layout {
            Layout::Same => t,
            Layout::Transposed => transpose(t),
        };
        out.insert(name.theirs, t);
    }
    let w = model.lm.wte.weight.val();
    let [rows, d] = w.dims();
    if vocab > rows {
        bail!("the tokenizer has {vocab} tokens, the embedding {rows} rows");
    }
    let mut table: Vec<f32> = w
        .slice(s![0..vocab, ..])
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 values");
    let new: Vec<f32> = model.new_tokens.val().into_data().to_vec().expect("f32");
    for (k, id) in [model.image_token, model.eoc_token].into_iter().enumerate() {
        let id = id as usize;
        table[id * d..(id + 1) * d].copy_from_slice(&new[k * d..(k + 1) * d]);
    }
    let table = (vec![vocab, d], table);
    if model.tied {
        out.insert("lang_encoder.lm_head.weight".into(), table.clone());
    }
    out.insert(embedding(cfg), table);
    Ok(out)
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
