//! `rookery data inspect`: what a set of shards holds, and which samples are bad.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

use crate::decode::decode_rgb;
use crate::wds::{read_shard, ShardItem};

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

/// An MMC4-layout page: every image named in `image_info` must be a decodable member, every
/// `matched_text_index` in range; text stats over `text_list`.
fn inspect_page(
    r: &mut InspectReport,
    url: &str,
    s: &crate::wds::RawSample,
    doc: &serde_json::Value,
) {
    let texts = doc["text_list"].as_array().map_or(0, |t| t.len());
    let joined: String = doc["text_list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    r.caption_chars.add(joined.chars().count() as u64);
    r.caption_words
        .add(joined.split_whitespace().count() as u64);
    for info in doc["image_info"].as_array().into_iter().flatten() {
        let name = info["image_name"]
            .as_str()
            .unwrap_or("")
            .to_ascii_lowercase();
        let idx = info["matched_text_index"].as_u64().unwrap_or(u64::MAX) as usize;
        let why = match s.get(&name) {
            None => Some(format!("page image {name:?} is not a member")),
            Some(bytes) => match decode_rgb(&name, bytes) {
                Ok(img) => {
                    *r.image_sides
                        .entry(side_bucket(img.width.max(img.height)))
                        .or_default() += 1;
                    None
                }
                Err(e) => Some(format!("undecodable page image {name}: {e}")),
            },
        };
        let why = why.or_else(|| {
            (idx >= texts).then(|| format!("matched_text_index {idx} out of range ({texts} texts)"))
        });
        if let Some(why) = why {
            r.bad.push((url.to_string(), s.key.clone(), why));
        }
    }
}

fn inspect_one(url: &str, image_exts: &[String], text_ext: &str) -> InspectReport {
    let mut r = InspectReport::default();
    read_shard(url, |item| {
        match item {
            ShardItem::Sample(s) => {
                r.samples += 1;
                for (e, _) in &s.members {
                    *r.extensions.entry(e.clone()).or_default() += 1;
                }
                if let Some(doc) = s
                    .get("json")
                    .and_then(|j| serde_json::from_slice::<serde_json::Value>(j).ok())
                    .filter(|d| d.get("text_list").is_some())
                {
                    inspect_page(&mut r, url, &s, &doc);
                    return true;
                }
                let mut bad = |why: String| r.bad.push((url.to_string(), s.key.clone(), why));
                match s.first_of(image_exts) {
                    None => bad("missing image".into()),
                    Some((ext, bytes)) => match decode_rgb(ext, bytes) {
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
