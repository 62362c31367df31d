//! Stage 1: CLIP on image-text pairs, with the contrastive loss over the global batch.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rookery_data::loader::{Mode, Pairs};
use rookery_data::{ImageTextBatch, TextTokenizer};
use rookery_dist::Communicator;
use rookery_model::Clip;
use serde_json::json;

use super::{Report, Stage};
use crate::config::RunConfig;
use crate::eval::{batch_tensors, evaluate};
use crate::step::{contrastive_grads, Micro, Negatives, StepGrads};

pub struct ClipStage {
    cfg: RunConfig,
    tokenizer: Arc<TextTokenizer>,
}

impl<B: AutodiffBackend> Stage<B> for ClipStage {
    type Model = Clip<B>;
    type Prep = Pairs;

    fn new(cfg: &RunConfig, tokenizer: Arc<TextTokenizer>) -> Result<Self> {
        let mut cfg = cfg.clone();
        if cfg.model.text.vocab_size == 0 {
            cfg.model.text.vocab_size = tokenizer.vocab_size;
        }
        cfg.model.text.eot_token = tokenizer.eot as usize;
        Ok(ClipStage { cfg, tokenizer })
    }

    fn config(&self) -> &RunConfig {
        &self.cfg
    }

    fn prepare(&self, mode: Mode) -> Result<Pairs> {
        Ok(Pairs::new(&self.cfg.data, self.tokenizer.clone(), mode))
    }

    fn init(&self, device: &B::Device) -> Clip<B> {
        self.cfg.model.init(device)
    }

    fn load_start(&self, model: Clip<B>) -> Result<Clip<B>> {
        let from = &self.cfg.model.init_from;
        if from.is_empty() {
            return Ok(model);
        }
        let model =
            crate::export::load_exported(model, Path::new(from)).context("model.init_from")?;
        tracing::info!(from = %from, "initialised from exported weights");
        Ok(model)
    }

    fn grads(
        &self,
        model: &Clip<B>,
        micro: Vec<ImageTextBatch>,
        comm: &dyn Communicator<B::InnerBackend>,
        device: &B::Device,
    ) -> Result<StepGrads> {
        let micro = micro
            .iter()
            .map(|b| {
                let (images, tokens) = batch_tensors::<B>(b, device);
                let neg_tokens = (!b.neg_tokens.is_empty()).then(|| {
                    let shape = [b.batch_size, b.context_length];
                    Tensor::from_data(TensorData::new(b.neg_tokens.clone(), shape), device)
                });
                Micro {
                    images,
                    tokens,
                    neg_tokens,
                }
            })
            .collect();
        let negatives = match self.cfg.train.negatives.as_str() {
            "local" => Negatives::Local,
            _ => Negatives::Global,
        };
        Ok(contrastive_grads(
            model,
            micro,
            comm,
            negatives,
            self.cfg.dist.bucket_elems(),
        )?)
    }

    fn after_update(&self, model: Clip<B>) -> Clip<B> {
        model.clamp_logit_scale()
    }

    fn log_fields(&self, model: &Clip<B>) -> serde_json::Map<String, serde_json::Value> {
        let scale: f32 = model.logit_scale.val().into_scalar().elem();
        let mut m = serde_json::Map::new();
        m.insert("logit_scale".into(), json!(scale.exp()));
        m
    }

    fn evaluate(&self, model: &Clip<B::InnerBackend>, device: &B::Device) -> Result<Report> {
        let r = evaluate(model, &self.cfg.data, self.tokenizer.clone(), device)?;
        tracing::info!(n = r.n, i2t_r1 = r.i2t_r1, t2i_r1 = r.t2i_r1, chance = r.chance_r1, zero_shot = ?r.zero_shot, "eval");
        Ok(Report::Clip(r))
    }
}
