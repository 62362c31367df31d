//! Checkpoints: a directory per save with the model (safetensors), optimizer state, trainer
//! state (step, samples seen, loader position), the resolved config and a manifest of SHA-256
//! hashes, and a copy of the tokenizer the run reads (token ids are only meaningful with it).
//! Written under a temporary name, fsynced, renamed; `latest` is replaced atomically
//! only after that, so a crash never leaves a broken `latest`. The last `keep` are kept.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::{AutodiffModule, Module};
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use rookery_data::LoaderPosition;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::RunConfig;
use crate::optim::PathIds;

/// `[checkpoint]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many steps (0: only at the end).
    pub every: usize,
    /// Checkpoints to keep.
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: 200,
            keep: 2,
        }
    }
}

/// What the trainer needs besides weights and optimizer state to continue exactly.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub samples_seen: u64,
    /// This rank's loader position (in memory only; checkpoints hold `loaders`).
    #[serde(skip)]
    pub loader: Option<LoaderPosition>,
    /// Every rank's loader position, in rank order.
    pub loaders: Vec<LoaderPosition>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    step: usize,
    files: Vec<(String, String)>,
}

const FILES: [&str; 4] = [
    "model.safetensors",
    "optim.bin",
    "state.json",
    "config.toml",
];

/// The tokenizer's copy inside a checkpoint (absent in checkpoints from before it was kept).
pub const TOKENIZER: &str = "tokenizer.json";

/// The tokenizer a checkpoint was trained with: its own copy, else the one its config names.
pub fn tokenizer_of(dir: &Path, cfg: &RunConfig) -> PathBuf {
    let own = dir.join(TOKENIZER);
    if own.is_file() {
        own
    } else {
        cfg.data.tokenizer.clone()
    }
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Saves a checkpoint for `state.step` and points `latest` at it.
pub fn save<B, M, O>(
    run_dir: &Path,
    cfg: &RunConfig,
    model: &M,
    optim: &O,
    state: &TrainState,
) -> Result<PathBuf>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let root = checkpoints_dir(run_dir);
    let name = format!("step-{:08}", state.step);
    let (tmp, dir) = (root.join(format!("{name}.tmp")), root.join(&name));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut store = SafetensorsStore::from_file(tmp.join("model.safetensors")).overwrite(true);
    model
        .valid()
        .save_into(&mut store)
        .context("writing model.safetensors")?;
    BinFileRecorder::<FullPrecisionSettings>::new()
        .record(optim.to_record(), tmp.join("optim"))
        .context("writing optimizer state")?;
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(state)?)?;
    std::fs::write(tmp.join("config.toml"), cfg.to_toml())?;
    let mut names: Vec<&str> = FILES.to_vec();
    if cfg.data.tokenizer.is_file() {
        std::fs::copy(&cfg.data.tokenizer, tmp.join(TOKENIZER))
            .with_context(|| format!("copying {}", cfg.data.tokenizer.display()))?;
        names.push(TOKENIZER);
    }
    let files = names
        .iter()
        .map(|f| Ok((f.to_string(), sha256(&tmp.join(f))?)))
        .collect::<Result<Vec<_>>>()?;
    std::fs::write(
        tmp.join("manifest.json"),
        serde_json::to_vec_pretty(&Manifest {
            step: state.step,
            files,
        })?,
    )?;
    for f in names.iter().chain(&["manifest.json"]) {
        File::open(tmp.join(f))?.sync_all()?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    File::open(&root)?.sync_all()?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    prune(&root, cfg.checkpoint.keep.max(1))?;
    Ok(dir)
}

/// The directory `latest` names, if any.
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    let root = checkpoints_dir(run_dir);
    let name = std::fs::read_to_string(root.join("latest")).ok()?;
    Some(root.join(name.trim()))
}

/// Loads a checkpoint directory into `model` and `optim` after verifying its manifest, and
/// refuses one whose model shape or data differs from `cfg`, naming both values.
pub fn load<B, M, O>(
    dir: &Path,
    cfg: &RunConfig,
    model: M,
    optim: O,
    device: &B::Device,
) -> Result<(M, O, TrainState)>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    verify(dir)?;
    let saved = RunConfig::load(&dir.join("config.toml"), &[])
        .with_context(|| format!("{}: config.toml", dir.display()))?;
    if saved.train.stage != cfg.train.stage {
        bail!(
            "checkpoint {} is of stage {:?}, the config's train.stage is {:?}",
            dir.display(),
            saved.train.stage,
            cfg.train.stage
        );
    }
    // Patch dropout is how the image tower is trained, not what it is: a run may resume with
    // another rate, or without it (FLIP's unmasked tuning at the end). Length buckets are how
    // the text tower is run, with the same features.
    let shape = |m: &rookery_model::ClipConfig| {
        let mut m = m.clone();
        m.vision.patch_dropout = 0.0;
        m.text.length_buckets = 1;
        m
    };
    if shape(&saved.model) != shape(&cfg.model)
        || saved.lm != cfg.lm
        || saved.flamingo != cfg.flamingo
    {
        bail!("checkpoint {} was trained with a different model: checkpoint [model] {:?} [lm] {:?} [flamingo] {:?}, config [model] {:?} [lm] {:?} [flamingo] {:?}", dir.display(), saved.model, saved.lm, saved.flamingo, cfg.model, cfg.lm, cfg.flamingo);
    }
    if saved.data.train != cfg.data.train || saved.data.seed != cfg.data.seed {
        bail!(
            "checkpoint {} was trained on different data: checkpoint data.train = {:?} (seed {}), config data.train = {:?} (seed {})",
            dir.display(), saved.data.train, saved.data.seed, cfg.data.train, cfg.data.seed
        );
    }
    let own = dir.join(TOKENIZER);
    if own.is_file()
        && std::fs::read(&own)? != std::fs::read(&cfg.data.tokenizer).unwrap_or_default()
    {
        bail!(
            "checkpoint {} was trained with the tokenizer copied in {}, which differs from data.tokenizer = {}: token ids would not match",
            dir.display(), own.display(), cfg.data.tokenizer.display()
        );
    }
    let model = load_weights(model, &dir.join("model.safetensors"))?;
    let record = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(dir.join("optim"), device)
        .context("reading optimizer state")?;
    let optim = optim.load_record(record);
    let state: TrainState = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)
        .context("reading state.json")?;
    Ok((model, optim, state))
}

/// Loads safetensors weights into `model` strictly (every tensor present, shapes checked), then
/// restores the path-derived parameter ids that optimizer state is keyed by.
pub fn load_weights<B: burn::prelude::Backend, M: Module<B>>(model: M, path: &Path) -> Result<M> {
    load_store(model, &mut SafetensorsStore::from_file(path), path)
}

/// `load_from` through `store`, refusing missing tensors and shape errors, then path ids.
pub(crate) fn load_store<B: burn::prelude::Backend, M: Module<B>>(
    mut model: M,
    store: &mut SafetensorsStore,
    path: &Path,
) -> Result<M> {
    let res = model
        .load_from(store)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if !res.errors.is_empty() || !res.missing.is_empty() {
        bail!(
            "{}: missing {:?}, errors {:?}",
            path.display(),
            res.missing,
            res.errors
        );
    }
    Ok(model.map(&mut PathIds::default()))
}

fn verify(dir: &Path) -> Result<()> {
    let text = std::fs::read(dir.join("manifest.json")).with_context(|| {
        format!(
            "{}: no manifest.json (incomplete checkpoint?)",
            dir.display()
        )
    })?;
    let m: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{}: manifest.json", dir.display()))?;
    for (f, want) in &m.files {
        let got = sha256(&dir.join(f)).with_context(|| format!("{}: {f}", dir.display()))?;
        if &got != want {
            bail!(
                "checkpoint {} is corrupt: {f} has SHA-256 {got}, manifest says {want}",
                dir.display()
            );
        }
    }
    Ok(())
}

fn sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name().is_some_and(|n| {
                    n.to_string_lossy().starts_with("step-")
                        && !n.to_string_lossy().ends_with(".tmp")
                })
        })
        .collect();
    dirs.sort();
    let n = dirs.len().saturating_sub(keep);
    for d in &dirs[..n] {
        std::fs::remove_dir_all(d)?;
    }
    Ok(())
}
