//! Held-out evaluation of the text stages: perplexity on the held-out pages, and (stage 2)
//! the pages' single-image (or single-video) questions written in the VQA layout
//! ([`write_vqa_layout`]) for the k-shot evaluation every Flamingo gets
//! ([`crate::openflamingo`]). Greedy decoding
//! ([`generate_visual`]) is shared with `rookery generate`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::prelude::*;
use rookery_data::loader::Mode;
use rookery_data::media::frame_members;
use rookery_data::pages::{PageBatch, Pages};
use rookery_data::wds::{read_shard, RawSample, ShardItem};
use rookery_data::{DataConfig, Loader, TextTokenizer};
use rookery_model::flamingo::{Flamingo, KvCache};
use serde::Serialize;
use serde_json::json;

use rookery_model::next_token::next_token_loss_sum;

use crate::config::EvalConfig;
use crate::input::page_tensors;
use crate::openflamingo::data::load_vqa;
use crate::openflamingo::model::FlamingoGenerator;
use crate::openflamingo::{evaluate, Example, FewShotConfig, FewShotTask, Prompts};

/// What a text-stage evaluation measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TextReport {
    /// exp(mean next-token loss) over the target tokens of the held-out pages.
    pub perplexity: f64,
    /// Target tokens scored.
    pub tokens: usize,
    /// Questions asked per shot count (0 without few-shot evaluation).
    pub questions: usize,
    /// `vqa_accuracy_{k}shot` over all questions and `vqa_accuracy_{k}shot_{kind}` per kind
    /// ([`crate::openflamingo`]).
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

/// Where [`write_vqa_layout`] put the held-out questions.
#[derive(Clone, Debug)]
pub struct VqaFiles {
    pub questions: PathBuf,
    pub annotations: PathBuf,
    pub images: PathBuf,
}

/// Writes the first `max` single-image (or single-video) questions of the held-out pages
/// (`data.val`) in the VQA layout ([`crate::openflamingo::data`]) under `out`:
/// `questions.json`, `annotations.json` (the page's answer as all ten human answers, so VQA
/// accuracy is exact match after VQA's normalisation; the question kind as `answer_type`) and
/// `images/` (a video as a directory of its frames). The
/// k-shot evaluation of stage 2 then reads them as it reads VQAv2.
pub fn write_vqa_layout(data: &DataConfig, max: usize, out: &Path) -> Result<VqaFiles> {
    let images = out.join("images");
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let (mut questions, mut annotations) = (Vec::new(), Vec::new());
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
                let name = doc["image_info"][i as usize]["image_name"]
                    .as_str()
                    .unwrap_or("");
                let Some(files) = medium_members(&s, name) else {
                    continue;
                };
                // "Which image has more shapes?" compares images: not a one-image question.
                if kind == "compare" || questions.len() >= max {
                    continue;
                }
                let id = questions.len() as u64;
                if let Err(e) = write_medium(&s, &files, &images.join(format!("{id:012}"))) {
                    err = Some(e);
                    return false;
                }
                let answer = qa["answer"].as_str().unwrap_or_default();
                questions.push(json!({"image_id": id, "question_id": id,
                    "question": qa["question"].as_str().unwrap_or_default()}));
                let answers: Vec<_> = (1..=10)
                    .map(|a| json!({"answer": answer, "answer_id": a}))
                    .collect();
                annotations.push(
                    json!({"question_id": id, "image_id": id, "answers": answers,
                    "answer_type": kind, "question_type": kind}),
                );
            }
            questions.len() < max
        });
        if let Some(e) = err {
            anyhow::bail!(e);
        }
        if questions.len() >= max {
            break;
        }
    }
    if questions.is_empty() {
        anyhow::bail!(
            "data.val = {:?} holds no page with questions (`qa` in the document JSON)",
            data.val
        );
    }
    let files = VqaFiles {
        questions: out.join("questions.json"),
        annotations: out.join("annotations.json"),
        images,
    };
    let write = |p: &Path, v: serde_json::Value| {
        std::fs::write(p, v.to_string()).with_context(|| format!("writing {}", p.display()))
    };
    write(&files.questions, json!({"questions": questions}))?;
    write(&files.annotations, json!({"annotations": annotations}))?;
    Ok(files)
}

/// The members holding a page's medium `name`: the image, or a video's frames in order.
fn medium_members(s: &RawSample, name: &str) -> Option<Vec<String>> {
    if s.get(name).is_some() {
        return Some(vec![name.to_string()]);
    }
    let members: BTreeSet<String> = s.members.iter().map(|(e, _)| e.clone()).collect();
    frame_members(&members, &format!("{name}."), name)?.ok()
}

/// Writes a medium under `stem`: an image as `stem.EXT`, a video as the directory `stem/`
/// of its frames `frame000.EXT`, ... (what [`crate::openflamingo::data`] reads as a video).
fn write_medium(s: &RawSample, files: &[String], stem: &Path) -> Result<(), String> {
    let ext = |name: &str| name.rsplit('.').next().unwrap_or("jpg").to_string();
    let write = |path: PathBuf, name: &str| {
        let bytes = s.get(name).unwrap_or_default();
        std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    if let [image] = files {
        return write(stem.with_extension(ext(image)), image);
    }
    std::fs::create_dir_all(stem).map_err(|e| format!("creating {}: {e}", stem.display()))?;
    for (t, name) in files.iter().enumerate() {
        write(stem.join(format!("frame{t:03}.{}", ext(name))), name)?;
    }
    Ok(())
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

/// Appends up to `max_new` tokens to each row (rows of any length), given the `n` media of
/// each row already encoded (`visual` `[R, n * latents, D]`, from [`Flamingo::encode_media`]),
/// choosing each with `pick` from the next-token logits; a row stops after any token of
/// `stop`. Returns the new tokens of each row. Runs with a key/value cache
/// ([`rookery_model::flamingo::cache`]): after the prompts, one token per row and step.
#[allow(clippy::too_many_arguments)]
pub fn generate_visual<B: Backend>(
    model: &Flamingo<B>,
    mut rows: Vec<Vec<i64>>,
    visual: Tensor<B, 3>,
    n: usize,
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
    let mut new: Vec<Vec<i64>> = vec![Vec::new(); rows.len()];
    // The prompts go through the LM once; each later step feeds the newest token of every row
    // (a stopped row's last one again: its result is not read).
    let mut cache = KvCache::new(&model.lm);
    let (mut tokens, mut start) = (padded(&rows, pad, device), vec![0; rows.len()]);
    for _ in 0..max_new {
        let live: Vec<bool> = new
            .iter()
            .map(|g| !g.last().is_some_and(|t| stop.contains(t)))
            .collect();
        if !live.contains(&true) {
            break;
        }
        if rows.iter().any(|r| r.len() > ctx) {
            break; // the context is full, as a maximum length stops HF's generate
        }
        let logits = model.forward_cached(tokens, &rows, &start, visual.clone(), n, &mut cache);
        let [_, t, v] = logits.dims();
        let all: Vec<f32> = logits.into_data().to_vec().expect("f32 logits");
        for (r, row) in rows.iter_mut().enumerate() {
            if !live[r] {
                continue;
            }
            let at = (r * t + row.len() - 1 - start[r]) * v;
            let t = pick(&all[at..at + v]);
            row.push(t);
            new[r].push(t);
        }
        start = rows.iter().map(|r| r.len() - 1).collect();
        let last: Vec<i64> = rows.iter().map(|r| r[r.len() - 1]).collect();
        tokens = Tensor::from_data(TensorData::new(last, [rows.len(), 1]), device);
    }
    Ok(new)
}

/// `rows` padded with `pad` to the longest, `[R, L]`.
fn padded<B: Backend>(rows: &[Vec<i64>], pad: i64, device: &B::Device) -> Tensor<B, 2, Int> {
    let len = rows.iter().map(Vec::len).max().unwrap_or(1);
    let flat: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.iter().copied().chain(std::iter::repeat(pad)).take(len))
        .collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), len]), device)
}

/// The held-out questions of the pages, written in the VQA layout under `dir` and read back as
/// any VQA set is.
pub fn held_out_questions(data: &DataConfig, max: usize, dir: &Path) -> Result<Vec<Example>> {
    let f = write_vqa_layout(data, max, dir)?;
    load_vqa(&f.questions, &f.annotations, &f.images)
}

/// Stage 2's k-shot question answering on `questions` as `[eval]` says (shots, batch, prompt,
/// answer length), demonstrations drawn from the same questions: `vqa_accuracy_{k}shot` and
/// per kind. When the questions are about videos, the same again with every video shown as
/// its first frame only, under `first_frame_vqa_accuracy_...`: the gap is what the frames
/// (and their time embeddings) add.
pub fn question_answering<B: Backend>(
    model: &Flamingo<B>,
    tokenizer: &TextTokenizer,
    data: &DataConfig,
    eval: &EvalConfig,
    questions: &[Example],
    device: &B::Device,
) -> Result<BTreeMap<String, f64>> {
    let run = FewShotConfig {
        task: FewShotTask::Vqa,
        shots: eval.shots.clone(),
        seed: data.seed,
        batch: eval.batch,
        prompts: Prompts {
            vqa: eval.vqa_prompt.clone(),
            ..Default::default()
        },
        rices: None,
    };
    let videos = questions.iter().any(|q| q.image.is_dir());
    let mut scores = BTreeMap::new();
    for first_frame_only in [false, true].into_iter().take(1 + videos as usize) {
        let mut generator = FlamingoGenerator {
            model,
            tokenizer,
            data,
            max_new: eval.max_new_tokens,
            first_frame_only,
            device,
        };
        let prefix = if first_frame_only { "first_frame_" } else { "" };
        let report = evaluate(&run, questions, questions, &mut generator)?;
        scores.extend(
            report
                .scores
                .into_iter()
                .map(|(k, v)| (format!("{prefix}{k}"), v)),
        );
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::module::Param;
    use burn::tensor::Distribution;
    use rookery_model::flamingo::{FlamingoConfig, LmStyle};

    /// Greedy generation with the cache picks the tokens that recomputing the whole rows at
    /// every step picks (rows of different lengths, one stopping early).
    #[test]
    fn cached_generation_picks_what_whole_recomputation_picks() {
        type B = Flex;
        let dev = Default::default();
        for style in [LmStyle::Gpt2, LmStyle::Llama] {
            let mut c = FlamingoConfig::default();
            (c.vision.image_size, c.vision.patch_size, c.vision.width) = (16, 8, 32);
            (c.vision.layers, c.vision.heads) = (1, 2);
            (c.lm.vocab_size, c.lm.context_length, c.lm.width) = (24, 20, 32);
            (c.lm.layers, c.lm.heads, c.lm.style) = (2, 2, style);
            (c.resampler.latents, c.resampler.depth) = (3, 1);
            (c.resampler.heads, c.resampler.dim_head) = (2, 8);
            (c.xattn_heads, c.xattn_dim_head) = (2, 8);
            B::seed(&dev, 9);
            let mut m = c.init::<B>(&dev);
            for x in m.xattn.iter_mut() {
                x.attn_gate = Param::from_tensor(Tensor::ones([1], &dev) * 0.7);
            }
            let images =
                Tensor::<B, 5>::random([3, 1, 3, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
            let visual = m.encode_images(images);
            let rows = vec![
                vec![2i64, 4, 7, 8],
                vec![2, 4, 9],
                vec![2, 11, 4, 12, 13, 14],
            ];
            let mut want = rows.clone();
            let mut reference = vec![Vec::new(); 3];
            // A row stops after token 9, else runs 8 steps.
            for _ in 0..8 {
                let len = want.iter().map(Vec::len).max().unwrap();
                let logits = m.forward_visual(padded(&want, 0, &dev), visual.clone(), 1);
                let all: Vec<f32> = logits.into_data().to_vec().unwrap();
                for (r, row) in want.iter_mut().enumerate() {
                    if reference[r].last() == Some(&9) {
                        continue;
                    }
                    let at = (r * len + row.len() - 1) * 24;
                    let t = greedy(&all[at..at + 24]);
                    row.push(t);
                    reference[r].push(t);
                }
            }
            let got = generate_visual(&m, rows, visual, 1, 8, &mut greedy, &[9], 0, &dev).unwrap();
            assert_eq!(got, reference, "{style:?}");
            assert!(reference.iter().map(Vec::len).sum::<usize>() > 8);
        }
    }
}
