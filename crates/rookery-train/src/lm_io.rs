//! `rookery generate` on a language model alone, imported as it is from an HF GPT-2, GPT-NeoX,
//! MPT or Llama-family directory (text only): a check of an LM before stage 2 is built on it.
//! The prompt is encoded by the LM's own `tokenizer.json` (its post-processor adds BOS or not; nothing is
//! added twice), generation stops at the config's `eos_token_id`(s). The prompt goes through the
//! LM once; each later step feeds the newest token against a key/value cache.

use std::path::Path;

use anyhow::{Context, Result};
use burn::prelude::*;
use rookery_data::rng::Rng;
use rookery_data::PromptTokenizer;
use rookery_model::flamingo::KvCache;

use crate::flamingo_io::{sample_top_k, GenerateArgs};
use rookery_eval::fewshot::greedy;

/// The end-of-sequence ids of the model in `dir` (`eos_token_id`: a number or a list).
fn eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    Ok(match &v["eos_token_id"] {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        x => x.as_u64().map(|x| x as u32).into_iter().collect(),
    })
}

/// The prompt's ids and the ids the model in `dir` continues it with.
pub fn generate_lm<B: Backend>(
    dir: &Path,
    args: &GenerateArgs,
    device: &B::Device,
) -> Result<(Vec<u32>, Vec<u32>, String)> {
    anyhow::ensure!(
        args.images.is_empty(),
        "{}: a language model alone reads no images",
        dir.display()
    );
    let cfg = rookery_interop::lm_config(dir)?;
    let lm = rookery_interop::load_lm(cfg.init::<B>(device), dir, &cfg)?;
    let tk_path = dir.join("tokenizer.json");
    let tk = PromptTokenizer::from_file(&tk_path)
        .with_context(|| format!("{}: the model's tokenizer", dir.display()))?;
    let prompt = tk.encode(&args.prompt).map_err(anyhow::Error::msg)?;
    let stop = eos_ids(dir)?;
    let mut rng = Rng::new(args.seed);
    let mut ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut new = Vec::new();
    // The prompt once, then one token per step against the key/value cache.
    let mut cache = KvCache::new(&lm);
    let (mut fresh, mut start) = (ids.clone(), 0);
    for _ in 0..args.max_new {
        if ids.len() >= cfg.context_length {
            break;
        }
        let t = fresh.len();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(fresh, [1, t]), device);
        let last = lm
            .forward_cached(tokens, &[start], &mut cache)
            .slice(s![.., t - 1..t, ..]);
        let logits: Vec<f32> = last
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let next = match args.top_k {
            0 => greedy(&logits),
            k => sample_top_k(&logits, k, args.temperature.max(1e-6), &mut rng),
        };
        new.push(next as u32);
        ids.push(next);
        (fresh, start) = (vec![next], ids.len() - 1);
        if stop.contains(&(next as u32)) {
            break;
        }
    }
    let text = tk.decode(&new);
    Ok((prompt, new, text))
}
