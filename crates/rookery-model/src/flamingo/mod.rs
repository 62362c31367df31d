//! Flamingo (Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning"):
//! a frozen vision encoder and a frozen language model, joined by a trainable Perceiver
//! Resampler and gated cross-attention blocks.

pub mod cache;
mod decoder;
pub mod llama;
pub mod lm;
pub mod model;
pub mod mpt;
pub mod neox;
pub mod resampler;
pub mod xattn;

pub use cache::KvCache;
pub use llama::LlamaBlock;
pub use lm::{LanguageModel, LmConfig, LmStyle, RopeScaling};
pub use model::{Flamingo, FlamingoConfig, VisionTokens, VisionTower};
pub use mpt::MptBlock;
pub use neox::NeoxBlock;
pub use resampler::{PerceiverResampler, ResamplerConfig};
pub use xattn::{media_mask, GatedCrossAttention};
