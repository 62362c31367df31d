//! HF transformers' `CLIPModel` (`config.json` with `model_type = "clip"` and
//! `model.safetensors`, transformers 4.x or 5.x): the config mapped to a [`ClipConfig`], and
//! the weights renamed to open_clip's layout in memory ([`to_open_clip`]), which
//! [`crate::open_clip`] then loads. Key paths, as HF writes them:
//!
//! ```text
//! vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}
//! vision_model.{pre_layrnorm, post_layernorm}.{weight, bias}          (HF's spelling)
//! {vision,text}_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight, bias}
//! {vision,text}_model.encoder.layers.N.{layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}.*
//! text_model.embeddings.{token_embedding, position_embedding}.weight
//! text_model.final_layer_norm.*, visual_projection.weight, text_projection.weight, logit_scale
//! ```
//!
//! open_clip packs q, k, v into one `in_proj_weight` (rows q, then k, then v) and stores the
//! projections as `[width, embed]` matrices used as `x @ proj`; HF keeps them apart and as
//! `[embed, width]` Linear weights.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rookery_model::layers::Act;
use rookery_model::ClipConfig;
use serde_json::Value;

use crate::tensors::{read_hf, transpose, Tensors};

/// A shape and its row-major values.
type Tensor = (Vec<usize>, Vec<f32>);

/// The [`ClipConfig`] of the HF `CLIPModel` in `dir`.
pub fn config(dir: &Path) -> Result<ClipConfig> {
    let path = dir.join("config.json");
    let v: Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", path.display()))?;
    let (t, vis) = (&v["text_config"], &v["vision_config"]);
    let num = |section: &Value, key: &str, default: Option<usize>| -> Result<usize> {
        match section[key].as_u64() {
            Some(n) => Ok(n as usize),
            None => default.with_context(|| format!("{}: no `{key}`", path.display())),
        }
    };
    let act = |section: &Value, which: &str| -> Result<Act> {
        match section["hidden_act"].as_str().unwrap_or("quick_gelu") {
            "quick_gelu" => Ok(Act::QuickGelu),
            "gelu" => Ok(Act::Gelu),
            other => bail!(
                "{}: {which}.hidden_act = {other:?}: rookery's CLIP has quick_gelu and gelu",
                path.display()
            ),
        }
    };
    for (section, which) in [(t, "text_config"), (vis, "vision_config")] {
        let eps = section["layer_norm_eps"].as_f64().unwrap_or(1e-5);
        if (eps - 1e-5).abs() > 1e-12 {
            bail!(
                "{}: {which}.layer_norm_eps = {eps}: rookery's CLIP LayerNorms use 1e-5",
                path.display()
            );
        }
    }
    let mut c = ClipConfig {
        embed_dim: num(&v, "projection_dim", Some(512))?,
        ..Default::default()
    };
    let width = num(vis, "hidden_size", Some(768))?;
    c.vision.width = width;
    c.vision.layers = num(vis, "num_hidden_layers", Some(12))?;
    c.vision.heads = num(vis, "num_attention_heads", Some(12))?;
    c.vision.image_size = num(vis, "image_size", Some(224))?;
    c.vision.patch_size = num(vis, "patch_size", Some(32))?;
    c.vision.mlp_ratio = num(vis, "intermediate_size", Some(3072))? as f64 / width as f64;
    c.vision.act = act(vis, "vision_config")?;
    c.vision.stem_patch = 0;
    c.vision.pool_type = rookery_model::vit::Pool::Tok;
    let tw = num(t, "hidden_size", Some(512))?;
    c.text.width = tw;
    c.text.layers = num(t, "num_hidden_layers", Some(12))?;
    c.text.heads = num(t, "num_attention_heads", Some(8))?;
    c.text.context_length = num(t, "max_position_embeddings", Some(77))?;
    c.text.vocab_size = num(t, "vocab_size", Some(49408))?;
    c.text.mlp_ratio = num(t, "intermediate_size", Some(2048))? as f64 / tw as f64;
    c.text.act = act(t, "text_config")?;
    // HF pools the first `eos_token_id`; configs from before transformers#24773 say 2 and pool
    // the largest id instead, which is CLIP's <|endoftext|>, the last of the vocabulary.
    c.text.eot_token = match num(t, "eos_token_id", Some(2))? {
        2 => c.text.vocab_size - 1,
        id => id,
    };
    c.init_logit_scale = v["logit_scale_init_value"].as_f64().unwrap_or(2.6592) as f32;
    Ok(c)
}

/// The open_clip name of an HF CLIP encoder-layer tail (`layer_norm1.weight` ->
/// `ln_1.weight`), for the keys that map one to one.
fn layer_tail(tail: &str) -> Option<String> {
    let (module, param) = tail.rsplit_once('.')?;
    let name = match module {
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        "self_attn.out_proj" => "attn.out_proj",
        _ => return None,
    };
    Some(format!("{name}.{param}"))
}

/// The HF `CLIPModel` weights in `dir` under open_clip's names and layouts, as f32.
pub fn to_open_clip(dir: &Path) -> Result<Tensors> {
    let path = dir;
    let hf = read_hf(dir)?;
    let mut out = Tensors::new();
    // q, k, v of each layer, gathered until all three are there: open_clip packs them.
    let mut qkv: BTreeMap<(String, String), [Option<Tensor>; 3]> = BTreeMap::new();
    for (key, (shape, data)) in hf {
        if key.ends_with("position_ids") {
            continue; // a stale buffer of older transformers, not a weight
        }
        let tower = if key.starts_with("vision_model.") {
            "visual.transformer"
        } else {
            "transformer"
        };
        let renamed = match key.as_str() {
            "logit_scale" => Some("logit_scale".to_string()),
            "vision_model.embeddings.class_embedding" => Some("visual.class_embedding".into()),
            "vision_model.embeddings.patch_embedding.weight" => Some("visual.conv1.weight".into()),
            "vision_model.embeddings.position_embedding.weight" => {
                Some("visual.positional_embedding".into())
            }
            "text_model.embeddings.token_embedding.weight" => Some("token_embedding.weight".into()),
            "text_model.embeddings.position_embedding.weight" => {
                Some("positional_embedding".into())
            }
            k if k.starts_with("vision_model.pre_layrnorm.") => {
                Some(k.replace("vision_model.pre_layrnorm.", "visual.ln_pre."))
            }
            k if k.starts_with("vision_model.post_layernorm.") => {
                Some(k.replace("vision_model.post_layernorm.", "visual.ln_post."))
            }
            k if k.starts_with("text_model.final_layer_norm.") => {
                Some(k.replace("text_model.final_layer_norm.", "ln_final."))
            }
            _ => None,
        };
        if let Some(name) = renamed {
            out.insert(name, (shape, data));
            continue;
        }
        if key == "visual_projection.weight" || key == "text_projection.weight" {
            let name = match key.starts_with("visual") {
                true => "visual.proj",
                false => "text_projection",
            };
            out.insert(name.into(), transpose((shape, data)));
            continue;
        }
        let layer = key
            .strip_prefix("vision_model.encoder.layers.")
            .or_else(|| key.strip_prefix("text_model.encoder.layers."))
            .and_then(|rest| rest.split_once('.'));
        let Some((n, tail)) = layer else {
            bail!(
                "{}: unexpected tensor {key} for a CLIPModel",
                path.display()
            );
        };
        let prefix = format!("{tower}.resblocks.{n}");
        if let Some(t) = layer_tail(tail) {
            out.insert(format!("{prefix}.{t}"), (shape, data));
            continue;
        }
        let (module, param) = tail.rsplit_once('.').unwrap_or((tail, ""));
        let slot = match module {
            "self_attn.q_proj" => 0,
            "self_attn.k_proj" => 1,
            "self_attn.v_proj" => 2,
            _ => bail!(
                "{}: unexpected tensor {key} for a CLIPModel",
                path.display()
            ),
        };
        qkv.entry((prefix, param.to_string())).or_default()[slot] = Some((shape, data));
    }
    for ((prefix, param), parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            bail!(
                "{}: {prefix} ({param}) lacks one of q_proj, k_proj, v_proj",
                path.display()
            );
        };
        let mut shape = q.0.clone();
        shape[0] *= 3;
        let data = [q.1, k.1, v.1].concat();
        out.insert(format!("{prefix}.attn.in_proj_{param}"), (shape, data));
    }
    Ok(out)
}
