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
use crate::metrics::LogConfig;
use crate::optim::OptimConfig;
use crate::parallel::DistConfig;
use crate::stage::flamingo::FlamingoRunConfig;
use crate::trainer::TrainConfig;
use crate::trainer::TrainStage;
use rookery_eval::config::EvalConfig;

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
        self.data.validate()?;
        match self.train.stage {
            TrainStage::Clip => self.validate_clip()?,
            TrainStage::Lm => {
                self.no_benchmark_tasks()?;
                self.data.interleaved.validate()?;
                self.lm
                    .validate()
                    .map_err(|m| (m.split('`').nth(1).unwrap_or("lm").to_string(), m))?;
                let (max, ctx) = (self.data.interleaved.max_tokens, self.lm.context_length);
                if max > ctx {
                    return Err((
                        "data.interleaved.max_tokens".into(),
                        format!("is {max} but lm.context_length is {ctx}"),
                    ));
                }
                self.eval.validate()?;
            }
            TrainStage::Flamingo => {
                self.no_benchmark_tasks()?;
                self.data.interleaved.validate()?;
                self.flamingo.validate()?;
                let (frames, embs) = (
                    self.data.interleaved.max_frames,
                    self.flamingo.model.resampler.max_frames,
                );
                if frames > embs {
                    return Err((
                        "data.interleaved.max_frames".into(),
                        format!("is {frames} but flamingo.model.resampler.max_frames (time embeddings) is {embs}"),
                    ));
                }
                self.eval.validate()?;
            }
        }
        self.optim.validate()?;
        self.train.validate()?;
        self.dist.validate()
    }

    /// Stage "clip": `[model]`, and how `[data]` fits it.
    fn validate_clip(&self) -> Result<(), (String, String)> {
        let (d, m) = (&self.data, &self.model);
        if d.image_size != m.vision.image_size as u32 {
            let msg = format!(
                "is {} but model.vision.image_size is {}",
                d.image_size, m.vision.image_size
            );
            return Err(("data.image_size".into(), msg));
        }
        if d.context_length != m.text.context_length {
            let msg = format!(
                "is {} but model.text.context_length is {}",
                d.context_length, m.text.context_length
            );
            return Err(("data.context_length".into(), msg));
        }
        if !d.hard_negative_ext.is_empty() && m.loss != rookery_model::ContrastiveLoss::Infonce {
            let msg = format!(
                "hard-negative captions need model.loss = \"infonce\", not {:?}",
                m.loss
            );
            return Err(("data.hard_negative_ext".into(), msg));
        }
        m.validate()
            .map_err(|msg| (msg.split('`').nth(1).unwrap_or("model").to_string(), msg))
    }

    /// `[[eval.tasks]]` scores a CLIP; the text stages refuse it rather than ignore it.
    fn no_benchmark_tasks(&self) -> Result<(), (String, String)> {
        match self.eval.tasks.is_empty() {
            true => Ok(()),
            false => Err((
                "eval.tasks".into(),
                format!(
                    "scores a CLIP (train.stage = \"clip\"), not stage {:?}",
                    self.train.stage
                ),
            )),
        }
    }

    /// Checks that the shard patterns match files (after any synthesis) and that every
    /// `[[eval.tasks]]` set opens, naming the key.
    pub fn check_shards(&self) -> Result<(), (String, String)> {
        rookery_data::expand_shards(&self.data.train)
            .map_err(|e| ("data.train".to_string(), e.to_string()))?;
        if !self.data.val.trim().is_empty() {
            rookery_data::expand_shards(&self.data.val)
                .map_err(|e| ("data.val".to_string(), e.to_string()))?;
        }
        self.eval.open_tasks()?;
        Ok(())
    }

    /// Whether evaluations have anything to score: held-out data or `[[eval.tasks]]`.
    pub fn evaluates(&self) -> bool {
        !self.data.val.is_empty() || !self.eval.tasks.is_empty()
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
