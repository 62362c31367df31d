//! Writes webdataset shards: one tar per shard, members `{key}.{ext}` in sample order,
//! deterministic headers (mtime 0, mode 0644) so the same data gives the same bytes.
//! A shard is written under a temporary name, fsynced, then renamed into place.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::DataError;

/// A sample to write: its key and (extension, bytes) members.
pub type SampleMembers = (String, Vec<(String, Vec<u8>)>);

/// Writes `samples` to the tar file `path` atomically (temp + fsync + rename).
pub fn write_shard(
    path: &Path,
    samples: impl IntoIterator<Item = SampleMembers>,
) -> Result<u64, DataError> {
    let name = path.display().to_string();
    let tmp = path.with_extension("tar.tmp");
    let file = File::create(&tmp).map_err(|e| DataError::io(&name, e))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    let mut n = 0u64;
    for (key, members) in samples {
        for (ext, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut h, format!("{key}.{ext}"), data.as_slice())
                .map_err(|e| DataError::io(&name, e))?;
        }
        n += 1;
    }
    let mut w = builder.into_inner().map_err(|e| DataError::io(&name, e))?;
    w.flush().map_err(|e| DataError::io(&name, e))?;
    let file = w
        .into_inner()
        .map_err(|e| DataError::io(&name, e.into_error()))?;
    file.sync_all().map_err(|e| DataError::io(&name, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(&name, e))?;
    Ok(n)
}
