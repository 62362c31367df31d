//! Run metrics: one JSON object per line in `metrics.jsonl` in the run directory, plus the
//! `[log]` section that says how often to write them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Log training metrics every this many steps.
    pub every: usize,
    /// Show a progress bar (off when stderr is not a terminal anyway).
    pub progress: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            every: 10,
            progress: true,
        }
    }
}

/// Appends JSON lines to `metrics.jsonl`.
pub struct MetricsWriter {
    file: File,
}

impl MetricsWriter {
    /// Opens the run's metrics for a run that starts after step `from_step` (0: a fresh run).
    /// The records of steps up to `from_step` are kept (a resumed run's history); later ones
    /// are dropped, since a killed run wrote them after the checkpoint the run resumes from
    /// and the resumed run writes those steps again.
    pub fn open(run_dir: &Path, from_step: usize) -> std::io::Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let kept: String = match std::fs::read_to_string(&path) {
            Ok(text) if from_step > 0 => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|r| r["step"].as_u64())
                        .is_some_and(|s| s <= from_step as u64)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            _ => String::new(),
        };
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, kept)?;
        std::fs::rename(&tmp, &path)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(MetricsWriter { file })
    }

    pub fn write(&mut self, record: &serde_json::Value) -> std::io::Result<()> {
        writeln!(self.file, "{record}")?;
        self.file.flush()
    }
}

/// Reads every record of a run's `metrics.jsonl`, skipping lines that do not parse
/// (a crash can leave a partial last line).
pub fn read_metrics(run_dir: &Path) -> std::io::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_keeps_the_steps_up_to_the_resume_point_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetricsWriter::open(dir.path(), 0).unwrap();
        for step in 1..=4 {
            m.write(&serde_json::json!({"kind": "train", "step": step}))
                .unwrap();
        }
        drop(m);
        let steps = |d: &Path| -> Vec<u64> {
            read_metrics(d)
                .unwrap()
                .iter()
                .map(|r| r["step"].as_u64().unwrap())
                .collect()
        };
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("metrics.jsonl"))
            .unwrap()
            .write_all(b"{\"kind\": \"tra")
            .unwrap();
        MetricsWriter::open(dir.path(), 2).unwrap();
        assert_eq!(steps(dir.path()), [1, 2]);
        MetricsWriter::open(dir.path(), 0).unwrap();
        assert!(steps(dir.path()).is_empty());
    }
}
