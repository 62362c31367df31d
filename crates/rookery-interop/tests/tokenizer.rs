//! A CLIP tokenizer read from its `tokenizer.json` (BPE with `</w>`, NFC + whitespace +
//! lower-casing, CLIP's split pattern, byte-level) gives the ids transformers'
//! `CLIPTokenizerFast` gives, on strings with unicode, odd whitespace, contractions, numbers,
//! an empty one and one past the context (fixture from `fixtures/generate.py`).
//!
//! Up to the end-of-text token, that is: transformers pads with `<|endoftext|>`, rookery (as
//! open_clip and OpenAI's CLIP) with id 0. The text tower is causal and pools the end token,
//! so what follows it never reaches the features.
//!
//! Also: an LM tokenizer extended as OpenFlamingo extends it finds its end token where the
//! LM's files name it.

use std::path::Path;

use rookery_data::TextTokenizer;

#[test]
fn clip_tokenizer_ids_match_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clip_tokenizer");
    let tk = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let ctx = expected["context_length"].as_u64().unwrap() as usize;
    let texts = expected["texts"].as_array().unwrap();
    let ids = expected["ids"].as_array().unwrap();
    assert_eq!(texts.len(), 7);
    for (text, want) in texts.iter().zip(ids) {
        let text = text.as_str().unwrap();
        let want: Vec<i64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let mut got = vec![0i64; ctx];
        tk.encode_into(text, &mut got).unwrap();
        let end = want.iter().position(|&t| t == tk.eot as i64).unwrap();
        assert_eq!(got[..=end], want[..=end], "{text:?}");
        assert_eq!((want[0], tk.sot), (got[0], want[0] as u32), "{text:?}");
    }
}

/// An LM whose config.json names no end token (MPT-7B's) takes the one its
/// tokenizer_config.json names; with neither, the extension is refused naming both files.
#[test]
fn an_lm_without_eos_token_id_takes_tokenizer_configs_eos_token() {
    use rookery_interop::open_flamingo::extend_tokenizer;
    let tmp = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf_mpt");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let c = config.as_object_mut().unwrap();
    c.remove("eos_token_id");
    c.remove("bos_token_id");
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        src.join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    let out = tmp.path().join("extended.json");
    let err = format!("{:#}", extend_tokenizer(tmp.path(), &out).unwrap_err());
    assert!(
        err.contains("eos_token_id") && err.contains("tokenizer_config.json"),
        "{err}"
    );
    let tc = r#"{"eos_token": {"content": "<|endoftext|>"}}"#;
    std::fs::write(tmp.path().join("tokenizer_config.json"), tc).unwrap();
    let e = extend_tokenizer(tmp.path(), &out).unwrap();
    assert_eq!(
        (e.bos.as_str(), e.eos.as_str(), e.pad.as_str()),
        ("<|endoftext|>", "<|endoftext|>", "<PAD>")
    );
}
