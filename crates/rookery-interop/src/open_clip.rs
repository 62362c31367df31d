//! `rookery export`: CLIP weights as safetensors under open_clip's key names and layouts
//! (`visual.transformer.resblocks.N.attn.in_proj_weight`, `token_embedding.weight`,
//! `ln_final.weight`, Linear weights as `[out, in]`), in f32 or bf16, with a JSON config beside
//! them; and the reverse, used by `[model] init_from = "DIR"`.
//!
//! Differences from an open_clip checkpoint: `logit_scale` has shape `[1]` (open_clip: `[]`),
//! and the vocabulary is this run's tokenizer (copied beside the weights), not OpenAI's BPE.
//! A tower with a patch stem (`model.vision.stem_patch`) has layers open_clip lacks: it exports
//! the same way for rookery to load back, and `config.json` says open_clip cannot load it
//! ([`open_clip_lacks`]).

use std::path::Path;

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{
    BurnToPyTorchAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};

use crate::cast::Cast;
use rookery_model::{Clip, ClipConfig};
use serde_json::json;

pub const WEIGHTS: &str = "open_clip_model.safetensors";

/// Writes `DIR/open_clip_model.safetensors`, `DIR/config.json` and (if given) `DIR/tokenizer.json`.
pub fn export<B: Backend>(
    model: &Clip<B>,
    cfg: &ClipConfig,
    tokenizer: Option<&Path>,
    out: &Path,
    bf16: bool,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let dtype = if bf16 { DType::BF16 } else { DType::F32 };
    let mut store = crate::store::safetensors_writer(out.join(WEIGHTS))
        .with_to_adapter(BurnToPyTorchAdapter.chain(Cast { to: dtype }))
        .with_key_remapping(r"^text\.", "")
        .with_key_remapping(r"attn\.in_proj\.(weight|bias)$", "attn.in_proj_$1");
    model
        .save_into(&mut store)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.join(WEIGHTS).display()))?;
    let v = &cfg.vision;
    let open_clip = if let Some(why) = open_clip_lacks(cfg) {
        tracing::warn!("{}: {why}", out.display());
        json!({ "loadable": false, "why": why })
    } else {
        json!({
            "embed_dim": cfg.embed_dim,
            "vision_cfg": { "image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
                            "head_width": v.width / v.heads, "mlp_ratio": v.mlp_ratio, "pool_type": v.pool_type,
                            "patch_dropout": v.patch_dropout },
            "text_cfg": { "context_length": cfg.text.context_length, "vocab_size": cfg.text.vocab_size, "width": cfg.text.width,
                          "heads": cfg.text.heads, "layers": cfg.text.layers },
            "quick_gelu": v.act == rookery_model::layers::Act::QuickGelu,
        })
    };
    let config = json!({
        "rookery_model": cfg,
        "dtype": if bf16 { "bf16" } else { "f32" },
        "open_clip": open_clip,
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    if let Some(t) = tokenizer {
        std::fs::copy(t, out.join("tokenizer.json"))
            .with_context(|| format!("copying {}", t.display()))?;
    }
    Ok(())
}

/// Why open_clip (and HF) cannot load a tower of this config, if they cannot: a patch stem
/// (`model.vision.stem_patch`) is a layer their `VisionTransformer` lacks. rookery itself
/// loads such weights back (`model.init_from`).
pub fn open_clip_lacks(cfg: &ClipConfig) -> Option<String> {
    (cfg.vision.stem_patch > 0).then(|| {
        format!(
            "model.vision.stem_patch = {}: the image tower has a patch stem (visual.stem.*) that \
             open_clip's and HF's VisionTransformer lack, so only rookery loads these weights; \
             train with model.vision.stem_patch = 0 for a tower they load",
            cfg.vision.stem_patch
        )
    })
}

/// The model config stored beside exported weights.
pub fn exported_config(dir: &Path) -> Result<ClipConfig> {
    let path = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    serde_json::from_value(v["rookery_model"].clone())
        .with_context(|| format!("{}: rookery_model", path.display()))
}

/// open_clip's PyTorch checkpoint in `dir`, if it has one and no safetensors file: the names
/// open_clip's `local-dir:` loader looks for, in its order.
pub fn pickle(dir: &Path) -> Option<std::path::PathBuf> {
    [
        "open_clip_pytorch_model.bin",
        "open_clip_pytorch_model.pth",
        "pytorch_model.bin",
    ]
    .iter()
    .map(|n| dir.join(n))
    .find(|p| p.is_file())
}

/// Loads open_clip-layout weights (f32, bf16 or f16; rookery's export or open_clip's own)
/// into `model`, which must have their shapes.
pub fn load_exported<B: Backend>(model: Clip<B>, dir: &Path) -> Result<Clip<B>> {
    let path = dir.join(WEIGHTS);
    let mut store = reader(SafetensorsStore::from_file(&path));
    crate::store::load_strict(model, &mut store, &path)
}

/// `store` reading open_clip's names and layouts into rookery's [`Clip`]: Linear weights
/// transposed, the text tower's top-level keys under `text.`, `in_proj_weight` as the
/// `in_proj` Linear, any float dtype (and 0-d `logit_scale`) cast to f32 `[1]`.
pub fn reader(store: SafetensorsStore) -> SafetensorsStore {
    store
        .with_from_adapter(PyTorchToBurnAdapter.chain(Cast { to: DType::F32 }))
        .with_key_remapping(
            r"^(token_embedding|positional_embedding|transformer|ln_final|text_projection)",
            "text.$1",
        )
        .with_key_remapping(r"attn\.in_proj_(weight|bias)$", "attn.in_proj.$1")
}
