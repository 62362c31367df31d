//! `rookery doctor`: what a run on this machine will use and what is missing, found without
//! starting a run: the build, the CPU and its vector units, memory, GPUs and their driver,
//! the CUDA files cubecl compiles kernels with (NVRTC, headers), the NCCL library, MPI.
//! Nothing is loaded or initialised: libraries are looked for where the dynamic loader and
//! Python's NVIDIA wheels put them, tools are asked for their versions.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

/// One line of the report: what was checked and what was found (or why not).
struct Line {
    what: &'static str,
    found: String,
}

/// Runs `rookery doctor`.
pub fn run() -> Result<()> {
    let cuda_build = cfg!(feature = "cuda");
    let gpus = gpus();
    let mut lines = vec![
        Line {
            what: "build",
            found: format!(
                "rookery {}, features: cuda {}, mpi {}",
                env!("CARGO_PKG_VERSION"),
                yes_no(cuda_build),
                yes_no(cfg!(feature = "mpi"))
            ),
        },
        Line {
            what: "trains on",
            found: match (cuda_build, gpus.is_ok()) {
                (true, true) => "CUDA (burn-cuda), NCCL between GPUs".into(),
                (true, false) => "CUDA build, but no GPU is usable: see below".into(),
                (false, _) => {
                    "CPU (burn-flex, rookery's kernels); build with --features cuda for GPUs".into()
                }
            },
        },
        Line {
            what: "CPU",
            found: cpu(),
        },
        Line {
            what: "memory",
            found: memory(),
        },
        Line {
            what: "GPUs",
            found: gpus.unwrap_or_else(|why| format!("none ({why})")),
        },
    ];
    let lib = |name: &str, what: &'static str, hint: &str| Line {
        what,
        found: match rookery_dist::libs::find_library(name) {
            Some(p) => p.display().to_string(),
            None => format!("not found ({name}; {hint})"),
        },
    };
    lines.push(lib(
        "libcuda.so.1",
        "CUDA driver",
        "the NVIDIA driver installs it",
    ));
    lines.push(lib(
        "libnvrtc.so",
        "NVRTC",
        "the CUDA toolkit or the nvidia-cuda-nvrtc-cu12 wheel; cubecl compiles kernels with it",
    ));
    lines.push(Line {
        what: "CUDA headers",
        found: {
            let cuda_path = std::env::var_os("CUDA_PATH").map(PathBuf::from);
            match rookery_dist::libs::cuda_headers(cuda_path.as_deref()) {
                Ok(p) => p.display().to_string(),
                Err(e) => format!("not found ({e})"),
            }
        },
    });
    lines.push(lib(
        "libnccl.so",
        "NCCL",
        "apt libnccl2 or the nvidia-nccl-cu12 wheel; multi-GPU runs need it",
    ));
    lines.push(Line {
        what: "MPI",
        found: first_line("mpirun", &["--version"])
            .unwrap_or_else(|| "not found (apt install openmpi-bin libopenmpi-dev; only dist.backend = \"mpi\" needs it)".into()),
    });
    let width = lines.iter().map(|l| l.what.len()).max().unwrap_or(0);
    for l in &lines {
        println!("{:width$}  {}", l.what, l.found);
    }
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The CPU's model, cores, and the vector units rookery's kernels pick at run time.
fn cpu() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown model".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores usable, vector units: {}", simd())
}

#[cfg(target_arch = "x86_64")]
fn simd() -> String {
    let mut have = vec![];
    if std::arch::is_x86_feature_detected!("avx2") {
        have.push("avx2");
    }
    if std::arch::is_x86_feature_detected!("fma") {
        have.push("fma");
    }
    if std::arch::is_x86_feature_detected!("avx512f") {
        have.push("avx512f");
    }
    if have.is_empty() {
        "sse only".into()
    } else {
        have.join(" ")
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn simd() -> String {
    std::env::consts::ARCH.to_string()
}

fn memory() -> String {
    let field = |text: &str, key: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / (1 << 20) as f64)
    };
    match std::fs::read_to_string("/proc/meminfo") {
        Ok(t) => match (field(&t, "MemTotal:"), field(&t, "MemAvailable:")) {
            (Some(total), Some(avail)) => format!("{avail:.1} GiB available of {total:.1} GiB"),
            _ => "unknown".into(),
        },
        Err(_) => "unknown".into(),
    }
}

/// The GPUs `nvidia-smi` lists (name, memory, driver), or why there are none.
fn gpus() -> Result<String, String> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,name,memory.total,driver_version",
            "--format=csv,noheader",
        ])
        .output()
        .map_err(|_| "nvidia-smi not found: no NVIDIA driver".to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim().is_empty() {
        return Err(format!(
            "nvidia-smi found no GPU: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let list: Vec<&str> = text.lines().map(str::trim).collect();
    Ok(format!(
        "{}{}",
        list.join("; "),
        visible.map_or(String::new(), |v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
    ))
}

/// The first line `program args` prints (stdout, else stderr), if it runs.
fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}
