//! What the parity tests share: the fixtures directory and its reference tensors.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Tensor `name` of the fixture file `file` as (shape, values); f32 and i64 (token ids).
pub fn fixture(file: &str, name: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(fixtures().join(file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let values = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        d => panic!("{file} {name}: {d:?}"),
    };
    (t.shape().to_vec(), values)
}

/// Largest absolute difference relative to the reference's largest magnitude.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
    diff / scale
}
