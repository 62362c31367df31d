//! Stage 0 of the tiny recipe: a causal language model pre-trained on the interleaved pages'
//! text (the `<image>` tokens stay in place, the pixels are not read), so that stage 2 has a
//! frozen LM that knows the language of the pages and nothing of their images.

use std::sync::Arc;

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use rookery_data::loader::Mode;
use rookery_data::pages::{PageBatch, Pages};
use rookery_data::TextTokenizer;
use rookery_dist::Communicator;
use rookery_model::flamingo::LanguageModel;

use super::{Report, Stage};
use crate::causal::causal_local;
use crate::config::RunConfig;
use crate::parallel::GradSync;
use crate::step::LocalGrads;
use rookery_eval::fewshot::perplexity;

pub struct LmStage {
    cfg: RunConfig,
    tokenizer: Arc<TextTokenizer>,
}

/// The vocabulary from the tokenizer when the config leaves it at 0, and the checks that need it.
pub(crate) fn resolve_lm(cfg: &mut RunConfig, tk: &TextTokenizer) -> Result<()> {
    if cfg.lm.vocab_size == 0 {
        cfg.lm.vocab_size = tk.vocab_size;
    }
    if cfg.lm.vocab_size < tk.vocab_size {
        bail!(
            "lm.vocab_size = {} is smaller than the tokenizer's {} tokens ({})",
            cfg.lm.vocab_size,
            tk.vocab_size,
            cfg.data.tokenizer.display()
        );
    }
    Ok(())
}

impl<B: AutodiffBackend> Stage<B> for LmStage {
    type Model = LanguageModel<B>;
    type Prep = Pages;

    fn new(cfg: &RunConfig, tokenizer: Arc<TextTokenizer>) -> Result<Self> {
        let mut cfg = cfg.clone();
        resolve_lm(&mut cfg, &tokenizer)?;
        Ok(LmStage { cfg, tokenizer })
    }

    fn config(&self) -> &RunConfig {
        &self.cfg
    }

    fn prepare(&self, mode: Mode) -> Result<Pages> {
        let mut p =
            Pages::new(&self.cfg.data, self.tokenizer.clone(), mode).map_err(anyhow::Error::msg)?;
        p.decode_images = false;
        Ok(p)
    }

    fn init(&self, device: &B::Device) -> LanguageModel<B> {
        self.cfg.lm.init(device)
    }

    fn grads(
        &self,
        model: &LanguageModel<B>,
        micro: Vec<PageBatch>,
        comm: &dyn Communicator<B::InnerBackend>,
        _sync: &mut GradSync<'_, B::InnerBackend>,
        _device: &B::Device,
    ) -> Result<LocalGrads> {
        Ok(causal_local(model, micro, comm, |m, _, tokens| {
            m.forward(tokens)
        })?)
    }

    fn evaluate(
        &self,
        model: &LanguageModel<B::InnerBackend>,
        device: &B::Device,
    ) -> Result<Report> {
        let prep = <Self as Stage<B>>::prepare(self, Mode::Eval)?;
        let report = perplexity(
            &self.cfg.data,
            prep,
            self.cfg.eval.pages,
            device,
            |tokens, _| model.forward(tokens),
        )?;
        tracing::info!(
            perplexity = report.perplexity,
            tokens = report.tokens,
            "eval"
        );
        Ok(Report::Text(report))
    }
}
