//! The embedded default dataset: a synthetic world of shapes rendered to images, with captions,
//! labels and interleaved pages, written as real webdataset shards plus a fitted tokenizer.
//!
//! Every sample is a pure function of (seed, split, index), so the output is the same for any
//! number of threads. Layout under `out`:
//! `train/shard-NNNNNN.tar`, `val/shard-NNNNNN.tar` (`.jpg`|`.png`, `.txt`, `.json` per sample),
//! `pages-train/`, `pages-val/` with `--interleaved` (`.json` + `.img{i}.jpg` per document),
//! `tokenizer.json`, and `synth.json` (written last: its presence means the set is complete).

pub mod pages;
pub mod scene;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::rng::Rng;
use crate::writer::{write_shard, SampleMembers};
use crate::DataError;
use scene::Scene;

/// What `rookery data synth` generates. Also the `[data.synth]` config section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Output directory.
    pub out: PathBuf,
    pub seed: u64,
    /// Side of the square images in pixels.
    pub image_size: u32,
    pub train_shards: usize,
    pub train_samples_per_shard: usize,
    pub val_shards: usize,
    pub val_samples_per_shard: usize,
    /// Share of images stored as PNG (the rest JPEG).
    pub png_fraction: f64,
    /// Share of scenes with two groups in a spatial relation.
    pub two_group_fraction: f64,
    /// Also write interleaved pages for stage 2.
    pub interleaved: bool,
    pub page_shards: usize,
    pub pages_per_shard: usize,
    pub val_page_shards: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            out: PathBuf::from("data/synth"),
            seed: 0,
            image_size: 64,
            train_shards: 16,
            train_samples_per_shard: 4000,
            val_shards: 1,
            val_samples_per_shard: 2000,
            png_fraction: 0.25,
            two_group_fraction: 0.7,
            interleaved: false,
            page_shards: 8,
            pages_per_shard: 2000,
            val_page_shards: 1,
        }
    }
}

impl SynthConfig {
    pub fn train_pattern(&self) -> String {
        pattern(&self.out.join("train"), self.train_shards)
    }
    pub fn val_pattern(&self) -> String {
        pattern(&self.out.join("val"), self.val_shards)
    }
    pub fn pages_train_pattern(&self) -> String {
        pattern(&self.out.join("pages-train"), self.page_shards)
    }
    pub fn pages_val_pattern(&self) -> String {
        pattern(&self.out.join("pages-val"), self.val_page_shards)
    }
    pub fn tokenizer_path(&self) -> PathBuf {
        self.out.join("tokenizer.json")
    }
    /// True when a complete set made with this exact configuration is already on disk.
    pub fn is_complete(&self) -> bool {
        let Ok(text) = std::fs::read_to_string(self.out.join("synth.json")) else {
            return false;
        };
        serde_json::from_str::<SynthConfig>(&text).is_ok_and(|c| &c == self)
    }
}

fn pattern(dir: &Path, n: usize) -> String {
    format!(
        "{}/shard-{{000000..{:06}}}.tar",
        dir.display(),
        n.saturating_sub(1)
    )
}

/// Counts of what was written.
#[derive(Debug, Default, Serialize)]
pub struct SynthSummary {
    pub train: u64,
    pub val: u64,
    pub pages_train: u64,
    pub pages_val: u64,
}

/// Generates the whole dataset in parallel (one rayon task per shard).
pub fn generate(cfg: &SynthConfig) -> Result<SynthSummary, DataError> {
    let bad = |k: &str, why: &str| Err(DataError::Invalid(format!("synth: `{k}` {why}")));
    if cfg.image_size < 16 {
        return bad("image_size", "must be at least 16");
    }
    if cfg.train_shards == 0
        || cfg.train_samples_per_shard == 0
        || cfg.val_shards == 0
        || cfg.val_samples_per_shard == 0
    {
        return bad(
            "train/val shards and samples_per_shard",
            "must be at least 1",
        );
    }
    let _ = std::fs::remove_file(cfg.out.join("synth.json"));
    let mut jobs: Vec<(&str, u64, usize, usize)> = Vec::new(); // (split, split id, shard, per shard)
    jobs.extend((0..cfg.train_shards).map(|s| ("train", 0, s, cfg.train_samples_per_shard)));
    jobs.extend((0..cfg.val_shards).map(|s| ("val", 1, s, cfg.val_samples_per_shard)));
    if cfg.interleaved {
        jobs.extend((0..cfg.page_shards).map(|s| ("pages-train", 2, s, cfg.pages_per_shard)));
        jobs.extend((0..cfg.val_page_shards).map(|s| ("pages-val", 3, s, cfg.pages_per_shard)));
    }
    for split in ["train", "val", "pages-train", "pages-val"] {
        if jobs.iter().any(|j| j.0 == split) {
            std::fs::create_dir_all(cfg.out.join(split))
                .map_err(|e| DataError::io(cfg.out.join(split).display().to_string(), e))?;
        }
    }
    let texts: Vec<(String, u64, Vec<String>)> = jobs
        .par_iter()
        .map(|&(split, sid, shard, per)| {
            let first = (shard * per) as u64;
            let samples: Vec<(SampleMembers, Vec<String>)> = (first..first + per as u64)
                .map(|i| {
                    let mut rng = Rng::derive(&[cfg.seed, sid, i]);
                    if sid >= 2 {
                        page_sample(cfg, &mut rng, i)
                    } else {
                        pair_sample(cfg, &mut rng, i)
                    }
                })
                .collect();
            let path = cfg.out.join(split).join(format!("shard-{shard:06}.tar"));
            let texts = samples.iter().flat_map(|(_, t)| t.clone()).collect();
            let n = write_shard(&path, samples.into_iter().map(|(m, _)| m))?;
            Ok((split.to_string(), n, texts))
        })
        .collect::<Result<_, DataError>>()?;
    let mut summary = SynthSummary::default();
    for (split, n, _) in &texts {
        match split.as_str() {
            "train" => summary.train += n,
            "val" => summary.val += n,
            "pages-train" => summary.pages_train += n,
            _ => summary.pages_val += n,
        }
    }
    // Fit on the training texts plus the full grammar vocabulary, so held-out text has no <unk>.
    let vocab = scene::vocabulary_text();
    let train_texts = texts
        .iter()
        .filter(|t| t.0.ends_with("train"))
        .flat_map(|t| t.2.iter().map(String::as_str));
    crate::tokenize::fit_word_level(
        train_texts.chain(std::iter::once(vocab.as_str())),
        &cfg.tokenizer_path(),
    )?;
    let manifest = serde_json::to_string_pretty(cfg).expect("config serializes");
    std::fs::write(cfg.out.join("synth.json"), manifest)
        .map_err(|e| DataError::io("synth.json", e))?;
    Ok(summary)
}

/// One image-text pair: image (JPEG or PNG), caption, labels.
fn pair_sample(cfg: &SynthConfig, rng: &mut Rng, i: u64) -> (SampleMembers, Vec<String>) {
    let scene = Scene::random(rng, cfg.two_group_fraction);
    let caption = scene.caption(rng);
    let png = rng.bool(cfg.png_fraction);
    let (ext, img) = encode(&scene.render(cfg.image_size, rng), cfg.image_size, png);
    let g = scene.groups[0];
    let labels = json!({
        "shape": scene::SHAPES[g.shape], "color": scene::COLORS[g.color], "count": g.count,
        "size": scene::SIZES[g.size], "scene": scene, "caption": caption,
    });
    let members = vec![
        (ext.to_string(), img),
        ("txt".into(), caption.clone().into_bytes()),
        ("json".into(), labels.to_string().into_bytes()),
    ];
    ((format!("{i:09}"), members), vec![caption])
}

/// One interleaved page with 2 to 6 images.
fn page_sample(cfg: &SynthConfig, rng: &mut Rng, i: u64) -> (SampleMembers, Vec<String>) {
    let n_images = 2 + rng.below(5);
    let (doc, scenes) = pages::page(rng, n_images, 0.08);
    let mut members = vec![("json".to_string(), doc.to_string().into_bytes())];
    for (k, s) in scenes.iter().enumerate() {
        let (_, img) = encode(&s.render(cfg.image_size, rng), cfg.image_size, false);
        members.push((format!("img{k}.jpg"), img));
    }
    let texts = doc["text_list"]
        .as_array()
        .expect("text_list")
        .iter()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    ((format!("page{i:09}"), members), texts)
}

fn encode(rgb: &[u8], size: u32, png: bool) -> (&'static str, Vec<u8>) {
    let img = image::RgbImage::from_raw(size, size, rgb.to_vec()).expect("buffer matches size");
    let mut out = Cursor::new(Vec::new());
    if png {
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("png encodes to memory");
        ("png", out.into_inner())
    } else {
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
            .encode_image(&img)
            .expect("jpeg encodes to memory");
        ("jpg", out.into_inner())
    }
}
