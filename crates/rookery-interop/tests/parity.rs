//! Parity with the reference implementations on tiny, randomly initialised models with the
//! real architectures: an HF transformers `CLIPModel` and an open_clip `CLIP`, written with
//! fixed inputs and their outputs by `fixtures/generate.py` (versions in fixtures/versions.json).
//! rookery loads each directory as it is and must give the same image and text features.

mod common;
use common::{fixture, fixtures, rel_err};

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::prelude::*;
use rookery_interop::{clip_config, detect_clip, load_clip, ClipFormat};
use safetensors::SafeTensors;

/// Tensor `name` of the CLIP fixtures' inputs and references.
fn io(name: &str) -> (Vec<usize>, Vec<f64>) {
    fixture("clip_io.safetensors", name)
}

/// Image and text features of the CLIP in `dir` for the fixture inputs, against `prefix`'s.
fn check(dir: &Path, prefix: &str) {
    let dev = Default::default();
    let cfg = clip_config(dir).unwrap();
    let model = load_clip(cfg.init::<Flex>(&dev), dir).unwrap();
    let (ps, pixels) = io("pixels");
    let pixels: Vec<f32> = pixels.iter().map(|&x| x as f32).collect();
    let shape = [ps[0], ps[1], ps[2], ps[3]];
    let images = Tensor::<Flex, 4>::from_data(TensorData::new(pixels, shape), &dev);
    let (is, ids) = io("ids");
    let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let tokens = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [is[0], is[1]]), &dev);
    let image: Vec<f32> = model.visual.forward(images).into_data().to_vec().unwrap();
    let text: Vec<f32> = model.text.forward(tokens).into_data().to_vec().unwrap();
    let (ei, ti) = (
        rel_err(&image, &io(&format!("{prefix}_image")).1),
        rel_err(&text, &io(&format!("{prefix}_text")).1),
    );
    eprintln!("{prefix}: image {ei:e}, text {ti:e}");
    assert!(
        ei < 1e-4 && ti < 1e-4,
        "{prefix}: image {ei:e}, text {ti:e}"
    );
}

#[test]
fn hf_clip_features_match_transformers() {
    let dir = fixtures().join("hf_clip");
    assert_eq!(detect_clip(&dir).unwrap(), ClipFormat::Hf);
    let cfg = clip_config(&dir).unwrap();
    assert_eq!(
        (cfg.vision.heads, cfg.text.eot_token, cfg.vision.act),
        (4, 99, rookery_model::layers::Act::QuickGelu)
    );
    check(&dir, "hf");
}

#[test]
fn open_clip_features_match_open_clip() {
    let dir = fixtures().join("open_clip");
    assert!(matches!(
        detect_clip(&dir).unwrap(),
        ClipFormat::OpenClip(_)
    ));
    check(&dir, "open_clip");
}

/// A copy of fixture directory `name` at `to`.
fn copy(name: &str, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}

/// A tensor list as the safetensors file keeps it: name, shape, little-endian f32 bytes.
type Listed = Vec<(String, Vec<usize>, Vec<u8>)>;

/// Rewrites `dir/model.safetensors` with `edit` applied to its tensors.
fn rewrite(dir: &Path, edit: impl Fn(&mut Listed)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut list: Listed = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut list);
    let views: Vec<(String, safetensors::tensor::TensorView)> = list
        .iter()
        .map(|(n, s, d)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn missing_unexpected_and_misshapen_tensors_and_foreign_directories_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let load = |dir: &Path| -> String {
        let cfg = clip_config(dir).unwrap();
        format!("{:#}", load_clip(cfg.init::<Flex>(&dev), dir).unwrap_err())
    };
    let missing = copy("hf_clip", &tmp.path().join("missing"));
    rewrite(&missing, |l| {
        l.retain(|(n, _, _)| n != "text_model.final_layer_norm.weight")
    });
    let err = load(&missing);
    assert!(
        err.contains("ln_final") && err.contains("missing/model.safetensors"),
        "{err}"
    );
    let extra = copy("hf_clip", &tmp.path().join("extra"));
    rewrite(&extra, |l| {
        l.push(("vision_model.head.probe".into(), vec![1], vec![0; 4]))
    });
    let err = load(&extra);
    assert!(err.contains("vision_model.head.probe"), "{err}");
    let shape = copy("hf_clip", &tmp.path().join("shape"));
    rewrite(&shape, |l| {
        let t = l
            .iter_mut()
            .find(|(n, _, _)| n == "text_model.embeddings.token_embedding.weight")
            .unwrap();
        t.1 = vec![t.1[1], t.1[0]];
    });
    let err = load(&shape);
    assert!(err.contains("token_embedding"), "{err}");
    let foreign = tmp.path().join("llama");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let err = format!("{:#}", detect_clip(&foreign).unwrap_err());
    assert!(
        err.contains("llama") && err.contains(&foreign.display().to_string()),
        "{err}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = format!("{:#}", detect_clip(&empty).unwrap_err());
    assert!(err.contains("not a CLIP directory"), "{err}");
}

/// Every weight of the CLIP fixture `name`, in module order.
fn clip_weights(name: &str) -> Vec<Vec<f32>> {
    use burn::module::{Module, ModuleVisitor, Param};
    struct Flat(Vec<Vec<f32>>);
    impl ModuleVisitor<Flex> for Flat {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Flex, D>>) {
            self.0.push(p.val().into_data().to_vec().unwrap());
        }
    }
    let dev = Default::default();
    let dir = fixtures().join(name);
    let cfg = clip_config(&dir).unwrap();
    let mut f = Flat(vec![]);
    load_clip(cfg.init::<Flex>(&dev), &dir)
        .unwrap()
        .visit(&mut f);
    f.0
}

/// HF `CLIPModel` weights as a PyTorch pickle (`pytorch_model.bin`, f16, as older hub repos
/// ship them) load through burn-store's reader to the f16 rounding of the safetensors
/// weights, every one.
#[test]
fn hf_clip_pickles_load_through_burn_stores_reader() {
    let dir = fixtures().join("hf_clip_bin");
    assert_eq!(detect_clip(&dir).unwrap(), ClipFormat::Hf);
    let (bin, st) = (clip_weights("hf_clip_bin"), clip_weights("hf_clip"));
    assert_eq!(bin.len(), st.len());
    let f16 = |x: f32| burn::tensor::f16::from_f32(x).to_f32();
    for (b, s) in bin.iter().zip(&st) {
        assert!(b.iter().zip(s).all(|(x, y)| *x == f16(*y)));
    }
}

/// open_clip's PyTorch pickle (`open_clip_pytorch_model.bin`, bf16, wrapped as a training
/// checkpoint: `{"state_dict": {"module.<key>": ...}}`) loads to the bf16 rounding of the
/// safetensors weights, every one.
#[test]
fn open_clip_pickles_load_through_burn_stores_reader() {
    let load = clip_weights;
    let dir = fixtures().join("open_clip_bin");
    assert!(matches!(
        detect_clip(&dir).unwrap(),
        ClipFormat::OpenClip(_)
    ));
    let (bin, st) = (load("open_clip_bin"), load("open_clip"));
    assert_eq!(bin.len(), st.len());
    let bf16 = |x: f32| burn::tensor::bf16::from_f32(x).to_f32();
    for (b, s) in bin.iter().zip(&st) {
        assert!(b.iter().zip(s).all(|(x, y)| *x == bf16(*y)));
    }
}
