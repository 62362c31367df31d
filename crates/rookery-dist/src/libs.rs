//! Where the NVIDIA libraries a GPU run loads at run time are, found the way the dynamic
//! loader and pip's CUDA wheels lay them out, and how NCCL is made loadable when it is there
//! only under its versioned name.
//!
//! cudarc 0.19 opens NCCL as `libnccl.so` (and `.so.1`, `.so.9`-`.so.12`), never `libnccl.so.2`,
//! which is what Debian's `libnccl2` and the `nvidia-nccl-cu12` wheel ship (the unversioned
//! link comes only with the `-dev` package): the first NCCL call would panic. [`nccl_link_dir`]
//! makes a directory holding a `libnccl.so` link to the versioned file; a process started with
//! it on `LD_LIBRARY_PATH` (the loader reads that variable once, at start) finds NCCL.

use std::path::{Path, PathBuf};

/// The directories searched, in order: `LD_LIBRARY_PATH`, the system's library directories,
/// CUDA's, and the `nvidia/*/lib` directories of the `python3` on the PATH (pip's wheels).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
        "/usr/local/cuda/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.extend(python_nvidia_dirs());
    dirs
}

/// The first file whose name starts with `name` (`libnccl.so` also finds `libnccl.so.2`) in
/// [`search_dirs`].
pub fn find_library(name: &str) -> Option<PathBuf> {
    search_dirs().iter().find_map(|d| in_dir(d, name))
}

fn in_dir(dir: &Path, name: &str) -> Option<PathBuf> {
    let mut hits: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(name))
        })
        .collect();
    hits.sort();
    hits.into_iter().next()
}

/// `site-packages/nvidia/<pkg>/lib` of the `python3` on the PATH.
fn python_nvidia_dirs() -> Vec<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ])
        .output();
    let Ok(out) = out else { return vec![] };
    let site = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if site.is_empty() {
        return vec![];
    }
    std::fs::read_dir(Path::new(&site).join("nvidia"))
        .map(|r| r.flatten().map(|e| e.path().join("lib")).collect())
        .unwrap_or_default()
}

/// The CUDA headers NVRTC compiles cubecl's kernels against: `include/cuda.h` under
/// `cuda_path` (`$CUDA_PATH`), else under `/usr/local/cuda`; `Err` says where it looked.
pub fn cuda_headers(cuda_path: Option<&Path>) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = cuda_path
        .map(Path::to_path_buf)
        .into_iter()
        .chain([PathBuf::from("/usr/local/cuda")])
        .map(|p| p.join("include"))
        .collect();
    match candidates.iter().find(|p| p.join("cuda.h").is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(format!(
            "cuda.h not in {} (set CUDA_PATH to the CUDA toolkit)",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        )),
    }
}

/// What a CUDA run needs at run time that this machine lacks: the driver (`libcuda.so.1`),
/// NVRTC (cubecl compiles every kernel with it) and the CUDA headers. Empty when all are here.
pub fn cuda_runtime_missing() -> Vec<String> {
    let mut missing = vec![];
    if find_library("libcuda.so").is_none() {
        missing.push("the CUDA driver (libcuda.so.1; the NVIDIA driver installs it)".to_string());
    }
    if find_library("libnvrtc.so").is_none() {
        missing.push(
            "NVRTC (libnvrtc.so*; the CUDA toolkit or pip's nvidia-cuda-nvrtc-cu12)".to_string(),
        );
    }
    let cuda_path = std::env::var_os("CUDA_PATH").map(PathBuf::from);
    if let Err(e) = cuda_headers(cuda_path.as_deref()) {
        missing.push(format!("the CUDA headers: {e}"));
    }
    missing
}

/// A directory under `cache` holding `libnccl.so`, a link to the NCCL library `found`
/// (made once per library; an existing link is kept).
pub fn nccl_link_dir(found: &Path, cache: &Path) -> std::io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    found.hash(&mut h);
    let dir = cache.join(format!("nccl-{:016x}", h.finish()));
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(found) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(found, &link)?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers are found under `CUDA_PATH`; without them the message says where it looked.
    #[test]
    fn cuda_headers_are_looked_for_under_cuda_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = cuda_headers(Some(dir.path())).err();
        if !Path::new("/usr/local/cuda/include/cuda.h").is_file() {
            let err = err.expect("no headers here");
            assert!(err.contains(&dir.path().display().to_string()), "{err}");
        }
        std::fs::create_dir_all(dir.path().join("include")).unwrap();
        std::fs::write(dir.path().join("include/cuda.h"), b"").unwrap();
        assert_eq!(
            cuda_headers(Some(dir.path())).unwrap(),
            dir.path().join("include")
        );
    }

    /// A versioned library on `LD_LIBRARY_PATH` is found by its base name, and the link
    /// directory names it `libnccl.so`.
    #[test]
    fn a_versioned_nccl_is_found_and_linked_under_the_name_cudarc_opens() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        let so2 = lib.join("libnccl.so.2");
        std::fs::write(&so2, b"").unwrap();
        assert_eq!(in_dir(&lib, "libnccl.so"), Some(so2.clone()));
        let linked = nccl_link_dir(&so2, &dir.path().join("cache")).unwrap();
        assert_eq!(std::fs::read_link(linked.join("libnccl.so")).unwrap(), so2);
        // Made again: the same directory, the link kept.
        assert_eq!(
            nccl_link_dir(&so2, &dir.path().join("cache")).unwrap(),
            linked
        );
    }
}
