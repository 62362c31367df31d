//! A CLIP tokenizer read from its `tokenizer.json` (BPE with `</w>`, NFC + whitespace +
//! lower-casing, CLIP's split pattern, byte-level) gives the ids transformers'
//! `CLIPTokenizerFast` gives, on strings with unicode, odd whitespace, contractions, numbers,
//! an empty one and one past the context (fixture from `fixtures/generate.py`).
//!
//! Up to the end-of-text token, that is: transformers pads with `<|endoftext|>`, rookery (as
//! open_clip and OpenAI's CLIP) with id 0. The text tower is causal and pools the end token,
//! so what follows it never reaches the features.

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
