//! Held-out evaluation of the text stages: perplexity on the held-out pages, and (stage 2)
//! k-shot question answering on their images, scored per question kind.
//!
//! A k-shot prompt is the pages' own format: `<sot> intro`, then k demonstrations
//! `<image> q: … a: answer <|endofchunk|>` drawn from the other held-out questions, then
//! `<image> q: … a:` for the query image. The model answers greedily; an answer is right when
//! its tokens equal the reference's (`two .`). Questions comparing several images ("which image
//! has more shapes?") follow an `<|endofchunk|>` in the pages, where no loss falls, so they are
//! not asked.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use burn::prelude::*;
use rookery_data::interleaved::Specials;
use rookery_data::loader::{load_image, Mode};
use rookery_data::pages::{PageBatch, Pages};
use rookery_data::rng::{hash_str, Rng};
use rookery_data::wds::{read_shard, ShardItem};
use rookery_data::{DataConfig, Loader, TextTokenizer};
use rookery_model::flamingo::Flamingo;
use serde::Serialize;

use rookery_model::next_token::next_token_loss_sum;

use crate::input::page_tensors;

/// What a text-stage evaluation measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TextReport {
    /// exp(mean next-token loss) over the target tokens of the held-out pages.
    pub perplexity: f64,
    /// Target tokens scored.
    pub tokens: usize,
    /// Questions asked per shot count (0 without few-shot evaluation).
    pub questions: usize,
    /// `acc_{k}shot` over all questions and `acc_{k}shot_{kind}` per kind.
    #[serde(flatten)]
    pub acc: BTreeMap<String, f64>,
}

/// Perplexity over at most `max_pages` held-out pages; `logits(tokens, batch)` runs the model.
pub fn perplexity<B: Backend>(
    data: &DataConfig,
    prep: Pages,
    max_pages: usize,
    device: &B::Device,
    logits: impl Fn(Tensor<B, 2, Int>, &PageBatch) -> Tensor<B, 3>,
) -> Result<TextReport> {
    let shards = rookery_data::expand_shards(&data.val)?;
    let loader = Loader::start(data, prep, shards, 0, 1, Mode::Eval, None)?;
    let (mut sum, mut n, mut pages) = (0.0f64, 0.0f64, 0);
    for batch in loader {
        let b = batch?;
        let (tokens, weights) = page_tensors::<B>(&b, device);
        let out = logits(tokens.clone(), &b);
        sum += next_token_loss_sum(out, tokens, weights)
            .into_scalar()
            .elem::<f64>();
        n += b.targets.iter().map(|&t| t as f64).sum::<f64>();
        pages += b.batch_size;
        if pages >= max_pages {
            break;
        }
    }
    anyhow::ensure!(
        sum.is_finite(),
        "held-out next-token loss on {} is {sum} (diverged weights?); refusing to score it",
        data.val
    );
    Ok(TextReport {
        perplexity: (sum / n.max(1.0)).exp(),
        tokens: n as usize,
        ..Default::default()
    })
}

/// One held-out question about one image.
#[derive(Clone, Debug)]
pub struct Question {
    /// `[3, S, S]`, center-cropped and normalised like training images.
    pub image: Vec<f32>,
    pub kind: String,
    pub question: String,
    pub answer: String,
}

/// The first `max` single-image questions of the held-out pages (`data.val`).
pub fn load_questions(data: &DataConfig, max: usize) -> Result<Vec<Question>> {
    let mut out = Vec::new();
    for shard in rookery_data::expand_shards(&data.val)? {
        let mut err = None;
        read_shard(&shard, |item| {
            let ShardItem::Sample(s) = item else {
                return false;
            };
            let Some(doc) = s
                .get("json")
                .and_then(|j| serde_json::from_slice::<serde_json::Value>(j).ok())
            else {
                return true;
            };
            for qa in doc["qa"].as_array().into_iter().flatten() {
                let (Some(kind), Some(i)) = (qa["kind"].as_str(), qa["image"].as_u64()) else {
                    continue;
                };
                let name = doc["image_info"][i as usize]["image_name"].as_str();
                let Some(bytes) = name.and_then(|n| s.get(n)) else {
                    continue;
                };
                if kind == "compare" || out.len() >= max {
                    continue;
                }
                let seed = [data.seed, hash_str(&s.key), i];
                match load_image(data, Mode::Eval, "jpg", bytes, &seed) {
                    Ok(image) => out.push(Question {
                        image,
                        kind: kind.into(),
                        question: qa["question"].as_str().unwrap_or_default().into(),
                        answer: qa["answer"].as_str().unwrap_or_default().into(),
                    }),
                    Err(e) => err = Some(format!("{shard}: {}: {e}", s.key)),
                }
            }
            out.len() < max
        });
        if let Some(e) = err {
            tracing::warn!(error = %e, "held-out question skipped");
        }
        if out.len() >= max {
            break;
        }
    }
    if out.is_empty() {
        anyhow::bail!(
            "data.val = {:?} holds no page with questions (`qa` in the document JSON)",
            data.val
        );
    }
    Ok(out)
}

/// k-shot accuracy for each k of `shots`, overall and per kind, `batch` prompts at a time.
pub fn few_shot<B: Backend>(
    model: &Flamingo<B>,
    tk: &TextTokenizer,
    questions: &[Question],
    shots: &[usize],
    batch: usize,
    image_size: usize,
    device: &B::Device,
) -> Result<BTreeMap<String, f64>> {
    let sp = Specials::of(tk).map_err(anyhow::Error::msg)?;
    let ids = |t: &str| -> Result<Vec<i64>> {
        Ok(tk
            .ids(t)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("tokenizing {t:?}"))?
            .into_iter()
            .map(i64::from)
            .collect())
    };
    let intro = ids("here are some pictures.")?;
    let mut acc = BTreeMap::new();
    for &k in shots {
        let k = k.min(questions.len() - 1);
        let mut right: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        let order: Vec<usize> = (0..questions.len()).collect();
        for chunk in order.chunks(batch.max(1)) {
            let (mut rows, mut imgs, mut answers) = (Vec::new(), Vec::new(), Vec::new());
            for &j in chunk {
                let mut rng = Rng::derive(&[17, k as u64, j as u64]);
                let mut demos = Vec::with_capacity(k);
                while demos.len() < k {
                    let d = rng.below(questions.len());
                    if d != j && !demos.contains(&d) {
                        demos.push(d);
                    }
                }
                let mut row = vec![sp.sot];
                row.extend(&intro);
                for &d in &demos {
                    let q = &questions[d];
                    row.push(sp.image);
                    row.extend(ids(&format!("{} a: {}", q.question, q.answer))?);
                    row.push(sp.eoc);
                    imgs.extend_from_slice(&q.image);
                }
                let q = &questions[j];
                row.push(sp.image);
                row.extend(ids(&format!("{} a:", q.question))?);
                imgs.extend_from_slice(&q.image);
                rows.push(row);
                answers.push(ids(&q.answer)?);
            }
            let n = rows.len();
            let images = Tensor::<B, 5>::from_data(
                TensorData::new(imgs, [n, k + 1, 3, image_size, image_size]),
                device,
            );
            let longest = answers.iter().map(Vec::len).max().unwrap_or(1);
            let need = rows.iter().map(Vec::len).max().unwrap_or(0) + longest - 1;
            let ctx = model.lm.context_length;
            if need > ctx {
                anyhow::bail!("{k}-shot prompts and their answers need {need} positions but the language model's context is {ctx}: lower eval.shots");
            }
            let got = generate(
                model,
                rows,
                images,
                longest,
                &mut greedy,
                &[],
                sp.pad,
                device,
            )?;
            for ((&j, g), want) in chunk.iter().zip(&got).zip(&answers) {
                let e = right.entry(questions[j].kind.as_str()).or_default();
                e.0 += usize::from(g.len() >= want.len() && &g[..want.len()] == want);
                e.1 += 1;
            }
        }
        let (all_right, all) = right.values().fold((0, 0), |(a, b), (r, n)| (a + r, b + n));
        acc.insert(format!("acc_{k}shot"), all_right as f64 / all as f64);
        for (kind, (r, n)) in right {
            acc.insert(format!("acc_{k}shot_{kind}"), r as f64 / n as f64);
        }
    }
    Ok(acc)
}

/// The highest-scoring token.
pub fn greedy(logits: &[f32]) -> i64 {
    logits
        .iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, &v)| if v > best.1 { (i, v) } else { best },
        )
        .0 as i64
}

/// Appends up to `max_new` tokens to each row (rows of any length; `images` `[R, N, 3, S, S]`
/// the same N for every row), choosing each with `pick` from the next-token logits; a row stops
/// after any token of `stop`. Returns the new tokens of each row.
#[allow(clippy::too_many_arguments)]
pub fn generate<B: Backend>(
    model: &Flamingo<B>,
    mut rows: Vec<Vec<i64>>,
    images: Tensor<B, 5>,
    max_new: usize,
    pick: &mut dyn FnMut(&[f32]) -> i64,
    stop: &[i64],
    pad: i64,
    device: &B::Device,
) -> Result<Vec<Vec<i64>>> {
    let ctx = model.lm.context_length;
    let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
    if longest > ctx {
        anyhow::bail!(
            "a prompt of {longest} tokens does not fit the language model's context of {ctx}"
        );
    }
    let n = images.dims()[1];
    let visual = model.encode_images(images);
    let mut new: Vec<Vec<i64>> = vec![Vec::new(); rows.len()];
    for _ in 0..max_new {
        let live: Vec<bool> = new
            .iter()
            .map(|g| !g.last().is_some_and(|t| stop.contains(t)))
            .collect();
        if !live.contains(&true) {
            break;
        }
        let len = rows.iter().map(Vec::len).max().unwrap_or(1);
        if len > ctx {
            break; // the context is full, as a maximum length stops HF's generate
        }
        let flat: Vec<i64> = rows
            .iter()
            .flat_map(|r| r.iter().copied().chain(std::iter::repeat(pad)).take(len))
            .collect();
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [rows.len(), len]), device);
        let logits = model.forward_visual(tokens, visual.clone(), n);
        let v = logits.dims()[2];
        let all: Vec<f32> = logits.into_data().to_vec().expect("f32 logits");
        for (r, row) in rows.iter_mut().enumerate() {
            if !live[r] {
                continue;
            }
            let at = (r * len + row.len() - 1) * v;
            let t = pick(&all[at..at + v]);
            row.push(t);
            new[r].push(t);
        }
    }
    Ok(new)
}
