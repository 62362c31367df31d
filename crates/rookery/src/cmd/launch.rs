//! `rookery launch`: starts a job's ranks and watches them.
//!
//! With `dist.backend = "mpi"` the ranks must be MPI processes, so the launch is handed to
//! `mpirun` (one node, or `--hostfile` for several). Otherwise this node's ranks are spawned
//! here as torchrun does, each with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
//! MASTER_ADDR and MASTER_PORT set. Either way, when one rank fails the others are stopped
//! and the error names it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rookery_train::parallel::DistBackend;
use rookery_train::RunConfig;

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Ranks (processes) on this node.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index (spawned ranks: node_rank * nproc_per_node + local rank).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// MPI hostfile for several nodes (dist.backend = "mpi": mpirun starts every node's ranks).
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
    /// Seconds the other ranks get to exit on their own after one fails, before being killed.
    #[arg(long, default_value_t = 30.0)]
    pub grace_s: f64,
    /// The rookery command each rank runs, after `--`: e.g. `-- train configs/clip-tiny.toml`.
    #[arg(last = true, required = true)]
    pub args: Vec<String>,
}

pub fn run(a: &LaunchArgs) -> Result<()> {
    if a.nproc_per_node == 0 || a.nnodes == 0 || a.node_rank >= a.nnodes {
        bail!("launch: need --nproc-per-node >= 1 and --node-rank below --nnodes");
    }
    let exe = std::env::current_exe().context("locating the rookery binary")?;
    if backend_of(&a.args)? == Some(DistBackend::Mpi) {
        return via_mpirun(a, &exe);
    }
    spawn_ranks(a, &exe)
}

/// The `[dist] backend` the ranks' `train` command will use (`None` for other commands).
fn backend_of(args: &[String]) -> Result<Option<DistBackend>> {
    if args.first().map(String::as_str) != Some("train") {
        return Ok(None);
    }
    let config = args.get(1).context("launch: `train` needs a config file")?;
    let sets: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == "--set")
        .map(|w| w[1].clone())
        .chain(
            args.iter()
                .filter_map(|s| s.strip_prefix("--set=").map(String::from)),
        )
        .collect();
    Ok(Some(
        RunConfig::load(Path::new(config), &sets)?.dist.backend,
    ))
}

fn via_mpirun(a: &LaunchArgs, exe: &Path) -> Result<()> {
    let mut cmd = Command::new("mpirun");
    cmd.arg("-n")
        .arg((a.nproc_per_node * a.nnodes).to_string())
        .args(["--bind-to", "none"]);
    match &a.hostfile {
        Some(h) => {
            cmd.arg("--hostfile").arg(h);
            cmd.args(["--map-by", &format!("ppr:{}:node", a.nproc_per_node)]);
        }
        None if a.nnodes > 1 => bail!("launch: dist.backend = \"mpi\" on several nodes needs --hostfile (mpirun starts every node's ranks)"),
        None => {
            cmd.arg("--oversubscribe");
        }
    }
    if running_as_root() {
        cmd.arg("--allow-run-as-root");
    }
    cmd.arg(exe).args(&a.args);
    tracing::info!(command = ?cmd, "starting the ranks through mpirun");
    let status = cmd
        .status()
        .context("running mpirun (is OpenMPI installed? apt install openmpi-bin)")?;
    if !status.success() {
        bail!("mpirun exited with {status}: see the ranks' errors above");
    }
    Ok(())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
    })
}

fn spawn_ranks(a: &LaunchArgs, exe: &Path) -> Result<()> {
    let world = a.nproc_per_node * a.nnodes;
    let mut ranks: Vec<(usize, Child)> = Vec::new();
    for local in 0..a.nproc_per_node {
        let rank = a.node_rank * a.nproc_per_node + local;
        let child = Command::new(exe)
            .args(&a.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc_per_node.to_string())
            .env("MASTER_ADDR", &a.master_addr)
            .env("MASTER_PORT", a.master_port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        ranks.push((rank, child));
    }
    watch(ranks, Duration::from_secs_f64(a.grace_s))
}

/// Waits for every rank; on the first failure, gives the rest `grace` to exit, then kills them.
fn watch(mut ranks: Vec<(usize, Child)>, grace: Duration) -> Result<()> {
    let mut first_failure: Option<(usize, ExitStatus, Instant)> = None;
    while !ranks.is_empty() {
        let mut still = Vec::new();
        for (rank, mut child) in ranks {
            match child.try_wait()? {
                None => still.push((rank, child)),
                Some(status) if !status.success() && first_failure.is_none() => {
                    tracing::error!(rank, %status, "rank failed; stopping the others");
                    first_failure = Some((rank, status, Instant::now()));
                }
                Some(_) => {}
            }
        }
        ranks = still;
        if let Some((_, _, at)) = first_failure {
            if at.elapsed() > grace {
                for (rank, child) in ranks.iter_mut() {
                    tracing::warn!(rank = *rank, "killing rank after the grace period");
                    let _ = child.kill();
                    let _ = child.wait();
                }
                ranks.clear();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match first_failure {
        Some((rank, status, _)) => {
            bail!("rank {rank} failed ({status}); the other ranks were stopped")
        }
        None => Ok(()),
    }
}
