//! The run configuration: TOML whose sections map 1:1 to typed structs, each defined beside
//! the code it configures ([`DataConfig`] in rookery-data, [`ClipConfig`] in rookery-model,
//! [`OptimConfig`], [`TrainConfig`], [`CheckpointConfig`], [`DistConfig`], [`LogConfig`] here).
//!
//! Precedence: defaults < file < `--set section.key=value`. Unknown keys and wrong types are
//! refused with the key and the file named; [`RunConfig::validate`] refuses bad values before
//! any work starts.

use std::path::{Path, PathBuf};

use rookery_data::DataConfig;
use rookery_model::flamingo::LmConfig;
use rookery_model::ClipConfig;
use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointConfig;
use crate::fewshot::EvalConfig;
use crate::metrics::LogConfig;
use crate::optim::OptimConfig;
use crate::parallel::DistConfig;
use crate::stage::flamingo::FlamingoRunConfig;
use crate::trainer::TrainConfig;
use crate::trainer::TrainStage;

/// The whole configuration of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub data: DataConfig,
    /// CLIP (stage "clip").
    pub model: ClipConfig,
    /// The language model (stage "lm").
    pub lm: LmConfig,
    /// Stage 2 (stage "flamingo").
    pub flamingo: FlamingoRunConfig,
    /// Held-out evaluation of stages "lm" and "flamingo".
    pub eval: EvalConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub checkpoint: CheckpointConfig,
    pub dist: DistConfig,
    pub log: LogConfig,
}

/// A configuration error, always naming the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {msg}")]
    Parse { file: String, msg: String },
    #[error("{file}: key `{key}`: {msg}")]
    Key {
        file: String,
        key: String,
        msg: String,
    },
    #[error("--set {0}: expected section.key=value")]
    BadOverride(String),
}

impl RunConfig {
    /// Reads `path` (empty path: defaults only), applies `overrides`, and deserializes strictly.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = if path.as_os_str().is_empty() {
            String::new()
        } else {
            std::fs::read_to_string(path).map_err(|e| ConfigError::Parse {
                file: file.clone(),
                msg: e.to_string(),
            })?
        };
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    file: file.clone(),
                    msg: e.to_string(),
                })?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let de = toml::Value::Table(table);
        let cfg: RunConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Key {
                file: file.clone(),
                key,
                msg: e.into_inner().to_string(),
            }
        })?;
        cfg.validate()
            .map_err(|(key, msg)| ConfigError::Key { file, key, msg })?;
        Ok(cfg)
    }

    /// Value checks serde cannot express. Returns (key, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        let d = &self.data;
        if d.batch_size == 0 {
            return err("data.batch_size", "must be at least 1");
        }
        if d.train.trim().is_empty() {
            return err("data.train", "names no shards");
        }
        if d.image_size == 0 {
            return err("data.image_size", "must be > 0");
        }
        if !(d.crop_ratio[0] > 0.0 && d.crop_ratio[0] <= d.crop_ratio[1]) {
            return err("data.crop_ratio", "must satisfy 0 < lo <= hi");
        }
        if self.train.stage != TrainStage::Clip {
            return self.validate_text_stage();
        }
        if d.image_size != self.model.vision.image_size as u32 {
            return err(
                "data.image_size",
                &format!(
                    "is {} but model.vision.image_size is {}",
                    d.image_size, self.model.vision.image_size
                ),
            );
        }
        if d.context_length != self.model.text.context_length {
            return err(
                "data.context_length",
                &format!(
                    "is {} but model.text.context_length is {}",
                    d.context_length, self.model.text.context_length
                ),
            );
        }
        if !(0.0..=1.0).contains(&d.max_bad_fraction) {
            return err("data.max_bad_fraction", "must be in [0, 1]");
        }
        let n = &d.image_norm;
        if !n.std.iter().chain(&n.mean).all(|x| x.is_finite()) || n.std.iter().any(|&x| x <= 0.0) {
            return err("data.image_norm", "mean must be finite and std > 0");
        }
        if !(d.crop_scale[0] > 0.0 && d.crop_scale[0] <= d.crop_scale[1] && d.crop_scale[1] <= 1.0)
        {
            return err("data.crop_scale", "must satisfy 0 < lo <= hi <= 1");
        }
        if !d.hard_negative_ext.is_empty()
            && self.model.loss != rookery_model::ContrastiveLoss::Infonce
        {
            return err(
                "data.hard_negative_ext",
                &format!(
                    "hard-negative captions need model.loss = \"infonce\", not {:?}",
                    self.model.loss
                ),
            );
        }
        self.model.validate().map_err(|m| {
            let key = m.split('`').nth(1).unwrap_or("model").to_string();
            (key, m)
        })?;
        self.optim.validate()?;
        self.train.validate()?;
        self.dist.validate()?;
        Ok(())
    }

    /// The checks of stages "lm" and "flamingo" (their model shapes partly come from
    /// checkpoints, checked when the run starts).
    fn validate_text_stage(&self) -> Result<(), (String, String)> {
        let seq = &self.data.interleaved;
        if seq.max_tokens < 2 {
            return Err((
                "data.interleaved.max_tokens".into(),
                "must be at least 2".into(),
            ));
        }
        if seq.pairs_weight.is_nan() || seq.pairs_weight < 0.0 {
            return Err((
                "data.interleaved.pairs_weight".into(),
                "must be >= 0".into(),
            ));
        }
        if self.train.stage == TrainStage::Lm {
            self.lm
                .validate()
                .map_err(|m| (m.split('`').nth(1).unwrap_or("lm").to_string(), m))?;
            if seq.max_tokens > self.lm.context_length {
                return Err((
                    "data.interleaved.max_tokens".into(),
                    format!(
                        "is {} but lm.context_length is {}",
                        seq.max_tokens, self.lm.context_length
                    ),
                ));
            }
        }
        let mult = self.flamingo.gate_lr_mult;
        if self.train.stage == TrainStage::Flamingo && !(mult.is_finite() && mult > 0.0) {
            return Err((
                "flamingo.gate_lr_mult".into(),
                format!("must be a number > 0, not {mult}"),
            ));
        }
        if self.train.stage == TrainStage::Flamingo {
            let (f, r) = (&self.flamingo.model, &self.flamingo.model.resampler);
            let sizes = [
                ("cross_attn_every_n_layers", f.cross_attn_every_n_layers),
                ("xattn_heads", f.xattn_heads),
                ("xattn_dim_head", f.xattn_dim_head),
                ("xattn_ff_mult", f.xattn_ff_mult),
                ("resampler.latents", r.latents),
                ("resampler.depth", r.depth),
                ("resampler.heads", r.heads),
                ("resampler.dim_head", r.dim_head),
                ("resampler.ff_mult", r.ff_mult),
                ("resampler.max_frames", r.max_frames),
            ];
            if let Some((k, _)) = sizes.iter().find(|(_, v)| *v == 0) {
                return Err((format!("flamingo.model.{k}"), "must be at least 1".into()));
            }
        }
        if self.eval.batch == 0 {
            return Err(("eval.batch".into(), "must be at least 1".into()));
        }
        self.optim.validate()?;
        self.train.validate()?;
        self.dist.validate()?;
        Ok(())
    }

    /// Checks that the shard patterns match files (after any synthesis), naming the key.
    pub fn check_shards(&self) -> Result<(), (String, String)> {
        rookery_data::expand_shards(&self.data.train)
            .map_err(|e| ("data.train".to_string(), e.to_string()))?;
        if !self.data.val.trim().is_empty() {
            rookery_data::expand_shards(&self.data.val)
                .map_err(|e| ("data.val".to_string(), e.to_string()))?;
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.train.run_dir.clone()
    }
}

/// `section.sub.key=value`: the value is parsed as TOML (`3`, `1e-4`, `true`, `[1, 2]`,
/// `"text"`), and taken as a plain string when it does not parse.
fn apply_override(table: &mut toml::Table, o: &str) -> Result<(), ConfigError> {
    let (path, raw) = o
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride(o.into()))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(ConfigError::BadOverride(o.into()));
    }
    let value = format!("v = {}", raw.trim())
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let (last, parents) = keys.split_last().expect("non-empty");
    let mut t = table;
    for k in parents {
        let entry = t
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::BadOverride(format!("{o}: `{k}` is not a section")))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}
