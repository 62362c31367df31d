//! `rookery data inspect`: what a set of shards holds, and which samples are bad.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

use std::collections::BTreeSet;

use base64::Engine;

use crate::decode::decode_rgb;
use crate::interleaved::{mmc4_medium, parse_obelics, DocError, ImageRef, Item};
use crate::media::{frame_members, is_frame};
use crate::wds::{read_shard, RawSample, ShardItem};

/// Statistics over a set of shards.
#[derive(Debug, Default, Serialize)]
pub struct InspectReport {
    pub shards: usize,
    pub samples: u64,
    pub extensions: BTreeMap<String, u64>,
    /// Longest image side, bucketed (`<=64`, `<=128`, ...).
    pub image_sides: BTreeMap<String, u64>,
    pub caption_words: Stats,
    pub caption_chars: Stats,
    /// (shard, key, reason) for each bad sample or shard.
    pub bad: Vec<(String, String, String)>,
}

#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct Stats {
    pub count: u64,
    pub min: u64,
    pub max: u64,
    pub mean: f64,
}

impl Stats {
    fn add(&mut self, v: u64) {
        self.min = if self.count == 0 { v } else { self.min.min(v) };
        self.max = self.max.max(v);
        self.mean = (self.mean * self.count as f64 + v as f64) / (self.count + 1) as f64;
        self.count += 1;
    }
    fn merge(&mut self, o: &Stats) {
        if o.count == 0 {
            return;
        }
        let n = self.count + o.count;
        self.min = if self.count == 0 {
            o.min
        } else {
            self.min.min(o.min)
        };
        self.max = self.max.max(o.max);
        self.mean = (self.mean * self.count as f64 + o.mean * o.count as f64) / n as f64;
        self.count = n;
    }
}

fn side_bucket(side: u32) -> String {
    let mut b = 32;
    while b < side && b < 4096 {
        b *= 2;
    }
    if side > b {
        format!(">{b}")
    } else {
        format!("<={b:04}")
    }
}

/// Reads every shard (in parallel) and decodes every image and caption.
pub fn inspect(shards: &[String], image_exts: &[String], text_ext: &str) -> InspectReport {
    let parts: Vec<InspectReport> = shards
        .par_iter()
        .map(|url| inspect_one(url, image_exts, text_ext))
        .collect();
    let mut r = InspectReport {
        shards: shards.len(),
        ..Default::default()
    };
    for p in parts {
        r.samples += p.samples;
        for (k, v) in p.extensions {
            *r.extensions.entry(k).or_default() += v;
        }
        for (k, v) in p.image_sides {
            *r.image_sides.entry(k).or_default() += v;
        }
        r.caption_words.merge(&p.caption_words);
        r.caption_chars.merge(&p.caption_chars);
        r.bad.extend(p.bad);
    }
    r
}

/// A page (MMC4 or OBELICS layout): every medium it names must be there and decode (each
/// frame of a video), every MMC4 `matched_text_index` in range; text stats over its texts.
fn inspect_page(r: &mut InspectReport, url: &str, s: &RawSample, doc: &serde_json::Value) {
    let texts: Vec<&str> = ["text_list", "texts"]
        .iter()
        .filter_map(|k| doc[*k].as_array())
        .flatten()
        .filter_map(|t| t.as_str())
        .collect();
    let joined = texts.join(" ");
    r.caption_chars.add(joined.chars().count() as u64);
    r.caption_words
        .add(joined.split_whitespace().count() as u64);
    let members: BTreeSet<String> = s.members.iter().map(|(e, _)| e.clone()).collect();
    let mut bad = |why: String| r.bad.push((url.to_string(), s.key.clone(), why));
    let mut media = Vec::new();
    match doc.get("image_info") {
        // MMC4: each entry on its own, so one page can show several faults.
        Some(info) => {
            let n = doc["text_list"].as_array().map_or(0, Vec::len);
            for (i, im) in info.as_array().into_iter().flatten().enumerate() {
                let idx = im["matched_text_index"].as_u64().unwrap_or(u64::MAX) as usize;
                match mmc4_medium(im, i, &members) {
                    Err(DocError::MissingImage(name)) => {
                        bad(format!("page image {name:?} is not a member"))
                    }
                    Err(e) => bad(e.to_string()),
                    Ok(m) => {
                        if idx >= n {
                            bad(format!("matched_text_index {idx} out of range ({n} texts)"));
                        }
                        media.push(m)
                    }
                }
            }
        }
        None => match parse_obelics(doc, &members) {
            Err(e) => bad(e.to_string()),
            Ok(items) => media.extend(items.into_iter().filter_map(|i| match i {
                Item::Media(m) => Some(m),
                Item::Text(_) => None,
            })),
        },
    }
    for frame in media.iter().flat_map(|m| &m.frames) {
        r.decode_frame(url, s, frame);
    }
}

impl InspectReport {
    /// Decodes one image (or video frame) of a sample, counting its size or why it failed.
    fn decode_frame(&mut self, url: &str, s: &RawSample, r: &ImageRef) {
        let (name, bytes) = match r {
            ImageRef::Member(name) => (name.clone(), s.get(name).map(<[u8]>::to_vec)),
            ImageRef::Base64(b) => {
                let engine = base64::engine::general_purpose::STANDARD;
                ("inline base64".to_string(), engine.decode(b.trim()).ok())
            }
        };
        let kind = match r {
            ImageRef::Member(n) => n.rsplit('.').next().unwrap_or(n).to_string(),
            ImageRef::Base64(_) => "png".to_string(),
        };
        let decoded = bytes
            .ok_or_else(|| "unreadable".to_string())
            .and_then(|b| decode_rgb(&kind, &b).map_err(|e| e.to_string()));
        match decoded {
            Ok(img) => {
                *self
                    .image_sides
                    .entry(side_bucket(img.width.max(img.height)))
                    .or_default() += 1
            }
            Err(e) => self.bad.push((
                url.to_string(),
                s.key.clone(),
                format!("undecodable page image {name}: {e}"),
            )),
        }
    }
}

/// How an extension is counted: a video's frames as one class (`frame*.jpg`, `*.frame*.jpg`).
fn extension_class(ext: &str) -> String {
    if !is_frame(ext) {
        return ext.to_string();
    }
    let kind = ext.rsplit('.').next().unwrap_or(ext);
    match ext.starts_with("frame") {
        true => format!("frame*.{kind}"),
        false => format!("*.frame*.{kind}"),
    }
}

fn inspect_one(url: &str, image_exts: &[String], text_ext: &str) -> InspectReport {
    let mut r = InspectReport::default();
    read_shard(url, |item| {
        match item {
            ShardItem::Sample(s) => {
                r.samples += 1;
                for (e, _) in &s.members {
                    *r.extensions.entry(extension_class(e)).or_default() += 1;
                }
                if let Some(doc) = s
                    .get("json")
                    .and_then(|j| serde_json::from_slice::<serde_json::Value>(j).ok())
                    .filter(|d| d.get("text_list").is_some() || d.get("texts").is_some())
                {
                    inspect_page(&mut r, url, &s, &doc);
                    return true;
                }
                let members: BTreeSet<String> = s.members.iter().map(|(e, _)| e.clone()).collect();
                let video = frame_members(&members, "", &s.key);
                let mut bad = |why: String| r.bad.push((url.to_string(), s.key.clone(), why));
                match (video, s.first_of(image_exts)) {
                    (Some(Err(e)), _) => bad(e.to_string()),
                    (Some(Ok(frames)), _) => {
                        for f in frames {
                            r.decode_frame(url, &s, &ImageRef::Member(f));
                        }
                    }
                    (None, None) => bad("missing image".into()),
                    (None, Some((ext, bytes))) => match decode_rgb(ext, bytes) {
                        Ok(img) => {
                            *r.image_sides
                                .entry(side_bucket(img.width.max(img.height)))
                                .or_default() += 1
                        }
                        Err(e) => bad(format!("undecodable image .{ext}: {e}")),
                    },
                }
                match s.get(text_ext).map(std::str::from_utf8) {
                    None => r
                        .bad
                        .push((url.to_string(), s.key.clone(), "missing caption".into())),
                    Some(Err(_)) => r.bad.push((
                        url.to_string(),
                        s.key.clone(),
                        "caption is not UTF-8".into(),
                    )),
                    Some(Ok(t)) => {
                        r.caption_chars.add(t.chars().count() as u64);
                        r.caption_words.add(t.split_whitespace().count() as u64);
                    }
                }
            }
            ShardItem::Broken(e) => r.bad.push((url.to_string(), "-".into(), e.to_string())),
        }
        true
    });
    if r.samples == 0 && r.bad.is_empty() {
        r.bad.push((
            url.to_string(),
            "-".into(),
            "empty shard: no samples".into(),
        ));
    }
    r
}
