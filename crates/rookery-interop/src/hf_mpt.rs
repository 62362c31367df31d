//! HF transformers' `MptForCausalLM` (`model_type = "mpt"`: MosaicML's MPT-7B and its kin, the
//! LM of OpenFlamingo-9B): `config.json` mapped to an [`LmConfig`] of style `mpt`, and the
//! weights renamed into rookery's [`LanguageModel`](rookery_model::flamingo::LanguageModel).
//! MosaicML's own remote-code checkpoints use the same names:
//!
//! ```text
//! transformer.wte.weight                        -> wte.weight (and the tied head)
//! transformer.blocks.N.norm_1.weight            -> blocks.N.Mpt.ln_1.gamma
//! transformer.blocks.N.attn.Wqkv.weight         -> blocks.N.Mpt.qkv.weight
//! transformer.blocks.N.attn.out_proj.weight     -> blocks.N.Mpt.out.weight
//! transformer.blocks.N.norm_2.weight            -> blocks.N.Mpt.ln_2.gamma
//! transformer.blocks.N.ffn.up_proj.weight       -> blocks.N.Mpt.mlp.c_fc.weight
//! transformer.blocks.N.ffn.down_proj.weight     -> blocks.N.Mpt.mlp.c_proj.weight
//! transformer.norm_f.weight                     -> norm_f.Layer.gamma
//! ```
//!
//! Matrices are transposed to burn's `[in, out]`; `Wqkv` packs all query heads, then the keys,
//! then the values, as rookery does. Options rookery's block lacks are refused by name: learned
//! positions instead of ALiBi, `clip_qkv`, `qk_ln`, a prefix LM, a softmax scale of its own,
//! biases, `logit_scale`.

use std::path::Path;

use crate::hf_config::HfConfig;
use crate::tensors::{read_hf, transpose, Tensors};
use anyhow::{bail, Context, Result};
use rookery_model::flamingo::{LmConfig, LmStyle};
use rookery_model::layers::Act;

/// The `model_type` of these models.
pub const MODEL_TYPE: &str = "mpt";

/// The [`LmConfig`] of the MPT model in `dir`.
pub fn config(dir: &Path) -> Result<LmConfig> {
    let c = HfConfig::read(dir, MODEL_TYPE)?;
    let (path, v, num) = (&c.path, &c.v, |k: &str| c.num(k));
    let a = &v["attn_config"];
    let refused = [
        (
            a["alibi"].as_bool() == Some(false),
            "attn_config.alibi = false (learned positions)",
        ),
        (!a["clip_qkv"].is_null(), "attn_config.clip_qkv"),
        (a["qk_ln"].as_bool() == Some(true), "attn_config.qk_ln"),
        (
            a["prefix_lm"].as_bool() == Some(true),
            "attn_config.prefix_lm",
        ),
        (!a["softmax_scale"].is_null(), "attn_config.softmax_scale"),
        (v["no_bias"].as_bool() == Some(false), "no_bias = false"),
        (!v["logit_scale"].is_null(), "logit_scale"),
    ];
    if let Some((_, what)) = refused.iter().find(|r| r.0) {
        bail!(
            "{}: {what}: not supported by rookery's mpt blocks",
            path.display()
        );
    }
    let width = num("d_model")?;
    let hidden = width * v["expansion_ratio"].as_u64().unwrap_or(4) as usize;
    let cfg = LmConfig {
        vocab_size: num("vocab_size")?,
        context_length: num("max_seq_len")?,
        width,
        layers: num("n_layers")?,
        heads: num("n_heads")?,
        mlp_ratio: hidden as f64 / width as f64,
        style: LmStyle::Mpt,
        hidden,
        alibi_bias_max: a["alibi_bias_max"].as_f64().unwrap_or(8.0),
        norm_eps: v["layer_norm_epsilon"].as_f64().unwrap_or(1e-5),
        act: Act::Gelu,
        tie_embeddings: true,
        ..Default::default()
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

/// The MPT weights in `dir` under rookery's names and layouts (see the module docs); a tensor
/// left over is refused by name.
pub fn to_rookery(dir: &Path, cfg: &LmConfig) -> Result<Tensors> {
    let mut hf = read_hf(dir)?;
    let name = dir.display().to_string();
    let mut need = |k: &str| {
        hf.remove(k)
            .with_context(|| format!("{name}: no tensor {k}"))
    };
    let mut out = Tensors::new();
    let wte = need("transformer.wte.weight")?;
    // The head is the embedding; a file that also holds it (HF's tied `lm_head`) agrees.
    out.insert("lm_head.weight".into(), transpose(wte.clone()));
    out.insert("wte.weight".into(), wte);
    out.insert(
        "norm_f.Layer.gamma".into(),
        need("transformer.norm_f.weight")?,
    );
    for n in 0..cfg.layers {
        let (src, dst) = (format!("transformer.blocks.{n}"), format!("blocks.{n}.Mpt"));
        for (to, from) in [("ln_1", "norm_1"), ("ln_2", "norm_2")] {
            out.insert(
                format!("{dst}.{to}.gamma"),
                need(&format!("{src}.{from}.weight"))?,
            );
        }
        for (to, from) in [
            ("qkv", "attn.Wqkv"),
            ("out", "attn.out_proj"),
            ("mlp.c_fc", "ffn.up_proj"),
            ("mlp.c_proj", "ffn.down_proj"),
        ] {
            let w = need(&format!("{src}.{from}.weight"))?;
            out.insert(format!("{dst}.{to}.weight"), transpose(w));
        }
    }
    hf.remove("lm_head.weight");
    if !hf.is_empty() {
        let left: Vec<&String> = hf.keys().collect();
        bail!(
            "{name}: unexpected tensors for a {}-layer MPT: {left:?}",
            cfg.layers
        );
    }
    Ok(out)
}
