//! `rookery bench step`: the time of one CLIP training step (forward, backward, clipping,
//! AdamW) on random inputs, without the loader, for comparison with PyTorch eager
//! (benches/reference/clip_step.py builds the same model).

use std::time::Instant;

use anyhow::Result;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use rookery_model::loss::clip_loss;
use rookery_model::ClipConfig;

use crate::optim::clip_global_norm;

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
    let mut optim = AdamWConfig::new()
        .with_beta_2(0.98)
        .with_epsilon(1e-6)
        .with_weight_decay(0.1)
        .init::<B, rookery_model::Clip<B>>();
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
        let loss = clip_loss(
            model.encode_image(images),
            model.encode_text(tokens),
            model.logit_scale.val(),
        );
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        clip_global_norm(&model, &mut grads, 1.0);
        model = optim.step(1e-4, model, grads).clamp_logit_scale();
        let _ = model.logit_scale.val().into_scalar(); // wait for the step to finish
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}
