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

/// Appends JSON lines to `metrics.jsonl`; appending keeps the history of a resumed run.
pub struct MetricsWriter {
    file: File,
}

impl MetricsWriter {
    pub fn open(run_dir: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("metrics.jsonl"))?;
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
