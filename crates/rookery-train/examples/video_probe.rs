//! What the resampler can read about motion from a CLIP checkpoint's frozen vision tower: a
//! Perceiver Resampler with time embeddings (4 frames) and a linear head trained on the tower's
//! patch tokens of synthetic videos to say which way a shape moves (`direction`, 4 ways) or
//! turns (`turn`, clockwise or not). `--no-time` keeps the time embeddings at zero: the latents
//! then see the frames as a set, without order.
//!
//! `cargo run --release --example video_probe -- runs/clip-tiny/checkpoints/step-00002600
//! [--task direction|turn] [--no-time] [--steps 600]`

use anyhow::{bail, Result};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use rookery_data::media::even_sample;
use rookery_data::rng::Rng;
use rookery_data::synth::video::{Event, Video};
use rookery_data::transform::{CLIP_MEAN, CLIP_STD};
use rookery_model::flamingo::{PerceiverResampler, ResamplerConfig};
use rookery_train::stage::flamingo::load_vision;

mod probe;

type I = Flex;
type A = Autodiff<Flex>;

const SIZE: usize = 64;
const FRAMES: usize = 4;

#[derive(Module, Debug)]
struct Probe<B: Backend> {
    resampler: PerceiverResampler<B>,
    head: Linear<B>,
}

/// `n` videos of a moving (`turn`: turning) shape, FRAMES frames each, normalised CHW, with
/// their labels.
fn videos(n: usize, seed: u64, turn: bool) -> (Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let (mut px, mut labels) = (Vec::new(), Vec::new());
    let plane = SIZE * SIZE;
    for _ in 0..n {
        let frames = 4 + rng.below(5);
        let mut v = Video::random(&mut rng, frames);
        let label = rng.below(if turn { 2 } else { 4 });
        v.event = match turn {
            true => Event::Turns {
                clockwise: label == 1,
                from: rng.uniform(0.0, std::f64::consts::TAU),
            },
            false => Event::Moves { direction: label },
        };
        for t in even_sample(frames, FRAMES) {
            let rgb = v.render(t, SIZE as u32, &mut rng);
            let mut chw = vec![0f32; 3 * plane];
            for (i, p) in rgb.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    chw[c * plane + i] = (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
                }
            }
            px.extend(chw);
        }
        labels.push(label);
    }
    (px, labels)
}

fn accuracy(probe: &Probe<I>, feats: Tensor<I, 4>, labels: &[usize]) -> f32 {
    let [n, _, _, d] = feats.dims();
    let h = probe.resampler.forward(feats).mean_dim(1).reshape([n, d]);
    probe::accuracy(probe.head.forward(h), |i| labels[i])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(std::path::PathBuf::from) else {
        bail!("usage: video_probe CLIP_CHECKPOINT_DIR [--task direction|turn] [--no-time]");
    };
    let no_time = args.iter().any(|a| a == "--no-time");
    let turn = args.windows(2).any(|w| w[0] == "--task" && w[1] == "turn");
    let classes = if turn { 2 } else { 4 };
    let steps: usize = match args.iter().position(|a| a == "--steps") {
        Some(i) => args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(600),
        None => 600,
    };
    let device = Default::default();
    let vision = load_vision::<I>(&dir, &device)?;
    let (n_train, n_test) = (3000, 600);
    let (px, train_y) = videos(n_train, 1, turn);
    let train_x = probe::patch_tokens(&vision, &px, FRAMES, SIZE, &device);
    let (px, test_y) = videos(n_test, 2, turn);
    let test_x = probe::patch_tokens(&vision, &px, FRAMES, SIZE, &device);
    let d = train_x.dims()[3];
    let tokens: Vec<f32> = train_x
        .clone()
        .narrow(0, 0, 8)
        .into_data()
        .to_vec()
        .unwrap();
    let rms = (tokens.iter().map(|x| x * x).sum::<f32>() / tokens.len() as f32).sqrt();
    println!("patch tokens: width {d}, rms {rms:.3} (time embeddings start at rms 1)");
    let resampler = ResamplerConfig {
        latents: 16,
        depth: 2,
        heads: 4,
        dim_head: 32,
        ff_mult: 2,
        max_frames: FRAMES,
    };
    let mut r = resampler.init::<A>(d, &device);
    if no_time {
        r.frame_embs = burn::module::Param::from_tensor(Tensor::zeros([FRAMES, d], &device))
            .set_require_grad(false);
    }
    let mut probe = Probe::<A> {
        resampler: r,
        head: LinearConfig::new(d, classes).init(&device),
    };
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    let (batch, mut rng) = (64, Rng::new(9));
    for step in 1..=steps {
        let idx: Vec<i64> = (0..batch).map(|_| rng.below(n_train) as i64).collect();
        let rows = Tensor::from_data(TensorData::new(idx.clone(), [batch]), &device);
        let x = Tensor::<A, 4>::from_inner(train_x.clone().select(0, rows));
        let h = probe.resampler.forward(x).mean_dim(1).reshape([batch, d]);
        let y: Vec<i64> = idx.iter().map(|&i| train_y[i as usize] as i64).collect();
        let y = Tensor::<A, 2, Int>::from_data(TensorData::new(y, [batch, 1]), &device);
        let loss = -log_softmax(probe.head.forward(h), 1).gather(1, y).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &probe);
        probe = optim.step(1e-3, probe, grads);
        if step % (steps / 6).max(1) == 0 {
            let acc = accuracy(&probe.valid(), test_x.clone(), &test_y);
            let task = if turn { "turn" } else { "direction" };
            let chance = 1.0 / classes as f32;
            println!("step {step}: held-out {task} {acc:.3} (chance {chance:.2})");
        }
    }
    Ok(())
}
