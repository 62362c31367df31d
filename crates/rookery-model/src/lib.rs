//! rookery-model: the models rookery trains, written on burn and generic over the backend.
//!
//! - [`clip`]: CLIP with a ViT image tower ([`vit`]) and a causal text tower ([`text`]),
//!   built from the pre-norm blocks in [`layers`];
//! - [`loss`]: the symmetric InfoNCE loss, shaped for gathered features.

pub mod clip;
pub mod layers;
pub mod loss;
pub mod text;
pub mod vit;

pub use clip::{Clip, ClipConfig};
