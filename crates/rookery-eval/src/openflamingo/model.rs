//! A rookery Flamingo as the [`Generate`] of the few-shot evaluation: prompts tokenized with
//! the checkpoint's tokenizer (its start token first, `<image>` and `<|endofchunk|>` as its
//! special tokens), images prepared as its held-out images, greedy continuation.

use std::path::PathBuf;

use anyhow::{bail, Result};
use burn::prelude::*;
use rookery_data::interleaved::Specials;
use rookery_data::loader::load_image_file;
use rookery_data::{DataConfig, TextTokenizer};
use rookery_model::flamingo::Flamingo;

use super::Generate;
use crate::fewshot::{generate, greedy};

pub struct FlamingoGenerator<'a, B: Backend> {
    pub model: &'a Flamingo<B>,
    pub tokenizer: &'a TextTokenizer,
    /// Image size and normalisation.
    pub data: &'a DataConfig,
    /// New tokens at most (OpenFlamingo: 5 for VQA, 20 for captions).
    pub max_new: usize,
    pub device: &'a B::Device,
}

impl<B: Backend> Generate for FlamingoGenerator<'_, B> {
    fn generate(&mut self, prompts: &[String], images: &[Vec<PathBuf>]) -> Result<Vec<String>> {
        let tk = self.tokenizer;
        let sp = Specials::of(tk).map_err(anyhow::Error::msg)?;
        let n = images.first().map_or(0, Vec::len);
        let s = self.data.image_size as usize;
        let mut rows = Vec::with_capacity(prompts.len());
        let mut pixels = Vec::with_capacity(prompts.len() * n * 3 * s * s);
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
            for f in files {
                pixels.extend(load_image_file(self.data, f).map_err(anyhow::Error::msg)?);
            }
            rows.push(row);
        }
        let images = Tensor::<B, 5>::from_data(
            TensorData::new(pixels, [rows.len(), n, 3, s, s]),
            self.device,
        );
        let stop = [sp.eoc, sp.eot];
        let new = generate(
            self.model,
            rows,
            images,
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
