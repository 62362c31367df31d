//! Stage 1: CLIP on image-text pairs, with the contrastive loss over the global batch.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rookery_data::loader::{Mode, Pairs};
use rookery_data::rng::{hash_str, Rng};
use rookery_data::{ImageTextBatch, TextTokenizer};
use rookery_dist::Communicator;
use rookery_model::text::used_context;
use rookery_model::vit::VitConfig;
use rookery_model::{Clip, ClipConfig};
use serde_json::json;

use super::{Report, Stage};
use crate::config::RunConfig;
use crate::parallel::GradSync;
use crate::step::{contrastive_local, LocalGrads, Micro};
use rookery_eval::benchmark::Runner;
use rookery_eval::clip::evaluate;
use rookery_eval::embed::TextEncoder;
use rookery_eval::input::{image_tensor, token_tensor};

/// Random stream of patch dropout, apart from the loader's (crop) and the synthetic set's.
const PATCH_STREAM: u64 = 0x7061_7463_6864_726f;

/// The patches each sample (`keys`, `epochs`: a batch's) keeps under `[model.vision]
/// patch_dropout` (`None` when off), row-major `[N, K]`, ascending within a row. The choice is
/// a function of the data seed, the sample's key and its epoch only: a sample keeps the same
/// patches whichever rank or micro-batch it lands in, and after a resume.
pub fn kept_patches(
    keys: &[String],
    epochs: &[u64],
    vision: &VitConfig,
    seed: u64,
) -> Option<Vec<i64>> {
    if vision.patch_dropout <= 0.0 {
        return None;
    }
    let (n, k) = (vision.grid() * vision.grid(), vision.kept_patches());
    let mut out = Vec::with_capacity(keys.len() * k);
    for (key, &epoch) in keys.iter().zip(epochs) {
        let mut rng = Rng::derive(&[seed, PATCH_STREAM, epoch, hash_str(key)]);
        let mut idx: Vec<i64> = (0..n as i64).collect();
        // Partial Fisher-Yates: the first k places get a uniform k-subset.
        for i in 0..k {
            let j = i + rng.below(n - i);
            idx.swap(i, j);
        }
        let mut kept = idx[..k].to_vec();
        kept.sort_unstable();
        out.extend(kept);
    }
    Some(out)
}

/// The `[model]` of a run that starts from `model.init_from` (rookery's export, open_clip or
/// HF CLIP): the architecture is the source's, the training options (loss, patch dropout,
/// length buckets) the config's. The data must fit it: the tokenizer the source was trained
/// with, and its image size and context length.
fn pretrained_shapes(cfg: &RunConfig, tokenizer: &TextTokenizer) -> Result<ClipConfig> {
    let from = &cfg.model.init_from;
    let src = rookery_interop::clip_config(Path::new(from))
        .with_context(|| format!("model.init_from = {from}"))?;
    let mine = &cfg.model;
    let mut m = src.clone();
    m.init_from = from.clone();
    (m.loss, m.init_logit_bias) = (mine.loss, mine.init_logit_bias);
    m.vision.patch_dropout = mine.vision.patch_dropout;
    m.text.length_buckets = mine.text.length_buckets;
    (m.vision.locked, m.text.locked) = (mine.vision.locked, mine.text.locked);
    let t = &src.text;
    let checks = [
        (
            tokenizer.vocab_size != t.vocab_size || tokenizer.eot as usize != t.eot_token,
            format!(
                "data.tokenizer = {} has {} tokens (end of text {}), the model's text tower {} (end of text {}): use the tokenizer it was trained with",
                cfg.data.tokenizer.display(), tokenizer.vocab_size, tokenizer.eot, t.vocab_size, t.eot_token
            ),
        ),
        (
            cfg.data.image_size as usize != src.vision.image_size,
            format!("data.image_size = {}, the model's is {}", cfg.data.image_size, src.vision.image_size),
        ),
        (
            cfg.data.context_length != t.context_length,
            format!("data.context_length = {}, the model's is {}", cfg.data.context_length, t.context_length),
        ),
    ];
    if let Some((_, why)) = checks.iter().find(|c| c.0) {
        anyhow::bail!("model.init_from = {from}: {why}");
    }
    if m != *mine {
        tracing::info!(from = %from, "[model] shapes taken from the pretrained model");
    }
    Ok(m)
}

/// The towers `[model.vision] locked` / `[model.text] locked` name, frozen (LiT): no
/// gradient, so no update, no weight decay and no optimizer state.
fn lock<B: AutodiffBackend>(cfg: &ClipConfig, mut model: Clip<B>) -> Clip<B> {
    if cfg.vision.locked {
        model.visual = model.visual.no_grad();
    }
    if cfg.text.locked {
        model.text = model.text.no_grad();
    }
    model
}

pub struct ClipStage {
    cfg: RunConfig,
    tokenizer: Arc<TextTokenizer>,
}

impl<B: AutodiffBackend> Stage<B> for ClipStage {
    type Model = Clip<B>;
    type Prep = Pairs;

    fn new(cfg: &RunConfig, tokenizer: Arc<TextTokenizer>) -> Result<Self> {
        let mut cfg = cfg.clone();
        if !cfg.model.init_from.is_empty() {
            cfg.model = pretrained_shapes(&cfg, &tokenizer)?;
            return Ok(ClipStage { cfg, tokenizer });
        }
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
        lock(&self.cfg.model, self.cfg.model.init(device))
    }

    fn after_load(&self, model: Clip<B>) -> Clip<B> {
        lock(&self.cfg.model, model)
    }

    fn load_start(&self, model: Clip<B>) -> Result<Clip<B>> {
        let from = &self.cfg.model.init_from;
        if from.is_empty() {
            return Ok(model);
        }
        let model = rookery_interop::load_clip(model, Path::new(from))
            .with_context(|| format!("model.init_from = {from}"))?;
        tracing::info!(from = %from, "initialised from pretrained weights");
        Ok(lock(&self.cfg.model, model).map(&mut crate::optim::PathIds::default()))
    }

    fn grads(
        &self,
        model: &Clip<B>,
        micro: Vec<ImageTextBatch>,
        comm: &dyn Communicator<B::InnerBackend>,
        sync: &mut GradSync<'_, B::InnerBackend>,
        device: &B::Device,
    ) -> Result<LocalGrads> {
        let (eot, vision) = (model.text.eot_token, &self.cfg.model.vision);
        let micro = micro
            .iter()
            .map(|b| {
                let images = image_tensor::<B>(b, device);
                // Captions and their hard negatives go through the tower as one batch, so
                // both keep the positions either needs.
                let (n, ctx) = (b.batch_size, b.context_length);
                let keep =
                    used_context(&b.tokens, ctx, eot).max(used_context(&b.neg_tokens, ctx, eot));
                let tokens = token_tensor::<B>(&b.tokens, n, ctx, keep, device);
                let neg_tokens = (!b.neg_tokens.is_empty())
                    .then(|| token_tensor::<B>(&b.neg_tokens, n, ctx, keep, device));
                let patches =
                    kept_patches(&b.keys, &b.epochs, vision, self.cfg.data.seed).map(|p| {
                        let k = p.len() / n;
                        Tensor::from_data(TensorData::new(p, [n, k]), device)
                    });
                Micro {
                    images,
                    tokens,
                    neg_tokens,
                    patches,
                }
            })
            .collect();
        let negatives = self.cfg.train.negatives;
        Ok(contrastive_local(model, micro, comm, negatives, sync)?)
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
        let mut r = match self.cfg.data.val.is_empty() {
            true => Default::default(), // [[eval.tasks]] only
            false => evaluate(model, &self.cfg.data, self.tokenizer.clone(), device)?,
        };
        r.benchmarks = self.benchmarks(model, device)?;
        // The whole report (confusions included) goes to metrics.jsonl; the log gets the gist.
        let zero_shot: Vec<String> = r
            .zero_shot
            .iter()
            .map(|(k, (acc, chance))| format!("{k} {acc:.3} (chance {chance:.3})"))
            .collect();
        tracing::info!(
            n = r.n,
            i2t_r1 = %format!("{:.4}", r.i2t_r1),
            t2i_r1 = %format!("{:.4}", r.t2i_r1),
            chance = %format!("{:.4}", r.chance_r1),
            zero_shot = %zero_shot.join(", "),
            "eval"
        );
        Ok(Report::Clip(r))
    }
}

impl ClipStage {
    /// The `[[eval.tasks]]` figures, `NAME/METRIC` (each set also logged as one line).
    fn benchmarks<B: Backend>(
        &self,
        model: &Clip<B>,
        device: &B::Device,
    ) -> Result<BTreeMap<String, f64>> {
        let towers = TextEncoder {
            model,
            tokenizer: &self.tokenizer,
            ctx: self.cfg.model.text.context_length,
            device,
        };
        let runner = Runner {
            towers: &towers,
            data: &self.cfg.data,
            batch: self.cfg.data.batch_size,
            device,
        };
        let mut out = BTreeMap::new();
        let sets = self
            .cfg
            .eval
            .open_tasks()
            .map_err(|(key, msg)| anyhow::anyhow!("{key}: {msg}"))?;
        for (task, set) in sets {
            let report = runner.run(task.task, &set, &task.recall_k)?;
            tracing::info!("eval {}", report.line());
            for (k, v) in report.metrics {
                out.insert(format!("{}/{k}", set.name), v);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_patches_belong_to_the_sample_and_its_epoch() {
        let vision = VitConfig {
            patch_dropout: 0.5,
            ..Default::default()
        }; // 64 patches, 32 kept
        let keys: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let kept = kept_patches(&keys, &[0, 0, 0], &vision, 7).unwrap();
        assert_eq!(kept.len(), 3 * 32);
        for row in kept.chunks(32) {
            assert!(
                row.windows(2).all(|w| w[0] < w[1]),
                "not distinct and ascending"
            );
            assert!(row.iter().all(|&p| (0..64).contains(&p)));
        }
        assert_ne!(
            kept[..32],
            kept[32..64],
            "two samples kept the same patches"
        );
        // Sample "b" alone, or first in another batch: the same patches.
        let alone = kept_patches(&keys[1..2], &[0], &vision, 7).unwrap();
        assert_eq!(alone, kept[32..64]);
        // Another epoch or seed: other patches.
        assert_ne!(kept_patches(&keys[1..2], &[1], &vision, 7).unwrap(), alone);
        assert_ne!(kept_patches(&keys[1..2], &[0], &vision, 8).unwrap(), alone);
        // Off: nothing.
        let off = VitConfig::default();
        assert!(kept_patches(&keys, &[0, 0, 0], &off, 7).is_none());
        // Every patch is about equally likely to stay.
        let many: Vec<String> = (0..2000).map(|i| format!("k{i}")).collect();
        let mut count = [0usize; 64];
        for p in kept_patches(&many, &vec![0; 2000], &vision, 1).unwrap() {
            count[p as usize] += 1;
        }
        // Each is Binomial(2000, 0.5): mean 1000, sd 22.4; 5 sd either side.
        assert!(
            count.iter().all(|&c| (888..=1112).contains(&c)),
            "{count:?}"
        );
    }
}
