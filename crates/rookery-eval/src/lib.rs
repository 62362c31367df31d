//! rookery-eval: how rookery scores its models, during training and on their own.
//!
//! - [`config`]: `[eval]`, what an evaluation runs;
//! - [`input`]: host batches as device tensors (shared with training);
//! - [`clip`]: held-out image<->text recall of a CLIP, with [`zero_shot`] classification on the
//!   synthetic scenes' labels and [`confusion`] analysis of its mistakes;
//! - [`benchmark`]: zero-shot classification and retrieval on sets in CLIP_benchmark's layouts,
//!   scored as CLIP_benchmark scores them ([`metrics`]);
//! - [`fewshot`]: perplexity of the text stages and k-shot question answering of stage 2.

pub mod benchmark;
pub mod cider;
pub mod clip;
pub mod config;
pub mod confusion;
pub mod embed;
pub mod fewshot;
pub mod input;
pub mod metrics;
pub mod openflamingo;
pub mod vqa;
pub mod zero_shot;
