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

/// `doctor --parity` on a stage-2 config compares a Flamingo step (random towers of
/// `[flamingo.model]`'s shapes: no source is read); with `frozen_dtype = "bf16"` (what "auto"
/// is on CUDA) the target holds its frozen towers in bf16 and is judged at bf16's tolerance.
#[test]
fn doctor_parity_compares_a_flamingo_step_also_with_bf16_frozen_towers() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::root().join("configs/flamingo-tiny.toml");
    let run = |sets: &[&str]| -> serde_json::Value {
        let json = dir.path().join("parity.json");
        let mut args = vec![
            "doctor",
            "--parity",
            config.to_str().unwrap(),
            "--batch",
            "2",
            "--json",
            json.to_str().unwrap(),
        ];
        for s in sets {
            args.extend(["--set", s]);
        }
        check(rookery(&args, &[]).output().unwrap());
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
    };
    let f32 = run(&[]);
    assert_eq!(f32["passed"], true, "{f32}");
    assert_eq!(f32["tolerance"], 1e-4, "{f32}");
    let bf16 = run(&["flamingo.frozen_dtype=\"bf16\""]);
    assert_eq!(bf16["passed"], true, "{bf16}");
    assert!(bf16["target"].as_str().unwrap().contains("BF16"), "{bf16}");
    assert!(
        bf16["grads"].as_f64().unwrap() > 10.0 * f32["grads"].as_f64().unwrap(),
        "bf16 changed nothing: {bf16} against {f32}"
    );
}
