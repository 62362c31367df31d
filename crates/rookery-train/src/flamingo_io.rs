//! Stage-2 weights in and out: `rookery export` of a Flamingo checkpoint, loading one (from a
//! checkpoint, a run directory or an export), and `rookery generate`.
//!
//! An export holds `flamingo.safetensors` with only what stage 2 trained (resampler,
//! cross-attention, the two new token rows; OpenFlamingo's checkpoints hold the same), or with
//! `--full` also `model.safetensors` with the frozen vision tower and LM. Keys are rookery's
//! module paths (`resampler.layers.0…`, `xattn.3.attn_gate`); `config.json` describes shapes
//! and sources, `config.toml` is the run's config, `tokenizer.json` its tokenizer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use rookery_data::interleaved::Specials;
use rookery_data::loader::{load_image_file, Mode};
use rookery_data::rng::Rng;
use rookery_data::TextTokenizer;
use rookery_model::flamingo::Flamingo;
use serde_json::json;

use crate::config::RunConfig;
use crate::stage::flamingo::{frozen_dtype, load_lm, load_source_lm, load_vision};
use crate::trainer::TrainStage;
use rookery_eval::fewshot::{generate_visual, greedy};
use rookery_interop::cast::Cast;

/// The trained parts of stage 2.
pub const TRAINED: &str = "flamingo.safetensors";
const TRAINED_KEYS: [&str; 3] = [r"^resampler\.", r"^xattn\.", r"^new_tokens$"];

/// Writes the export of the Flamingo checkpoint (or run directory) `path` into `out`.
pub fn export_flamingo(path: &Path, out: &Path, full: bool, bf16: bool) -> Result<()> {
    let (cfg, tk_path, model) = open_flamingo::<burn::backend::Flex>(path, &Default::default())?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let to = if bf16 { DType::BF16 } else { DType::F32 };
    let mut store = rookery_interop::store::safetensors_writer(out.join(TRAINED))
        .with_regexes(TRAINED_KEYS)
        .with_to_adapter(Cast { to });
    model
        .save_into(&mut store)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.join(TRAINED).display()))?;
    if full {
        let mut store = rookery_interop::store::safetensors_writer(out.join("model.safetensors"))
            .with_to_adapter(Cast { to });
        model
            .save_into(&mut store)
            .map_err(|e| anyhow::anyhow!("writing model.safetensors: {e}"))?;
    }
    let f = &cfg.flamingo;
    let config = json!({
        "rookery_flamingo": f.model,
        "dtype": if bf16 { "bf16" } else { "f32" },
        "vision_from": f.vision_from, "vision_sha256": f.vision_sha256,
        "lm_from": f.lm_from, "lm_sha256": f.lm_sha256,
        "trained": TRAINED, "full": full.then_some("model.safetensors"),
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    std::fs::write(out.join("config.toml"), cfg.to_toml())?;
    std::fs::copy(&tk_path, out.join("tokenizer.json"))
        .with_context(|| format!("copying {}", tk_path.display()))?;
    Ok(())
}

use rookery_interop::open_flamingo_export::FILE as OPEN_FLAMINGO_FILE;

/// Writes the trained parts of the Flamingo checkpoint (or run directory) `path` into `out`
/// under OpenFlamingo's names ([`rookery_interop::open_flamingo_export`]), with the run's
/// tokenizer and a `config.json` saying how to build the model they load into.
pub fn export_open_flamingo(path: &Path, out: &Path, bf16: bool) -> Result<()> {
    let (cfg, tk_path, model) = open_flamingo::<burn::backend::Flex>(path, &Default::default())?;
    let tk = TextTokenizer::load(&tk_path, &cfg.data.special_tokens)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let f = &cfg.flamingo;
    let m = &f.model;
    rookery_interop::open_flamingo_export::export(&model, m, tk.vocab_size, out, bf16)?;
    let (r, fixed) = (
        &m.resampler,
        rookery_interop::open_flamingo_export::differs_from_factory(m),
    );
    let config = json!({
        "format": "open_flamingo",
        "weights": OPEN_FLAMINGO_FILE,
        "dtype": if bf16 { "bf16" } else { "f32" },
        "lang_encoder_path": f.lm_from, "lm_sha256": f.lm_sha256,
        "vision_from": f.vision_from, "vision_sha256": f.vision_sha256,
        "vision_tokens": m.vision_tokens,
        "cross_attn_every_n_layers": m.cross_attn_every_n_layers,
        "perceiver": {"depth": r.depth, "heads": r.heads, "dim_head": r.dim_head,
            "num_latents": r.latents, "ff_mult": r.ff_mult},
        "gated_cross_attn": {"heads": m.xattn_heads, "dim_head": m.xattn_dim_head, "ff_mult": m.xattn_ff_mult},
        "media_token_id": m.image_token, "endofchunk_token_id": m.eoc_token,
        "vocab": tk.vocab_size,
        "differs_from_open_flamingo_factory": fixed,
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    std::fs::copy(&tk_path, out.join("tokenizer.json"))
        .with_context(|| format!("copying {}", tk_path.display()))?;
    Ok(())
}

/// A Flamingo with its run config and tokenizer path, from a checkpoint, a run directory, or an
/// export (full, or trained parts on top of the recorded vision and LM sources).
pub fn open_flamingo<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(RunConfig, PathBuf, Flamingo<B>)> {
    let dir = if path.join(TRAINED).exists() {
        path.to_path_buf()
    } else {
        crate::checkpoint::resolve(path)?
    };
    let cfg = RunConfig::load(&dir.join("config.toml"), &[])?;
    if cfg.train.stage != TrainStage::Flamingo {
        bail!(
            "{}: a checkpoint of stage \"{}\", not \"flamingo\"",
            dir.display(),
            cfg.train.stage
        );
    }
    let tk = crate::checkpoint::tokenizer_of(&dir, &cfg);
    let model = cfg.flamingo.model.init::<B>(device);
    let full = dir.join("model.safetensors");
    if full.exists() {
        let mut store =
            SafetensorsStore::from_file(&full).with_from_adapter(Cast { to: DType::F32 });
        let model = crate::checkpoint::load_store(model, &mut store, &full)?;
        let dtype = frozen_dtype::<B>(&cfg, device)?;
        return Ok((cfg, tk, model.with_frozen_dtype(dtype)));
    }
    let mut model = model;
    model.vision = load_vision(&cfg.flamingo.vision_from, device)?;
    let f = &cfg.flamingo;
    model.lm = load_source_lm(&f.lm_from, &f.model.lm, device)?;
    let path = dir.join(TRAINED);
    let mut store = SafetensorsStore::from_file(&path)
        .allow_partial(true)
        .with_from_adapter(Cast { to: DType::F32 });
    let res = model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if !res.errors.is_empty() {
        bail!("{}: {:?}", path.display(), res.errors);
    }
    let dtype = frozen_dtype::<B>(&cfg, device)?;
    Ok((cfg, tk, model.with_frozen_dtype(dtype)))
}

/// `rookery generate`'s settings.
#[derive(Clone, Debug)]
pub struct GenerateArgs {
    /// Text with an `<image>` where each image goes.
    pub prompt: String,
    pub images: Vec<PathBuf>,
    /// The frames of one video, in order, for the prompt's one `<image>` (instead of images).
    pub video: Vec<PathBuf>,
    pub max_new: usize,
    /// 0: greedy; else sample from the k most likely tokens.
    pub top_k: usize,
    pub temperature: f32,
    pub seed: u64,
}

/// The continuation of `args.prompt` by the Flamingo in `weights`.
pub fn generate_text<B: Backend>(
    weights: &Path,
    args: &GenerateArgs,
    device: &B::Device,
) -> Result<String> {
    let (cfg, tk_path, model) = open_flamingo::<B>(weights, device)?;
    let tk = TextTokenizer::load(&tk_path, &cfg.data.special_tokens)?;
    let sp = Specials::of(&tk).map_err(anyhow::Error::msg)?;
    let mut row = vec![sp.sot];
    row.extend(
        tk.ids(&args.prompt)
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .map(i64::from),
    );
    let n = row.iter().filter(|&&t| t == sp.image).count();
    let (visual, n) = media_tokens(&model, &cfg, args, n, device)?;
    let mut rng = Rng::new(args.seed);
    let (k, temp) = (args.top_k, args.temperature.max(1e-6));
    let mut pick = |logits: &[f32]| -> i64 {
        if k == 0 {
            return greedy(logits);
        }
        sample_top_k(logits, k, temp, &mut rng)
    };
    let new = generate_visual(
        &model,
        vec![row],
        visual,
        n,
        args.max_new,
        &mut pick,
        &[sp.eoc, sp.eot],
        sp.pad,
        device,
    )?;
    let ids: Vec<u32> = new[0].iter().map(|&t| t as u32).collect();
    Ok(tk.decode(&ids))
}

/// The visual tokens of `rookery generate`'s media for a prompt with `tags` `<image>` tokens:
/// one image per tag, or one video (`args.video`'s frames, at most the resampler's
/// `max_frames`) for a single tag; and how many media that is.
fn media_tokens<B: Backend>(
    model: &Flamingo<B>,
    cfg: &RunConfig,
    args: &GenerateArgs,
    tags: usize,
    device: &B::Device,
) -> Result<(Tensor<B, 3>, usize)> {
    let s = cfg.data.image_size as usize;
    let load = |files: &[PathBuf]| -> Result<Vec<f32>> {
        let mut pixels = Vec::with_capacity(files.len() * 3 * s * s);
        for p in files {
            pixels.extend(load_image_file(&cfg.data, p).map_err(anyhow::Error::msg)?);
        }
        Ok(pixels)
    };
    if !args.video.is_empty() {
        let (f, max) = (args.video.len(), model.resampler.frame_embs.dims()[0]);
        if tags != 1 || !args.images.is_empty() {
            bail!("a video goes with a prompt of exactly one <image> and no --images; this prompt has {tags}");
        }
        if f > max {
            bail!("a video of {f} frames for a model trained with at most {max} (flamingo.model.resampler.max_frames)");
        }
        let t = Tensor::<B, 6>::from_data(
            TensorData::new(load(&args.video)?, [1, 1, f, 3, s, s]),
            device,
        );
        return Ok((model.encode_media(t, None), 1));
    }
    if tags != args.images.len() {
        bail!(
            "the prompt has {tags} <image> tokens but {} images were given",
            args.images.len()
        );
    }
    let mut pixels = load(&args.images)?;
    if tags == 0 {
        pixels.resize(3 * s * s, 0.0); // one unused slot: no token attends to it
    }
    let n = tags.max(1);
    let images = Tensor::<B, 5>::from_data(TensorData::new(pixels, [1, n, 3, s, s]), device);
    Ok((model.encode_images(images), n))
}

/// A token drawn from the `k` most likely, with probabilities `softmax(logits / temperature)`.
pub fn sample_top_k(logits: &[f32], k: usize, temperature: f32, rng: &mut Rng) -> i64 {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(k.max(1));
    let top = logits[idx[0]];
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - top) / temperature) as f64).exp())
        .collect();
    let mut u = rng.f64() * w.iter().sum::<f64>();
    for (&i, &wi) in idx.iter().zip(&w) {
        if u < wi {
            return i as i64;
        }
        u -= wi;
    }
    idx[idx.len() - 1] as i64
}

/// `rookery eval` of a stage-"lm" or stage-"flamingo" checkpoint (or run directory): held-out
/// perplexity, and for Flamingo k-shot accuracy, on `data_val` or the run's `data.val`.
pub fn evaluate_text_checkpoint<B: Backend>(
    path: &Path,
    data_val: Option<String>,
    device: &B::Device,
) -> Result<rookery_eval::fewshot::TextReport> {
    use rookery_data::pages::Pages;
    use std::sync::Arc;
    let dir = crate::checkpoint::resolve(path)?;
    let mut cfg = RunConfig::load(&dir.join("config.toml"), &[])?;
    if let Some(d) = data_val {
        cfg.data.val = d;
    }
    let tk = crate::checkpoint::tokenizer_of(&dir, &cfg);
    let tk = Arc::new(TextTokenizer::load(&tk, &cfg.data.special_tokens)?);
    let mut prep = Pages::new(&cfg.data, tk.clone(), Mode::Eval).map_err(anyhow::Error::msg)?;
    let e = cfg.eval.clone();
    if cfg.train.stage == TrainStage::Lm {
        let lm = load_lm::<B>(&dir, device)?;
        prep.decode_images = false;
        return rookery_eval::fewshot::perplexity(&cfg.data, prep, e.pages, device, |t, _| {
            lm.forward(t)
        });
    }
    let (cfg, _, model) = open_flamingo::<B>(&dir, device)?;
    let mut report =
        rookery_eval::fewshot::perplexity(&cfg.data, prep, e.pages, device, |t, b| {
            rookery_eval::input::page_logits(&model, t, b, device)
        })?;
    // The questions in the VQA layout, in a scratch directory for as long as they are asked.
    let scratch = std::env::temp_dir().join(format!("rookery-eval-vqa-{}", std::process::id()));
    let asked = rookery_eval::fewshot::held_out_questions(&cfg.data, e.questions, &scratch)
        .and_then(|qs| {
            let acc =
                rookery_eval::fewshot::question_answering(&model, &tk, &cfg.data, &e, &qs, device)?;
            Ok((qs, acc))
        });
    let _ = std::fs::remove_dir_all(&scratch);
    let (qs, acc) = asked?;
    report.acc = acc;
    report.questions = qs.len();
    Ok(report)
}

/// The stage a checkpoint (or run directory, or Flamingo export) was trained in.
pub fn stage_of(path: &Path) -> Result<TrainStage> {
    let dir = if path.join(TRAINED).exists() {
        path.to_path_buf()
    } else {
        crate::checkpoint::resolve(path)?
    };
    Ok(RunConfig::load(&dir.join("config.toml"), &[])?.train.stage)
}
