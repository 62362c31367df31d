//! What differs between training stages, behind one trait so that the trainer has one loop:
//! - [`clip`]: stage 1, CLIP with a global-batch contrastive loss;
//! - [`lm`]: stage 0 of the tiny recipe, a causal language model on the pages' text;
//! - [`flamingo`]: stage 2, Perceiver Resampler and gated cross-attention over a frozen CLIP
//!   vision tower and a frozen LM.
//!
//! The loop ([`crate::trainer`]) owns batching, accumulation, the optimizer update, logging,
//! evaluation cadence, checkpoints and ranks; a stage owns its model, its data pipeline, its
//! gradients and its evaluation.

pub mod clip;
pub mod flamingo;
pub mod lm;

use std::sync::Arc;

use anyhow::Result;
use burn::module::{AutodiffModule, ParamId};
use burn::tensor::backend::AutodiffBackend;
use rookery_data::loader::{Mode, Prepare};
use rookery_data::TextTokenizer;
use rookery_dist::Communicator;
use serde::Serialize;

use crate::config::RunConfig;
use crate::parallel::GradSync;
use crate::step::LocalGrads;
use rookery_eval::clip::EvalReport;
use rookery_eval::fewshot::TextReport;

/// A stage's batches.
pub type BatchOf<P> = <P as Prepare>::Batch;

/// One training stage.
pub trait Stage<B: AutodiffBackend>: Sized + Sync {
    type Model: AutodiffModule<B> + Clone + Send + 'static;
    type Prep: Prepare;

    /// The stage of a run of `cfg`, with what the config leaves open resolved (vocabulary from
    /// the tokenizer, shapes from the checkpoints the run starts from).
    fn new(cfg: &RunConfig, tokenizer: Arc<TextTokenizer>) -> Result<Self>;
    /// The resolved config: what the run directory and checkpoints record.
    fn config(&self) -> &RunConfig;
    /// The data pipeline.
    fn prepare(&self, mode: Mode) -> Result<Self::Prep>;
    /// Fresh weights (the backend is seeded before).
    fn init(&self, device: &B::Device) -> Self::Model;
    /// The weights a fresh run starts from besides its initialisation (`model.init_from`,
    /// stage 2's vision tower and language model).
    fn load_start(&self, model: Self::Model) -> Result<Self::Model> {
        Ok(model)
    }
    /// This rank's part of one optimizer step over its micro-batches: its gradients and its
    /// share of the global batch's loss. The loop sums them over ranks (`sync`, which a stage
    /// may hand final gradients early to overlap their sums with its backward).
    fn grads(
        &self,
        model: &Self::Model,
        micro: Vec<BatchOf<Self::Prep>>,
        comm: &dyn Communicator<B::InnerBackend>,
        sync: &mut GradSync<'_, B::InnerBackend>,
        device: &B::Device,
    ) -> Result<LocalGrads>;
    /// Constraints after each update (CLIP clamps `logit_scale`).
    fn after_update(&self, model: Self::Model) -> Self::Model {
        model
    }
    /// Parameters trained at a multiple of the learning rate (stage 2: the tanh gates).
    fn lr_mult(&self, _model: &Self::Model) -> Vec<(ParamId, f32)> {
        Vec::new()
    }
    /// Restores what a checkpoint's weights do not record (stage 2: which parts are frozen).
    fn after_load(&self, model: Self::Model) -> Self::Model {
        model
    }
    /// The model as it trains on `device`, called last when it is built, fresh or resumed
    /// (stage 2 holds its frozen towers in `flamingo.frozen_dtype`).
    fn place(&self, model: Self::Model, _device: &B::Device) -> Result<Self::Model> {
        Ok(model)
    }
    /// Extra fields of the training log line.
    fn log_fields(&self, _model: &Self::Model) -> serde_json::Map<String, serde_json::Value> {
        Default::default()
    }
    /// Held-out evaluation on `data.val`.
    fn evaluate(
        &self,
        model: &<Self::Model as AutodiffModule<B>>::InnerModule,
        device: &B::Device,
    ) -> Result<Report>;
}

/// What an evaluation reports.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Report {
    Clip(EvalReport),
    Text(TextReport),
}
