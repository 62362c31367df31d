//! Export under HF transformers' `CLIPModel` names and layouts, so that
//! `CLIPModel.from_pretrained(DIR)` loads rookery weights: packed `in_proj` split into
//! `q_proj`/`k_proj`/`v_proj`, Linear weights as `[out, in]`, projections as Linear weights,
//! `logit_scale` as a 0-d tensor, and a `config.json` with `model_type = "clip"`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use burn::prelude::*;
use rookery_model::layers::Act;
use rookery_model::{Clip, ClipConfig};
use serde_json::json;

/// Row-major f32 values and shape.
type Values = (Vec<f32>, Vec<usize>);
/// Tensors by name.
type Tensors = BTreeMap<String, Values>;

fn transpose((v, s): &Values) -> Values {
    let (r, c) = (s[0], s[1]);
    let mut out = vec![0f32; v.len()];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = v[i * c + j];
        }
    }
    (out, vec![c, r])
}

/// Columns `part*d .. (part+1)*d` of a `[rows, 3d]` matrix, or that slice of a `[3d]` vector.
fn third((v, s): &Values, part: usize) -> Values {
    if s.len() == 1 {
        let d = s[0] / 3;
        return (v[part * d..(part + 1) * d].to_vec(), vec![d]);
    }
    let (r, c) = (s[0], s[1]);
    let d = c / 3;
    let out = (0..r)
        .flat_map(|i| v[i * c + part * d..i * c + (part + 1) * d].iter().copied())
        .collect();
    (out, vec![r, d])
}

/// The HF name and value of every tensor.
fn hf_tensors(t: &Tensors) -> Result<Tensors> {
    let get = |k: &str| t.get(k).with_context(|| format!("no tensor {k}"));
    let mut out = Tensors::new();
    let mut put = |k: String, v: Values| out.insert(k, v);
    let norm = |k: &str, p: &str| -> Result<[(String, Values); 2]> {
        Ok([
            (format!("{k}.weight"), get(&format!("{p}.gamma"))?.clone()),
            (format!("{k}.bias"), get(&format!("{p}.beta"))?.clone()),
        ])
    };
    for (tower, hf) in [("visual", "vision_model"), ("text", "text_model")] {
        let layers = t
            .keys()
            .filter(|k| {
                k.starts_with(&format!("{tower}.transformer.resblocks."))
                    && k.ends_with("ln_1.gamma")
            })
            .count();
        for n in 0..layers {
            let (p, h) = (
                format!("{tower}.transformer.resblocks.{n}"),
                format!("{hf}.encoder.layers.{n}"),
            );
            for (k, v) in norm(&format!("{h}.layer_norm1"), &format!("{p}.ln_1"))?
                .into_iter()
                .chain(norm(&format!("{h}.layer_norm2"), &format!("{p}.ln_2"))?)
            {
                put(k, v);
            }
            let (w, b) = (
                get(&format!("{p}.attn.in_proj.weight"))?,
                get(&format!("{p}.attn.in_proj.bias"))?,
            );
            for (i, qkv) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                put(
                    format!("{h}.self_attn.{qkv}.weight"),
                    transpose(&third(w, i)),
                );
                put(format!("{h}.self_attn.{qkv}.bias"), third(b, i));
            }
            for (ours, theirs) in [
                ("attn.out_proj", "self_attn.out_proj"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ] {
                put(
                    format!("{h}.{theirs}.weight"),
                    transpose(get(&format!("{p}.{ours}.weight"))?),
                );
                put(
                    format!("{h}.{theirs}.bias"),
                    get(&format!("{p}.{ours}.bias"))?.clone(),
                );
            }
        }
    }
    let emb = "vision_model.embeddings";
    put(
        format!("{emb}.patch_embedding.weight"),
        get("visual.conv1.weight")?.clone(),
    );
    put(
        format!("{emb}.class_embedding"),
        get("visual.class_embedding")?.clone(),
    );
    put(
        format!("{emb}.position_embedding.weight"),
        get("visual.positional_embedding")?.clone(),
    );
    for (k, v) in norm("vision_model.pre_layrnorm", "visual.ln_pre")?
        .into_iter()
        .chain(norm("vision_model.post_layernorm", "visual.ln_post")?)
    {
        put(k, v);
    }
    put(
        "visual_projection.weight".into(),
        transpose(get("visual.proj")?),
    );
    put(
        "text_model.embeddings.token_embedding.weight".into(),
        get("text.token_embedding.weight")?.clone(),
    );
    put(
        "text_model.embeddings.position_embedding.weight".into(),
        get("text.positional_embedding")?.clone(),
    );
    for (k, v) in norm("text_model.final_layer_norm", "text.ln_final")? {
        put(k, v);
    }
    put(
        "text_projection.weight".into(),
        transpose(get("text.text_projection")?),
    );
    put(
        "logit_scale".into(),
        (get("logit_scale")?.0.clone(), vec![]),
    );
    Ok(out)
}

/// Writes `DIR/model.safetensors` and `DIR/config.json` for HF `CLIPModel`.
pub fn export_hf<B: Backend>(
    model: &Clip<B>,
    cfg: &ClipConfig,
    out: &Path,
    bf16: bool,
) -> Result<()> {
    anyhow::ensure!(
        cfg.vision.pool_type == rookery_model::vit::Pool::Tok,
        "model.vision.pool_type = {:?}: HF CLIPVisionModel reads the class token only, so its features would differ; export with --format open_clip",
        cfg.vision.pool_type
    );
    if let Some(why) = crate::open_clip::open_clip_lacks(cfg) {
        anyhow::bail!("cannot export for HF transformers: {why}");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let own: Tensors = crate::tensors::of_module(model)
        .into_iter()
        .map(|(k, (s, v))| (k, (v, s)))
        .collect();
    let tensors = hf_tensors(&own)?;
    let tensors: crate::tensors::Tensors =
        tensors.into_iter().map(|(k, (v, s))| (k, (s, v))).collect();
    crate::tensors::write(&tensors, &out.join("model.safetensors"), bf16)?;
    let act = |a: Act| match a {
        Act::QuickGelu => "quick_gelu",
        Act::Gelu => "gelu",
        Act::GeluTanh => "gelu_pytorch_tanh",
    };
    let (v, t) = (&cfg.vision, &cfg.text);
    let config = json!({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale, "torch_dtype": if bf16 { "bfloat16" } else { "float32" },
        "vision_config": { "model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": (v.width as f64 * v.mlp_ratio) as usize,
            "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "num_channels": 3, "hidden_act": act(v.act), "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim },
        "text_config": { "model_type": "clip_text_model", "hidden_size": t.width, "intermediate_size": (t.width as f64 * t.mlp_ratio) as usize,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
            "vocab_size": t.vocab_size, "hidden_act": act(t.act), "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim,
            "eos_token_id": t.eot_token, "bos_token_id": 2, "pad_token_id": 0 },
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}
