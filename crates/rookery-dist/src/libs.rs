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
