//! The embedded default dataset: a synthetic world of shapes rendered to images, with captions,
//! labels and interleaved pages, written as real webdataset shards plus a fitted tokenizer.
//!
//! Every sample is a pure function of (seed, split, index), so the output is the same for any
//! number of threads. Layout under `out`:
//! `train/shard-NNNNNN.tar`, `val/shard-NNNNNN.tar` (`.jpg`|`.png`, `.txt`, `.json` per sample),
//! `pages-train/`, `pages-val/` with `--interleaved` (`.json` + `.img{i}.jpg` per document),
//! `videos-train/`, `videos-val/` with `--video` (`.json` + `.vid{i}.frame{t:03}.jpg`),
//! `tokenizer.json`, and `synth.json` (written last: its presence means the set is complete).

pub mod pages;
pub mod scene;
pub mod video;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::rng::Rng;
use crate::writer::{write_shard, SampleMembers};
use crate::DataError;
use scene::Scene;

/// The current `SynthConfig::version`.
pub const VERSION: u32 = 3;

fn current_version() -> u32 {
    VERSION
}

/// What `rookery data synth` generates. Also the `[data.synth]` config section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Layout version of what `generate` writes; a set on disk from another version is made
    /// again. 2: held-out pairs show distinct scenes. 3: training pairs carry a hard-negative
    /// caption (`.neg.txt`). A config asks for the current one whatever it says here; a
    /// `synth.json` without it is version 1.
    #[serde(default = "current_version")]
    pub version: u32,
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
    /// Also write video pages for stage 2 ([`video`]); their words join the tokenizer.
    pub video: bool,
    pub video_shards: usize,
    pub video_pages_per_shard: usize,
    pub val_video_shards: usize,
    /// Frames per video, drawn from this range (inclusive).
    pub video_frames: [usize; 2],
    /// Videos per page, drawn from this range (inclusive).
    pub videos_per_page: [usize; 2],
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            version: VERSION,
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
            video: false,
            video_shards: 4,
            video_pages_per_shard: 1000,
            val_video_shards: 1,
            video_frames: [4, 8],
            videos_per_page: [1, 3],
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
    pub fn videos_train_pattern(&self) -> String {
        pattern(&self.out.join("videos-train"), self.video_shards)
    }
    pub fn videos_val_pattern(&self) -> String {
        pattern(&self.out.join("videos-val"), self.val_video_shards)
    }
    pub fn tokenizer_path(&self) -> PathBuf {
        self.out.join("tokenizer.json")
    }
    /// True when a complete set made with this exact configuration by the current `generate`
    /// is already on disk.
    pub fn is_complete(&self) -> bool {
        let Ok(text) = std::fs::read_to_string(self.out.join("synth.json")) else {
            return false;
        };
        let Ok(disk) = serde_json::from_str::<serde_json::Value>(&text) else {
            return false;
        };
        // Read apart from the struct, whose default is the current version.
        let version = disk.get("version").and_then(|v| v.as_u64()).unwrap_or(1);
        version == VERSION as u64
            && serde_json::from_value::<SynthConfig>(disk).is_ok_and(|c| c == self.current())
    }

    /// This configuration at the current version.
    fn current(&self) -> SynthConfig {
        SynthConfig {
            version: VERSION,
            ..self.clone()
        }
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
    pub videos_train: u64,
    pub videos_val: u64,
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
    let [f0, f1] = cfg.video_frames;
    let [v0, v1] = cfg.videos_per_page;
    if cfg.video && (f0 < 2 || f1 < f0 || v0 == 0 || v1 < v0) {
        return bad(
            "video_frames / videos_per_page",
            "must be ranges [lo, hi] with lo <= hi, at least 2 frames and 1 video",
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
    if cfg.video {
        let per = cfg.video_pages_per_shard;
        jobs.extend((0..cfg.video_shards).map(|s| ("videos-train", 5, s, per)));
        jobs.extend((0..cfg.val_video_shards).map(|s| ("videos-val", 6, s, per)));
    }
    for split in SPLITS {
        if jobs.iter().any(|j| j.0 == split) {
            std::fs::create_dir_all(cfg.out.join(split))
                .map_err(|e| DataError::io(cfg.out.join(split).display().to_string(), e))?;
        }
    }
    let val_redraws = distinct_val_draws(cfg)?;
    let texts: Vec<(String, u64, Vec<String>)> = jobs
        .par_iter()
        .map(|&(split, sid, shard, per)| {
            let first = (shard * per) as u64;
            let samples: Vec<(SampleMembers, Vec<String>)> = (first..first + per as u64)
                .map(|i| {
                    let mut rng = match sid {
                        1 => val_rng(cfg.seed, i, val_redraws[i as usize]),
                        _ => Rng::derive(&[cfg.seed, sid, i]),
                    };
                    // Hard negatives draw from a stream of their own (id 4, after the four
                    // splits), so every other byte of the set is as before they existed.
                    match sid {
                        0 => pair_sample(cfg, &mut rng, Some(Rng::derive(&[cfg.seed, 4, i])), i),
                        1 => pair_sample(cfg, &mut rng, None, i),
                        2 | 3 => page_sample(cfg, &mut rng, i),
                        _ => video_sample(cfg, &mut rng, i),
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
            "pages-val" => summary.pages_val += n,
            "videos-train" => summary.videos_train += n,
            _ => summary.videos_val += n,
        }
    }
    // Fit on the training texts plus the full grammar vocabulary, so held-out text has no <unk>.
    let vocab = scene::vocabulary_text(cfg.video);
    let train_texts = texts
        .iter()
        .filter(|t| t.0.ends_with("train"))
        .flat_map(|t| t.2.iter().map(String::as_str));
    crate::tokenize::fit_word_level(
        train_texts.chain(std::iter::once(vocab.as_str())),
        &cfg.tokenizer_path(),
    )?;
    let manifest = serde_json::to_string_pretty(&cfg.current()).expect("config serializes");
    std::fs::write(cfg.out.join("synth.json"), manifest)
        .map_err(|e| DataError::io("synth.json", e))?;
    Ok(summary)
}

/// The splits `generate` may write, each in a directory of its name.
const SPLITS: [&str; 6] = [
    "train",
    "val",
    "pages-train",
    "pages-val",
    "videos-train",
    "videos-val",
];

/// For each held-out pair, which draw of its random stream gives a scene whose content no
/// earlier held-out pair has (0: the first). Identical scenes get interchangeable captions, so a
/// retrieval benchmark with repeats has no single right answer: with repeats, 474 of 2,000 pairs
/// shared their content and image->text R@1 could not pass ~0.85. Training pairs stay as drawn.
fn distinct_val_draws(cfg: &SynthConfig) -> Result<Vec<u64>, DataError> {
    let mut seen = std::collections::HashSet::new();
    let n = (cfg.val_shards * cfg.val_samples_per_shard) as u64;
    (0..n)
        .map(|i| {
            (0u64..10_000)
                .find(|&r| {
                    let mut rng = val_rng(cfg.seed, i, r);
                    seen.insert(Scene::random(&mut rng, cfg.two_group_fraction).content_key())
                })
                .ok_or_else(|| {
                    DataError::Invalid(format!(
                        "synth: no new scene for held-out pair {i} in 10,000 draws: \
                         val_shards x val_samples_per_shard = {n} is near the number of \
                         distinct scenes at two_group_fraction = {}",
                        cfg.two_group_fraction
                    ))
                })
        })
        .collect()
}

/// The random stream of held-out pair `i` at draw `r`; draw 0 is the stream every pair had
/// before redraws existed.
fn val_rng(seed: u64, i: u64, r: u64) -> Rng {
    match r {
        0 => Rng::derive(&[seed, 1, i]),
        _ => Rng::derive(&[seed, 1, i, r]),
    }
}

/// One image-text pair: image (JPEG or PNG), caption, labels; and a hard-negative caption
/// (`.neg.txt`) drawn from `neg_rng` when given, a stream of its own so the rest is unchanged.
fn pair_sample(
    cfg: &SynthConfig,
    rng: &mut Rng,
    neg_rng: Option<Rng>,
    i: u64,
) -> (SampleMembers, Vec<String>) {
    let scene = Scene::random(rng, cfg.two_group_fraction);
    let caption = scene.caption(rng);
    let png = rng.bool(cfg.png_fraction);
    let (ext, img) = encode(&scene.render(cfg.image_size, rng), cfg.image_size, png);
    let g = scene.groups[0];
    let labels = json!({
        "shape": scene::SHAPES[g.shape], "color": scene::COLORS[g.color], "count": g.count,
        "size": scene::SIZES[g.size], "scene": scene, "caption": caption,
    });
    let mut members = vec![
        (ext.to_string(), img),
        ("txt".into(), caption.clone().into_bytes()),
        ("json".into(), labels.to_string().into_bytes()),
    ];
    // The tokenizer is fitted on captions only: negatives use the same words (the grammar's
    // vocabulary is added to the fit anyway), so the tokenizer stays as it was.
    if let Some(mut r) = neg_rng {
        let negative = scene.hard_negative(&mut r).caption(&mut r);
        members.push(("neg.txt".into(), negative.into_bytes()));
    }
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
    let texts = doc_texts(&doc);
    ((format!("page{i:09}"), members), texts)
}

/// One video page: `videos_per_page` videos of `video_frames` frames, each frame a member
/// `vid{k}.frame{t:03}.jpg`.
fn video_sample(cfg: &SynthConfig, rng: &mut Rng, i: u64) -> (SampleMembers, Vec<String>) {
    let [v0, v1] = cfg.videos_per_page;
    let [f0, f1] = cfg.video_frames;
    let n = v0 + rng.below(v1 - v0 + 1);
    let (doc, videos) = video::page(rng, n, (f0, f1));
    let mut members = vec![("json".to_string(), doc.to_string().into_bytes())];
    for (k, v) in videos.iter().enumerate() {
        for t in 0..v.frames {
            let (_, img) = encode(&v.render(t, cfg.image_size, rng), cfg.image_size, false);
            members.push((format!("vid{k}.frame{t:03}.jpg"), img));
        }
    }
    let texts = doc_texts(&doc);
    ((format!("video{i:09}"), members), texts)
}

/// A page document's texts (what the tokenizer is fitted on).
fn doc_texts(doc: &serde_json::Value) -> Vec<String> {
    let texts = doc["text_list"].as_array().expect("text_list");
    texts
        .iter()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Held-out scenes are distinct in content, and only repeats are redrawn.
    #[test]
    fn held_out_scenes_are_distinct() {
        let cfg = SynthConfig {
            val_samples_per_shard: 1500,
            ..SynthConfig::default()
        };
        let draws = distinct_val_draws(&cfg).unwrap();
        assert_eq!(draws.len(), 1500);
        let mut seen = std::collections::HashSet::new();
        let mut repeats_as_drawn = 0;
        for (i, &r) in draws.iter().enumerate() {
            let first = Scene::random(&mut Rng::derive(&[0, 1, i as u64]), 0.7).content_key();
            let kept = Scene::random(&mut val_rng(0, i as u64, r), 0.7).content_key();
            assert_eq!(r == 0, kept == first, "pair {i}: redrawn only when needed");
            repeats_as_drawn += seen.contains(&first) as usize;
            assert!(seen.insert(kept), "pair {i} repeats an earlier scene");
        }
        // Without the redraws about a fifth of the pairs would repeat (single-group scenes
        // have only 384 contents).
        assert!(
            repeats_as_drawn > 150,
            "{repeats_as_drawn} repeats as drawn"
        );
    }

    /// Asking for more distinct held-out scenes than exist is refused, not looped on.
    #[test]
    fn too_many_held_out_scenes_are_refused() {
        let cfg = SynthConfig {
            val_samples_per_shard: 400,
            two_group_fraction: 0.0,
            ..SynthConfig::default()
        };
        let err = distinct_val_draws(&cfg).unwrap_err().to_string();
        assert!(err.contains("two_group_fraction = 0"), "{err}");
    }

    /// "a above b" and "b below a" are the same content; a different relation is not.
    #[test]
    fn content_key_is_the_same_for_inverse_relations() {
        let mut rng = Rng::new(7);
        let (a, b) = (
            scene::Group::random(&mut rng),
            scene::Group::random(&mut rng),
        );
        let scene = |g: Vec<scene::Group>, rel| Scene::with_groups(&mut rng.clone(), g, Some(rel));
        assert_eq!(
            scene(vec![a, b], 0).content_key(),
            scene(vec![b, a], 1).content_key()
        );
        assert_eq!(
            scene(vec![a, b], 2).content_key(),
            scene(vec![b, a], 3).content_key()
        );
        assert_ne!(
            scene(vec![a, b], 0).content_key(),
            scene(vec![a, b], 1).content_key()
        );
    }

    /// A set written before held-out scenes were made distinct (no `version`) is made again.
    #[test]
    fn a_set_without_version_is_not_complete() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let cfg = SynthConfig {
            out: dir.to_path_buf(),
            ..SynthConfig::default()
        };
        let mut old = serde_json::to_value(&cfg).unwrap();
        old.as_object_mut().unwrap().remove("version");
        std::fs::write(dir.join("synth.json"), old.to_string()).unwrap();
        assert!(!cfg.is_complete());
        std::fs::write(dir.join("synth.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
        assert!(cfg.is_complete());
    }

    /// A config section says nothing about the version: it means the current one, so a set on
    /// disk from an older version is made again (it used to compare equal to version 1).
    #[test]
    fn a_config_without_version_wants_the_current_set() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let out = dir.display().to_string();
        let cfg: SynthConfig = serde_json::from_value(json!({ "out": out })).unwrap();
        assert_eq!(cfg.version, VERSION);
        for version in 1..VERSION {
            let old = SynthConfig {
                version,
                ..cfg.clone()
            };
            std::fs::write(dir.join("synth.json"), serde_json::to_string(&old).unwrap()).unwrap();
            assert!(!cfg.is_complete(), "version {version} on disk");
        }
        let stale = SynthConfig {
            version: 1,
            ..cfg.clone()
        };
        std::fs::write(dir.join("synth.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
        assert!(cfg.is_complete() && stale.is_complete());
    }
}
