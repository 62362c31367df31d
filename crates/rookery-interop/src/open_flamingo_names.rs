//! The names OpenFlamingo gives a Flamingo's trained parts (`train_utils.
//! filter_state_dict_to_trainable`: what its `checkpoint.pt` holds), beside rookery's module
//! paths, in one table that the export ([`crate::open_flamingo_export`]) and the import
//! ([`crate::open_flamingo_import`]) both read:
//!
//! ```text
//! resampler.latents                          <-> perceiver.latents
//! resampler.frame_embs                       <-> perceiver.frame_embs (absent when untrained)
//! resampler.layers.N.{norm_media,norm_latents,to_q,to_kv,to_out}
//!                                            <-> perceiver.layers.N.0.{same}
//! resampler.layers.N.{ff_norm,ff_in,ff_out}  <-> perceiver.layers.N.1.{0,1,3}
//! resampler.norm                             <-> perceiver.norm
//! xattn.K (before decoder layer i)           <-> lang_encoder.<layers>.i.gated_cross_attn_layer.
//!     {attn_gate, ff_gate, norm -> attn.norm, to_q|to_kv|to_out -> attn.*, ff_norm|ff_in|ff_out -> ff.{0,1,3}}
//! lm.wte with the new rows                   <-> lang_encoder.<embed>.weight
//! ```
//!
//! `<layers>` / `<embed>`: `model.layers` / `model.embed_tokens` for Llama-style LMs,
//! `transformer.h` / `transformer.wte` for GPT-2, `gpt_neox.layers` / `gpt_neox.embed_in` for
//! GPT-NeoX, `transformer.blocks` / `transformer.wte` for MPT (OpenFlamingo's
//! `_infer_decoder_layers_attr_name` names the same). Linear weights
//! are `[out, in]` there, as PyTorch holds them, `[in, out]` here; LayerNorm's `weight`/`bias`
//! are `gamma`/`beta` here.

use rookery_model::flamingo::{FlamingoConfig, LmStyle};

/// How a tensor is laid out in OpenFlamingo's files relative to rookery's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Same,
    /// A Linear weight: `[out, in]` there, `[in, out]` here.
    Transposed,
}

/// One trained tensor: OpenFlamingo's name, rookery's module path, the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name {
    pub theirs: String,
    pub ours: String,
    pub layout: Layout,
}

/// The decoder-layer and embedding paths of the LM inside `lang_encoder`.
pub fn lm_paths(cfg: &FlamingoConfig) -> (&'static str, &'static str) {
    match cfg.lm.style {
        LmStyle::Gpt2 => ("transformer.h", "transformer.wte"),
        LmStyle::Llama => ("model.layers", "model.embed_tokens"),
        LmStyle::Neox => ("gpt_neox.layers", "gpt_neox.embed_in"),
        LmStyle::Mpt => ("transformer.blocks", "transformer.wte"),
    }
}

/// OpenFlamingo's name of the LM's (input) embedding table.
pub fn embedding(cfg: &FlamingoConfig) -> String {
    format!("lang_encoder.{}.weight", lm_paths(cfg).1)
}

/// OpenFlamingo's names of the LM's output embedding (its head): `lm_head`, and for GPT-NeoX
/// `embed_out` too (transformers 4.x's attribute, which checkpoints of that time carry).
pub fn head(cfg: &FlamingoConfig) -> &'static [&'static str] {
    match cfg.lm.style {
        LmStyle::Neox => &[
            "lang_encoder.embed_out.weight",
            "lang_encoder.lm_head.weight",
        ],
        LmStyle::Gpt2 | LmStyle::Llama | LmStyle::Mpt => &["lang_encoder.lm_head.weight"],
    }
}

struct Table(Vec<Name>);

impl Table {
    fn put(&mut self, theirs: String, ours: String, layout: Layout) {
        self.0.push(Name {
            theirs,
            ours,
            layout,
        });
    }
    fn linear(&mut self, theirs: String, ours: String) {
        self.put(
            format!("{theirs}.weight"),
            format!("{ours}.weight"),
            Layout::Transposed,
        );
    }
    fn norm(&mut self, theirs: String, ours: String) {
        let same = Layout::Same;
        self.put(format!("{theirs}.weight"), format!("{ours}.gamma"), same);
        self.put(format!("{theirs}.bias"), format!("{ours}.beta"), same);
    }
}

/// Every trained tensor but the embedding rows (see the module docs); `frame_embs` included.
pub fn trained(cfg: &FlamingoConfig) -> Vec<Name> {
    let mut t = Table(Vec::new());
    let same = Layout::Same;
    t.put("perceiver.latents".into(), "resampler.latents".into(), same);
    t.put(
        "perceiver.frame_embs".into(),
        "resampler.frame_embs".into(),
        same,
    );
    for n in 0..cfg.resampler.depth {
        let (p, o) = (
            format!("perceiver.layers.{n}"),
            format!("resampler.layers.{n}"),
        );
        t.norm(format!("{p}.0.norm_media"), format!("{o}.norm_media"));
        t.norm(format!("{p}.0.norm_latents"), format!("{o}.norm_latents"));
        for l in ["to_q", "to_kv", "to_out"] {
            t.linear(format!("{p}.0.{l}"), format!("{o}.{l}"));
        }
        t.norm(format!("{p}.1.0"), format!("{o}.ff_norm"));
        t.linear(format!("{p}.1.1"), format!("{o}.ff_in"));
        t.linear(format!("{p}.1.3"), format!("{o}.ff_out"));
    }
    t.norm("perceiver.norm".into(), "resampler.norm".into());
    let layers = lm_paths(cfg).0;
    let every = cfg.cross_attn_every_n_layers.max(1);
    let placed = (0..cfg.lm.layers).filter(|i| (i + 1) % every == 0);
    for (k, i) in placed.enumerate() {
        let (p, o) = (
            format!("lang_encoder.{layers}.{i}.gated_cross_attn_layer"),
            format!("xattn.{k}"),
        );
        for g in ["attn_gate", "ff_gate"] {
            t.put(format!("{p}.{g}"), format!("{o}.{g}"), same);
        }
        t.norm(format!("{p}.attn.norm"), format!("{o}.norm"));
        for l in ["to_q", "to_kv", "to_out"] {
            t.linear(format!("{p}.attn.{l}"), format!("{o}.{l}"));
        }
        t.norm(format!("{p}.ff.0"), format!("{o}.ff_norm"));
        t.linear(format!("{p}.ff.1"), format!("{o}.ff_in"));
        t.linear(format!("{p}.ff.3"), format!("{o}.ff_out"));
    }
    t.0
}
