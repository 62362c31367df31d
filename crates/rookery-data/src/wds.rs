//! Webdataset tar reading: members grouped into samples by key, as the Python `webdataset`
//! library does (`tariterators.group_by_keys`).
//!
//! The key is the member path up to the first dot of its basename (`d/a.seg.png` has key `d/a`
//! and extension `seg.png`); extensions are lower-cased; members without a dot are dropped.
//! A repeated extension within one key starts a new sample, as open_clip does (webdataset raises).

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use crate::DataError;

/// One sample: its key and its members by extension, plus the shard it came from.
#[derive(Clone, Debug)]
pub struct RawSample {
    pub shard: Arc<str>,
    pub key: String,
    /// Index of the sample within its shard (0-based), used by loader positions.
    pub index: u64,
    pub members: Vec<(String, Vec<u8>)>,
}

impl RawSample {
    pub fn get(&self, ext: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|(e, _)| e == ext)
            .map(|(_, b)| b.as_slice())
    }

    /// The first member whose extension is in `exts` (order of `exts` wins).
    pub fn first_of<'a>(&'a self, exts: &'a [String]) -> Option<(&'a str, &'a [u8])> {
        exts.iter()
            .find_map(|e| self.get(e).map(|b| (e.as_str(), b)))
    }
}

/// Splits a member path into (key, extension); `None` for members without a dot.
pub fn split_key(path: &str) -> Option<(&str, String)> {
    let base_start = path.rfind('/').map_or(0, |i| i + 1);
    let dot = path[base_start..].find('.')? + base_start;
    if dot == base_start {
        return None; // hidden file such as `._foo` or `.json`: no key
    }
    Some((&path[..dot], path[dot + 1..].to_ascii_lowercase()))
}

/// Opens a shard URL: a file path or `pipe:CMD` (the command's stdout).
pub fn open_shard(url: &str) -> Result<ShardReader, DataError> {
    if let Some(cmd) = url.strip_prefix("pipe:") {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| DataError::io(url, e))?;
        let out = child.stdout.take().expect("piped stdout");
        return Ok(ShardReader {
            inner: Box::new(out),
            child: Some(child),
        });
    }
    let f = std::fs::File::open(url).map_err(|e| DataError::io(url, e))?;
    Ok(ShardReader {
        inner: Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
        child: None,
    })
}

/// A readable shard; kills its `pipe:` child, if any, when dropped early.
pub struct ShardReader {
    inner: Box<dyn Read + Send>,
    child: Option<Child>,
}

impl Read for ShardReader {
    /// At the end of a `pipe:` command's output, its exit status: a command that failed
    /// (`curl` on a missing object) is an error, not an empty or shortened shard.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Some(mut c) = self.child.take() {
                let status = c.wait()?;
                if !status.success() {
                    return Err(std::io::Error::other(format!("the command {status}")));
                }
            }
        }
        Ok(n)
    }
}

impl Drop for ShardReader {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What reading a shard produced: samples, then at most one error that ended the shard early
/// (truncated tar, garbage bytes).
pub enum ShardItem {
    Sample(RawSample),
    /// The shard could not be read further; samples before this point were delivered.
    Broken(DataError),
}

/// Reads every sample of a shard and hands each to `f`; stops early when `f` returns false.
/// Errors inside the tar end the shard with one `ShardItem::Broken`; they never panic.
pub fn read_shard(url: &str, mut f: impl FnMut(ShardItem) -> bool) {
    let reader = match open_shard(url) {
        Ok(r) => r,
        Err(e) => {
            f(ShardItem::Broken(e));
            return;
        }
    };
    let shard: Arc<str> = Arc::from(url);
    let mut archive = tar::Archive::new(reader);
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => {
            f(ShardItem::Broken(DataError::io(url, e)));
            return;
        }
    };
    let mut current: Option<RawSample> = None;
    let mut index = 0u64;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                f(ShardItem::Broken(DataError::bad_tar(url, &e.to_string())));
                return; // the partial sample is dropped: its members may be incomplete
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let Some((key, ext)) = split_key(&path) else {
            continue;
        };
        // The header's size is only a claim (a corrupt one can say petabytes): reserve up to
        // 64 MiB from it and let the read grow the buffer by what actually arrives.
        let mut data = Vec::with_capacity((entry.size() as usize).min(64 << 20));
        if let Err(e) = entry.read_to_end(&mut data) {
            f(ShardItem::Broken(DataError::bad_tar(
                url,
                &format!("{path}: {e}"),
            )));
            return;
        }
        let starts_new = match &current {
            Some(s) => s.key != key || s.get(&ext).is_some(),
            None => true,
        };
        if starts_new {
            if let Some(done) = current.take() {
                if !f(ShardItem::Sample(done)) {
                    return;
                }
                index += 1;
            }
            current = Some(RawSample {
                shard: shard.clone(),
                key: key.to_string(),
                index,
                members: vec![],
            });
        }
        current
            .as_mut()
            .expect("set above")
            .members
            .push((ext, data));
    }
    if let Some(done) = current {
        f(ShardItem::Sample(done));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_key_follows_webdataset() {
        assert_eq!(split_key("d/a.seg.png"), Some(("d/a", "seg.png".into())));
        assert_eq!(
            split_key("x.y/000123.JPG"),
            Some(("x.y/000123", "jpg".into()))
        );
        assert_eq!(split_key("noext"), None);
        assert_eq!(split_key("d/.hidden"), None);
    }
}

#[cfg(test)]
mod pipe_tests {
    use super::*;

    fn broken(url: &str) -> String {
        let mut why = String::new();
        read_shard(url, |i| {
            if let ShardItem::Broken(e) = i {
                why = e.to_string();
            }
            true
        });
        why
    }

    #[test]
    fn a_failing_pipe_command_is_a_broken_shard_with_its_exit_status() {
        let why = broken("pipe:echo partial; exit 3");
        assert!(
            why.contains("pipe:echo partial; exit 3") && why.contains("exit status: 3"),
            "{why}"
        );
        let why = broken("pipe:exit 1");
        assert!(why.contains("exit status: 1"), "{why}");
    }
}
