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
pub use tokenize::TextTokenizer;

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
    #[error("tokenizer {0}: {1}")]
    Tokenizer(String, String),
    #[error("too many bad samples: {bad} of {total} ({frac:.1}%) exceed the limit max_bad_fraction = {limit}; last: {last}")]
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
}
