//! A rookery Flamingo as the [`Generate`] of the few-shot evaluation: prompts tokenized with
//! the checkpoint's tokenizer (its start token first, `<image>` and `<|endofchunk|>` as its
//! special tokens), images prepared as its held-out images, greedy continuation.
//!
//! A medium that is a directory is a video, its image files (by name) the frames, evenly
//! sampled to `data.interleaved.max_frames` as training samples them, or only the first
//! (`first_frame_only`: what time embeddings add is the gap between the two).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use burn::prelude::*;
use rookery_data::interleaved::Specials;
use rookery_data::loader::load_image_file;
use rookery_data::media::{even_sample, pack_media};
use rookery_data::{DataConfig, TextTokenizer};
use rookery_model::flamingo::Flamingo;

use super::data::media_files;
use super::Generate;
use crate::fewshot::{generate_visual, greedy};

pub struct FlamingoGenerator<'a, B: Backend> {
    pub model: &'a Flamingo<B>,
    pub tokenizer: &'a TextTokenizer,
    /// Image size and normalisation.
    pub data: &'a DataConfig,
    /// New tokens at most (OpenFlamingo: 5 for VQA, 20 for captions).
    pub max_new: usize,
    /// Videos shown as their first frame only.
    pub first_frame_only: bool,
    pub device: &'a B::Device,
}

impl<B: Backend> FlamingoGenerator<'_, B> {
    /// The frames of a medium (an image file, or a directory of frames) as pixels.
    fn frames(&self, path: &Path) -> Result<Vec<Vec<f32>>> {
        let files = media_files(path)?;
        let keep = match self.first_frame_only {
            true => 1,
            false => self.data.interleaved.max_frames,
        };
        even_sample(files.len(), keep)
            .into_iter()
            .map(|i| load_image_file(self.data, &files[i]).map_err(anyhow::Error::msg))
            .collect()
    }

    /// The visual tokens of `media` (per prompt, its media in order; the same count for all).
    fn encode(&self, media: &[Vec<Vec<Vec<f32>>>]) -> Tensor<B, 3> {
        let s = self.data.image_size as usize;
        let rows: Vec<&[Vec<Vec<f32>>]> = media.iter().map(Vec::as_slice).collect();
        let p = pack_media(&rows, 3 * s * s);
        let shape = [media.len(), p.max_media, p.max_frames, 3, s, s];
        let t = Tensor::<B, 6>::from_data(TensorData::new(p.pixels, shape), self.device);
        self.model.encode_media(t, Some(&p.frames))
    }
}

impl<B: Backend> Generate for FlamingoGenerator<'_, B> {
    fn generate(&mut self, prompts: &[String], images: &[Vec<PathBuf>]) -> Result<Vec<String>> {
        let tk = self.tokenizer;
        let sp = Specials::of(tk).map_err(anyhow::Error::msg)?;
        let n = images.first().map_or(0, Vec::len);
        let mut rows = Vec::with_capacity(prompts.len());
        let mut media = Vec::with_capacity(prompts.len());
        for (p, files) in prompts.iter().zip(images) {
            let mut row = vec![sp.sot];
            row.extend(
                tk.ids(p)
                    .map_err(anyhow::Error::msg)?
                    .into_iter()
                    .map(i64::from),
            );
            let tags = row.iter().filter(|&&t| t == sp.image).count();
            if tags != files.len() || files.len() != n {
                bail!(
                    "a prompt with {tags} <image> tags and {} images in a batch of {n}: {p:?}",
                    files.len()
                );
            }
            media.push(
                files
                    .iter()
                    .map(|f| self.frames(f))
                    .collect::<Result<_>>()?,
            );
            rows.push(row);
        }
        let visual = self.encode(&media);
        let stop = [sp.eoc, sp.eot];
        let new = generate_visual(
            self.model,
            rows,
            visual,
            n.max(1),
            self.max_new,
            &mut greedy,
            &stop,
            sp.pad,
            self.device,
        )?;
        Ok(new
            .into_iter()
            .map(|ids| {
                let ids: Vec<u32> = ids
                    .into_iter()
                    .filter(|t| !stop.contains(t))
                    .map(|t| t as u32)
                    .collect();
                tk.decode(&ids)
            })
            .collect())
    }
}
