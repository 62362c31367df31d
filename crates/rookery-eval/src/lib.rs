//! rookery-eval: how rookery scores its models, during training and on their own.
//!
//! - [`input`]: host batches as device tensors (shared with training);
//! - [`clip`]: held-out image<->text recall of a CLIP, with [`zero_shot`] classification on the
//!   synthetic scenes' labels and [`confusion`] analysis of its mistakes;
//! - [`fewshot`]: perplexity of the text stages and k-shot question answering of stage 2.

pub mod clip;
pub mod confusion;
pub mod fewshot;
pub mod input;
pub mod zero_shot;
