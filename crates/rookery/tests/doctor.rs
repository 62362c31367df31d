//! `rookery doctor` reports what a run will use, plainly, on a machine without a GPU too; a
//! library is found under `LD_LIBRARY_PATH` by its versioned name (`libnccl.so.2`, what the
//! NCCL packages and wheels ship).

mod common;
use common::{check, rookery};

#[test]
fn doctor_reports_the_machine_and_finds_versioned_libraries() {
    let dir = tempfile::tempdir().unwrap();
    let nccl = dir.path().join("libnccl.so.2");
    std::fs::write(&nccl, b"").unwrap();
    let out = check(
        rookery(&["doctor"], &[])
            .env("LD_LIBRARY_PATH", dir.path())
            .output()
            .unwrap(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for what in [
        "build",
        "trains on",
        "CPU",
        "memory",
        "GPUs",
        "NVRTC",
        "MPI",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(what)),
            "no {what} line:\n{text}"
        );
    }
    let line = |what: &str| {
        text.lines()
            .find(|l| l.starts_with(what))
            .unwrap()
            .to_string()
    };
    assert!(line("NCCL").contains(&nccl.display().to_string()), "{text}");
    if std::process::Command::new("nvidia-smi").output().is_err() {
        assert!(line("GPUs").contains("none"), "{text}");
    }
    if !cfg!(feature = "cuda") {
        assert!(line("trains on").contains("CPU"), "{text}");
    }
}

/// `doctor --parity` runs one step on this build's backend and on the CPU reference and says
/// how far apart they are; on a CPU build that is the generic path against the flex kernels.
#[test]
fn doctor_parity_compares_a_clip_step_with_the_cpu_reference() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("parity.json");
    let config = common::root().join("configs/clip-tiny.toml");
    let out = check(
        rookery(
            &[
                "doctor",
                "--parity",
                config.to_str().unwrap(),
                "--batch",
                "8",
                "--json",
                json.to_str().unwrap(),
            ],
            &[],
        )
        .output()
        .unwrap(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("parity") && text.contains("within"), "{text}");
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(p["passed"], true, "{p}");
    assert!(p["tensors"].as_u64().unwrap() > 50, "{p}");
    assert!(
        p["grads"].as_f64().unwrap() > 0.0,
        "the same path ran twice: {p}"
    );
}
