//! Samples of a [`BenchmarkSet`] decoded in batches, bad ones named, skipped and counted.

use anyhow::Result;
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use rookery_data::loader::{load_image, load_image_file, Mode};
use rookery_data::wds::{read_shard, ShardItem};
use rookery_data::DataConfig;

use super::data::{image_of, BenchmarkSet, Source};

/// The label a task needs from each sample.
#[derive(Clone, Copy)]
pub enum Want {
    /// `cls`: a class index below this count.
    Class(usize),
    /// `txt`: one caption a line, at least one.
    Captions,
}

/// Decoded samples: images `[n, 3, S, S]` flat, with their classes or captions.
pub struct Batch {
    pub pixels: Vec<f32>,
    pub size: usize,
    pub classes: Vec<usize>,
    pub captions: Vec<Vec<String>>,
}

impl Batch {
    pub fn images<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4> {
        let n = self.pixels.len() / (3 * self.size * self.size);
        let data = TensorData::new(self.pixels.clone(), [n, 3, self.size, self.size]);
        Tensor::from_data(data, device)
    }
}

/// A sample before decoding: where it is from (for messages), its image, its label.
struct Pending {
    name: String,
    image: Image,
    class: Option<usize>,
    captions: Vec<String>,
}

enum Image {
    Bytes(&'static str, Vec<u8>),
    File(std::path::PathBuf),
}

/// Calls `f` with batches of at most `batch` decoded samples of `set`, in order; returns how
/// many samples were skipped (each named in a warning).
pub fn for_each_batch(
    set: &BenchmarkSet,
    want: Want,
    data: &DataConfig,
    batch: usize,
    mut f: impl FnMut(Batch) -> Result<()>,
) -> Result<usize> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} {pos} images {msg}").expect("template"),
    );
    let mut skipped = 0usize;
    let mut pending = Vec::with_capacity(batch);
    let mut flush = |pending: &mut Vec<Pending>, skipped: &mut usize| -> Result<()> {
        let b = decode(std::mem::take(pending), data, skipped);
        bar.inc(b.classes.len().max(b.captions.len()) as u64);
        match b.pixels.is_empty() {
            true => Ok(()),
            false => f(b),
        }
    };
    match &set.source {
        Source::Folder(files) => {
            for (path, class) in files {
                pending.push(Pending {
                    name: path.display().to_string(),
                    image: Image::File(path.clone()),
                    class: Some(*class),
                    captions: Vec::new(),
                });
                if pending.len() == batch {
                    flush(&mut pending, &mut skipped)?;
                }
            }
        }
        Source::Shards(shards) => {
            for shard in shards {
                let mut failed = None;
                read_shard(shard, |item| {
                    let s = match item {
                        ShardItem::Sample(s) => s,
                        ShardItem::Broken(e) => {
                            tracing::warn!(shard = %shard, error = %e, "shard ends early");
                            return false;
                        }
                    };
                    let name = format!("{shard}: {}", s.key);
                    match parse(&s, want) {
                        Ok(p) => pending.push(Pending { name, ..p }),
                        Err(why) => {
                            tracing::warn!(sample = %name, "skipped: {why}");
                            skipped += 1;
                        }
                    }
                    if pending.len() == batch {
                        if let Err(e) = flush(&mut pending, &mut skipped) {
                            failed = Some(e);
                            return false;
                        }
                    }
                    true
                });
                if let Some(e) = failed {
                    return Err(e);
                }
            }
        }
    }
    flush(&mut pending, &mut skipped)?;
    bar.finish_and_clear();
    Ok(skipped)
}

/// A shard sample's image and the label `want` asks for.
fn parse(s: &rookery_data::wds::RawSample, want: Want) -> Result<Pending, String> {
    let (ext, bytes) = image_of(s).ok_or("no webp, png, jpg or jpeg member")?;
    let mut p = Pending {
        name: String::new(),
        image: Image::Bytes(ext, bytes.to_vec()),
        class: None,
        captions: Vec::new(),
    };
    match want {
        Want::Class(classes) => {
            let cls = s.get("cls").ok_or("no cls member")?;
            let text = String::from_utf8_lossy(cls);
            let c: usize = text
                .trim()
                .parse()
                .map_err(|_| format!("cls {:?} is not a class index", text.trim()))?;
            if c >= classes {
                return Err(format!("class {c}, but classnames lists {classes}"));
            }
            p.class = Some(c);
        }
        Want::Captions => {
            let txt = s.get("txt").ok_or("no txt member")?;
            p.captions = String::from_utf8_lossy(txt)
                .lines()
                .map(str::to_string)
                .collect();
            if p.captions.is_empty() {
                return Err("txt holds no caption".into());
            }
        }
    }
    Ok(p)
}

/// Decodes `pending` in parallel (center crops); undecodable ones are named and counted.
fn decode(pending: Vec<Pending>, data: &DataConfig, skipped: &mut usize) -> Batch {
    let images: Vec<Result<Vec<f32>, String>> = pending
        .par_iter()
        .map(|p| match &p.image {
            Image::Bytes(ext, bytes) => load_image(data, Mode::Eval, ext, bytes, &[]),
            Image::File(path) => load_image_file(data, path),
        })
        .collect();
    let size = data.image_size as usize;
    let mut b = Batch {
        pixels: Vec::with_capacity(pending.len() * 3 * size * size),
        size,
        classes: Vec::new(),
        captions: Vec::new(),
    };
    for (p, img) in pending.into_iter().zip(images) {
        match img {
            Ok(px) => {
                b.pixels.extend(px);
                b.classes.extend(p.class);
                if !p.captions.is_empty() {
                    b.captions.push(p.captions);
                }
            }
            Err(e) => {
                tracing::warn!(sample = %p.name, "skipped: {e}");
                *skipped += 1;
            }
        }
    }
    b
}
