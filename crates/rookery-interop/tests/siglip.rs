//! Parity with HF transformers' SigLIP on a tiny, randomly initialised `SiglipModel` (tanh GELU,
//! LayerNorm eps 1e-6, a MAP head) and its vision tower saved alone as `SiglipVisionModel`
//! (transformers 5: keys without `vision_model.`), written by `fixtures/generate.py`: image and
//! text embeddings and the vision tokens (after `post_layernorm`) within 1e-4.

mod common;
use common::{fixture, fixtures, rel_err};

use burn::backend::Flex;
use burn::prelude::*;
use rookery_interop::hf_siglip;

fn io(name: &str) -> (Vec<usize>, Vec<f64>) {
    fixture("siglip_io.safetensors", name)
}

fn inputs(dev: &Device<Flex>) -> (Tensor<Flex, 4>, Tensor<Flex, 2, Int>) {
    let (ps, pixels) = io("pixels");
    let pixels: Vec<f32> = pixels.iter().map(|&x| x as f32).collect();
    let images = Tensor::from_data(TensorData::new(pixels, [ps[0], ps[1], ps[2], ps[3]]), dev);
    let (is, ids) = io("ids");
    let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    (
        images,
        Tensor::from_data(TensorData::new(ids, [is[0], is[1]]), dev),
    )
}

fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

#[test]
fn hf_siglip_embeddings_and_tokens_match_transformers() {
    let dev = Default::default();
    let dir = fixtures().join("hf_siglip");
    let cfg = hf_siglip::config(&dir).unwrap();
    assert_eq!(
        (cfg.vision.eps, cfg.vision.act),
        (1e-6, rookery_model::layers::Act::GeluTanh)
    );
    let model = hf_siglip::load(cfg.init::<Flex>(&dev), &dir, &cfg).unwrap();
    let (images, ids) = inputs(&dev);
    let text = model.text.as_ref().unwrap();
    for (name, got) in [
        ("siglip_image", values(model.vision.forward(images.clone()))),
        ("siglip_text", values(text.forward(ids))),
        ("siglip_tokens", values(model.vision.forward_tokens(images))),
    ] {
        let e = rel_err(&got, &io(name).1);
        eprintln!("{name}: {e:e}");
        assert!(e < 1e-4, "{name}: {e:e}");
    }
}

#[test]
fn a_siglip_vision_tower_saved_alone_gives_the_same_tokens() {
    let dev = Default::default();
    let dir = fixtures().join("hf_siglip_vision");
    let cfg = hf_siglip::config(&dir).unwrap();
    assert!(cfg.text.is_none());
    let model = hf_siglip::load(cfg.init::<Flex>(&dev), &dir, &cfg).unwrap();
    let (images, _) = inputs(&dev);
    let e = rel_err(
        &values(model.vision.forward_tokens(images.clone())),
        &io("siglip_tokens").1,
    );
    assert!(e < 1e-4, "tokens: {e:e}");
    let e = rel_err(&values(model.vision.forward(images)), &io("siglip_image").1);
    assert!(e < 1e-4, "pooled: {e:e}");
}
