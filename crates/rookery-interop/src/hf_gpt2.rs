//! HF transformers' `GPT2LMHeadModel` (`model_type = "gpt2"`): `config.json` mapped to an
//! [`LmConfig`] of style `gpt2` with GELU's tanh form (`gelu_new`), and the weights renamed
//! into rookery's [`LanguageModel`](rookery_model::flamingo::LanguageModel):
//!
//! ```text
//! transformer.wte.weight, transformer.wpe.weight    -> wte.weight, wpe.weight
//! transformer.h.N.ln_1.{weight,bias}                -> blocks.N.Gpt2.ln_1.{gamma,beta}
//! transformer.h.N.attn.c_attn.{weight,bias}         -> blocks.N.Gpt2.attn.in_proj.{weight,bias}
//! transformer.h.N.attn.c_proj.{weight,bias}         -> blocks.N.Gpt2.attn.out_proj.{weight,bias}
//! transformer.h.N.ln_2.*                            -> blocks.N.Gpt2.ln_2.*
//! transformer.h.N.mlp.{c_fc,c_proj}.{weight,bias}   -> blocks.N.Gpt2.mlp.{c_fc,c_proj}.*
//! transformer.ln_f.*                                -> norm_f.Layer.*
//! lm_head.weight (absent: tied to wte)              -> lm_head.weight
//! ```
//!
//! GPT-2's `Conv1D` weights are `[in, out]`, burn's `Linear` layout: they are taken as they
//! are, q/k/v packed in `c_attn`'s columns as rookery packs `in_proj`. Keys may lack the
//! `transformer.` prefix (`GPT2Model` files); the causal-mask buffers older versions saved
//! (`attn.bias`, `attn.masked_bias`) are skipped.

use std::path::Path;

use crate::hf_config::HfConfig;
use crate::tensors::{read_hf, transpose, Tensors};
use anyhow::{bail, Context, Result};
use rookery_model::flamingo::LmConfig;
use rookery_model::layers::Act;

/// The `model_type` of these models.
pub const MODEL_TYPE: &str = "gpt2";

/// The [`LmConfig`] of the GPT-2 model in `dir`.
pub fn config(dir: &Path) -> Result<LmConfig> {
    let c = HfConfig::read(dir, MODEL_TYPE)?;
    let (path, v) = (&c.path, &c.v);
    let num = |k: &str, d: u64| v[k].as_u64().unwrap_or(d) as usize;
    let act = match v["activation_function"].as_str().unwrap_or("gelu_new") {
        "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
        "gelu" => Act::Gelu,
        other => bail!("{}: activation_function {other:?}", path.display()),
    };
    let eps = v["layer_norm_epsilon"].as_f64().unwrap_or(1e-5);
    let by_layer = v["scale_attn_by_inverse_layer_idx"].as_bool() == Some(true);
    if (eps - 1e-5).abs() > 1e-12 || by_layer || v["scale_attn_weights"].as_bool() == Some(false) {
        bail!(
            "{}: layer_norm_epsilon {eps} / attention scaling other than GPT-2's: not supported",
            path.display()
        );
    }
    let width = num("n_embd", 768);
    let hidden = match v["n_inner"].as_u64() {
        Some(n) => n as usize,
        None => 4 * width,
    };
    Ok(LmConfig {
        vocab_size: num("vocab_size", 50257),
        context_length: num("n_positions", 1024),
        width,
        layers: num("n_layer", 12),
        heads: num("n_head", 12),
        mlp_ratio: hidden as f64 / width as f64,
        style: rookery_model::flamingo::LmStyle::Gpt2,
        act,
        tie_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(true),
        ..Default::default()
    })
}

/// The GPT-2 weights in `dir` under rookery's names (see the module docs).
pub fn to_rookery(dir: &Path, cfg: &LmConfig) -> Result<Tensors> {
    let path = dir;
    let mut hf: Tensors = read_hf(dir)?
        .into_iter()
        .filter(|(k, _)| !k.ends_with(".attn.bias") && !k.ends_with(".attn.masked_bias"))
        .map(|(k, t)| match k.strip_prefix("transformer.") {
            Some(rest) => (rest.to_string(), t),
            None => (k, t),
        })
        .collect();
    let name = path.display().to_string();
    let mut need = |k: &str| {
        hf.remove(k)
            .with_context(|| format!("{name}: no tensor {k}"))
    };
    let mut out = Tensors::new();
    let wte = need("wte.weight")?;
    let head = need("lm_head.weight").unwrap_or_else(|_| wte.clone());
    out.insert("lm_head.weight".into(), transpose(head));
    out.insert("wte.weight".into(), wte);
    out.insert("wpe.weight".into(), need("wpe.weight")?);
    let ln = |to: &str, from: &str, need: &mut dyn FnMut(&str) -> Result<_>| -> Result<_> {
        Ok([
            (format!("{to}.gamma"), need(&format!("{from}.weight"))?),
            (format!("{to}.beta"), need(&format!("{from}.bias"))?),
        ])
    };
    out.extend(ln("norm_f.Layer", "ln_f", &mut need)?);
    for n in 0..cfg.layers {
        let (src, dst) = (format!("h.{n}"), format!("blocks.{n}.Gpt2"));
        for l in ["ln_1", "ln_2"] {
            out.extend(ln(&format!("{dst}.{l}"), &format!("{src}.{l}"), &mut need)?);
        }
        for (from, to) in [
            ("attn.c_attn", "attn.in_proj"),
            ("attn.c_proj", "attn.out_proj"),
            ("mlp.c_fc", "mlp.c_fc"),
            ("mlp.c_proj", "mlp.c_proj"),
        ] {
            for p in ["weight", "bias"] {
                out.insert(
                    format!("{dst}.{to}.{p}"),
                    need(&format!("{src}.{from}.{p}"))?,
                );
            }
        }
    }
    if !hf.is_empty() {
        let left: Vec<&String> = hf.keys().collect();
        bail!(
            "{name}: unexpected tensors for a {}-layer GPT-2: {left:?}",
            cfg.layers
        );
    }
    Ok(out)
}
