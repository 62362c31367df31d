//! The image-text loader: a [`ShardStream`] of raw samples, decoded, augmented and tokenized
//! on a rayon pool by a batcher thread that keeps `prefetch` batches ready, so the trainer
//! does not wait when the CPU keeps up.
//!
//! Bad input never kills a run: a sample with a missing, empty, corrupt or undecodable image, a
//! missing or non-UTF-8 caption, and a broken or empty shard are skipped, logged at warn with
//! shard and key, and counted; only a bad fraction above `max_bad_fraction` stops the run.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use fast_image_resize::Resizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::decode::decode_rgb;
use crate::interleaved::SequenceConfig;
use crate::rng::{shard_seed, Rng};
use crate::stream::{ShardStream, StreamItem, StreamPosition, StreamSpec};
use crate::synth::SynthConfig;
use crate::tokenize::TextTokenizer;
use crate::transform::{center_square, crop_resize_normalize, random_resized_crop, whole, Norm};
use crate::wds::RawSample;
use crate::DataError;

/// The `[data]` config section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training shards: brace pattern(s) joined by `::`, glob, directory, list file or `pipe:`.
    pub train: String,
    /// Held-out shards for evaluation (empty: none).
    pub val: String,
    /// HF `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Its start, end and padding tokens, where rookery cannot find them by name.
    pub special_tokens: crate::tokenize::SpecialTokens,
    /// Samples per rank per micro-batch.
    pub batch_size: usize,
    /// Side of the square model input in pixels.
    pub image_size: u32,
    /// How evaluation fits an image to the square, and the statistics pixels are normalised
    /// with: the vision tower's own (stage 2 takes them from its source).
    pub image_norm: ImageNorm,
    /// Text tokens per caption, start and end tokens included.
    pub context_length: usize,
    /// Shard reader threads per rank.
    pub workers: usize,
    /// Threads decoding and augmenting (0: one per core).
    pub decode_threads: usize,
    /// Batches decoded ahead of the trainer.
    pub prefetch: usize,
    /// Per-worker sample shuffle buffer (0: keep shard order).
    pub shuffle_buffer: usize,
    pub seed: u64,
    /// Draw shards with replacement for an endless stream.
    pub resampled: bool,
    /// Image member extensions, by preference.
    pub image_exts: Vec<String>,
    /// Caption member extension.
    pub text_ext: String,
    /// Member holding one hard-negative caption per training pair, a caption that does not
    /// match the image (NegCLIP); "" for none. Evaluation ignores it.
    pub hard_negative_ext: String,
    /// RandomResizedCrop area fraction range for training.
    pub crop_scale: [f64; 2],
    /// RandomResizedCrop aspect ratio range for training.
    pub crop_ratio: [f64; 2],
    /// Highest tolerated fraction of bad samples before the run stops.
    pub max_bad_fraction: f64,
    /// Bad samples tolerated regardless of the fraction (a few bad files early on are normal).
    pub min_bad_allowed: u64,
    /// A reader that produces nothing for this many seconds (a `pipe:` command that hangs, a
    /// stalled network mount) stops the run with an error naming its shard (0: wait forever).
    pub stall_timeout_s: f64,
    /// When the train shards are absent, generate the synthetic set described by `[data.synth]`.
    pub synthesize_if_missing: bool,
    pub synth: SynthConfig,
    /// How interleaved documents become sequences (stages "lm" and "flamingo").
    pub interleaved: SequenceConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        let synth = SynthConfig::default();
        DataConfig {
            train: synth.train_pattern(),
            val: synth.val_pattern(),
            tokenizer: synth.tokenizer_path(),
            special_tokens: Default::default(),
            batch_size: 64,
            image_size: 64,
            image_norm: ImageNorm::default(),
            context_length: 32,
            workers: 2,
            decode_threads: 0,
            prefetch: 4,
            shuffle_buffer: 2000,
            seed: 0,
            resampled: false,
            image_exts: ["jpg", "jpeg", "png", "webp"].map(String::from).to_vec(),
            text_ext: "txt".into(),
            hard_negative_ext: String::new(),
            crop_scale: [0.9, 1.0],
            crop_ratio: [0.75, 4.0 / 3.0],
            max_bad_fraction: 0.05,
            stall_timeout_s: 600.0,
            min_bad_allowed: 10,
            synthesize_if_missing: true,
            synth,
            interleaved: SequenceConfig::default(),
        }
    }
}

impl DataConfig {
    /// The checks of `[data]` on its own (`(key, reason)`); how it fits the model is the run
    /// config's to check.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let n = &self.image_norm;
        let (scale, ratio) = (self.crop_scale, self.crop_ratio);
        let checks = [
            (
                self.batch_size == 0,
                "data.batch_size",
                "must be at least 1",
            ),
            (
                self.train.trim().is_empty(),
                "data.train",
                "names no shards",
            ),
            (self.image_size == 0, "data.image_size", "must be > 0"),
            (
                !(ratio[0] > 0.0 && ratio[0] <= ratio[1]),
                "data.crop_ratio",
                "must satisfy 0 < lo <= hi",
            ),
            (
                !(scale[0] > 0.0 && scale[0] <= scale[1] && scale[1] <= 1.0),
                "data.crop_scale",
                "must satisfy 0 < lo <= hi <= 1",
            ),
            (
                !(0.0..=1.0).contains(&self.max_bad_fraction),
                "data.max_bad_fraction",
                "must be in [0, 1]",
            ),
            (
                !n.std.iter().chain(&n.mean).all(|x| x.is_finite())
                    || n.std.iter().any(|&x| x <= 0.0),
                "data.image_norm",
                "mean must be finite and std > 0",
            ),
        ];
        match checks.iter().find(|c| c.0) {
            Some((_, k, m)) => Err((k.to_string(), m.to_string())),
            None => Ok(()),
        }
    }
}

/// `[data.image_norm]`: what a vision tower was trained to see.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageNorm {
    /// Per-channel mean and standard deviation of pixels in [0, 1] (OpenAI CLIP's by default;
    /// SigLIP: 0.5 and 0.5).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Evaluation: `center_crop` (resize the short side, crop the middle: CLIP) or `squash`
    /// (resize the whole image to the square: SigLIP's processor).
    pub eval_resize: EvalResize,
}

impl Default for ImageNorm {
    fn default() -> Self {
        ImageNorm {
            mean: crate::transform::CLIP_MEAN,
            std: crate::transform::CLIP_STD,
            eval_resize: EvalResize::CenterCrop,
        }
    }
}

impl ImageNorm {
    /// SigLIP's processor: the whole image squashed, mean and std 0.5.
    pub fn siglip() -> Self {
        ImageNorm {
            mean: [0.5; 3],
            std: [0.5; 3],
            eval_resize: EvalResize::Squash,
        }
    }
}

/// `[data.image_norm] eval_resize`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalResize {
    #[default]
    CenterCrop,
    Squash,
}

/// Bad-sample accounting, part of the position so that resumed counts continue exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadCounts {
    /// Samples read (good and bad).
    pub seen: u64,
    /// Bad items: samples, and shards that could not be read (not in `seen`).
    pub bad: u64,
    /// Of `bad`, whole shards (broken, unreadable or empty).
    #[serde(default)]
    pub bad_shards: u64,
    pub by_reason: std::collections::BTreeMap<String, u64>,
}

/// Where the loader is: resuming from it yields exactly the batches that would have come next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub stream: StreamPosition,
    pub counts: BadCounts,
    pub batches: u64,
}

/// A batch of image-text pairs, laid out for `Tensor::from_data`.
#[derive(Clone, Debug)]
pub struct ImageTextBatch {
    /// `[B, 3, S, S]` normalised pixels.
    pub images: Vec<f32>,
    /// `[B, T]` token ids.
    pub tokens: Vec<i64>,
    /// `[B, T]` token ids of the hard-negative captions (empty: none).
    pub neg_tokens: Vec<i64>,
    pub batch_size: usize,
    pub image_size: usize,
    pub context_length: usize,
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    /// The sample's `.json` member, when present (labels of the synthetic set).
    pub json: Vec<Option<serde_json::Value>>,
    /// Epoch each sample came from.
    pub epochs: Vec<u64>,
    /// Loader position after this batch.
    pub position: LoaderPosition,
}

/// Training (shuffled, augmented, endless) or evaluation (in order, center crop, one pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// What a loader makes of raw samples: one item per sample (run in parallel on the decode
/// pool; an `Err` skips and counts the sample), then a batch from the good ones.
pub trait Prepare: Send + Sync + 'static {
    type Item: Send;
    type Batch: Batched + Send + 'static;
    fn prepare(&self, s: &RawSample, epoch: u64) -> Result<Self::Item, String>;
    fn assemble(
        &self,
        good: Vec<(RawSample, u64, Self::Item)>,
        position: LoaderPosition,
    ) -> Self::Batch;
}

/// What the trainer reads off any batch.
pub trait Batched {
    /// Samples in the batch.
    fn size(&self) -> usize;
    /// The epoch of its last sample.
    fn last_epoch(&self) -> Option<u64>;
    /// Where the stream stands after it.
    fn position(&self) -> &LoaderPosition;
}

impl Batched for ImageTextBatch {
    fn size(&self) -> usize {
        self.batch_size
    }
    fn last_epoch(&self) -> Option<u64> {
        self.epochs.last().copied()
    }
    fn position(&self) -> &LoaderPosition {
        &self.position
    }
}

/// Image-text pairs (the default): one image, one caption per sample.
pub struct Pairs {
    cfg: DataConfig,
    tokenizer: Arc<TextTokenizer>,
    mode: Mode,
}

/// A running loader; iterate it for batches.
pub struct Loader<P: Prepare = Pairs> {
    rx: Receiver<Result<P::Batch, DataError>>,
    _thread: JoinHandle<()>,
}

pub struct Decoded {
    image: Vec<f32>,
    tokens: Vec<i64>,
    neg_tokens: Option<Vec<i64>>,
    caption: String,
    json: Option<serde_json::Value>,
}

/// How `rank` of `world` walks `shards` under `cfg`.
fn stream_spec(
    cfg: &DataConfig,
    shards: Vec<String>,
    rank: usize,
    world: usize,
    mode: Mode,
) -> StreamSpec {
    StreamSpec {
        shards,
        rank,
        world,
        workers: cfg.workers.max(1),
        seed: cfg.seed,
        shuffle_buffer: if mode == Mode::Train {
            cfg.shuffle_buffer
        } else {
            0
        },
        resampled: cfg.resampled && mode == Mode::Train,
        single_epoch: mode == Mode::Eval,
        skip: Default::default(),
        stall_timeout: (cfg.stall_timeout_s > 0.0)
            .then(|| std::time::Duration::from_secs_f64(cfg.stall_timeout_s)),
    }
}

impl LoaderPosition {
    /// The training position for `rank` of `world` that continues a run whose ranks (another
    /// number of them) were at `old`: finished shards are neither repeated nor skipped, partly
    /// read ones are read again from their start (see [`crate::resplit`]). The old ranks'
    /// bad-sample counts carry over, summed, on rank 0.
    pub fn resplit(
        cfg: &DataConfig,
        shards: Vec<String>,
        old: &[LoaderPosition],
        rank: usize,
        world: usize,
    ) -> Result<LoaderPosition, DataError> {
        let spec = stream_spec(cfg, shards, rank, world, Mode::Train);
        let streams: Vec<StreamPosition> = old.iter().map(|p| p.stream.clone()).collect();
        let stream = crate::resplit::resplit(&spec, &streams).map_err(DataError::Invalid)?;
        let mut counts = BadCounts::default();
        for c in old.iter().map(|p| &p.counts).filter(|_| rank == 0) {
            counts.seen += c.seen;
            counts.bad += c.bad;
            counts.bad_shards += c.bad_shards;
            for (k, v) in &c.by_reason {
                *counts.by_reason.entry(k.clone()).or_default() += v;
            }
        }
        Ok(LoaderPosition {
            stream,
            counts,
            batches: 0,
        })
    }
}

impl Pairs {
    pub fn new(cfg: &DataConfig, tokenizer: Arc<TextTokenizer>, mode: Mode) -> Self {
        Pairs {
            cfg: cfg.clone(),
            tokenizer,
            mode,
        }
    }
}

impl Loader {
    /// Starts an image-text loader over `shards` for `rank` of `world`, from `position` if
    /// resuming.
    pub fn new(
        cfg: &DataConfig,
        tokenizer: Arc<TextTokenizer>,
        shards: Vec<String>,
        rank: usize,
        world: usize,
        mode: Mode,
        position: Option<LoaderPosition>,
    ) -> Result<Self, DataError> {
        let prep = Pairs::new(cfg, tokenizer, mode);
        Loader::start(cfg, prep, shards, rank, world, mode, position)
    }
}

impl<P: Prepare> Loader<P> {
    /// Starts a loader that turns samples into batches with `prep`.
    pub fn start(
        cfg: &DataConfig,
        prep: P,
        shards: Vec<String>,
        rank: usize,
        world: usize,
        mode: Mode,
        position: Option<LoaderPosition>,
    ) -> Result<Self, DataError> {
        let spec = stream_spec(cfg, shards, rank, world, mode);
        let (stream_pos, counts, batches) = match position {
            Some(p) => (Some(p.stream), p.counts, p.batches),
            None => (None, BadCounts::default(), 0),
        };
        let stream = ShardStream::start(spec, stream_pos).map_err(DataError::Invalid)?;
        let threads = if cfg.decode_threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.decode_threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .map_err(|e| DataError::Invalid(e.to_string()))?;
        let (tx, rx) = bounded(cfg.prefetch.max(1));
        let mut batcher = Batcher {
            cfg: cfg.clone(),
            prep,
            stream,
            counts,
            batches,
            pool,
        };
        let thread = std::thread::Builder::new()
            .name("batcher".into())
            .spawn(move || {
                while let Some(b) = batcher.next_batch() {
                    let stop = b.is_err();
                    if tx.send(b).is_err() || stop {
                        return;
                    }
                }
            })
            .map_err(|e| DataError::Invalid(e.to_string()))?;
        Ok(Loader {
            rx,
            _thread: thread,
        })
    }
}

impl<P: Prepare> Iterator for Loader<P> {
    type Item = Result<P::Batch, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

struct Batcher<P: Prepare> {
    cfg: DataConfig,
    prep: P,
    stream: ShardStream,
    counts: BadCounts,
    batches: u64,
    pool: rayon::ThreadPool,
}

impl<P: Prepare> Batcher<P> {
    /// Pulls raw samples until `batch_size` decode cleanly. In eval mode the last batch may be
    /// short; `None` once the stream is exhausted.
    fn next_batch(&mut self) -> Option<Result<P::Batch, DataError>> {
        let bs = self.cfg.batch_size;
        let mut good: Vec<(RawSample, u64, P::Item)> = Vec::with_capacity(bs);
        let mut exhausted = false;
        while good.len() < bs && !exhausted {
            let mut raws = Vec::with_capacity(bs - good.len());
            while raws.len() < bs - good.len() {
                match self.stream.next_item() {
                    Some(StreamItem::Sample { sample, epoch }) => raws.push((sample, epoch)),
                    Some(StreamItem::Bad { shard, reason }) => {
                        if let Err(e) = self.count_bad(&shard, "-", &reason) {
                            return Some(Err(e));
                        }
                    }
                    Some(StreamItem::Stalled { shard, seconds }) => {
                        return Some(Err(DataError::Stalled { shard, seconds }));
                    }
                    None => {
                        exhausted = true;
                        break;
                    }
                }
            }
            let prep = &self.prep;
            let decoded: Vec<Result<P::Item, String>> = self
                .pool
                .install(|| raws.par_iter().map(|(s, e)| prep.prepare(s, *e)).collect());
            for ((raw, epoch), d) in raws.into_iter().zip(decoded) {
                self.counts.seen += 1;
                match d {
                    Ok(d) => good.push((raw, epoch, d)),
                    Err(reason) => {
                        if let Err(e) = self.count_bad(&raw.shard, &raw.key, &reason) {
                            return Some(Err(e));
                        }
                    }
                }
            }
        }
        if good.is_empty() {
            return if exhausted && self.counts.seen == 0 && self.batches == 0 {
                Some(Err(DataError::Invalid(
                    "the shards hold no usable sample".into(),
                )))
            } else {
                None
            };
        }
        self.batches += 1;
        let position = LoaderPosition {
            stream: self.stream.position().clone(),
            counts: self.counts.clone(),
            batches: self.batches,
        };
        Some(Ok(self.prep.assemble(good, position)))
    }

    fn count_bad(&mut self, shard: &str, key: &str, reason: &str) -> Result<(), DataError> {
        self.counts.bad += 1;
        self.counts.bad_shards += u64::from(key == "-");
        let kind = if key == "-" && reason.contains("broken tar") {
            "broken tar".to_string()
        } else if key == "-" && !reason.starts_with("empty shard") {
            "unreadable shard".to_string()
        } else {
            reason.split(':').next().unwrap_or(reason).to_string()
        };
        *self.counts.by_reason.entry(kind).or_default() += 1;
        tracing::warn!(shard, key, reason, "skipping bad sample");
        // A shard that could not be read is one item among the samples read.
        let total = (self.counts.seen + self.counts.bad_shards).max(1);
        let frac = self.counts.bad as f64 / total as f64;
        if self.counts.bad > self.cfg.min_bad_allowed && frac > self.cfg.max_bad_fraction {
            return Err(DataError::TooManyBad {
                bad: self.counts.bad,
                total,
                frac: 100.0 * frac,
                limit: self.cfg.max_bad_fraction,
                last: format!("{shard} key {key}: {reason}"),
            });
        }
        Ok(())
    }
}

impl Pairs {
    fn tokens(&self, text: &str) -> Result<Vec<i64>, String> {
        let mut tokens = vec![0i64; self.cfg.context_length];
        self.tokenizer
            .encode_into(text, &mut tokens)
            .map_err(|e| format!("tokenize: {e}"))?;
        Ok(tokens)
    }
}

/// The trimmed UTF-8 text of member `.ext`, which must exist and not be empty.
fn member_text(s: &RawSample, ext: &str, what: &str) -> Result<String, String> {
    let bytes = s
        .get(ext)
        .ok_or_else(|| format!("missing {what}: no .{ext} member"))?;
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("{what} is not UTF-8"))?
        .trim()
        .to_string();
    if text.is_empty() {
        return Err(format!("empty {what}"));
    }
    Ok(text)
}

impl Prepare for Pairs {
    type Item = Decoded;
    type Batch = ImageTextBatch;

    fn prepare(&self, s: &RawSample, epoch: u64) -> Result<Decoded, String> {
        let (ext, bytes) = s.first_of(&self.cfg.image_exts).ok_or_else(|| {
            format!(
                "missing image: no member with extension {:?}",
                self.cfg.image_exts
            )
        })?;
        let caption = member_text(s, &self.cfg.text_ext, "caption")?;
        let neg_ext = &self.cfg.hard_negative_ext;
        let negative = match self.mode {
            Mode::Train if !neg_ext.is_empty() => {
                Some(member_text(s, neg_ext, "hard-negative caption")?)
            }
            _ => None,
        };
        let seed = [self.cfg.seed, epoch, shard_seed(&s.shard), s.index];
        let image = load_image(&self.cfg, self.mode, ext, bytes, &seed)?;
        let tokens = self.tokens(&caption)?;
        let neg_tokens = negative.as_deref().map(|t| self.tokens(t)).transpose()?;
        let json = s.get("json").and_then(|b| serde_json::from_slice(b).ok());
        Ok(Decoded {
            image,
            tokens,
            neg_tokens,
            caption,
            json,
        })
    }

    fn assemble(
        &self,
        good: Vec<(RawSample, u64, Decoded)>,
        position: LoaderPosition,
    ) -> ImageTextBatch {
        let n = good.len();
        let mut b = ImageTextBatch {
            images: Vec::with_capacity(n * good[0].2.image.len()),
            tokens: Vec::with_capacity(n * self.cfg.context_length),
            neg_tokens: Vec::new(),
            batch_size: n,
            image_size: self.cfg.image_size as usize,
            context_length: self.cfg.context_length,
            keys: Vec::with_capacity(n),
            captions: Vec::with_capacity(n),
            json: Vec::with_capacity(n),
            epochs: Vec::with_capacity(n),
            position,
        };
        for (raw, epoch, d) in good {
            b.images.extend_from_slice(&d.image);
            b.tokens.extend_from_slice(&d.tokens);
            if let Some(neg) = &d.neg_tokens {
                b.neg_tokens.extend_from_slice(neg);
            }
            b.keys.push(raw.key);
            b.captions.push(d.caption);
            b.json.push(d.json);
            b.epochs.push(epoch);
        }
        b
    }
}

/// Decodes `bytes` (a `.ext` image) and crops, resizes and normalises it to `[3, S, S]`:
/// a random resized crop seeded by `seed` in training, the center square in evaluation.
pub fn load_image(
    cfg: &DataConfig,
    mode: Mode,
    ext: &str,
    bytes: &[u8],
    seed: &[u64],
) -> Result<Vec<f32>, String> {
    let img = decode_rgb(ext, bytes).map_err(|e| format!("undecodable image .{ext}: {e}"))?;
    let size = cfg.image_size;
    let crop = match mode {
        Mode::Train => {
            let mut rng = Rng::derive(seed);
            let (sc, ra) = (cfg.crop_scale, cfg.crop_ratio);
            random_resized_crop(
                img.width,
                img.height,
                (sc[0], sc[1]),
                (ra[0], ra[1]),
                &mut rng,
            )
        }
        Mode::Eval => match cfg.image_norm.eval_resize {
            EvalResize::CenterCrop => center_square(img.width, img.height),
            EvalResize::Squash => whole(img.width, img.height),
        },
    };
    let norm = Norm {
        mean: cfg.image_norm.mean,
        std: cfg.image_norm.std,
    };
    let mut image = vec![0f32; 3 * (size * size) as usize];
    RESIZER
        .with(|r| crop_resize_normalize(&img, crop, size, norm, &mut r.borrow_mut(), &mut image))
        .map_err(|e| format!("resize: {e}"))?;
    Ok(image)
}

/// An image file prepared for evaluation as `cfg` says (`rookery embed`, `rookery generate`);
/// JPEG by its extension, anything else by its bytes. Errors name the file.
pub fn load_image_file(cfg: &DataConfig, path: &std::path::Path) -> Result<Vec<f32>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    load_image(cfg, Mode::Eval, &ext.to_ascii_lowercase(), &bytes, &[])
        .map_err(|e| format!("{}: {e}", path.display()))
}

thread_local! {
    static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
}

#[cfg(test)]
mod image_norm_tests {
    use super::*;

    /// A 16x4 PNG: 12 red columns, then 4 blue ones.
    fn red_then_blue() -> Vec<u8> {
        let img = image::RgbImage::from_fn(16, 4, |x, _| match x < 12 {
            true => image::Rgb([255, 0, 0]),
            false => image::Rgb([0, 0, 255]),
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// CLIP's evaluation crops the middle square (all red here), SigLIP's squashes the whole
    /// image (blue on the right), each with its own statistics.
    #[test]
    fn evaluation_fits_and_normalises_images_as_the_tower_was_trained() {
        let png = red_then_blue();
        let mut cfg = DataConfig {
            image_size: 4,
            ..Default::default()
        };
        let clip = load_image(&cfg, Mode::Eval, "png", &png, &[]).unwrap();
        let blue = |img: &[f32]| img[2 * 16 + 3]; // channel 2, row 0, last column
        let (m, s) = (
            crate::transform::CLIP_MEAN[2],
            crate::transform::CLIP_STD[2],
        );
        assert!(
            (blue(&clip) - (0.0 - m) / s).abs() < 1e-5,
            "center crop: red"
        );
        cfg.image_norm = ImageNorm::siglip();
        let siglip = load_image(&cfg, Mode::Eval, "png", &png, &[]).unwrap();
        // Squashed: the last column is the blue quarter ((1 - 0.5) / 0.5 = 1; the resampling
        // kernel reaches a little into the red), the first the red ((1 - 0.5) / 0.5 in red).
        assert!(blue(&siglip) > 0.8, "squashed: blue, not {}", blue(&siglip));
        assert!((siglip[0] - 1.0).abs() < 1e-5, "red on the left");
    }
}
