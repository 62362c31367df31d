//! Video in stage 2 end to end: a tiny Flamingo trains on video pages (frames through the
//! resampler's time embeddings, which train), evaluation scores the video questions next to
//! the first frame alone, resume is exact, and video batches over 2 ranks (each padding its
//! frames to its own longest video) give the gradients of one rank with twice the batch.

mod common;
use common::recipe::{flamingo_cfg, sources, video_synth, B, IB};
use common::{floats, grads_of, rel_diff, resume_from_step_2, rows};

use std::sync::Arc;
use std::time::Duration;

use burn::module::{Module, Param};
use burn::optim::Optimizer;
use burn::prelude::*;
use rookery_data::loader::Mode;
use rookery_data::pages::{PageBatch, Pages};
use rookery_data::{Loader, TextTokenizer};
use rookery_dist::{Communicator, LocalGroup, Single};
use rookery_eval::input::page_logits;
use rookery_model::flamingo::{Flamingo, FlamingoConfig, LmStyle};
use rookery_train::causal::causal_grads;
use rookery_train::flamingo_io::open_flamingo;
use rookery_train::optim::PathIds;
use rookery_train::stage::Report;
use rookery_train::{checkpoint, train};

/// Videos of 4 to 8 frames read at up to 6: some sampled, some padded.
const FRAMES: usize = 6;

#[test]
fn video_stage_two_trains_time_embeddings_scores_the_first_frame_gap_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let s = video_synth(dir.path());
    let (clip, lm) = sources(dir.path(), &s);
    let run = dir.path().join("flamingo");
    let video = |mut c: rookery_train::RunConfig| {
        c.data.interleaved.max_frames = FRAMES;
        c.flamingo.model.resampler.max_frames = FRAMES;
        (c.eval.questions, c.eval.shots) = (12, vec![0, 2]);
        c
    };
    let cfg = video(flamingo_cfg(&s, &run, &clip, &lm, 4));
    let summary = train::<B>(&cfg, &Default::default()).unwrap();
    let Some(Report::Text(r)) = summary.eval else {
        panic!("stage 2 reports perplexity and accuracy")
    };
    assert!(r.perplexity.is_finite(), "{r:?}");
    // Every score twice: with the videos, and with their first frames only.
    for k in ["vqa_accuracy_0shot", "vqa_accuracy_2shot"] {
        for key in [k.to_string(), format!("first_frame_{k}")] {
            let a = r.acc.get(&key).copied().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&a), "{key}: {a} in {:?}", r.acc);
        }
    }
    let kinds = ["direction", "appears", "disappears", "color"];
    assert!(
        kinds.iter().any(|k| r
            .acc
            .contains_key(&format!("first_frame_vqa_accuracy_2shot_{k}"))),
        "{:?}",
        r.acc
    );
    // The held-out videos were written as directories of their frames.
    let written = std::fs::read_dir(run.join("eval-vqa/images")).unwrap();
    assert!(written.flatten().any(|e| e.path().is_dir()));

    // The time embeddings trained (several frames per medium: they moved between the step-2
    // checkpoint and the end), and only the new layers did.
    let dev = Default::default();
    let (_, _, model) = open_flamingo::<IB>(&run, &dev).unwrap();
    let (_, _, at_2) = open_flamingo::<IB>(&run.join("checkpoints/step-00000002"), &dev).unwrap();
    let times = |m: &rookery_model::flamingo::Flamingo<IB>| -> Vec<f32> {
        m.resampler.frame_embs.val().into_data().to_vec().unwrap()
    };
    assert_eq!(
        times(&model).len(),
        FRAMES * model.resampler.frame_embs.dims()[1]
    );
    assert_ne!(
        times(&model),
        times(&at_2),
        "the time embeddings did not train"
    );
    let lm_weights =
        rookery_train::stage::flamingo::load_lm::<IB>(&checkpoint::latest(&lm).unwrap(), &dev)
            .unwrap();
    assert!(
        floats(&model.lm) == floats(&lm_weights),
        "the language model changed"
    );

    // Stopped at step 2 and resumed, the run ends where the unbroken one did.
    let run2 = dir.path().join("flamingo-resumed");
    resume_from_step_2(&run, video(flamingo_cfg(&s, &run2, &clip, &lm, 4)));
    let (_, _, resumed) = open_flamingo::<IB>(&run2, &dev).unwrap();
    assert!(floats(&resumed) == floats(&model), "resumed run differs");
}

/// `b` with its frames padded to its own longest medium, as a rank's loader pads them.
fn own_padding(b: PageBatch) -> PageBatch {
    let f = b.frames.iter().copied().max().unwrap_or(1);
    let per = 3 * b.image_size * b.image_size;
    let mut images = vec![0.0; b.batch_size * b.max_images * f * per];
    for (slot, &n) in b.frames.iter().enumerate() {
        let from = slot * b.max_frames * per;
        images[slot * f * per..(slot * f + n) * per]
            .copy_from_slice(&b.images[from..from + n * per]);
    }
    PageBatch {
        images,
        max_frames: f,
        ..b
    }
}

/// Loss and trainable gradients of three SGD steps on this rank's rows of `data`.
type Trace = (Vec<f32>, Vec<Vec<f32>>);

fn flamingo_steps(init: &Flamingo<B>, data: &[PageBatch], comm: &dyn Communicator<IB>) -> Trace {
    // Leaves of its own on each rank thread (rookery_train::leaves).
    let mut model = rookery_train::leaves::fresh_leaves(init);
    let mut sgd = burn::optim::SgdConfig::new().init::<B, Flamingo<B>>();
    let (mut losses, mut grads) = (vec![], vec![]);
    let (w, r) = (comm.world_size(), comm.rank());
    let dev = Default::default();
    for b in data {
        let per = b.batch_size / w;
        let mine = own_padding(rows(b, r * per..(r + 1) * per));
        let g = causal_grads(&model, vec![mine], comm, 1 << 12, |m, b, t| {
            page_logits(m, t, b, &dev)
        })
        .unwrap();
        losses.push(g.loss);
        grads.extend(grads_of(&model, &g.grads));
        model = sgd.step(0.5, model, g.grads);
    }
    (losses, grads)
}

#[test]
fn video_batches_over_two_ranks_equal_one_rank_with_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = video_synth(dir.path());
    let tk = Arc::new(TextTokenizer::from_file(&s.tokenizer_path()).unwrap());
    // Videos of 4 to 8 frames, none sampled: each half pads to its longest.
    let frames = 8;
    let mut dc = rookery_data::DataConfig {
        batch_size: 4,
        image_size: 32,
        shuffle_buffer: 8,
        decode_threads: 1,
        ..Default::default()
    };
    (dc.interleaved.max_tokens, dc.interleaved.max_frames) = (48, frames);
    let shards = rookery_data::expand_shards(&s.videos_train_pattern()).unwrap();
    let prep = Pages::new(&dc, tk.clone(), Mode::Eval).unwrap();
    let data: Vec<PageBatch> = Loader::start(&dc, prep, shards, 0, 1, Mode::Eval, None)
        .unwrap()
        .take(3)
        .map(|b| b.unwrap())
        .collect();
    // The halves pad to different lengths, or the test would not test the masking.
    let longest = |b: PageBatch| own_padding(b).max_frames;
    let halves: Vec<usize> = (0..3)
        .flat_map(|i| [longest(rows(&data[i], 0..2)), longest(rows(&data[i], 2..4))])
        .collect();
    assert!(halves.windows(2).any(|w| w[0] != w[1]), "{halves:?}");

    let mut c = FlamingoConfig::default();
    (c.vision.image_size, c.vision.patch_size, c.vision.width) = (32, 8, 32);
    (c.vision.layers, c.vision.heads) = (1, 2);
    (c.lm.vocab_size, c.lm.context_length, c.lm.width) = (tk.vocab_size, 48, 32);
    (c.lm.layers, c.lm.heads, c.lm.style) = (2, 2, LmStyle::Llama);
    let r = &mut c.resampler;
    (r.latents, r.depth, r.heads, r.dim_head, r.max_frames) = (4, 1, 2, 8, frames);
    (c.xattn_heads, c.xattn_dim_head, c.xattn_ff_mult) = (2, 8, 2);
    (c.image_token, c.eoc_token) = (
        tk.token_id("<image>").unwrap() as usize,
        tk.token_id("<|endofchunk|>").unwrap() as usize,
    );
    let dev = Default::default();
    B::seed(&dev, 5);
    let init = c.init::<B>(&dev).freeze().map(&mut PathIds::default());
    // Random time embeddings (they start at zero), so frame order and padding matter.
    let mut init = init;
    init.resampler.frame_embs = Param::from_tensor(Tensor::random(
        [frames, 32],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    ));
    let single = flamingo_steps(&init, &data, &Single::new(dev));
    let out = LocalGroup::run::<IB, _, String, _>(
        2,
        |_| Default::default(),
        Duration::from_secs(300),
        |comm| Ok(flamingo_steps(&init, &data, comm)),
    );
    let out: Vec<Trace> = out.into_iter().map(|r| r.unwrap()).collect();
    assert!(out[0] == out[1], "replicas must stay identical");
    let loss = out[0]
        .0
        .iter()
        .zip(&single.0)
        .map(|(a, b)| ((a - b) / b).abs() as f64)
        .fold(0.0, f64::max);
    let grads = rel_diff(&out[0].1, &single.1);
    eprintln!("2 ranks x 2 vs 1 rank x 4 on video batches: loss {loss:e}, gradients {grads:e}");
    assert_eq!(single.0.len(), 3);
    assert!(
        loss < 1e-6 && grads < 1e-5,
        "loss {loss:e}, gradients {grads:e}"
    );
}
