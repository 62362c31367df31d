//! Malformed weight files and configs are refused with an error, never a panic or an
//! allocation of what a header claims: safetensors with an oversized header, offsets outside
//! the file, overlapping tensors, a wrong dtype or shape, and random mutations; TOML configs
//! mutated at random or with absurd sizes.

use std::path::Path;

use burn::backend::Flex;
use burn::module::Module;
use proptest::prelude::*;
use rookery_model::{Clip, ClipConfig};
use rookery_train::{checkpoint, RunConfig};

fn small() -> ClipConfig {
    let mut c = ClipConfig {
        embed_dim: 8,
        ..Default::default()
    };
    (c.vision.image_size, c.vision.patch_size, c.vision.width) = (16, 8, 16);
    (c.vision.layers, c.vision.heads, c.vision.stem_patch) = (1, 2, 0);
    (c.text.context_length, c.text.vocab_size, c.text.width) = (8, 20, 16);
    (c.text.layers, c.text.heads) = (1, 2);
    c
}

/// A valid safetensors file of `small()`'s weights.
fn valid(dir: &Path) -> Vec<u8> {
    let model: Clip<Flex> = small().init(&Default::default());
    let path = dir.join("valid.safetensors");
    burn_store::ModuleSnapshot::save_into(
        &model,
        &mut rookery_interop::store::safetensors_writer(&path),
    )
    .unwrap();
    std::fs::read(path).unwrap()
}

/// Loads `bytes` as `small()`'s weights.
fn load(dir: &Path, bytes: &[u8]) -> Result<Clip<Flex>, String> {
    let path = dir.join("weights.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let model: Clip<Flex> = small().init(&Default::default());
    checkpoint::load_weights(model, &path).map_err(|e| format!("{e:#}"))
}

/// The header (JSON) and the data of a safetensors file.
fn split(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn join(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// The name of the first tensor in the header.
fn first(header: &serde_json::Value) -> String {
    header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone()
}

#[test]
fn crafted_safetensors_faults_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid(dir.path());
    assert!(load(dir.path(), &bytes).is_ok());
    let (header, data) = split(&bytes);
    let name = first(&header);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // A header length far past the file (and past any sane header size).
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("oversized header", huge));
    let mut h = header.clone();
    h[&name]["data_offsets"] = serde_json::json!([0, data.len() as u64 + 4096]);
    cases.push(("offsets outside the file", join(&h, &data)));
    let mut h = header.clone();
    let other = h
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__" && **k != name)
        .unwrap()
        .clone();
    h[&other]["data_offsets"] = h[&name]["data_offsets"].clone();
    cases.push(("overlapping tensors", join(&h, &data)));
    let mut h = header.clone();
    h[&name]["dtype"] = serde_json::json!("I64");
    cases.push(("wrong dtype", join(&h, &data)));
    let mut h = header.clone();
    let shape = h[&name]["shape"].as_array().unwrap().clone();
    let mut swapped: Vec<serde_json::Value> = shape.clone();
    swapped.reverse();
    swapped.push(serde_json::json!(1));
    h[&name]["shape"] = serde_json::Value::Array(swapped);
    cases.push(("wrong shape", join(&h, &data)));
    cases.push(("truncated", bytes[..bytes.len() - 100].to_vec()));
    for (what, b) in cases {
        let r = std::panic::catch_unwind(|| load(dir.path(), &b));
        match r {
            Ok(Err(e)) => assert!(e.contains("weights.safetensors"), "{what}: {e}"),
            Ok(Ok(_)) => panic!("{what}: accepted"),
            Err(_) => panic!("{what}: panicked"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn mutated_safetensors_load_or_are_refused(
        edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = valid(dir.path());
        for (i, v) in edits {
            let n = bytes.len();
            bytes[i % n] = v;
        }
        // Err or Ok (a flipped weight value is still a valid file); a panic fails the test.
        let _ = load(dir.path(), &bytes);
    }

    #[test]
    fn mutated_configs_load_or_are_refused_naming_the_file(
        edits in proptest::collection::vec((any::<usize>(), 32u8..127), 1..6),
    ) {
        let text = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/clip-tiny.toml")).unwrap();
        let mut bytes = text.clone();
        for (i, v) in edits {
            let n = bytes.len();
            bytes[i % n] = v;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mutated.toml");
        std::fs::write(&path, bytes).unwrap();
        if let Err(e) = RunConfig::load(&path, &[]) {
            prop_assert!(e.to_string().contains("mutated.toml"), "{}", e);
        }
    }

    #[test]
    fn absurd_sizes_are_refused_or_fit_the_memory_bound(
        key in prop::sample::select(vec![
            "model.vision.width", "model.vision.image_size", "model.vision.patch_size",
            "model.text.context_length", "model.text.width", "data.batch_size",
            "model.vision.layers", "model.embed_dim",
        ]),
        value in prop::sample::select(vec![0u64, 1, 3, 1 << 20, 1 << 40, u32::MAX as u64, i64::MAX as u64]),
    ) {
        let sets = vec![format!("{key}={value}")];
        if let Ok(cfg) = RunConfig::load(Path::new(""), &sets) {
            // What loads is then measured against memory, without overflow or panic.
            let e = rookery_train::memory::estimate(&cfg);
            prop_assert!(e.total().is_finite() && e.total() > 0.0);
            let _ = rookery_train::memory::check_fits(&cfg, Some(8.0 * (1u64 << 30) as f64));
        }
    }
}

#[test]
fn a_model_loads_after_a_round_trip() {
    // The helper's own check: the valid file loads back to the same weights.
    let dir = tempfile::tempdir().unwrap();
    let m = load(dir.path(), &valid(dir.path())).unwrap();
    assert_eq!(
        m.num_params(),
        small().init::<Flex>(&Default::default()).num_params()
    );
}
