//! Batches of interleaved documents for Flamingo training: each sample's `.json` (MMC4 or
//! OBELICS layout, told apart by its fields) becomes a token sequence with loss targets
//! ([`crate::interleaved`]) and its images are decoded, cropped and normalised like stage 1's.
//! A malformed document (missing image, index out of range, undecodable image, empty text, no
//! image left, a video with a missing frame, no frames or too many) is skipped and counted by
//! the loader with its shard and key.
//!
//! Media are images or videos ([`crate::media`]): a batch holds `[B, N, F, 3, S, S]` pixels, F
//! the most frames of any medium in it, with each medium's frame count so the resampler masks
//! the padding. All frames of a video share one random crop, so motion survives augmentation.
//!
//! Image-text pairs (stage-1 shards listed in `data.train` beside the documents', `::`-joined)
//! mix into the same stream as OpenFlamingo mixes LAION into MMC4: each becomes
//! `<sot><image>caption<|endofchunk|><eot>`, its tokens weighted `data.interleaved.pairs_weight`
//! in the loss (a weighted mean over all target tokens of the global batch).

use std::collections::BTreeSet;
use std::sync::Arc;

use base64::Engine;

use crate::interleaved::{
    build_sequence, pair_sequence, parse_mmc4, parse_obelics, DocError, ImageRef, Medium,
    SequenceConfig, Specials,
};
use crate::loader::{load_image, Batched, DataConfig, LoaderPosition, Mode, Prepare};
use crate::media::{frame_members, pack_media, sample_frames};
use crate::rng::shard_seed;
use crate::tokenize::TextTokenizer;
use crate::wds::RawSample;

/// Prepares interleaved documents.
pub struct Pages {
    pub data: DataConfig,
    pub seq: SequenceConfig,
    pub tokenizer: Arc<TextTokenizer>,
    pub specials: Specials,
    pub mode: Mode,
    /// Decode the images (a text-only model reads the `<image>` tokens but not the pixels).
    pub decode_images: bool,
}

/// One document, ready.
pub struct Page {
    tokens: Vec<i64>,
    targets: Vec<bool>,
    /// Loss weight of each target token (`data.interleaved.pairs_weight` for pairs).
    weight: f32,
    /// Per medium in `<image>` order, its frames' `[3, S, S]` pixels.
    images: Vec<Vec<Vec<f32>>>,
    json: serde_json::Value,
}

/// A batch of sequences with their images, laid out for `Tensor::from_data`.
#[derive(Clone, Debug)]
pub struct PageBatch {
    /// `[B, T]` token ids.
    pub tokens: Vec<i64>,
    /// `[B, T]`: the loss weight of each token: 0.0 where no loss falls, 1.0 on a document's
    /// text, `pairs_weight` on a mixed-in pair's caption.
    pub targets: Vec<f32>,
    /// `[B, N, F, 3, S, S]`, N the most media of any row, F the most frames of any medium;
    /// missing media and frames are zeros.
    pub images: Vec<f32>,
    pub n_images: Vec<usize>,
    /// `[B * N]`: each medium's real frames (an empty slot counts one: no token attends to it).
    pub frames: Vec<usize>,
    pub batch_size: usize,
    pub max_images: usize,
    pub max_frames: usize,
    pub context_length: usize,
    pub image_size: usize,
    pub keys: Vec<String>,
    /// Each document's JSON (the synthetic pages carry their questions in `qa`).
    pub json: Vec<serde_json::Value>,
    pub epochs: Vec<u64>,
    pub position: LoaderPosition,
}

impl Batched for PageBatch {
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

impl Pages {
    /// Documents as `data` and `data.interleaved` say, special tokens from `tokenizer`.
    pub fn new(
        data: &DataConfig,
        tokenizer: Arc<TextTokenizer>,
        mode: Mode,
    ) -> Result<Self, String> {
        let specials = Specials::of(&tokenizer)?;
        Ok(Pages {
            data: data.clone(),
            seq: data.interleaved.clone(),
            tokenizer,
            specials,
            mode,
            decode_images: true,
        })
    }

    /// Medium `k`'s frames, all cropped alike (one seed per medium).
    fn medium(
        &self,
        s: &RawSample,
        m: &Medium,
        k: usize,
        epoch: u64,
    ) -> Result<Vec<Vec<f32>>, String> {
        let seed = [
            self.data.seed,
            epoch,
            shard_seed(&s.shard),
            s.index,
            k as u64,
        ];
        m.frames.iter().map(|r| self.image(s, r, &seed)).collect()
    }

    fn image(&self, s: &RawSample, r: &ImageRef, seed: &[u64]) -> Result<Vec<f32>, String> {
        match r {
            ImageRef::Member(ext) => {
                let bytes = s.get(ext).ok_or_else(|| format!("missing image: {ext}"))?;
                let kind = ext.rsplit('.').next().unwrap_or(ext);
                load_image(&self.data, self.mode, kind, bytes, seed)
            }
            ImageRef::Base64(b) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .map_err(|e| format!("undecodable image: bad base64: {e}"))?;
                let kind = if bytes.starts_with(&[0xff, 0xd8]) {
                    "jpg"
                } else {
                    "png"
                };
                load_image(&self.data, self.mode, kind, &bytes, seed)
            }
        }
    }
}

impl Pages {
    /// An image-text or video-text pair (stage-1 shards mixed in; a video as its
    /// `frameNNN.jpg` members) as `<image>caption<|endofchunk|>`, its tokens weighted
    /// `pairs_weight`.
    fn pair(&self, s: &RawSample, video: Option<Vec<String>>, epoch: u64) -> Result<Page, String> {
        let medium = match video {
            Some(frames) => {
                let m = Medium {
                    frames: frames.into_iter().map(ImageRef::Member).collect(),
                };
                let (max, most) = (self.seq.max_frames, self.seq.max_video_frames);
                sample_frames(&m, max, most, &s.key).map_err(|e| format!("bad video: {e}"))?
            }
            None => {
                let (ext, _) = s.first_of(&self.data.image_exts).ok_or("missing image")?;
                Medium::image(ImageRef::Member(ext.to_string()))
            }
        };
        let caption = std::str::from_utf8(s.get(&self.data.text_ext).unwrap_or_default())
            .map_err(|_| "caption is not UTF-8".to_string())?;
        let seq = pair_sequence(caption, &self.tokenizer, self.specials, self.seq.max_tokens)
            .map_err(|e| format!("bad pair: {e}"))?;
        let images = match self.decode_images {
            true => vec![self.medium(s, &medium, 0, epoch)?],
            false => Vec::new(),
        };
        Ok(Page {
            tokens: seq.tokens,
            targets: seq.targets,
            weight: self.seq.pairs_weight as f32,
            images,
            json: serde_json::Value::Null,
        })
    }
}

/// A skipped document's reason; video problems counted apart from other document problems.
fn reason(e: DocError) -> String {
    match e {
        DocError::Video(v) => format!("bad video: {v}"),
        e => format!("bad document: {e}"),
    }
}

impl Prepare for Pages {
    type Item = Page;
    type Batch = PageBatch;

    fn prepare(&self, s: &RawSample, epoch: u64) -> Result<Page, String> {
        let json: Option<serde_json::Value> = match s.get("json") {
            Some(raw) => Some(
                serde_json::from_slice(raw).map_err(|e| format!("bad document: not JSON: {e}"))?,
            ),
            None => None,
        };
        let is_doc = json
            .as_ref()
            .is_some_and(|j| j.get("text_list").is_some() || j.get("texts").is_some());
        let has_text = s.get(&self.data.text_ext).is_some();
        // Image-text pairs (the common mixed-in case) before any member set is built.
        if !is_doc && has_text && s.first_of(&self.data.image_exts).is_some() {
            return self.pair(s, None, epoch);
        }
        let members: BTreeSet<String> = s.members.iter().map(|(e, _)| e.clone()).collect();
        if !is_doc && has_text {
            if let Some(frames) = frame_members(&members, "", &s.key) {
                let frames = frames.map_err(|e| format!("bad video: {e}"))?;
                return self.pair(s, Some(frames), epoch);
            }
        }
        let json = json.ok_or("missing document: no .json member")?;
        let items = if json.get("text_list").is_some() {
            parse_mmc4(&json, &members, self.seq.min_sim)
        } else if json.get("texts").is_some() {
            parse_obelics(&json, &members)
        } else {
            return Err("bad document: neither MMC4 (text_list) nor OBELICS (texts), nor an image-text pair".into());
        }
        .map_err(reason)?;
        let seq =
            build_sequence(&items, &self.tokenizer, self.specials, &self.seq).map_err(reason)?;
        let images = seq
            .images
            .iter()
            .filter(|_| self.decode_images)
            .enumerate()
            .map(|(k, m)| self.medium(s, m, k, epoch))
            .collect::<Result<_, _>>()?;
        Ok(Page {
            tokens: seq.tokens,
            targets: seq.targets,
            weight: 1.0,
            images,
            json,
        })
    }

    fn assemble(&self, good: Vec<(RawSample, u64, Page)>, position: LoaderPosition) -> PageBatch {
        let n = good.len();
        let s = self.data.image_size as usize;
        let rows: Vec<&[Vec<Vec<f32>>]> = good.iter().map(|g| g.2.images.as_slice()).collect();
        let media = pack_media(&rows, 3 * s * s);
        let mut b = PageBatch {
            tokens: Vec::with_capacity(n * self.seq.max_tokens),
            targets: Vec::with_capacity(n * self.seq.max_tokens),
            images: media.pixels,
            n_images: Vec::with_capacity(n),
            frames: media.frames,
            batch_size: n,
            max_images: media.max_media,
            max_frames: media.max_frames,
            context_length: self.seq.max_tokens,
            image_size: s,
            keys: Vec::with_capacity(n),
            json: Vec::with_capacity(n),
            epochs: Vec::with_capacity(n),
            position,
        };
        for (raw, epoch, page) in good {
            b.tokens.extend_from_slice(&page.tokens);
            b.targets
                .extend(page.targets.iter().map(|&t| t as u8 as f32 * page.weight));
            b.n_images.push(page.images.len());
            b.keys.push(raw.key);
            b.json.push(page.json);
            b.epochs.push(epoch);
        }
        b
    }
}
