//! HF transformers' Llama-family causal LMs (`model_type` `llama`, `mistral`, `qwen2`; Llama
//! 2/3, TinyLlama, SmolLM, Mistral, Qwen2): `config.json` mapped to an [`LmConfig`] of style
//! `llama`, and the weights (one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`; f32, bf16 or f16) renamed into rookery's
//! [`LanguageModel`](rookery_model::flamingo::LanguageModel). Key paths, as HF writes them:
//!
//! ```text
//! model.embed_tokens.weight                               -> wte.weight
//! model.layers.N.input_layernorm.weight                   -> blocks.N.Llama.attn_norm.gamma
//! model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}     -> blocks.N.Llama.qkv.{weight,bias}
//! model.layers.N.self_attn.o_proj.weight                  -> blocks.N.Llama.out.weight
//! model.layers.N.post_attention_layernorm.weight          -> blocks.N.Llama.ffn_norm.gamma
//! model.layers.N.mlp.{gate,up,down}_proj.weight           -> blocks.N.Llama.{gate,up,down}.weight
//! model.norm.weight                                       -> norm_f.Rms.gamma
//! lm_head.weight (absent when tied: the embedding)        -> lm_head.weight
//! ```
//!
//! Two layouts differ. burn's `Linear` holds `[in, out]`, HF's `[out, in]`: every matrix is
//! transposed. HF's rotary embedding pairs dimension `j` of a head with `j + d/2`
//! (`rotate_half`), burn's `RotaryEncoding` pairs `2i` with `2i + 1`: the query and key rows of
//! each head are reordered (HF row `i` -> `2i`, row `i + d/2` -> `2i + 1`), which rotates the
//! same pairs and leaves every query-key product as it was.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rookery_model::flamingo::{LmConfig, RopeScaling};
use serde_json::Value;

use crate::tensors::{read_hf, transpose, Tensors};

/// The `model_type`s with Llama's layout.
pub const MODEL_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

fn read_config(dir: &Path) -> Result<(PathBuf, Value)> {
    let path = dir.join("config.json");
    let v: Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", path.display()))?;
    Ok((path, v))
}

/// RoPE's base and scaling from either generation of config: transformers 4.x's top-level
/// `rope_theta` / `rope_scaling` (`type` or `rope_type`), 5.x's `rope_parameters`.
fn rope(path: &Path, v: &Value) -> Result<(f64, Option<RopeScaling>)> {
    let p = if v["rope_parameters"].is_object() {
        v["rope_parameters"].clone()
    } else {
        let mut p = v["rope_scaling"].clone();
        if !p.is_object() {
            p = serde_json::json!({});
        }
        p["rope_theta"] = v["rope_theta"].clone();
        p
    };
    let theta = p["rope_theta"].as_f64().unwrap_or(10000.0);
    let kind = p["rope_type"]
        .as_str()
        .or(p["type"].as_str())
        .unwrap_or("default");
    let f = |k: &str| p[k].as_f64();
    let scaling = match kind {
        "default" => None,
        "llama3" => Some(RopeScaling {
            factor: f("factor").context("rope llama3: factor")?,
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_context: f("original_max_position_embeddings")
                .or(v["max_position_embeddings"].as_f64())
                .context("rope llama3: original_max_position_embeddings")?,
        }),
        other => bail!(
            "{}: rope type {other:?}: rookery has the default RoPE and Llama 3's scaling",
            path.display()
        ),
    };
    Ok((theta, scaling))
}

/// The [`LmConfig`] of the HF Llama-family model in `dir`.
pub fn config(dir: &Path) -> Result<LmConfig> {
    let (path, v) = read_config(dir)?;
    let kind = v["model_type"].as_str().unwrap_or("");
    if !MODEL_TYPES.contains(&kind) {
        bail!(
            "{}: model_type {kind:?}; rookery reads {MODEL_TYPES:?} here",
            path.display()
        );
    }
    let num = |k: &str| -> Result<usize> {
        v[k].as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("{}: no `{k}`", path.display()))
    };
    for (flag, what) in [
        ("attention_bias", "an o_proj bias"),
        ("mlp_bias", "MLP biases"),
    ] {
        if v[flag].as_bool() == Some(true) {
            bail!("{}: {flag} = true ({what}): not supported", path.display());
        }
    }
    let act = v["hidden_act"].as_str().unwrap_or("silu");
    if act != "silu" {
        bail!(
            "{}: hidden_act {act:?}: rookery's llama blocks use silu",
            path.display()
        );
    }
    let width = num("hidden_size")?;
    let heads = num("num_attention_heads")?;
    let (rope_theta, rope_scaling) = rope(&path, &v)?;
    let window = v["sliding_window"].as_u64();
    let ctx = num("max_position_embeddings")?;
    let sliding = v["use_sliding_window"]
        .as_bool()
        .unwrap_or(kind == "mistral");
    if sliding && window.is_some_and(|w| (w as usize) < ctx) {
        bail!(
            "{}: sliding_window = {} is shorter than max_position_embeddings = {ctx}: rookery attends to the whole context",
            path.display(),
            window.unwrap_or_default()
        );
    }
    Ok(LmConfig {
        vocab_size: num("vocab_size")?,
        context_length: ctx,
        width,
        layers: num("num_hidden_layers")?,
        heads,
        mlp_ratio: num("intermediate_size")? as f64 / width as f64,
        style: rookery_model::flamingo::LmStyle::Llama,
        kv_heads: v["num_key_value_heads"].as_u64().unwrap_or(heads as u64) as usize,
        head_dim: v["head_dim"].as_u64().map_or(width / heads, |d| d as usize),
        hidden: num("intermediate_size")?,
        rope_theta,
        rope_scaling,
        norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        qkv_bias: kind == "qwen2",
        tie_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
        ..Default::default()
    })
}

/// Whether the model's head is its embedding (`tie_word_embeddings`).
fn tied(dir: &Path) -> Result<bool> {
    Ok(read_config(dir)?.1["tie_word_embeddings"]
        .as_bool()
        .unwrap_or(false))
}

/// The Llama-family weights in `dir` under rookery's names and layouts (see the module docs);
/// a tensor left over (another architecture's, or a layer too many) is refused by name.
pub fn to_rookery(dir: &Path, cfg: &LmConfig) -> Result<Tensors> {
    let mut hf = read_hf(dir)?;
    hf.retain(|k, _| !k.ends_with("rotary_emb.inv_freq")); // a stale buffer of older versions
    let name = dir.display().to_string();
    let mut need = |k: &str| {
        hf.remove(k)
            .with_context(|| format!("{name}: no tensor {k}"))
    };
    let mut out = Tensors::new();
    let embed = need("model.embed_tokens.weight")?;
    let head = match need("lm_head.weight") {
        Ok(h) => h,
        Err(_) if tied(dir)? => embed.clone(),
        Err(e) => return Err(e),
    };
    out.insert("wte.weight".into(), embed);
    out.insert("lm_head.weight".into(), transpose(head));
    out.insert("norm_f.Rms.gamma".into(), need("model.norm.weight")?);
    let (h, kv, hd) = (cfg.heads, cfg.kv(), cfg.head_dim());
    for n in 0..cfg.layers {
        let (src, dst) = (format!("model.layers.{n}"), format!("blocks.{n}.Llama"));
        let mut get = |tail: &str| need(&format!("{src}.{tail}"));
        let norms = [
            ("attn_norm.gamma", get("input_layernorm.weight")?),
            ("ffn_norm.gamma", get("post_attention_layernorm.weight")?),
        ];
        let linears = [
            ("out.weight", get("self_attn.o_proj.weight")?),
            ("gate.weight", get("mlp.gate_proj.weight")?),
            ("up.weight", get("mlp.up_proj.weight")?),
            ("down.weight", get("mlp.down_proj.weight")?),
        ];
        let q = interleave_rope(get("self_attn.q_proj.weight")?, h, hd, hd);
        let k = interleave_rope(get("self_attn.k_proj.weight")?, kv, hd, hd);
        let v = get("self_attn.v_proj.weight")?;
        let bias = match cfg.qkv_bias {
            true => {
                let qb = interleave_rope(as_rows(get("self_attn.q_proj.bias")?), h, hd, hd);
                let kb = interleave_rope(as_rows(get("self_attn.k_proj.bias")?), kv, hd, hd);
                let (_, data) = stack_rows([qb, kb, as_rows(get("self_attn.v_proj.bias")?)]);
                Some((vec![data.len()], data))
            }
            false => None,
        };
        for (to, t) in norms {
            out.insert(format!("{dst}.{to}"), t);
        }
        for (to, t) in linears {
            out.insert(format!("{dst}.{to}"), transpose(t));
        }
        out.insert(
            format!("{dst}.qkv.weight"),
            transpose(stack_rows([q, k, v])),
        );
        if let Some(b) = bias {
            out.insert(format!("{dst}.qkv.bias"), b);
        }
    }
    if !hf.is_empty() {
        let left: Vec<&String> = hf.keys().collect();
        bail!(
            "{name}: unexpected tensors for a {}-layer model: {left:?}",
            cfg.layers
        );
    }
    Ok(out)
}

/// A 1-d tensor as a column `[n, 1]` (for reordering rows).
pub(crate) fn as_rows((shape, data): (Vec<usize>, Vec<f32>)) -> (Vec<usize>, Vec<f32>) {
    (vec![shape[0], 1], data)
}

/// Rows of `parts` one after another.
pub(crate) fn stack_rows(parts: [(Vec<usize>, Vec<f32>); 3]) -> (Vec<usize>, Vec<f32>) {
    let cols = parts[0].0[1];
    let rows: usize = parts.iter().map(|p| p.0[0]).sum();
    let data = parts.into_iter().flat_map(|p| p.1).collect();
    (vec![rows, cols], data)
}

/// The rows of each of `heads` heads of width `d` reordered from HF's half-split rotary
/// layout to interleaved pairs over the `r` rotated leading rows of a head: HF row `i` goes
/// to `2i`, row `r/2 + i` to `2i + 1`; rows from `r` on stay.
pub(crate) fn interleave_rope(
    (shape, data): (Vec<usize>, Vec<f32>),
    heads: usize,
    d: usize,
    r: usize,
) -> (Vec<usize>, Vec<f32>) {
    let cols = shape[1];
    let mut out = data.clone();
    for h in 0..heads {
        for i in 0..r / 2 {
            for (from, to) in [(i, 2 * i), (r / 2 + i, 2 * i + 1)] {
                let (src, dst) = ((h * d + from) * cols, (h * d + to) * cols);
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    (shape, out)
}
