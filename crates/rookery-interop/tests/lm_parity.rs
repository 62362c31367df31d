//! HF causal language models read as they are give transformers' logits: GPT-2 (Conv1D
//! weights, tanh GELU, tied head), and a Llama with
//! grouped-query attention (8 query heads, 2 key/value heads), Llama 3 RoPE scaling and a tied
//! head (transformers 5.x config, `rope_parameters`), and a Qwen2 with q/k/v biases, an untied
//! head and its weights in six shards (`model.safetensors.index.json`). Fixtures from
//! `fixtures/generate.py`.

mod common;
use common::{fixture, fixtures, rel_err};

use burn::backend::Flex;
use burn::prelude::*;
use rookery_interop::{hf_llama, load_lm};

fn io(name: &str) -> (Vec<usize>, Vec<f64>) {
    fixture("lm_io.safetensors", name)
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
        (r#"{"model_type": "gpt_neox"}"#, "gpt_neox"),
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
