//! HF transformers' `GPTNeoXForCausalLM` (`model_type = "gpt_neox"`: Pythia, RedPajama-INCITE,
//! the LM of OpenFlamingo-4B): `config.json` mapped to an [`LmConfig`] of style `neox`, and the
//! weights renamed into rookery's [`LanguageModel`](rookery_model::flamingo::LanguageModel):
//!
//! ```text
//! gpt_neox.embed_in.weight                              -> wte.weight
//! gpt_neox.layers.N.input_layernorm.{weight,bias}       -> blocks.N.Neox.ln_1.{gamma,beta}
//! gpt_neox.layers.N.attention.query_key_value.*         -> blocks.N.Neox.qkv.*  (repacked)
//! gpt_neox.layers.N.attention.dense.*                   -> blocks.N.Neox.out.*
//! gpt_neox.layers.N.post_attention_layernorm.*          -> blocks.N.Neox.ln_2.*
//! gpt_neox.layers.N.mlp.dense_h_to_4h.*                 -> blocks.N.Neox.mlp.c_fc.*
//! gpt_neox.layers.N.mlp.dense_4h_to_h.*                 -> blocks.N.Neox.mlp.c_proj.*
//! gpt_neox.final_layer_norm.*                           -> norm_f.Layer.*
//! embed_out.weight                                      -> lm_head.weight
//! ```
//!
//! HF packs `query_key_value`'s output rows head by head (`[q, k, v]` of head 0, then of head
//! 1, ...); rookery packs all query heads, then all key heads, then all value heads, and pairs
//! RoPE's dimensions as burn does (adjacent, not half-split: [`crate::hf_llama`] explains the
//! reordering, here over the rotated leading `rotary_dim` rows of each head only). Matrices are
//! transposed to burn's `[in, out]`. Both generations of config are read: transformers 5.x's
//! `rope_parameters` and the hub files' `rotary_pct` / `rotary_emb_base`. The causal-mask and
//! frequency buffers older versions saved (`attention.bias`, `attention.masked_bias`,
//! `attention.rotary_emb.inv_freq`) are skipped.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rookery_model::flamingo::{LmConfig, LmStyle};
use rookery_model::layers::Act;
use serde_json::Value;

use crate::hf_config::HfConfig;
use crate::hf_llama::{as_rows, interleave_rope};
use crate::tensors::{read_hf, transpose, Tensors};

/// The `model_type` of these models.
pub const MODEL_TYPE: &str = "gpt_neox";

/// RoPE's base and rotated share from either generation of config (transformers 4.x's
/// defaults: base 10000, a quarter rotated).
fn rope(path: &Path, v: &Value) -> Result<(f64, f64)> {
    let p = &v["rope_parameters"];
    let kind = p["rope_type"].as_str().unwrap_or("default");
    let scaled = v["rope_scaling"].is_object() && !v["rope_scaling"].is_null();
    if kind != "default" || scaled {
        bail!(
            "{}: RoPE scaling ({kind:?} / rope_scaling): rookery's neox blocks use plain RoPE",
            path.display()
        );
    }
    let theta = p["rope_theta"]
        .as_f64()
        .or(v["rotary_emb_base"].as_f64())
        .unwrap_or(10000.0);
    let share = p["partial_rotary_factor"]
        .as_f64()
        .or(v["rotary_pct"].as_f64())
        .unwrap_or(0.25);
    Ok((theta, share))
}

/// The [`LmConfig`] of the GPT-NeoX model in `dir`.
pub fn config(dir: &Path) -> Result<LmConfig> {
    let c = HfConfig::read(dir, MODEL_TYPE)?;
    let (path, v, num) = (&c.path, &c.v, |k: &str| c.num(k));
    if v["attention_bias"].as_bool() == Some(false) {
        bail!(
            "{}: attention_bias = false: rookery's neox blocks have attention biases",
            path.display()
        );
    }
    let act = match v["hidden_act"].as_str().unwrap_or("gelu") {
        "gelu" => Act::Gelu,
        "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => Act::GeluTanh,
        other => bail!("{}: hidden_act {other:?}: not supported", path.display()),
    };
    let (rope_theta, rotary_pct) = rope(path, v)?;
    let width = num("hidden_size")?;
    let hidden = num("intermediate_size")?;
    let cfg = LmConfig {
        vocab_size: num("vocab_size")?,
        context_length: num("max_position_embeddings")?,
        width,
        layers: num("num_hidden_layers")?,
        heads: num("num_attention_heads")?,
        mlp_ratio: hidden as f64 / width as f64,
        style: LmStyle::Neox,
        hidden,
        rope_theta,
        rotary_pct,
        parallel_residual: v["use_parallel_residual"].as_bool().unwrap_or(true),
        norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-5),
        act,
        tie_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
        ..Default::default()
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

/// The GPT-NeoX weights in `dir` under rookery's names and layouts (see the module docs); a
/// tensor left over is refused by name.
pub fn to_rookery(dir: &Path, cfg: &LmConfig) -> Result<Tensors> {
    let mut hf = read_hf(dir)?;
    hf.retain(|k, _| {
        !(k.ends_with("attention.bias")
            || k.ends_with("attention.masked_bias")
            || k.ends_with("rotary_emb.inv_freq"))
    });
    let name = dir.display().to_string();
    let mut need = |k: &str| {
        hf.remove(k)
            .with_context(|| format!("{name}: no tensor {k}"))
    };
    let mut out = Tensors::new();
    let embed = need("gpt_neox.embed_in.weight")?;
    let head = match need("embed_out.weight") {
        Ok(h) => h,
        Err(_) if cfg.tie_embeddings => embed.clone(),
        Err(e) => return Err(e),
    };
    out.insert("wte.weight".into(), embed);
    out.insert("lm_head.weight".into(), transpose(head));
    let (h, hd, r) = (cfg.heads, cfg.head_dim(), cfg.rotary_dim());
    let mut put = |to: String, t| out.insert(to, t);
    for (to, from) in [("gamma", "weight"), ("beta", "bias")] {
        put(
            format!("norm_f.Layer.{to}"),
            need(&format!("gpt_neox.final_layer_norm.{from}"))?,
        );
    }
    for n in 0..cfg.layers {
        let (src, dst) = (format!("gpt_neox.layers.{n}"), format!("blocks.{n}.Neox"));
        let mut get = |tail: &str| need(&format!("{src}.{tail}"));
        for (to, from) in [
            ("ln_1", "input_layernorm"),
            ("ln_2", "post_attention_layernorm"),
        ] {
            put(format!("{dst}.{to}.gamma"), get(&format!("{from}.weight"))?);
            put(format!("{dst}.{to}.beta"), get(&format!("{from}.bias"))?);
        }
        for (to, from) in [
            ("out", "attention.dense"),
            ("mlp.c_fc", "mlp.dense_h_to_4h"),
            ("mlp.c_proj", "mlp.dense_4h_to_h"),
        ] {
            put(
                format!("{dst}.{to}.weight"),
                transpose(get(&format!("{from}.weight"))?),
            );
            put(format!("{dst}.{to}.bias"), get(&format!("{from}.bias"))?);
        }
        let w = repack_qkv(get("attention.query_key_value.weight")?, h, hd, r);
        put(format!("{dst}.qkv.weight"), transpose(w));
        let (_, b) = repack_qkv(as_rows(get("attention.query_key_value.bias")?), h, hd, r);
        put(format!("{dst}.qkv.bias"), (vec![b.len()], b));
    }
    if !hf.is_empty() {
        let left: Vec<&String> = hf.keys().collect();
        bail!(
            "{name}: unexpected tensors for a {}-layer GPT-NeoX: {left:?}",
            cfg.layers
        );
    }
    Ok(out)
}

/// `query_key_value`'s rows `[heads * 3 * d, cols]` (per head: its query, key, value rows)
/// as rookery packs them: every head's query rows, then key rows, then value rows, the query
/// and key rows' rotated dimensions paired as burn's RoPE pairs them.
fn repack_qkv(
    (shape, data): (Vec<usize>, Vec<f32>),
    heads: usize,
    d: usize,
    r: usize,
) -> (Vec<usize>, Vec<f32>) {
    let cols = shape[1];
    let part = |p: usize| -> (Vec<usize>, Vec<f32>) {
        let rows = (0..heads).flat_map(|h| {
            let start = (h * 3 + p) * d * cols;
            data[start..start + d * cols].iter().copied()
        });
        (vec![heads * d, cols], rows.collect())
    };
    let (q, k, v) = (part(0), part(1), part(2));
    let (q, k) = (
        interleave_rope(q, heads, d, r),
        interleave_rope(k, heads, d, r),
    );
    let data = [q.1, k.1, v.1].concat();
    (vec![3 * heads * d, cols], data)
}
