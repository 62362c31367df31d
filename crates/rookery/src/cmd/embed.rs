//! `rookery embed`: L2-normalised image and text embeddings from any CLIP rookery loads (a
//! rookery checkpoint or run directory, `rookery export` output, open_clip or HF CLIP) or an HF
//! SigLIP, written as safetensors with the tensors `image` `[N, E]` and `text` `[M, E]`: what
//! search, labelling and parity checks use a CLIP for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use rookery_data::loader::{load_image_file, Mode};
use rookery_data::{DataConfig, Loader, PromptTokenizer, TextTokenizer};
use rookery_eval::embed::{SiglipTowers, Towers};
use rookery_model::siglip::Siglip;
use rookery_model::{Clip, ClipConfig};
use safetensors::tensor::{Dtype, TensorView};

use super::train::{backend, open_checkpoint, Inner};

/// What to embed and where to write it.
#[derive(clap::Args)]
pub struct EmbedArgs {
    /// CLIP weights: checkpoint, run directory, or a directory of another format.
    #[arg(long)]
    pub weights: PathBuf,
    /// tokenizer.json (default: the one beside the weights or the run's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Image files.
    #[arg(long, num_args = 0..)]
    pub images: Vec<PathBuf>,
    /// Texts, one per argument.
    #[arg(long, num_args = 0..)]
    pub texts: Vec<String>,
    /// Image-text shards: both embeddings per pair (keys in OUT.keys.json).
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
}

/// A CLIP loaded for inference, with its tokenizer and how its images are prepared.
pub(crate) struct LoadedClip {
    pub model: Clip<Inner>,
    pub cfg: ClipConfig,
    /// The tokenizer: given, beside the weights, or the run's; `None` when not asked for.
    pub tokenizer: Option<TextTokenizer>,
    /// Image size, normalisation and context length for this model (the run's own for a
    /// rookery run; CLIP's defaults for imported weights).
    pub data: DataConfig,
}

/// A CLIP from a rookery run or any directory `rookery_interop` reads, and (when `text`) the
/// tokenizer that goes with it, refused when it cannot be this model's.
pub(crate) fn open_clip(
    weights: &Path,
    tokenizer: Option<&Path>,
    text: bool,
) -> Result<LoadedClip> {
    let dev = backend::device();
    let (model, cfg, tk_path, data) = if rookery_train::checkpoint::is_rookery_run(weights) {
        let (_, run, model) = open_checkpoint(weights)?;
        let tk = tokenizer
            .map(Path::to_path_buf)
            .or(Some(run.data.tokenizer.clone()));
        (model, run.model, tk, run.data)
    } else {
        let cfg = rookery_interop::clip_config(weights)?;
        let model = rookery_interop::load_clip(cfg.init::<Inner>(&dev), weights)?;
        let own = weights.join("tokenizer.json");
        let tk = tokenizer
            .map(Path::to_path_buf)
            .or(own.is_file().then_some(own));
        (model, cfg, tk, DataConfig::default())
    };
    let data = DataConfig {
        image_size: cfg.vision.image_size as u32,
        context_length: cfg.text.context_length,
        ..data
    };
    let tokenizer = match (&tk_path, text) {
        (_, false) => None,
        (Some(p), true) => Some(TextTokenizer::from_file(p)?),
        (None, true) => bail!(
            "{}: no tokenizer.json beside the weights (save_pretrained of a model alone leaves none): give --tokenizer",
            weights.display()
        ),
    };
    if let Some(tk) = &tokenizer {
        let t = &cfg.text;
        if tk.vocab_size > t.vocab_size || tk.eot as usize != t.eot_token {
            bail!(
                "{}: {} tokens (end of text {}) for a text tower of {} (end of text {}): not the tokenizer this model was trained with",
                tk_path.as_deref().unwrap_or(Path::new("?")).display(),
                tk.vocab_size, tk.eot, t.vocab_size, t.eot_token
            );
        }
    }
    Ok(LoadedClip {
        model,
        cfg,
        tokenizer,
        data,
    })
}

fn progress(n: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {what}"
        ))
        .expect("valid template"),
    );
    bar
}

/// Image files as one batch of model inputs `[N, 3, S, S]`, prepared as `data_cfg` says.
fn image_batch(paths: &[PathBuf], data_cfg: &DataConfig) -> Result<Tensor<Inner, 4>> {
    let s = data_cfg.image_size as usize;
    let mut pixels = Vec::with_capacity(paths.len() * 3 * s * s);
    for p in paths {
        let img = load_image_file(data_cfg, p).map_err(anyhow::Error::msg)?;
        pixels.extend(img);
    }
    let data = TensorData::new(pixels, [paths.len(), 3, s, s]);
    Ok(Tensor::from_data(data, &backend::device()))
}

/// An HF SigLIP loaded for inference, its tokenizer fixed to the trained text length (when
/// `text`), and its image preparation (squashed to the square, normalised with 0.5, as its
/// processor does).
pub(crate) struct LoadedSiglip {
    pub model: Siglip<Inner>,
    pub tokenizer: Option<PromptTokenizer>,
    pub data: DataConfig,
}

pub(crate) fn open_siglip(
    weights: &Path,
    tokenizer: Option<&Path>,
    text: bool,
) -> Result<LoadedSiglip> {
    let cfg = rookery_interop::hf_siglip::config(weights)?;
    let model =
        rookery_interop::hf_siglip::load(cfg.init::<Inner>(&backend::device()), weights, &cfg)?;
    let tokenizer = match (&cfg.text, text) {
        (_, false) => None,
        (None, true) => bail!(
            "{}: a SigLIP vision tower alone embeds no text",
            weights.display()
        ),
        (Some(tc), true) => {
            let path = tokenizer.map_or(weights.join("tokenizer.json"), Path::to_path_buf);
            let tk = PromptTokenizer::from_file(&path)
                .with_context(|| format!("{}: give --tokenizer", weights.display()))?
                .fixed_length(tc.context_length, tc.pad_token as u32)
                .map_err(anyhow::Error::msg)?;
            Some(tk)
        }
    };
    let data = DataConfig {
        image_size: cfg.image_size as u32,
        image_norm: rookery_data::loader::ImageNorm::siglip(),
        ..Default::default()
    };
    Ok(LoadedSiglip {
        model,
        tokenizer,
        data,
    })
}

/// `rookery embed` with an HF SigLIP ([`SiglipTowers`]).
fn run_siglip(args: &EmbedArgs) -> Result<()> {
    let w = &args.weights;
    if args.data.is_some() {
        bail!(
            "{}: --data with a SigLIP is not supported yet; give --images and --texts",
            w.display()
        );
    }
    let dev = backend::device();
    let s = open_siglip(w, args.tokenizer.as_deref(), !args.texts.is_empty())?;
    let towers = SiglipTowers {
        model: &s.model,
        tokenizer: s.tokenizer.as_ref(),
        device: &dev,
    };
    let batch = args.batch.max(1);
    let mut out: HashMap<&str, Vec<Tensor<Inner, 2>>> = HashMap::new();
    let bar = progress(args.images.len(), "images");
    for chunk in args.images.chunks(batch) {
        out.entry("image")
            .or_default()
            .push(towers.images(image_batch(chunk, &s.data)?));
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    let bar = progress(args.texts.len(), "texts");
    for chunk in args.texts.chunks(batch) {
        out.entry("text").or_default().push(towers.texts(chunk)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    write(&args.out, out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Runs `rookery embed`.
pub fn run(args: &EmbedArgs) -> Result<()> {
    if args.images.is_empty() && args.texts.is_empty() && args.data.is_none() {
        bail!("nothing to embed: give --images, --texts or --data");
    }
    if rookery_interop::is_siglip(&args.weights) {
        return run_siglip(args);
    }
    let text = !(args.texts.is_empty() && args.data.is_none());
    let LoadedClip {
        model,
        cfg,
        tokenizer,
        data,
    } = open_clip(&args.weights, args.tokenizer.as_deref(), text)?;
    let dev = backend::device();
    let ctx = cfg.text.context_length;
    let data_cfg = DataConfig {
        batch_size: args.batch.max(1),
        ..data
    };
    let batch = args.batch.max(1);
    let mut out: HashMap<&str, Vec<Tensor<Inner, 2>>> = HashMap::new();
    if !args.images.is_empty() {
        let bar = progress(args.images.len(), "images");
        for chunk in args.images.chunks(batch) {
            let t = image_batch(chunk, &data_cfg)?;
            out.entry("image").or_default().push(model.encode_image(t));
            bar.inc(chunk.len() as u64);
        }
        bar.finish();
    }
    if let Some(tk) = &tokenizer {
        let bar = progress(args.texts.len(), "texts");
        for chunk in args.texts.chunks(batch) {
            let mut ids = vec![0i64; chunk.len() * ctx];
            for (row, text) in ids.chunks_mut(ctx).zip(chunk) {
                tk.encode_into(text, row)
                    .map_err(|e| anyhow::anyhow!("text {text:?}: {e}"))?;
            }
            let t = Tensor::from_data(TensorData::new(ids, [chunk.len(), ctx]), &dev);
            out.entry("text").or_default().push(model.encode_text(t));
            bar.inc(chunk.len() as u64);
        }
        bar.finish();
    }
    let mut keys = Vec::new();
    if let (Some(spec), Some(tk)) = (&args.data, &tokenizer) {
        let shards = rookery_data::expand_shards(spec)?;
        let loader = Loader::new(
            &data_cfg,
            std::sync::Arc::new(tk.clone()),
            shards,
            0,
            1,
            Mode::Eval,
            None,
        )?;
        let bar = ProgressBar::new_spinner();
        for b in loader {
            let b = b?;
            let (images, tokens) =
                rookery_eval::input::batch_tensors::<Inner>(&b, tk.eot as usize, &dev);
            out.entry("image")
                .or_default()
                .push(model.encode_image(images));
            out.entry("text")
                .or_default()
                .push(model.encode_text(tokens));
            keys.extend(b.keys.clone());
            bar.inc(b.batch_size as u64);
        }
        bar.finish();
    }
    write(&args.out, out)?;
    if !keys.is_empty() {
        let path = args.out.with_extension("keys.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&keys)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The embeddings as f32 safetensors, one tensor per kind.
fn write(path: &Path, parts: HashMap<&str, Vec<Tensor<Inner, 2>>>) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, chunks) in parts {
        let t = Tensor::cat(chunks, 0);
        rookery_eval::clip::ensure_finite(&t, &format!("{name} embeddings"))?;
        let shape = t.dims().to_vec();
        let values: Vec<f32> = t
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        tensors.push((
            name.to_string(),
            shape,
            values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    tensors.sort();
    let views = tensors
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))
}
