//! `rookery bench`: the time of one CLIP training step as the trainer runs it (forward,
//! gathered-loss backward, clipping, decoupled decay, AdamW) on random inputs, without the
//! loader, for comparison with PyTorch eager (benches/reference/clip_step.py builds the same
//! model).

use std::time::Instant;

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use rookery_dist::Single;
use rookery_model::ClipConfig;

use crate::optim::{OptimConfig, Updater};
use crate::step::{contrastive_grads, Micro, Negatives};

/// Seconds per step for `steps` timed steps after `warmup` untimed ones.
pub fn step_times<B: AutodiffBackend>(
    model_cfg: &ClipConfig,
    batch: usize,
    warmup: usize,
    steps: usize,
    device: &B::Device,
) -> Result<Vec<f64>> {
    B::seed(device, 0);
    let mut model = model_cfg.init::<B>(device);
    let o = OptimConfig {
        lr: 1e-4,
        warmup_steps: 0,
        ..Default::default()
    };
    let mut up = Updater::new(&o, o.adamw::<B, _>(), &model);
    let comm = Single::<B::InnerBackend>::new(device.clone());
    let s = model_cfg.vision.image_size;
    let (ctx, vocab) = (model_cfg.text.context_length, model_cfg.text.vocab_size);
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let images =
            Tensor::<B, 4>::random([batch, 3, s, s], Distribution::Normal(0.0, 1.0), device);
        let mut ids: Vec<i64> = (0..batch * ctx)
            .map(|k| 4 + (k * 7919 % (vocab - 4)) as i64)
            .collect();
        for row in ids.chunks_mut(ctx) {
            row[ctx - 1] = model_cfg.text.eot_token as i64;
        }
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, ctx]), device);
        let t = Instant::now();
        let micro = vec![Micro {
            images,
            tokens,
            neg_tokens: None,
        }];
        let g = contrastive_grads(&model, micro, &comm, Negatives::Global, 1 << 22)?;
        model = up
            .apply(model, g.grads, i + 1, warmup + steps)
            .0
            .clamp_logit_scale();
        let _ = model.logit_scale.val().into_scalar(); // wait for the step to finish
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}
