//! `[dist]`: how many ranks, over what, with what bucket size and timeouts.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[dist]`: how many ranks, and over what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistConfig {
    /// Ranks as threads of this process ("local" backend). Under `mpirun`/`srun` the launcher
    /// decides and this must be 1 or equal to the launched world size.
    pub world_size: usize,
    /// "local" (threads, burn-collective), "mpi" (processes, `mpi` build feature) or "nccl"
    /// (GPU processes started by `rookery launch`/Slurm, `cuda` build feature).
    pub backend: DistBackend,
    /// Gradients cross ranks in flat buckets of this many MiB.
    pub bucket_mb: f64,
    /// Seconds any collective may wait for a peer before the run fails naming it.
    pub timeout_s: f64,
    /// Seconds the other ranks wait while rank 0 evaluates or writes a checkpoint.
    pub eval_timeout_s: f64,
}

/// What carries the collectives between ranks (`dist.backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistBackend {
    /// Ranks as threads of one process (burn-collective).
    Local,
    /// Ranks as MPI processes (rsmpi; the `mpi` build feature).
    Mpi,
    /// One process per GPU (NCCL; the `cuda` build feature).
    Nccl,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            world_size: 1,
            backend: DistBackend::Local,
            bucket_mb: 25.0,
            timeout_s: 300.0,
            eval_timeout_s: 3600.0,
        }
    }
}

impl DistConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        // `is_nan() || <= 0` refuses NaN as well as non-positive values.
        let bad = |x: f64| x.is_nan() || x <= 0.0;
        let checks = [
            (
                self.world_size == 0,
                "dist.world_size",
                "must be at least 1",
            ),
            (bad(self.bucket_mb), "dist.bucket_mb", "must be > 0"),
            (bad(self.timeout_s), "dist.timeout_s", "must be > 0"),
            (
                bad(self.eval_timeout_s),
                "dist.eval_timeout_s",
                "must be > 0",
            ),
        ];
        match checks.iter().find(|c| c.0) {
            Some((_, k, m)) => Err((k.to_string(), m.to_string())),
            None => Ok(()),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s)
    }

    /// Bucket size in f32 elements.
    pub fn bucket_elems(&self) -> usize {
        ((self.bucket_mb * 1024.0 * 1024.0 / 4.0) as usize).max(1)
    }
}
