//! HF transformers' SigLIP: `SiglipModel` (`model_type = "siglip"`, both towers) and
//! `SiglipVisionModel` (`"siglip_vision_model"`, the vision tower alone, saved with or without
//! the `vision_model.` prefix by transformers 4.x / 5.x), mapped to rookery's
//! [`Siglip`](rookery_model::siglip::Siglip). Key paths, as HF writes them:
//!
//! ```text
//! vision_model.embeddings.patch_embedding.{weight,bias}  -> vision.patch_embedding.{weight,bias}
//! vision_model.embeddings.position_embedding.weight      -> vision.position_embedding
//! vision_model.encoder.layers.N.layer_norm{1,2}.*        -> vision.layers.N.layer_norm{1,2}.{gamma,beta}
//! vision_model.encoder.layers.N.self_attn.{q,k,v}_proj.* -> vision.layers.N.self_attn.in_proj.* (packed)
//! vision_model.encoder.layers.N.self_attn.out_proj.*     -> vision.layers.N.self_attn.out_proj.*
//! vision_model.encoder.layers.N.mlp.fc{1,2}.*            -> vision.layers.N.mlp.c_{fc,proj}.*
//! vision_model.post_layernorm.*                          -> vision.post_layernorm.*
//! vision_model.head.probe [1, 1, W]                      -> vision.head.probe [1, W]
//! vision_model.head.attention.in_proj_{weight,bias}      -> vision.head.attention.in_proj.{weight,bias}
//! vision_model.head.attention.out_proj.*, layernorm.*, mlp.fc{1,2}.* -> vision.head.…
//! text_model.embeddings.{token,position}_embedding.weight -> text.token_embedding.weight, text.position_embedding
//! text_model.encoder.layers.N.*, final_layer_norm.*, head.* -> text.…
//! logit_scale, logit_bias                                -> logit_scale, logit_bias
//! ```
//!
//! Linear weights are transposed (burn holds `[in, out]`); LayerNorm `weight`/`bias` become
//! `gamma`/`beta`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rookery_model::layers::Act;
use rookery_model::siglip::{SiglipConfig, SiglipText, SiglipTower};
use serde_json::Value;

use crate::tensors::{read_hf, transpose, Tensors};

/// The `model_type`s read here.
pub const MODEL_TYPES: [&str; 2] = ["siglip", "siglip_vision_model"];

fn tower(path: &Path, v: &Value, which: &str) -> Result<SiglipTower> {
    let num = |k: &str| -> Result<usize> {
        v[k].as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("{}: no `{which}.{k}`", path.display()))
    };
    let act = match v["hidden_act"].as_str().unwrap_or("gelu_pytorch_tanh") {
        "gelu_pytorch_tanh" | "gelu_new" => Act::GeluTanh,
        "gelu" => Act::Gelu,
        "quick_gelu" => Act::QuickGelu,
        other => bail!("{}: {which}.hidden_act = {other:?}", path.display()),
    };
    Ok(SiglipTower {
        width: num("hidden_size")?,
        layers: num("num_hidden_layers")?,
        heads: num("num_attention_heads")?,
        hidden: num("intermediate_size")?,
        eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-6),
        act,
    })
}

/// The [`SiglipConfig`] of the HF SigLIP model in `dir`.
pub fn config(dir: &Path) -> Result<SiglipConfig> {
    let path = dir.join("config.json");
    let v: Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", path.display()))?;
    let kind = v["model_type"].as_str().unwrap_or("");
    let vis = match kind {
        "siglip" => &v["vision_config"],
        "siglip_vision_model" => &v,
        other => bail!(
            "{}: model_type {other:?}; rookery reads {MODEL_TYPES:?} here",
            path.display()
        ),
    };
    let size = |k: &str| vis[k].as_u64().map(|n| n as usize);
    let (image_size, patch_size) = (
        size("image_size").unwrap_or(224),
        size("patch_size").unwrap_or(16),
    );
    if vis["num_channels"].as_u64().is_some_and(|c| c != 3) {
        bail!("{}: num_channels other than 3", path.display());
    }
    let text = match kind {
        "siglip" => {
            let t = &v["text_config"];
            let tt = tower(&path, t, "text_config")?;
            Some(SiglipText {
                vocab_size: t["vocab_size"].as_u64().unwrap_or(32000) as usize,
                context_length: t["max_position_embeddings"].as_u64().unwrap_or(64) as usize,
                projection: t["projection_size"]
                    .as_u64()
                    .map_or(tt.width, |p| p as usize),
                pad_token: t["pad_token_id"].as_u64().unwrap_or(1) as usize,
                tower: tt,
            })
        }
        _ => None,
    };
    Ok(SiglipConfig {
        image_size,
        patch_size,
        vision: tower(&path, vis, "vision_config")?,
        vision_head: vis["vision_use_head"].as_bool().unwrap_or(true),
        text,
    })
}

type T = (Vec<usize>, Vec<f32>);

/// Takes HF tensors out of a map, naming the directory when one is missing.
struct Take<'a> {
    hf: Tensors,
    dir: &'a Path,
}

impl Take<'_> {
    fn get(&mut self, k: &str) -> Result<T> {
        self.hf
            .remove(k)
            .with_context(|| format!("{}: no tensor {k}", self.dir.display()))
    }
    fn linear(&mut self, out: &mut Tensors, from: &str, to: &str) -> Result<()> {
        out.insert(
            format!("{to}.weight"),
            transpose(self.get(&format!("{from}.weight"))?),
        );
        out.insert(format!("{to}.bias"), self.get(&format!("{from}.bias"))?);
        Ok(())
    }
    fn norm(&mut self, out: &mut Tensors, from: &str, to: &str) -> Result<()> {
        out.insert(format!("{to}.gamma"), self.get(&format!("{from}.weight"))?);
        out.insert(format!("{to}.beta"), self.get(&format!("{from}.bias"))?);
        Ok(())
    }
    /// An encoder's blocks, `q/k/v` packed row-wise before the transpose.
    fn blocks(&mut self, out: &mut Tensors, from: &str, to: &str, n: usize) -> Result<()> {
        for i in 0..n {
            let (f, t) = (format!("{from}.layers.{i}"), format!("{to}.layers.{i}"));
            self.norm(
                out,
                &format!("{f}.layer_norm1"),
                &format!("{t}.layer_norm1"),
            )?;
            self.norm(
                out,
                &format!("{f}.layer_norm2"),
                &format!("{t}.layer_norm2"),
            )?;
            let mut rows = (vec![0, 0], vec![]);
            let mut bias = (vec![0], vec![]);
            for x in ["q", "k", "v"] {
                let (s, w) = self.get(&format!("{f}.self_attn.{x}_proj.weight"))?;
                let (bs, b) = self.get(&format!("{f}.self_attn.{x}_proj.bias"))?;
                rows = (vec![rows.0[0] + s[0], s[1]], [rows.1, w].concat());
                bias = (vec![bias.0[0] + bs[0]], [bias.1, b].concat());
            }
            out.insert(format!("{t}.self_attn.in_proj.weight"), transpose(rows));
            out.insert(format!("{t}.self_attn.in_proj.bias"), bias);
            let (fa, ta) = (
                format!("{f}.self_attn.out_proj"),
                format!("{t}.self_attn.out_proj"),
            );
            self.linear(out, &fa, &ta)?;
            self.linear(out, &format!("{f}.mlp.fc1"), &format!("{t}.mlp.c_fc"))?;
            self.linear(out, &format!("{f}.mlp.fc2"), &format!("{t}.mlp.c_proj"))?;
        }
        Ok(())
    }
}

/// The SigLIP weights in `dir` under rookery's names (see the module docs); a tensor left over
/// is refused by name.
pub fn to_rookery(dir: &Path, cfg: &SiglipConfig) -> Result<Tensors> {
    let mut hf = read_hf(dir)?;
    hf.retain(|k, _| !k.ends_with("position_ids"));
    if cfg.text.is_none() && !hf.keys().any(|k| k.starts_with("vision_model.")) {
        // transformers 5 saves a standalone tower without its prefix.
        hf = hf
            .into_iter()
            .map(|(k, t)| (format!("vision_model.{k}"), t))
            .collect();
    }
    let mut t = Take { hf, dir };
    let mut out = Tensors::new();
    let v = "vision_model";
    for x in ["weight", "bias"] {
        let k = format!("{v}.embeddings.patch_embedding.{x}");
        out.insert(format!("vision.patch_embedding.{x}"), t.get(&k)?);
    }
    let pos = t.get(&format!("{v}.embeddings.position_embedding.weight"))?;
    out.insert("vision.position_embedding".into(), pos);
    t.blocks(
        &mut out,
        &format!("{v}.encoder"),
        "vision",
        cfg.vision.layers,
    )?;
    t.norm(
        &mut out,
        &format!("{v}.post_layernorm"),
        "vision.post_layernorm",
    )?;
    if cfg.vision_head {
        let (shape, probe) = t.get(&format!("{v}.head.probe"))?;
        out.insert("vision.head.probe".into(), (vec![1, shape[2]], probe));
        let h = format!("{v}.head");
        let w = t.get(&format!("{h}.attention.in_proj_weight"))?;
        out.insert("vision.head.attention.in_proj.weight".into(), transpose(w));
        let b = t.get(&format!("{h}.attention.in_proj_bias"))?;
        out.insert("vision.head.attention.in_proj.bias".into(), b);
        let o = &mut out;
        t.linear(
            o,
            &format!("{h}.attention.out_proj"),
            "vision.head.attention.out_proj",
        )?;
        t.norm(o, &format!("{h}.layernorm"), "vision.head.layernorm")?;
        t.linear(o, &format!("{h}.mlp.fc1"), "vision.head.mlp.c_fc")?;
        t.linear(o, &format!("{h}.mlp.fc2"), "vision.head.mlp.c_proj")?;
    }
    match &cfg.text {
        Some(tc) => {
            let e = "text_model.embeddings";
            let tok = t.get(&format!("{e}.token_embedding.weight"))?;
            out.insert("text.token_embedding.weight".into(), tok);
            let pos = t.get(&format!("{e}.position_embedding.weight"))?;
            out.insert("text.position_embedding".into(), pos);
            t.blocks(&mut out, "text_model.encoder", "text", tc.tower.layers)?;
            t.norm(
                &mut out,
                "text_model.final_layer_norm",
                "text.final_layer_norm",
            )?;
            t.linear(&mut out, "text_model.head", "text.head")?;
            out.insert("logit_scale".into(), t.get("logit_scale")?);
            out.insert("logit_bias".into(), t.get("logit_bias")?);
        }
        // A vision tower alone has no logit scale and bias; the model keeps zeros.
        None => {
            out.insert("logit_scale".into(), (vec![1], vec![0.0]));
            out.insert("logit_bias".into(), (vec![1], vec![0.0]));
        }
    }
    if let Some(k) = t.hf.keys().next() {
        bail!(
            "{}: unexpected tensor {k} (another architecture, or a layer too many)",
            dir.display()
        );
    }
    Ok(out)
}

/// Loads the HF SigLIP model in `dir` into `model` (built from [`config`]), strictly.
pub fn load<B: burn::prelude::Backend>(
    model: rookery_model::siglip::Siglip<B>,
    dir: &Path,
    cfg: &SiglipConfig,
) -> Result<rookery_model::siglip::Siglip<B>> {
    let tensors = to_rookery(dir, cfg)?;
    let mut store =
        burn_store::SafetensorsStore::from_bytes(Some(crate::tensors::to_bytes(&tensors)?));
    crate::store::load_strict(model, &mut store, dir)
}
