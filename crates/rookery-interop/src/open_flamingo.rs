//! OpenFlamingo's conventions around a pretrained language model: the tokenizer it extends
//! (`open_flamingo/src/factory.py`) and the vocabulary it grows for the new tokens.
//!
//! The factory adds `<|endofchunk|>` and `<image>` as special tokens (in that order), and
//! `<PAD>` when the tokenizer has no padding token, then resizes the LM's embeddings to the
//! tokenizer's new length: the new tokens get the ids after the last one. The checkpoint names
//! its trained parts are written under are in [`crate::open_flamingo_export`].

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokenizers::{AddedToken, Tokenizer};

use crate::tensors::Tensors;

/// The tokens OpenFlamingo adds, in its order.
pub const ADDED: [&str; 2] = ["<|endofchunk|>", "<image>"];
/// The padding token added to a tokenizer without one.
pub const PAD: &str = "<PAD>";

/// The names of the start, end and padding tokens of what [`extend_tokenizer`] wrote (for
/// `[data.special_tokens]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extended {
    pub bos: String,
    pub eos: String,
    pub pad: String,
}

fn json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The first id of `key` in `config.json` (a number or a list of numbers).
fn first_id(v: &Value, key: &str) -> Option<u32> {
    match &v[key] {
        Value::Array(a) => a.first().and_then(Value::as_u64),
        x => x.as_u64(),
    }
    .map(|x| x as u32)
}

/// The token `tokenizer_config.json` names under `key` (`pad_token`, `eos_token`: a string,
/// or `{content: …}`).
fn configured(dir: &Path, key: &str) -> Option<String> {
    let v = json(&dir.join("tokenizer_config.json"))?;
    let p = &v[key];
    p.as_str()
        .or_else(|| p["content"].as_str())
        .map(str::to_string)
}

/// Writes to `out` the tokenizer of the HF language model in `dir` as OpenFlamingo extends it
/// (see the module docs). The start token is the one the tokenizer's post-processor adds, else
/// `config.json`'s `bos_token_id`, else the end token; the end token is `eos_token_id` (the
/// first, where it is a list), else `tokenizer_config.json`'s `eos_token`; padding is
/// `pad_token_id`, else `tokenizer_config.json`'s `pad_token`, else the added `<PAD>`. Written
/// to a temporary file and renamed, so ranks that write the same file at once never see half
/// of it.
pub fn extend_tokenizer(dir: &Path, out: &Path) -> Result<Extended> {
    let src = dir.join("tokenizer.json");
    let mut tk = Tokenizer::from_file(&src).map_err(|e| {
        anyhow::anyhow!(
            "{}: the language model's tokenizer: {e} (stage 2 needs the LM's own tokenizer.json)",
            src.display()
        )
    })?;
    let config = json(&dir.join("config.json"))
        .with_context(|| format!("{}: no readable config.json", dir.display()))?;
    let name = |id: u32, what: &str| {
        tk.id_to_token(id).with_context(|| {
            format!(
                "{}: {what} id {id} is not in {}",
                dir.display(),
                src.display()
            )
        })
    };
    // MPT-7B's config names no end token; its tokenizer_config.json does.
    let eos = match (first_id(&config, "eos_token_id"), configured(dir, "eos_token")) {
        (Some(id), _) => name(id, "eos_token_id")?,
        (None, Some(t)) if tk.token_to_id(&t).is_some() => t,
        _ => bail!(
            "{}: neither config.json's eos_token_id nor tokenizer_config.json's eos_token names an end token",
            dir.display()
        ),
    };
    let bos = match (post_processor_bos(&tk), first_id(&config, "bos_token_id")) {
        (Some(id), _) | (None, Some(id)) => name(id, "bos_token_id")?,
        (None, None) => eos.clone(),
    };
    let pad = match (
        first_id(&config, "pad_token_id"),
        configured(dir, "pad_token"),
    ) {
        (Some(id), _) => Some(name(id, "pad_token_id")?),
        (None, Some(p)) if tk.token_to_id(&p).is_some() => Some(p),
        _ => None,
    };
    let mut added: Vec<AddedToken> = ADDED.iter().map(|t| AddedToken::from(*t, true)).collect();
    if pad.is_none() {
        added.push(AddedToken::from(PAD, true));
    }
    tk.add_special_tokens(&added);
    for t in ADDED {
        if tk.token_to_id(t).is_none() {
            bail!("{}: could not add {t}", src.display());
        }
    }
    let tmp = out.with_extension(format!(
        "json.tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    tk.save(&tmp, true)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(Extended {
        bos,
        eos,
        pad: pad.unwrap_or_else(|| PAD.into()),
    })
}

/// The token the post-processor puts before a text, if any (a Llama tokenizer's `<s>`).
fn post_processor_bos(tk: &Tokenizer) -> Option<u32> {
    let with = tk.encode("a", true).ok()?;
    let without = tk.encode("a", false).ok()?;
    let first = *with.get_ids().first()?;
    (with.len() > without.len() && without.get_ids().first() != Some(&first)).then_some(first)
}

/// Grows the vocabulary of rookery-named LM weights (`wte.weight` `[V, D]`, `lm_head.weight`
/// `[D, V]`) to `vocab` rows: each new row is the mean of the old ones (HF's
/// `resize_token_embeddings` starts from the mean too, and adds noise; rookery does not, so
/// runs repeat). A model whose table is already as large keeps it: models pad their tables
/// past their tokenizers, and those rows serve.
pub fn grow_vocab(tensors: &mut Tensors, vocab: usize) -> Result<()> {
    let (shape, rows) = tensors.get_mut("wte.weight").context("no wte.weight")?;
    let (v, d) = (shape[0], shape[1]);
    if vocab <= v {
        return Ok(());
    }
    let mut mean = vec![0f64; d];
    for r in rows.chunks_exact(d) {
        mean.iter_mut().zip(r).for_each(|(m, &x)| *m += x as f64);
    }
    let mean: Vec<f32> = mean.iter().map(|m| (m / v as f64) as f32).collect();
    for _ in v..vocab {
        rows.extend_from_slice(&mean);
    }
    shape[0] = vocab;
    let (shape, cols) = tensors
        .get_mut("lm_head.weight")
        .context("no lm_head.weight")?;
    let old = std::mem::take(cols);
    for row in old.chunks_exact(v) {
        let m = (row.iter().map(|&x| x as f64).sum::<f64>() / v as f64) as f32;
        cols.extend_from_slice(row);
        cols.extend(std::iter::repeat_n(m, vocab - v));
    }
    shape[1] = vocab;
    Ok(())
}
