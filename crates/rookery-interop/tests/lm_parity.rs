//! HF causal language models read as they are give transformers' logits: GPT-2 (Conv1D
//! weights, tanh GELU, tied head), and a Llama with
//! grouped-query attention (8 query heads, 2 key/value heads), Llama 3 RoPE scaling and a tied
//! head (transformers 5.x config, `rope_parameters`), and a Qwen2 with q/k/v biases, an untied
//! head and its weights in six shards (`model.safetensors.index.json`), and two GPT-NeoX
//! layouts (Pythia's and RedPajama-INCITE's). Fixtures from `fixtures/generate.py`.

mod common;
use common::{fixture, fixtures, rel_err};

use burn::backend::Flex;
use burn::prelude::*;
use rookery_interop::{hf_llama, load_lm};

/// The reference tensor `name` (the NeoX and MPT fixtures were added later, in a file of
/// their own).
fn io(name: &str) -> (Vec<usize>, Vec<f64>) {
    match name.starts_with("neox") || name.starts_with("mpt") {
        true => fixture("neox_io.safetensors", name),
        false => fixture("lm_io.safetensors", name),
    }
}

/// Largest difference of the logits relative to the largest reference logit.
fn check(name: &str) -> f64 {
    let dir = fixtures().join(format!("hf_{name}"));
    let cfg = rookery_interop::lm_config(&dir).unwrap();
    let dev = Default::default();
    let lm = load_lm(cfg.init::<Flex>(&dev), &dir, &cfg).unwrap();
    let (shape, ids) = io("ids");
    let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let tokens =
        Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), &dev);
    let got: Vec<f32> = lm.forward(tokens).into_data().to_vec().unwrap();
    let err = rel_err(&got, &io(&format!("{name}_logits")).1);
    eprintln!("{name}: logits differ by {err:e} of the largest");
    err
}

#[test]
fn llama_with_gqa_llama3_rope_and_a_tied_head_matches_transformers() {
    let cfg = hf_llama::config(&fixtures().join("hf_llama")).unwrap();
    assert_eq!((cfg.heads, cfg.kv(), cfg.head_dim()), (8, 2, 8));
    assert!(cfg.rope_scaling.is_some() && cfg.rope_theta == 500000.0);
    assert!(check("llama") < 1e-4);
}

#[test]
fn sharded_qwen2_with_qkv_biases_matches_transformers() {
    let cfg = hf_llama::config(&fixtures().join("hf_qwen2")).unwrap();
    assert!(cfg.qkv_bias && cfg.rope_scaling.is_none() && cfg.norm_eps == 1e-6);
    assert!(check("qwen2") < 1e-4);
}

#[test]
fn other_architectures_and_options_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"{"model_type": "mistral", "sliding_window": 4, "max_position_embeddings": 8, "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 4, "intermediate_size": 8}"#,
            "sliding_window",
        ),
        (
            r#"{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 4, "intermediate_size": 8, "max_position_embeddings": 8, "rope_scaling": {"type": "yarn", "factor": 2.0}}"#,
            "yarn",
        ),
        (
            r#"{"model_type": "llama", "attention_bias": true}"#,
            "attention_bias",
        ),
    ];
    for (i, (json, want)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("c{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), json).unwrap();
        let err = format!("{:#}", hf_llama::config(&dir).unwrap_err());
        assert!(err.contains(want) && err.contains("config.json"), "{err}");
    }
}

#[test]
fn gpt2_with_conv1d_weights_and_a_tied_head_matches_transformers() {
    let cfg = rookery_interop::lm_config(&fixtures().join("hf_gpt2")).unwrap();
    assert_eq!(
        (cfg.style, cfg.act),
        (
            rookery_model::flamingo::LmStyle::Gpt2,
            rookery_model::layers::Act::GeluTanh
        )
    );
    assert!(check("gpt2") < 1e-4);
}

#[test]
fn pythia_style_neox_with_partial_rope_and_parallel_residual_matches_transformers() {
    let cfg = rookery_interop::lm_config(&fixtures().join("hf_neox_pythia")).unwrap();
    assert_eq!(cfg.style, rookery_model::flamingo::LmStyle::Neox);
    assert_eq!((cfg.head_dim(), cfg.rotary_dim()), (16, 4));
    assert!(cfg.parallel_residual && cfg.act == rookery_model::layers::Act::Gelu);
    assert!(check("neox_pythia") < 1e-4);
}

/// RedPajama-INCITE's layout (OpenFlamingo-4B's LM), its config in the hub's 4.x keys.
#[test]
fn incite_style_neox_with_whole_rope_and_sequential_residual_matches_transformers() {
    let cfg = rookery_interop::lm_config(&fixtures().join("hf_neox_incite")).unwrap();
    assert_eq!((cfg.head_dim(), cfg.rotary_dim()), (16, 16));
    assert!(!cfg.parallel_residual && cfg.rope_theta == 5000.0);
    assert_eq!(cfg.act, rookery_model::layers::Act::GeluTanh);
    assert!(check("neox_incite") < 1e-4);
}

/// Each of `cases` (JSON members added to the config `base`) refused, naming what it lists
/// and the config file.
fn assert_refused(base: &str, cases: &[(&str, &str)]) {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (extra, want)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("c{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), format!("{{{base}, {extra}}}")).unwrap();
        let err = format!("{:#}", rookery_interop::lm_config(&dir).unwrap_err());
        assert!(err.contains(want) && err.contains("config.json"), "{err}");
    }
}

#[test]
fn neox_options_and_other_architectures_are_refused_by_name() {
    let base = r#""model_type": "gpt_neox", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 4, "intermediate_size": 8, "max_position_embeddings": 8"#;
    assert_refused(
        base,
        &[
            (r#""attention_bias": false"#, "attention_bias"),
            (r#""hidden_act": "relu""#, "relu"),
            (
                r#""rope_scaling": {"type": "linear", "factor": 2.0}"#,
                "rope_scaling",
            ),
            (r#""rotary_pct": 0.1"#, "rotary_pct"),
            (r#""model_type": "opt""#, "\"opt\": rookery reads"),
        ],
    );
}

/// MPT-7B's layout (OpenFlamingo-9B's LM): ALiBi with 6 heads (not a power of two: MPT
/// interleaves the slopes of the next power), bias-free LayerNorms, a tied head.
#[test]
fn mpt_with_alibi_and_bias_free_norms_matches_transformers() {
    let cfg = rookery_interop::lm_config(&fixtures().join("hf_mpt")).unwrap();
    assert_eq!(cfg.style, rookery_model::flamingo::LmStyle::Mpt);
    assert_eq!((cfg.heads, cfg.hidden(), cfg.alibi_bias_max), (6, 192, 8.0));
    assert!(cfg.tie_embeddings);
    assert!(check("mpt") < 1e-4);
}

/// ALiBi's slopes as MPT computes them: a geometric sequence for a power of two, the next
/// power's slopes interleaved (odd first) otherwise.
#[test]
fn alibi_slopes_are_mpts() {
    use rookery_model::flamingo::mpt::alibi_slopes;
    let s4 = alibi_slopes(4, 8.0);
    assert_eq!(s4, [0.25, 0.0625, 0.015625, 0.00390625]);
    let s8: Vec<f32> = (1..=8).map(|k| 2f32.powi(-k)).collect();
    // 6 heads: slopes 2, 4, 6, 8 of eight, then 1 and 3.
    let want = [s8[1], s8[3], s8[5], s8[7], s8[0], s8[2]];
    assert_eq!(alibi_slopes(6, 8.0), want);
}

#[test]
fn mpt_options_rookery_lacks_are_refused_by_name() {
    let base = r#""model_type": "mpt", "d_model": 8, "n_heads": 2, "n_layers": 1, "vocab_size": 4, "max_seq_len": 8"#;
    assert_refused(
        base,
        &[
            (r#""attn_config": {"alibi": false}"#, "alibi"),
            (r#""attn_config": {"clip_qkv": 6.0}"#, "clip_qkv"),
            (r#""attn_config": {"qk_ln": true}"#, "qk_ln"),
            (r#""no_bias": false"#, "no_bias"),
            (r#""logit_scale": 0.5"#, "logit_scale"),
        ],
    );
}
