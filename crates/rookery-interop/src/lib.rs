//! rookery-interop: weights and configs in other projects' formats, in and out, one module per
//! format. rookery-train keeps the loop and its own checkpoints; everything that reads or
//! writes another project's files is here.
//!
//! - [`open_clip`]: open_clip's key names and layouts (rookery's export, `open_clip_model.safetensors`);
//!   [`open_clip_config`]: its model config;
//! - [`hf_clip`]: HF transformers' `CLIPModel` read in; [`hf_clip_export`]: written out;
//! - [`hf_llama`], [`hf_gpt2`], [`hf_neox`], [`hf_mpt`]: HF causal LMs read in;
//!   [`open_flamingo`]: the tokenizer and vocabulary OpenFlamingo builds on such an LM;
//!   [`open_flamingo_export`] / [`open_flamingo_import`]: a Flamingo's trained parts under
//!   OpenFlamingo's names ([`open_flamingo_names`]), out and in;
//! - [`store`]: strict, reproducible safetensors through burn-store; [`cast`]: dtype casts;
//!   [`tensors`]: named f32 tensors in memory, where one layout is renamed into another.
//!
//! [`load_clip`] takes any CLIP directory rookery reads, found by [`detect_clip`].

pub mod cast;
pub mod hf_clip;
pub mod hf_clip_export;
mod hf_config;
pub mod hf_gpt2;
pub mod hf_llama;
pub mod hf_mpt;
pub mod hf_neox;
pub mod hf_siglip;
pub mod open_clip;
pub mod open_clip_config;
pub mod open_flamingo;
pub mod open_flamingo_export;
pub mod open_flamingo_import;
pub mod open_flamingo_names;
pub mod store;
pub mod tensors;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::prelude::Backend;
use burn_store::SafetensorsStore;
use rookery_model::{Clip, ClipConfig};

/// The HF causal-LM families rookery reads, each through its importer.
#[derive(Clone, Copy)]
enum LmFamily {
    Gpt2,
    Neox,
    Mpt,
    Llama,
}

impl LmFamily {
    /// The family of `dir` by its `config.json`'s `model_type`; another type is refused naming
    /// those rookery reads. Without a readable `model_type`, Llama's reader says what is wrong.
    fn of(dir: &Path) -> Result<Self> {
        Ok(match model_type(dir).as_deref() {
            Some(hf_gpt2::MODEL_TYPE) => LmFamily::Gpt2,
            Some(hf_neox::MODEL_TYPE) => LmFamily::Neox,
            Some(hf_mpt::MODEL_TYPE) => LmFamily::Mpt,
            Some(t) if !hf_llama::MODEL_TYPES.contains(&t) => bail!(
                "{}: model_type {t:?}: rookery reads the causal LMs {:?}, {:?}, {:?} and {:?}",
                dir.join("config.json").display(),
                hf_gpt2::MODEL_TYPE,
                hf_neox::MODEL_TYPE,
                hf_mpt::MODEL_TYPE,
                hf_llama::MODEL_TYPES
            ),
            _ => LmFamily::Llama,
        })
    }
}

/// The [`LmConfig`](rookery_model::flamingo::LmConfig) of the HF causal LM in `dir`: GPT-2
/// ([`hf_gpt2`]), GPT-NeoX ([`hf_neox`]), MPT ([`hf_mpt`]) or Llama-family ([`hf_llama`]).
pub fn lm_config(dir: &Path) -> Result<rookery_model::flamingo::LmConfig> {
    match LmFamily::of(dir)? {
        LmFamily::Gpt2 => hf_gpt2::config(dir),
        LmFamily::Neox => hf_neox::config(dir),
        LmFamily::Mpt => hf_mpt::config(dir),
        LmFamily::Llama => hf_llama::config(dir),
    }
}

/// The weight files of the HF model in `dir` ([`tensors::hf_weight_files`]).
pub fn lm_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    tensors::hf_weight_files(dir)
}

/// `config.json`'s `model_type` in `dir`, if it has one.
pub fn model_type(dir: &Path) -> Option<String> {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["model_type"].as_str().map(str::to_string))
}

/// Whether `dir` holds an HF causal LM rookery reads (by its `model_type`).
pub fn is_lm(dir: &Path) -> bool {
    model_type(dir).is_some() && LmFamily::of(dir).is_ok()
}

/// Loads the HF causal LM in `dir` (any [`lm_config`] reads) into `model` (built from
/// [`lm_config`], its `vocab_size` perhaps raised for added tokens:
/// [`open_flamingo::grow_vocab`]), strictly.
pub fn load_lm<B: Backend>(
    model: rookery_model::flamingo::LanguageModel<B>,
    dir: &Path,
    cfg: &rookery_model::flamingo::LmConfig,
) -> Result<rookery_model::flamingo::LanguageModel<B>> {
    let mut tensors = match LmFamily::of(dir)? {
        LmFamily::Gpt2 => hf_gpt2::to_rookery(dir, cfg)?,
        LmFamily::Neox => hf_neox::to_rookery(dir, cfg)?,
        LmFamily::Mpt => hf_mpt::to_rookery(dir, cfg)?,
        LmFamily::Llama => hf_llama::to_rookery(dir, cfg)?,
    };
    open_flamingo::grow_vocab(&mut tensors, cfg.vocab_size)?;
    let mut store = SafetensorsStore::from_bytes(Some(tensors::to_bytes(&tensors)?));
    store::load_strict(model, &mut store, dir)
}

/// Whether `dir` holds an HF SigLIP (`config.json` `model_type` in [`hf_siglip::MODEL_TYPES`]).
pub fn is_siglip(dir: &Path) -> bool {
    model_type(dir).is_some_and(|t| hf_siglip::MODEL_TYPES.contains(&t.as_str()))
}

/// The kinds of CLIP directory rookery reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClipFormat {
    /// `rookery export`: `open_clip_model.safetensors` + `config.json` with `rookery_model`.
    Rookery,
    /// open_clip: `open_clip_model.safetensors` + the model config file named here
    /// (`open_clip_config.json`, or the only other `*.json` beside the weights).
    OpenClip(PathBuf),
    /// HF transformers `CLIPModel`: `config.json` with `model_type = "clip"`, and its weights
    /// ([`tensors::hf_weight_files`]).
    Hf,
}

/// What kind of CLIP directory `dir` is, from its file names and `config.json`'s `model_type`;
/// an error naming the directory and what was looked for otherwise.
pub fn detect_clip(dir: &Path) -> Result<ClipFormat> {
    let config = dir.join("config.json");
    let model_type = std::fs::read(&config)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    if let Some(v) = &model_type {
        if v.get("rookery_model").is_some() {
            return Ok(ClipFormat::Rookery);
        }
        match v["model_type"].as_str() {
            Some("clip") => return Ok(ClipFormat::Hf),
            Some(other) if !other.is_empty() => bail!(
                "{}: config.json says model_type = {other:?}; rookery reads HF CLIP (\"clip\") here",
                dir.display()
            ),
            _ => {}
        }
    }
    if dir.join(open_clip::WEIGHTS).is_file() || open_clip::pickle(dir).is_some() {
        let named = dir.join("open_clip_config.json");
        if named.is_file() {
            return Ok(ClipFormat::OpenClip(named));
        }
        let jsons: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        if let [one] = &jsons[..] {
            return Ok(ClipFormat::OpenClip(one.clone()));
        }
    }
    bail!(
        "{}: not a CLIP directory rookery reads: expected `rookery export` output (config.json with rookery_model), open_clip ({} or open_clip_pytorch_model.bin, with open_clip_config.json) or HF CLIPModel (config.json with model_type \"clip\")",
        dir.display(),
        open_clip::WEIGHTS
    )
}

/// The model config of the CLIP directory `dir`.
pub fn clip_config(dir: &Path) -> Result<ClipConfig> {
    match detect_clip(dir)? {
        ClipFormat::Rookery => open_clip::exported_config(dir),
        ClipFormat::OpenClip(config) => open_clip_config::config(&config),
        ClipFormat::Hf => hf_clip::config(dir),
    }
}

/// Loads the CLIP directory `dir` into `model` (built from [`clip_config`], or with the same
/// shapes), strictly: every tensor present with its shape, nothing left over, values finite.
pub fn load_clip<B: Backend>(model: Clip<B>, dir: &Path) -> Result<Clip<B>> {
    match detect_clip(dir)? {
        ClipFormat::OpenClip(_) if !dir.join(open_clip::WEIGHTS).is_file() => {
            let path = open_clip::pickle(dir).expect("detected");
            let bytes = tensors::to_bytes(&tensors::read_pytorch_f32(&path)?)?;
            let mut store = open_clip::reader(SafetensorsStore::from_bytes(Some(bytes)));
            store::load_strict(model, &mut store, &path)
        }
        ClipFormat::Rookery | ClipFormat::OpenClip(_) => open_clip::load_exported(model, dir),
        ClipFormat::Hf => {
            let renamed = hf_clip::to_open_clip(dir)?;
            let mut store = open_clip::reader(SafetensorsStore::from_bytes(Some(
                tensors::to_bytes(&renamed)?,
            )));
            let files = tensors::hf_weight_files(dir)?;
            let named = match &files[..] {
                [one] => one.clone(),
                _ => dir.to_path_buf(),
            };
            store::load_strict(model, &mut store, &named)
        }
    }
}
