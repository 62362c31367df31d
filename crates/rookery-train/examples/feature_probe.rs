//! What a stage-2 model can hope to read from a CLIP checkpoint's vision tower: a small Perceiver
//! Resampler and three linear heads trained on the tower's frozen patch tokens to predict the
//! color, shape and count of a synthetic scene (one group of shapes, as on the synthetic pages).
//! Held-out accuracy is printed every 100 steps; `--random` probes a freshly initialised tower of
//! the same shape instead, the baseline that says what training the tower added.
//!
//! `cargo run --release --example feature_probe -- runs/clip-tiny/checkpoints/step-00000400`

use anyhow::{bail, Result};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use rookery_data::rng::Rng;
use rookery_data::synth::scene::{Group, Scene};
use rookery_data::transform::{CLIP_MEAN, CLIP_STD};
use rookery_model::flamingo::{PerceiverResampler, ResamplerConfig, VisionTower};
use rookery_train::stage::flamingo::load_vision;
use rookery_train::RunConfig;

mod probe;

type I = Flex;
type A = Autodiff<Flex>;

const SIZE: usize = 64;
const TASKS: [(&str, usize); 3] = [("color", 8), ("shape", 6), ("count", 4)];

#[derive(Module, Debug)]
struct Probe<B: Backend> {
    resampler: PerceiverResampler<B>,
    heads: Vec<Linear<B>>,
}

/// `n` rendered scenes, normalised CHW, with their (color, shape, count - 1) labels.
fn scenes(n: usize, seed: u64) -> (Vec<f32>, Vec<[usize; 3]>) {
    let mut rng = Rng::new(seed);
    let (mut px, mut labels) = (Vec::new(), Vec::new());
    let plane = SIZE * SIZE;
    for _ in 0..n {
        let g = Group::random(&mut rng);
        let rgb = Scene::with_groups(&mut rng, vec![g], None).render(SIZE as u32, &mut rng);
        let mut chw = vec![0f32; 3 * plane];
        for (i, p) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * plane + i] = (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
            }
        }
        px.extend(chw);
        labels.push([g.color, g.shape, g.count as usize - 1]);
    }
    (px, labels)
}

fn accuracy(probe: &Probe<I>, feats: Tensor<I, 4>, labels: &[[usize; 3]]) -> Vec<f32> {
    let [n, _, _, d] = feats.dims();
    let h = probe.resampler.forward(feats).mean_dim(1).reshape([n, d]);
    let task_acc =
        |(k, head): (usize, &Linear<I>)| probe::accuracy(head.forward(h.clone()), |i| labels[i][k]);
    probe.heads.iter().enumerate().map(task_acc).collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(std::path::PathBuf::from) else {
        bail!("usage: feature_probe CLIP_CHECKPOINT_DIR [--random]");
    };
    let device = Default::default();
    let vision = if args.iter().any(|a| a == "--random") {
        VisionTower::Clip(
            RunConfig::load(&dir.join("config.toml"), &[])?
                .model
                .init::<I>(&device)
                .visual,
        )
    } else {
        load_vision::<I>(&dir, &device)?
    };
    let (n_train, n_test) = (4000, 1000);
    let (px, train_y) = scenes(n_train, 1);
    let train_x = probe::patch_tokens(&vision, &px, 1, SIZE, &device);
    let (px, test_y) = scenes(n_test, 2);
    let test_x = probe::patch_tokens(&vision, &px, 1, SIZE, &device);
    let d = train_x.dims()[3];
    let resampler = ResamplerConfig {
        latents: 16,
        depth: 2,
        heads: 4,
        dim_head: 32,
        ff_mult: 2,
        max_frames: 1,
    };
    let mut probe = Probe::<A> {
        resampler: resampler.init(d, &device),
        heads: TASKS
            .iter()
            .map(|&(_, k)| LinearConfig::new(d, k).init(&device))
            .collect(),
    };
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    let (batch, mut rng) = (64, Rng::new(9));
    for step in 1..=600 {
        let idx: Vec<i64> = (0..batch).map(|_| rng.below(n_train) as i64).collect();
        let rows = Tensor::from_data(TensorData::new(idx.clone(), [batch]), &device);
        let x = Tensor::<A, 4>::from_inner(train_x.clone().select(0, rows));
        let h = probe.resampler.forward(x).mean_dim(1).reshape([batch, d]);
        let mut loss = Tensor::<A, 1>::zeros([1], &device);
        for (k, head) in probe.heads.iter().enumerate() {
            let y: Vec<i64> = idx.iter().map(|&i| train_y[i as usize][k] as i64).collect();
            let y = Tensor::<A, 2, Int>::from_data(TensorData::new(y, [batch, 1]), &device);
            loss = loss
                - log_softmax(head.forward(h.clone()), 1)
                    .gather(1, y)
                    .mean()
                    .reshape([1]);
        }
        let grads = GradientsParams::from_grads(loss.backward(), &probe);
        probe = optim.step(1e-3, probe, grads);
        if step % 100 == 0 {
            let acc = accuracy(&probe.valid(), test_x.clone(), &test_y);
            let shown: Vec<String> = TASKS
                .iter()
                .zip(acc)
                .map(|((t, k), a)| format!("{t} {a:.3} (chance {:.3})", 1.0 / *k as f32))
                .collect();
            println!("step {step}: held-out {}", shown.join(", "));
        }
    }
    Ok(())
}
