//! RICES (Yang et al. 2022, as OpenFlamingo's evaluation runs it): the demonstrations for a
//! query are the support examples whose images a CLIP finds most similar to the query's image
//! (cosine of unit image embeddings), shown least similar first so the most similar one sits
//! right before the query. An example with the query's own image is never chosen. Videos are
//! compared by their first frames.

use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::prelude::*;
use rookery_data::loader::load_image_file;
use rookery_data::DataConfig;
use rookery_model::Clip;

use super::data::media_files;
use super::Example;

/// Unit image embeddings of the queries and of the support set.
#[derive(Clone, Debug)]
pub struct Rices {
    query: Vec<Vec<f32>>,
    support: Vec<Vec<f32>>,
}

impl Rices {
    /// From embeddings already computed (one row per query, one per support example).
    pub fn from_embeddings(query: Vec<Vec<f32>>, support: Vec<Vec<f32>>) -> Self {
        Rices { query, support }
    }

    /// Embeds every query and support image with `clip` (images prepared as `data` says).
    pub fn embed<B: Backend>(
        clip: &Clip<B>,
        data: &DataConfig,
        queries: &[Example],
        support: &[Example],
        batch: usize,
        device: &B::Device,
    ) -> Result<Self> {
        // A video (a directory of frames) is compared by its first frame.
        let files = |s: &[Example]| -> Result<Vec<PathBuf>> {
            s.iter()
                .map(|e| Ok(media_files(&e.image)?.swap_remove(0)))
                .collect()
        };
        Ok(Rices {
            query: image_embeddings(clip, data, &files(queries)?, batch, device)?,
            support: image_embeddings(clip, data, &files(support)?, batch, device)?,
        })
    }

    /// The `n` support indices for query `q` (least similar first), none showing `image`.
    pub fn demos(&self, q: usize, n: usize, support: &[Example], image: &Path) -> Vec<usize> {
        let e = &self.query[q];
        let mut scored: Vec<(f32, usize)> = self
            .support
            .iter()
            .enumerate()
            .filter(|(i, _)| support[*i].image != image)
            .map(|(i, s)| (s.iter().zip(e).map(|(a, b)| a * b).sum(), i))
            .collect();
        // Most similar first (ties by position), then the best n reversed.
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.iter().take(n).rev().map(|&(_, i)| i).collect()
    }
}

/// Unit image embeddings of `files`, `batch` at a time.
pub fn image_embeddings<B: Backend>(
    clip: &Clip<B>,
    data: &DataConfig,
    files: &[PathBuf],
    batch: usize,
    device: &B::Device,
) -> Result<Vec<Vec<f32>>> {
    let s = data.image_size as usize;
    let mut out = Vec::with_capacity(files.len());
    for chunk in files.chunks(batch.max(1)) {
        let mut px = Vec::with_capacity(chunk.len() * 3 * s * s);
        for f in chunk {
            px.extend(load_image_file(data, f).map_err(anyhow::Error::msg)?);
        }
        let t = Tensor::<B, 4>::from_data(TensorData::new(px, [chunk.len(), 3, s, s]), device);
        let e = clip.encode_image(t);
        let width = e.dims()[1];
        let v: Vec<f32> = e.into_data().convert::<f32>().to_vec().expect("f32");
        out.extend(v.chunks(width).map(<[f32]>::to_vec));
    }
    Ok(out)
}
