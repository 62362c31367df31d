//! Checkpoints: a directory per save with the model (safetensors), optimizer state, trainer
//! state (step, samples seen, loader position), the resolved config and a manifest of SHA-256
//! hashes, and a copy of the tokenizer the run reads (token ids are only meaningful with it).
//! Written under a temporary name, fsynced, renamed; `latest` is replaced atomically
//! only after that, so a crash never leaves a broken `latest`. The last `keep` are kept, and
//! never the one `latest` names. Every reader ([`resolve`], [`load`]) verifies the manifest.

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
use crate::trainer::TrainStage;

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
    /// Steps whose update was skipped for a non-finite loss or gradient.
    #[serde(default)]
    pub skipped_steps: u64,
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

/// The step checkpoints under `root` (`step-N`, not the `.tmp` of an unfinished save), sorted.
fn step_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with("step-") && !n.ends_with(".tmp")
                })
        })
        .collect();
    dirs.sort();
    dirs
}

/// Removes what an interrupted save left (`step-N.tmp`, `latest.tmp`), saying so: nothing in
/// them is a checkpoint (`latest` only ever names renamed, complete ones).
pub fn remove_unfinished(run_dir: &Path) -> Result<()> {
    let root = checkpoints_dir(run_dir);
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "tmp") {
            tracing::warn!(path = %p.display(), "removing what an interrupted checkpoint save left");
            let res = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            res.with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Makes `run_dir` ready for a run: what an interrupted save left is removed; a directory that
/// holds checkpoints is refused unless the run resumes from them or `overwrite` deletes the
/// earlier run's files (checkpoints, metrics, plot, config) first (a fresh run would otherwise write `step-500` beside an older run's `step-2600`,
/// and pruning by step would delete the new one at once).
pub fn prepare_run_dir(run_dir: &Path, resume: bool, overwrite: bool) -> Result<()> {
    if resume && overwrite {
        bail!("train.resume = \"auto\" (--resume) and train.overwrite (--overwrite) contradict each other: resume continues the run in {}, overwrite deletes it", run_dir.display());
    }
    remove_unfinished(run_dir)?;
    let root = checkpoints_dir(run_dir);
    if overwrite {
        // Only what a run writes: a run directory may sit beside (or hold) the user's files.
        for f in ["checkpoints", "metrics.jsonl", "metrics.png", "config.toml"] {
            let p = run_dir.join(f);
            let res = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else if p.exists() {
                std::fs::remove_file(&p)
            } else {
                continue;
            };
            tracing::warn!(path = %p.display(), "train.overwrite: deleted");
            res.with_context(|| format!("clearing {}", p.display()))?;
        }
    }
    let found = step_dirs(&root);
    if !resume && !found.is_empty() {
        bail!(
            "run directory {} already holds {} checkpoint(s) (the newest {}): continue that run with --resume (train.resume = \"auto\"), start over with --overwrite (train.overwrite = true; deletes them), or set another train.run_dir",
            run_dir.display(),
            found.len(),
            found.last().expect("non-empty").display()
        );
    }
    Ok(())
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
    let weights = model.valid();
    rookery_interop::store::check_finite(&weights)
        .with_context(|| format!("refusing to save checkpoint {name}"))?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let path = tmp.join("model.safetensors");
    weights
        .save_into(&mut rookery_interop::store::safetensors_writer(&path))
        .with_context(|| format!("writing {}", path.display()))?;
    fail::fail_point!("checkpoint.after_weights", |_| bail!("failpoint"));
    BinFileRecorder::<FullPrecisionSettings>::new()
        .record(optim.to_record(), tmp.join("optim"))
        .with_context(|| {
            format!(
                "writing optimizer state {}",
                tmp.join("optim.bin").display()
            )
        })?;
    fail::fail_point!("checkpoint.after_optim", |_| bail!("failpoint"));
    write_file(&tmp.join("state.json"), &serde_json::to_vec_pretty(state)?)?;
    write_file(&tmp.join("config.toml"), cfg.to_toml().as_bytes())?;
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
    write_file(
        &tmp.join("manifest.json"),
        &serde_json::to_vec_pretty(&Manifest {
            step: state.step,
            files,
        })?,
    )?;
    for f in names.iter().chain(&["manifest.json"]) {
        let p = tmp.join(f);
        File::open(&p)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", p.display()))?;
    }
    fail::fail_point!("checkpoint.before_rename", |_| bail!("failpoint"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    File::open(&root)?.sync_all()?;
    fail::fail_point!("checkpoint.before_latest", |_| bail!("failpoint"));
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

/// The newest checkpoint of `run_dir` that verifies against its manifest, trying `latest`
/// first and then the others from the newest step down; each one skipped is logged with why.
/// `None` when there is none at all; an error when some exist and none verifies.
pub fn newest_verified(run_dir: &Path) -> Result<Option<PathBuf>> {
    let mut candidates: Vec<PathBuf> = latest(run_dir).into_iter().collect();
    for d in step_dirs(&checkpoints_dir(run_dir)).into_iter().rev() {
        if !candidates.contains(&d) {
            candidates.push(d);
        }
    }
    let mut why = Vec::new();
    for dir in &candidates {
        match verify(dir) {
            Ok(()) => return Ok(Some(dir.clone())),
            Err(e) => {
                tracing::warn!(checkpoint = %dir.display(), "skipping a checkpoint that does not verify: {e:#}");
                why.push(format!("{e:#}"));
            }
        }
    }
    match why.is_empty() {
        true => Ok(None),
        false => bail!(
            "no checkpoint of {} verifies:\n  {}",
            run_dir.display(),
            why.join("\n  ")
        ),
    }
}

/// Whether `path` is a rookery checkpoint or run directory (else another project's files).
pub fn is_rookery_run(path: &Path) -> bool {
    path.join("manifest.json").exists() || checkpoints_dir(path).is_dir()
}

/// The checkpoint a user names: `path` itself when it is one, else the run directory `path`'s
/// latest; verified against its manifest, so nothing reads a corrupt checkpoint.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let dir = if path.join("manifest.json").exists() {
        path.to_path_buf()
    } else {
        latest(path).with_context(|| {
            format!(
                "{}: neither a checkpoint (no manifest.json) nor a run directory with one (no checkpoints/latest)",
                path.display()
            )
        })?
    };
    verify(&dir)?;
    Ok(dir)
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
            "checkpoint {} is of stage \"{}\", the config's train.stage is \"{}\"",
            dir.display(),
            saved.train.stage,
            cfg.train.stage
        );
    }
    // Patch dropout is how the image tower is trained, not what it is: a run may resume with
    // another rate, or without it (FLIP's unmasked tuning at the end). Length buckets are how
    // the text tower is run, with the same features; a locked tower may be unlocked later.
    let shape = |m: &rookery_model::ClipConfig| {
        let mut m = m.clone();
        m.vision.patch_dropout = 0.0;
        m.text.length_buckets = 1;
        (m.vision.locked, m.text.locked) = (false, false);
        m
    };
    // Only the section the stage trains is compared: another default in a section it does
    // not use must not stop a resume.
    let (differs, section, was, is) = match cfg.train.stage {
        TrainStage::Clip => (
            shape(&saved.model) != shape(&cfg.model),
            "model",
            format!("{:?}", saved.model),
            format!("{:?}", cfg.model),
        ),
        TrainStage::Lm => (
            saved.lm != cfg.lm,
            "lm",
            format!("{:?}", saved.lm),
            format!("{:?}", cfg.lm),
        ),
        TrainStage::Flamingo => (
            saved.flamingo != cfg.flamingo,
            "flamingo",
            format!("{:?}", saved.flamingo),
            format!("{:?}", cfg.flamingo),
        ),
    };
    if differs {
        bail!("checkpoint {} was trained with a different model: checkpoint [{section}] {was}, config [{section}] {is}", dir.display());
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

/// Loads safetensors weights into `model` strictly (every tensor present, shapes checked, every
/// value finite), then restores the path-derived parameter ids that optimizer state is keyed by.
pub fn load_weights<B: burn::prelude::Backend, M: Module<B>>(model: M, path: &Path) -> Result<M> {
    load_store(model, &mut SafetensorsStore::from_file(path), path)
}

/// `load_from` through `store` strictly ([`rookery_interop::store::load_strict`]: every
/// tensor, shapes, finite values), then the path ids optimizer state is keyed by.
pub(crate) fn load_store<B: burn::prelude::Backend, M: Module<B>>(
    model: M,
    store: &mut SafetensorsStore,
    path: &Path,
) -> Result<M> {
    let model = rookery_interop::store::load_strict(model, store, path)?;
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

/// The SHA-256 of a file, in hex (manifests, and the hashes of stage 2's sources).
pub fn sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// `std::fs::write` whose error names the path (a full disk must say where).
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let write = || -> std::io::Result<()> {
        // Test-only: the OS refusing this write, with the errno given (default ENOSPC, 28;
        // EROFS, 30, is a read-only file system).
        fail::fail_point!("checkpoint.disk_full", |errno: Option<String>| Err(
            std::io::Error::from_raw_os_error(errno.and_then(|e| e.parse().ok()).unwrap_or(28))
        ));
        std::fs::write(path, bytes)
    };
    write().with_context(|| format!("writing {}", path.display()))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// Deletes all but the newest `keep` checkpoints, and never the one `latest` names.
fn prune(root: &Path, keep: usize) -> Result<()> {
    let dirs = step_dirs(root);
    let newest = std::fs::read_to_string(root.join("latest"))
        .ok()
        .map(|n| root.join(n.trim()));
    let n = dirs.len().saturating_sub(keep);
    for d in dirs[..n].iter().filter(|d| Some(*d) != newest.as_ref()) {
        std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(root: &Path) -> Vec<String> {
        step_dirs(root)
            .iter()
            .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn prune_keeps_the_newest_and_never_what_latest_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for s in [
            "step-00000500",
            "step-00002400",
            "step-00002600",
            "step-00000600.tmp",
        ] {
            std::fs::create_dir_all(root.join(s)).unwrap();
        }
        // `latest` names an older step than others present (an earlier run's leftovers).
        write_atomic(&root.join("latest"), b"step-00000500").unwrap();
        prune(root, 1).unwrap();
        assert_eq!(names(root), ["step-00000500", "step-00002600"]);
        write_atomic(&root.join("latest"), b"step-00002600").unwrap();
        prune(root, 1).unwrap();
        assert_eq!(names(root), ["step-00002600"]);
    }

    #[test]
    fn unfinished_saves_are_removed_and_checkpoints_refused_without_resume() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        let root = checkpoints_dir(run);
        std::fs::create_dir_all(root.join("step-00000004.tmp")).unwrap();
        std::fs::write(root.join("latest.tmp"), "x").unwrap();
        prepare_run_dir(run, false, false).unwrap();
        assert!(!root.join("step-00000004.tmp").exists() && !root.join("latest.tmp").exists());
        std::fs::create_dir_all(root.join("step-00000002")).unwrap();
        let err = prepare_run_dir(run, false, false).unwrap_err().to_string();
        assert!(err.contains("already holds 1 checkpoint"), "{err}");
        prepare_run_dir(run, true, false).unwrap();
        assert!(prepare_run_dir(run, true, true).is_err());
        prepare_run_dir(run, false, true).unwrap();
        assert!(!root.exists());
    }
}
