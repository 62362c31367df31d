//! An HF model directory's `config.json`, read and checked to be the architecture asked for;
//! its numbers read with the key named when one is missing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub(crate) struct HfConfig {
    pub path: PathBuf,
    pub v: Value,
}

impl HfConfig {
    /// `dir/config.json`, refused unless its `model_type` is `model_type`.
    pub fn read(dir: &Path, model_type: &str) -> Result<Self> {
        let path = dir.join("config.json");
        let v: Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{}: not JSON", path.display()))?;
        if v["model_type"].as_str() != Some(model_type) {
            bail!("{}: model_type is not {model_type:?}", path.display());
        }
        Ok(HfConfig { path, v })
    }

    /// The whole number under `key`.
    pub fn num(&self, key: &str) -> Result<usize> {
        self.v[key]
            .as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("{}: no `{key}`", self.path.display()))
    }
}
