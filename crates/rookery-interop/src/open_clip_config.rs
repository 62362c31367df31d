//! open_clip's model config (`open_clip_config.json` as `push_to_hf_hub` writes it, with the
//! model under `model_cfg`, or a bare `model_configs/*.json`) mapped to a [`ClipConfig`], and
//! the options rookery's CLIP does not have refused by name.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rookery_model::layers::Act;
use rookery_model::vit::Pool;
use rookery_model::ClipConfig;
use serde_json::Value;

/// `vision_cfg` / `text_cfg` keys that change the architecture away from the plain ViT and
/// text transformer rookery builds, with what they would need.
const UNSUPPORTED: [&str; 14] = [
    "timm_model_name",
    "hf_model_name",
    "ls_init_value",
    "no_ln_pre",
    "attentional_pool",
    "final_ln_after_pool",
    "input_patchnorm",
    "proj_bias",
    "no_causal_mask",
    "norm_kwargs",
    "act_kwargs",
    "embed_cls",
    "output_tokens",
    "attn_pooler_queries",
];

/// The [`ClipConfig`] described by the open_clip config file `path`.
pub fn config(path: &Path) -> Result<ClipConfig> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_slice(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let m = if v.get("model_cfg").is_some() {
        &v["model_cfg"]
    } else {
        &v
    };
    let (vis, txt) = (&m["vision_cfg"], &m["text_cfg"]);
    if !vis.is_object() || !txt.is_object() {
        bail!(
            "{}: no vision_cfg / text_cfg: not an open_clip model config",
            path.display()
        );
    }
    for (section, name) in [(vis, "vision_cfg"), (txt, "text_cfg")] {
        for key in UNSUPPORTED {
            let set = match &section[key] {
                Value::Null | Value::Bool(false) => false,
                Value::Object(o) => !o.is_empty(),
                _ => true,
            };
            if set {
                bail!(
                    "{}: {name}.{key} is set: rookery's CLIP is open_clip's plain ViT and text transformer and has no such option",
                    path.display()
                );
            }
        }
    }
    let int = |section: &Value, key: &str, default: usize| -> Result<usize> {
        match &section[key] {
            Value::Null => Ok(default),
            x => x
                .as_u64()
                .map(|n| n as usize)
                .with_context(|| format!("{}: `{key}` is not a whole number", path.display())),
        }
    };
    let pool = txt["pool_type"].as_str().unwrap_or("argmax");
    if !["argmax", "eos"].contains(&pool) {
        bail!(
            "{}: text_cfg.pool_type = {pool:?}: rookery pools the end-of-text token",
            path.display()
        );
    }
    let mut c = ClipConfig {
        embed_dim: int(m, "embed_dim", 512)?,
        ..Default::default()
    };
    let v = &mut c.vision;
    v.image_size = int(vis, "image_size", 224)?;
    v.patch_size = int(vis, "patch_size", 16)?;
    v.width = int(vis, "width", 768)?;
    v.layers = int(vis, "layers", 12)?;
    v.heads = v.width / int(vis, "head_width", 64)?.max(1);
    v.mlp_ratio = vis["mlp_ratio"].as_f64().unwrap_or(4.0);
    v.pool_type = match vis["pool_type"].as_str().unwrap_or("tok") {
        "tok" => Pool::Tok,
        "avg" => Pool::Avg,
        other => bail!(
            "{}: vision_cfg.pool_type = {other:?}: rookery reads \"tok\" (class token) or \"avg\"",
            path.display()
        ),
    };
    v.stem_patch = 0;
    v.act = match m["quick_gelu"].as_bool().unwrap_or(false) {
        true => Act::QuickGelu,
        false => Act::Gelu,
    };
    let t = &mut c.text;
    t.context_length = int(txt, "context_length", 77)?;
    t.vocab_size = int(txt, "vocab_size", 49408)?;
    t.width = int(txt, "width", 512)?;
    t.heads = int(txt, "heads", 8)?;
    t.layers = int(txt, "layers", 12)?;
    t.mlp_ratio = txt["mlp_ratio"].as_f64().unwrap_or(4.0);
    t.act = c.vision.act;
    // `argmax` pools the largest id, CLIP's <|endoftext|>, the last of the vocabulary.
    t.eot_token = match &txt["eos_id"] {
        Value::Null => t.vocab_size - 1,
        x => x.as_u64().context("text_cfg.eos_id")? as usize,
    };
    if m["init_logit_bias"].is_number() {
        bail!(
            "{}: init_logit_bias is set (a SigLIP model): not a CLIP rookery loads",
            path.display()
        );
    }
    Ok(c)
}
