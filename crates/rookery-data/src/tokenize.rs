//! Text tokenization from a HF `tokenizer.json` (tokenizers crate): start/end tokens,
//! truncation and padding to a fixed context length, as CLIP's text tower expects.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::{AddedToken, Tokenizer};

use crate::DataError;

/// `[data.special_tokens]`: the tokenizer's start, end and padding tokens by name, for
/// tokenizers whose names rookery cannot guess (a language model's, where its `config.json`
/// says which). Empty: found by [`TextTokenizer::from_file`]'s rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpecialTokens {
    pub bos: String,
    pub eos: String,
    pub pad: String,
}

/// Special tokens of the tokenizers that rookery writes. Their ids are their positions here.
pub const SPECIAL_TOKENS: [&str; 6] = [
    "<pad>",
    "<unk>",
    "<start_of_text>",
    "<end_of_text>",
    "<image>",
    "<|endofchunk|>",
];

const SOT_NAMES: [&str; 4] = ["<start_of_text>", "<|startoftext|>", "<s>", "[CLS]"];
const EOT_NAMES: [&str; 5] = [
    "<end_of_text>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "[SEP]",
];
const PAD_NAMES: [&str; 3] = ["<pad>", "<PAD>", "[PAD]"];

/// A tokenizer that turns a caption into exactly `context_length` ids:
/// `[sot, ids.., eot, pad..]`, truncating the ids so that `eot` is always present.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub sot: u32,
    pub eot: u32,
    pub pad: u32,
    pub vocab_size: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TextTokenizer(vocab {}, sot {}, eot {}, pad {})",
            self.vocab_size, self.sot, self.eot, self.pad
        )
    }
}

impl TextTokenizer {
    /// The tokenizer in `path`, its special tokens found by name: the start token is the one
    /// its post-processor puts first (a Llama tokenizer's `<s>`), else one of [`SOT_NAMES`],
    /// else the end token (GPT-2-style tokenizers have none: `<|endoftext|>` also starts a
    /// document); padding is the tokenizer's own padding token, else `<pad>`-like, else 0.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        Self::load(path, &SpecialTokens::default())
    }

    /// The tokenizer `[data]` names, with its `special_tokens`.
    pub fn of(data: &crate::DataConfig) -> Result<Self, DataError> {
        Self::load(&data.tokenizer, &data.special_tokens)
    }

    /// As [`Self::from_file`], with the tokens `names` gives taking precedence.
    pub fn load(path: &Path, names: &SpecialTokens) -> Result<Self, DataError> {
        let name = path.display().to_string();
        let inner = Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer(name.clone(), e.to_string()))?;
        let named = |t: &str, what: &str| -> Result<Option<u32>, DataError> {
            if t.is_empty() {
                return Ok(None);
            }
            inner
                .token_to_id(t)
                .map(Some)
                .ok_or_else(|| DataError::Tokenizer(name.clone(), format!("no {what} token {t:?}")))
        };
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eot = named(&names.eos, "end")?.or_else(|| find(&EOT_NAMES));
        let eot = eot.ok_or_else(|| {
            DataError::Tokenizer(name.clone(), format!("no end token (one of {EOT_NAMES:?})"))
        })?;
        let sot = named(&names.bos, "start")?
            .or_else(|| added_first(&inner))
            .or_else(|| find(&SOT_NAMES))
            .unwrap_or(eot);
        // OpenAI's CLIP pads with id 0; so do we when the vocabulary has no pad token.
        let pad = named(&names.pad, "padding")?
            .or_else(|| inner.get_padding().map(|p| p.pad_id))
            .or_else(|| find(&PAD_NAMES))
            .unwrap_or(0);
        let vocab_size = inner.get_vocab_size(true);
        Ok(TextTokenizer {
            inner,
            sot,
            eot,
            pad,
            vocab_size,
        })
    }

    /// Token ids of `text` without start/end tokens.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self.inner.encode(text, false).map_err(|e| e.to_string())?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// Writes `[sot, ids.., eot, pad..]` into `out` (its length is the context length).
    pub fn encode_into(&self, text: &str, out: &mut [i64]) -> Result<(), String> {
        let ctx = out.len();
        assert!(ctx >= 2, "context length must fit start and end tokens");
        let ids = self.ids(text)?;
        let n = ids.len().min(ctx - 2);
        out[0] = self.sot as i64;
        for (o, &i) in out[1..].iter_mut().zip(&ids[..n]) {
            *o = i as i64;
        }
        out[n + 1] = self.eot as i64;
        out[n + 2..].fill(self.pad as i64);
        Ok(())
    }
}

/// The token the post-processor puts before a text, if any (a Llama tokenizer's `<s>`).
fn added_first(tk: &Tokenizer) -> Option<u32> {
    let with = tk.encode("a", true).ok()?;
    let without = tk.encode("a", false).ok()?;
    let first = *with.get_ids().first()?;
    let added = with.len() > without.len() && without.get_ids().first() != Some(&first);
    added.then_some(first)
}

/// A language model's own tokenizer for prompts: its `tokenizer.json` decides the special
/// tokens (the post-processor adds BOS or not), so none is ever added twice or assumed.
pub struct PromptTokenizer {
    inner: Tokenizer,
}

impl PromptTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer(path.display().to_string(), e.to_string()))?;
        Ok(PromptTokenizer { inner })
    }

    /// Every encoding exactly `len` ids, as HF's `padding="max_length", truncation=True`:
    /// longer texts are cut before the post-processor adds its tokens (so an end token stays),
    /// shorter ones padded with `pad` (SigLIP's text tower reads the last position).
    pub fn fixed_length(mut self, len: usize, pad: u32) -> Result<Self, String> {
        use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};
        let trunc = TruncationParams {
            max_length: len,
            ..Default::default()
        };
        self.inner
            .with_truncation(Some(trunc))
            .map_err(|e| e.to_string())?;
        let pad_token = self.inner.id_to_token(pad).unwrap_or_default();
        self.inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(len),
            pad_id: pad,
            pad_token,
            ..Default::default()
        }));
        Ok(self)
    }

    /// The ids of `text` with the special tokens the tokenizer's post-processor adds.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self.inner.encode(text, true).map_err(|e| e.to_string())?;
        Ok(enc.get_ids().to_vec())
    }

    /// `ids` as text, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }
}

/// Fits a word-level tokenizer (lower-cased, split on whitespace and punctuation) to `texts`
/// and writes it as a HF `tokenizer.json` that `tokenizers.Tokenizer.from_file` also reads.
pub fn fit_word_level<I, S>(texts: I, path: &Path) -> Result<(), DataError>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let name = path.display().to_string();
    let err = |e: tokenizers::Error| DataError::Tokenizer(name.clone(), e.to_string());
    let special: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = WordLevelTrainer::builder()
        .special_tokens(special.clone())
        .show_progress(false)
        .vocab_size(1_000_000)
        .build()
        .map_err(|e| DataError::Tokenizer(name.clone(), e.to_string()))?
        .into();
    let mut tk = Tokenizer::new(WordLevel::default());
    tk.with_normalizer(Some(Lowercase));
    tk.with_pre_tokenizer(Some(Whitespace {}));
    tk.train(&mut trainer, texts).map_err(err)?;
    tk.add_special_tokens(&special);
    tk.save(path, true).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_encode_truncate_and_pad() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let texts = ["two red circles", "a blue square above two red circles"];
        fit_word_level(texts.iter(), &path).unwrap();
        let tk = TextTokenizer::from_file(&path).unwrap();
        assert_eq!((tk.pad, tk.sot, tk.eot), (0, 2, 3));
        assert_eq!(tk.token_id("<image>"), Some(4));
        assert_eq!(tk.vocab_size, 6 + 7);
        let mut out = [9i64; 6];
        tk.encode_into("Two RED circles", &mut out).unwrap();
        let red = tk.token_id("red").unwrap() as i64;
        assert_eq!(out[0], 2);
        assert_eq!(out[2], red);
        assert_eq!(&out[4..], &[3, 0]);
        let mut short = [9i64; 4];
        tk.encode_into("a blue square above two red circles", &mut short)
            .unwrap();
        assert_eq!(short[0], 2);
        assert_eq!(short[3], 3, "truncation keeps the end token");
        assert_eq!(tk.decode(&[red as u32]), "red");
        assert_eq!(
            tk.ids("purple").unwrap(),
            vec![1],
            "unknown words map to <unk>"
        );
    }
}
