//! Multi-process training through MPI (`--features mpi`, OpenMPI installed): `rookery launch`
//! over mpirun gives the same weights as the same ranks run as threads, and a killed rank
//! stops the whole job with an error naming it while the last checkpoint stays intact.
#![cfg(feature = "mpi")]

mod common;
use common::{check, rookery, root, sets, BIN};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every tensor's values by name.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

/// The tensors of clip-tiny's checkpoint (CLIP's own tower: 3 image and 2 text layers).
const CLIP_TINY_TENSORS: usize = 38;

#[test]
fn mpi_ranks_train_the_same_model_as_thread_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let common = ["train.steps=3", "train.accum_steps=2", "checkpoint.every=0"];
    let threads = sets(
        dir.path(),
        "threads",
        &[&common[..], &["dist.world_size=2"]].concat(),
    );
    check(
        rookery(&["train", "configs/clip-tiny.toml"], &threads)
            .current_dir(root())
            .output()
            .unwrap(),
    );
    let mpi = sets(
        dir.path(),
        "mpi",
        &[&common[..], &["dist.backend=mpi"]].concat(),
    );
    let launch = [
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "train",
        "configs/clip-tiny.toml",
    ];
    check(rookery(&launch, &mpi).current_dir(root()).output().unwrap());
    let ck = "checkpoints/step-00000003/model.safetensors";
    let (a, b) = (
        tensors(&dir.path().join("threads").join(ck)),
        tensors(&dir.path().join("mpi").join(ck)),
    );
    assert_eq!(a.len(), CLIP_TINY_TENSORS);
    if a != b {
        let kept = dir.keep();
        panic!(
            "2 MPI processes and 2 threads ended with different weights (runs kept in {}): {}",
            kept.display(),
            differences(&a, &b).join(", ")
        );
    }
}

/// "name: max |a - b|" for each tensor whose values differ.
fn differences(a: &[(String, Vec<u8>)], b: &[(String, Vec<u8>)]) -> Vec<String> {
    let floats = |v: &[u8]| -> Vec<f32> {
        v.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    a.iter()
        .zip(b)
        .filter(|(x, y)| x != y)
        .map(|((name, x), (_, y))| {
            let d = floats(x)
                .iter()
                .zip(floats(y))
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            format!("{name}: {d:e}")
        })
        .collect()
}

#[test]
fn a_killed_rank_stops_the_job_naming_it_and_the_job_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let run = sets(
        dir.path(),
        "killed",
        &[
            "train.steps=300",
            "checkpoint.every=2",
            "dist.backend=mpi",
            "dist.timeout_s=30",
        ],
    );
    let launch = [
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "train",
        "configs/clip-tiny.toml",
    ];
    let child = rookery(&launch, &run)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let latest = dir.path().join("killed/checkpoints/latest");
    let start = Instant::now();
    while !latest.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint was written"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let victim = rank_pid(1, dir.path()).expect("rank 1's process");
    check(
        Command::new("kill")
            .args(["-9", &victim.to_string()])
            .output()
            .unwrap(),
    );
    let killed_at = Instant::now();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(
        killed_at.elapsed() < Duration::from_secs(60),
        "the job outlived the timeout"
    );
    assert!(
        text.contains("rank 1"),
        "the error must name rank 1:\n{text}"
    );
    // The newest complete checkpoint is intact.
    let name = std::fs::read_to_string(&latest).unwrap();
    let ck = dir.path().join("killed/checkpoints").join(name.trim());
    assert_eq!(
        tensors(&ck.join("model.safetensors")).len(),
        CLIP_TINY_TENSORS
    );
    assert!(
        name.trim() < "step-00000300",
        "the job finished before the kill: {name}"
    );

    // Resumed, the job ends with the weights of the same ranks never interrupted (as threads,
    // which train bit for bit what MPI processes do).
    let resume = [&launch[..], &["--resume"]].concat();
    check(rookery(&resume, &run).current_dir(root()).output().unwrap());
    let threads = sets(
        dir.path(),
        "threads",
        &["train.steps=300", "checkpoint.every=0", "dist.world_size=2"],
    );
    check(
        rookery(&["train", "configs/clip-tiny.toml"], &threads)
            .current_dir(root())
            .output()
            .unwrap(),
    );
    let last = "checkpoints/step-00000300/model.safetensors";
    let (a, b) = (
        tensors(&dir.path().join("killed").join(last)),
        tensors(&dir.path().join("threads").join(last)),
    );
    assert!(
        a == b,
        "resumed MPI job differs: {}",
        differences(&a, &b).join(", ")
    );
}

/// The pid of the rookery process that MPI made rank `rank` in the job writing under `dir`.
fn rank_pid(rank: usize, dir: &Path) -> Option<u32> {
    let marker = dir.display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let is_rank = environ
            .split(|&b| b == 0)
            .any(|kv| kv == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes());
        let ours = String::from_utf8_lossy(&cmdline).contains(&marker)
            && cmdline.starts_with(BIN.as_bytes());
        (is_rank && ours).then_some(pid)
    })
}
