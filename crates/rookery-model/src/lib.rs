//! rookery-model: the models rookery trains, written on burn and generic over the backend.
//!
//! - [`clip`]: CLIP with a ViT image tower ([`vit`]) and a causal text tower ([`text`]),
//!   built from the pre-norm blocks in [`layers`];
//! - [`loss`]: the symmetric InfoNCE and SigLIP losses, shaped for gathered features;
//! - [`next_token`]: the weighted next-token loss of the language models;
//! - [`cpu`]: vectorised CPU kernels for ops burn's CPU backend runs scalar (GELU);
//! - [`flamingo`]: a decoder LM, the Perceiver Resampler and gated cross-attention;
//! - [`precision`]: the dtype stage 2's frozen towers are held and run in.

pub mod clip;
pub mod cpu;
pub mod flamingo;
pub mod layers;
pub mod loss;
pub mod next_token;
pub mod precision;
pub mod siglip;
pub mod text;
pub mod vit;

pub use clip::{Clip, ClipConfig, ContrastiveLoss};
