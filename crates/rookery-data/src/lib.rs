//! rookery-data: streaming webdataset shards into training batches.
//!
//! Flow: shard spec ([`shards`]) -> per-worker tar readers with a bounded shuffle buffer
//! ([`wds`], [`loader`]) -> decode ([`decode`]) and augment ([`transform`]) on a rayon pool,
//! tokenize ([`tokenize`]) -> [`loader::ImageTextBatch`] in CHW f32, ready for a tensor.
//! [`synth`] renders the embedded synthetic dataset; [`writer`] writes shards.

pub mod decode;
pub mod inspect;
pub mod interleaved;
pub mod loader;
pub mod media;
pub mod pages;
pub mod resplit;
pub mod rng;
pub mod shards;
pub mod stream;
pub mod synth;
pub mod tokenize;
pub mod transform;
pub mod wds;
pub mod writer;

pub use loader::{DataConfig, ImageTextBatch, Loader, LoaderPosition};
pub use shards::expand_shards;
pub use tokenize::{PromptTokenizer, SpecialTokens, TextTokenizer};

/// Errors from reading data; each names the file, pattern or sample concerned.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("shard pattern `{0}` matches no file")]
    NoShards(String),
    #[error("shard pattern `{0}`: {1}")]
    Pattern(String, String),
    #[error("{0}: broken tar: {1}")]
    BadTar(String, String),
    #[error("{shard}: no sample for {seconds:.0} s (data.stall_timeout_s): the reader is stuck on this shard (a hanging pipe: command or file system?)")]
    Stalled { shard: String, seconds: f64 },
    #[error("tokenizer {0}: {1}")]
    Tokenizer(String, String),
    #[error("too many bad samples: {bad} of {total} items read (samples, and shards that could not be read) are bad ({frac:.1}%), over the limit max_bad_fraction = {limit}; last: {last}")]
    TooManyBad {
        bad: u64,
        total: u64,
        frac: f64,
        limit: f64,
        last: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        DataError::Io(what.into(), e)
    }

    /// A broken tar, its reason made printable: the tar reader quotes header bytes, which for
    /// a file that is not a tar at all are binary.
    pub fn bad_tar(shard: impl Into<String>, reason: &str) -> Self {
        DataError::BadTar(shard.into(), printable(reason))
    }
}

/// `s` with control characters and undecodable bytes escaped, cut to 300 characters.
pub fn printable(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(300)
        .flat_map(
            |c| match c.is_control() || c == char::REPLACEMENT_CHARACTER {
                true => c.escape_unicode().collect::<Vec<_>>(),
                false => vec![c],
            },
        )
        .collect();
    if s.chars().nth(300).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn broken_tar_reasons_are_printable() {
        let raw =
            String::from_utf8_lossy(b"numeric field was not a number: \x89PNG\r\n\x1a\n\x00\x00");
        let e = super::DataError::bad_tar("a.tar", &raw).to_string();
        assert!(e.starts_with("a.tar: broken tar: numeric field"), "{e}");
        assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
        assert!(e.contains("PNG\\u{d}\\u{a}"), "{e}");
        let long = "x".repeat(1000);
        assert_eq!(super::printable(&long).len(), 303);
    }
}
