//! A training process stopped from outside: SIGTERM / SIGUSR1 (preemption, Slurm's
//! `--signal`) make it checkpoint after the current step and exit 0 saying how to resume, a
//! second signal ends it at once (status 130); a `kill -9` at an arbitrary step loses only the
//! steps after the last checkpoint. Either way the resumed run ends with the bytes of a run
//! that was never stopped.

mod common;
use common::{check, rookery, root, sets};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: &str = "train.steps=150";

fn train(run_dir: &Path, name: &str, extra: &[&str]) -> Command {
    let set = sets(run_dir, name, &[&[STEPS, "data.val="][..], extra].concat());
    let mut c = rookery(&["train", "configs/clip-tiny.toml"], &set);
    c.current_dir(root());
    c
}

/// Train lines in the run's metrics.jsonl so far.
fn steps_logged(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|t| t.lines().filter(|l| l.contains("\"train\"")).count())
        .unwrap_or(0)
}

/// Waits until `child` has logged `n` steps, then sends it `signal` (`-0`: none, only a check
/// that it lives).
fn signal_after(child: &Child, run: &Path, n: usize, signal: &str) {
    let start = Instant::now();
    while steps_logged(run) < n {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    check(
        Command::new("kill")
            .args([signal, &child.id().to_string()])
            .output()
            .unwrap(),
    );
}

fn final_weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("checkpoints/step-00000150/model.safetensors")).unwrap()
}

#[test]
fn a_signal_checkpoints_and_exits_0_and_a_kill_loses_nothing_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    check(
        train(base, "reference", &["checkpoint.every=0"])
            .output()
            .unwrap(),
    );
    let reference = final_weights(&base.join("reference"));

    for signal in ["-TERM", "-USR1"] {
        let name = format!("signal{signal}");
        let run = base.join(&name);
        let child = train(base, &name, &["checkpoint.every=0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        signal_after(&child, &run, 10, signal);
        let out = check(child.wait_with_output().unwrap());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("stopped by a signal after step") && text.contains("--resume"),
            "{text}"
        );
        let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
        assert!(latest.as_str() < "step-00000150", "{latest}");
        check(
            train(base, &name, &["checkpoint.every=0", "train.resume=auto"])
                .output()
                .unwrap(),
        );
        assert!(
            final_weights(&run) == reference,
            "{signal}: resumed weights differ"
        );
    }

    // A second signal ends the process at once (SIGTERM then SIGINT: two of one kind could
    // coalesce into one).
    let run = base.join("twice");
    let child = train(base, "twice", &["checkpoint.every=0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Both from one shell, microseconds apart: the first cannot have finished its
    // checkpoint when the second arrives.
    let pid = child.id();
    let both = format!("kill -TERM {pid}; kill -INT {pid}");
    signal_after(&child, &run, 5, "-0");
    check(Command::new("sh").args(["-c", &both]).output().unwrap());
    let status = { child }.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");

    let run = base.join("killed");
    let child = train(base, "killed", &["checkpoint.every=7"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    signal_after(&child, &run, 25, "-9");
    let status = { child }.wait().unwrap();
    assert!(!status.success());
    check(
        train(base, "killed", &["checkpoint.every=7", "train.resume=auto"])
            .output()
            .unwrap(),
    );
    assert!(
        final_weights(&run) == reference,
        "kill -9: resumed weights differ"
    );
    // Each step logged once, in order, though the killed run had logged past its checkpoint.
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=150).collect::<Vec<u64>>());
}
