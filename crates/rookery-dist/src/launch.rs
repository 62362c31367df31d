//! Where this process sits in a multi-process job, read from the launcher's environment:
//! torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
//! MASTER_PORT, also set by `rookery launch`), then OpenMPI's (OMPI_COMM_WORLD_*), then
//! Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID).

/// One process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// Which launcher's variables these came from.
    pub source: &'static str,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

impl RankEnv {
    /// The job this process belongs to, or `None` when no launcher set anything (a lone run).
    pub fn detect() -> Result<Option<RankEnv>, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`detect`](Self::detect), reading variables through `get` (testable).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>, String> {
        let schemes: [(&str, [&str; 3]); 3] = [
            ("torchrun", ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
            (
                "openmpi",
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                ],
            ),
            ("slurm", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]),
        ];
        for (source, [rank, world, local]) in schemes {
            let Some(r) = get(rank) else { continue };
            let num = |key: &str, v: Option<String>| -> Result<usize, String> {
                let v = v.ok_or_else(|| format!("{rank} is set but {key} is not"))?;
                v.trim()
                    .parse()
                    .map_err(|_| format!("{key}={v:?} is not a number"))
            };
            let env = RankEnv {
                rank: num(rank, Some(r))?,
                world_size: num(world, get(world))?,
                local_rank: num(local, get(local).or(Some("0".into())))?,
                source,
                master_addr: get("MASTER_ADDR"),
                master_port: match get("MASTER_PORT") {
                    Some(p) => Some(p.parse().map_err(|_| format!("MASTER_PORT={p:?}"))?),
                    None => None,
                },
            };
            if env.world_size == 0 || env.rank >= env.world_size {
                return Err(format!(
                    "{source}: rank {} is not below world size {}",
                    env.rank, env.world_size
                ));
            }
            return Ok(Some(env));
        }
        Ok(None)
    }
}

/// The GPU a rank with `local_rank` uses when the process sees `visible` GPUs: its local rank,
/// wrapped, so that a scheduler that shows each task only its own GPU (Slurm's
/// `--gpus-per-task=1`, `CUDA_VISIBLE_DEVICES` of one) gives every rank GPU 0 instead of an
/// index that does not exist. `visible` 0 (unknown): the local rank.
pub fn gpu_index(local_rank: usize, visible: usize) -> usize {
    match visible {
        0 => local_rank,
        n => local_rank % n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn ranks_map_onto_the_gpus_they_see() {
        assert_eq!(gpu_index(3, 8), 3, "one process per GPU of a node");
        assert_eq!(gpu_index(3, 1), 0, "each task sees only its own GPU");
        assert_eq!(gpu_index(5, 4), 1);
        assert_eq!(gpu_index(2, 0), 2, "count unknown");
    }

    fn env(pairs: &[(&str, &str)]) -> Result<Option<RankEnv>, String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RankEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn reads_each_launcher() {
        assert_eq!(env(&[]).unwrap(), None);
        let t = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "n0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (t.rank, t.world_size, t.local_rank, t.source),
            (3, 8, 1, "torchrun")
        );
        assert_eq!(t.master_port, Some(29500));
        let o = env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")])
            .unwrap()
            .unwrap();
        assert_eq!((o.rank, o.world_size, o.source), (1, 2, "openmpi"));
        let s = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((s.rank, s.local_rank, s.source), (5, 1, "slurm"));
    }

    #[test]
    fn refuses_inconsistent_variables() {
        assert!(env(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .contains("below"));
        assert!(env(&[("RANK", "0")]).unwrap_err().contains("WORLD_SIZE"));
        assert!(env(&[("RANK", "x"), ("WORLD_SIZE", "2")]).is_err());
    }
}
