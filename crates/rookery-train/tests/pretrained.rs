//! Stage 2 on pretrained towers as users have them (rookery-interop's tiny fixtures, the real
//! architectures): an HF `CLIPModel` vision tower and an HF Llama with its own `tokenizer.json`.
//! The tokenizer is extended as OpenFlamingo extends it, only the new parts train (the frozen
//! towers stay bit-identical to the files), resume is exact, and the export carries
//! OpenFlamingo's names and layouts.
//!
//! `ROOKERY_KEEP_EXPORT=DIR` (the Llama run) and `ROOKERY_KEEP_EXPORT_NEOX=DIR` (the GPT-NeoX
//! run) keep the OpenFlamingo export, with the logits rookery computes for a fixed page, for
//! `fixtures/check_open_flamingo.py` (not part of CI).

mod common;
use common::{floats, resume_from_step_2};

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use rookery_data::synth::{generate, SynthConfig};
use rookery_interop::tensors::{read_f32, transpose};
use rookery_train::flamingo_io::{export_open_flamingo, open_flamingo};
use rookery_train::stage::flamingo::load_vision;
use rookery_train::{train, RunConfig};

type B = Autodiff<Flex>;
type IB = Flex;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../rookery-interop/fixtures")
        .join(name)
}

fn synth(dir: &Path) -> SynthConfig {
    let s = SynthConfig {
        out: dir.join("synth"),
        train_shards: 1,
        train_samples_per_shard: 16,
        val_shards: 1,
        val_samples_per_shard: 8,
        image_size: 32,
        interleaved: true,
        page_shards: 2,
        pages_per_shard: 24,
        val_page_shards: 1,
        ..Default::default()
    };
    generate(&s).unwrap();
    s
}

/// Stage 2 on the HF CLIP and HF Llama fixtures, with OpenFlamingo's resampler and gated
/// layers at their factory sizes (so that its model takes the export as it is).
fn flamingo_cfg(s: &SynthConfig, run: &Path, steps: usize) -> RunConfig {
    let sets = [
        format!("data.train={}", s.pages_train_pattern()),
        "data.val=".into(),
        // Ignored: the LM's own tokenizer, extended, replaces it.
        format!("data.tokenizer={}", s.tokenizer_path().display()),
        format!("train.run_dir={}", run.display()),
        "train.stage=\"flamingo\"".into(),
        format!("train.steps={steps}"),
        "data.batch_size=2".into(),
        "data.image_size=32".into(),
        "data.shuffle_buffer=8".into(),
        "data.decode_threads=1".into(),
        "data.interleaved.max_tokens=32".into(),
        "data.interleaved.max_images=2".into(),
        "optim.warmup_steps=1".into(),
        "optim.lr=1e-3".into(),
        "log.every=1".into(),
        "log.progress=false".into(),
        "train.eval_every=0".into(),
        "checkpoint.every=2".into(),
        format!("flamingo.vision_from={}", fixture("hf_clip").display()),
        format!("flamingo.lm_from={}", fixture("hf_llama").display()),
        "flamingo.model.vision_tokens=\"after_ln_post\"".into(),
        "flamingo.gate_lr_mult=20".into(),
        "flamingo.model.resampler.latents=64".into(),
        "flamingo.model.resampler.depth=6".into(),
        "flamingo.model.resampler.heads=8".into(),
        "flamingo.model.resampler.dim_head=64".into(),
        "flamingo.model.xattn_heads=8".into(),
        "flamingo.model.xattn_dim_head=64".into(),
        "flamingo.model.xattn_ff_mult=4".into(),
    ];
    RunConfig::load(Path::new(""), &sets).unwrap()
}

fn values<const D: usize>(t: Tensor<IB, D>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

#[test]
fn stage_two_on_an_hf_clip_and_an_hf_llama_trains_resumes_and_exports_open_flamingo_names() {
    let dir = tempfile::tempdir().unwrap();
    let s = synth(dir.path());
    let run = dir.path().join("run");
    let cfg = flamingo_cfg(&s, &run, 4);
    train::<B>(&cfg, &Default::default()).unwrap();

    // The LM's tokenizer (80 tokens, no padding token) extended as OpenFlamingo does, and the
    // special tokens from its config; the model's table (128 rows) already has room.
    let resolved = RunConfig::load(&run.join("config.toml"), &[]).unwrap();
    assert_eq!(resolved.data.tokenizer, run.join("tokenizer.json"));
    let sp = &resolved.data.special_tokens;
    assert_eq!(
        (sp.bos.as_str(), sp.eos.as_str(), sp.pad.as_str()),
        ("<s>", "</s>", "<PAD>")
    );
    let m = &resolved.flamingo.model;
    assert_eq!((m.eoc_token, m.image_token), (80, 81));
    assert_eq!(m.lm.vocab_size, 128);
    assert_eq!(
        resolved.data.image_norm,
        Default::default(),
        "CLIP's statistics"
    );
    assert!(m.lm.tie_embeddings);
    use sha2::Digest;
    let sha = |p: &Path| format!("{:x}", sha2::Sha256::digest(std::fs::read(p).unwrap()));
    assert_eq!(
        resolved.flamingo.lm_sha256,
        sha(&fixture("hf_llama/model.safetensors"))
    );

    // Frozen towers bit-identical to the files; the new parts moved.
    let dev = Default::default();
    let (_, _, model) = open_flamingo::<IB>(&run, &dev).unwrap();
    let vision = load_vision::<IB>(&fixture("hf_clip"), &dev).unwrap();
    assert!(floats(&model.vision) == floats(&vision), "vision changed");
    let lm_cfg = &m.lm;
    let lm = rookery_interop::load_lm(lm_cfg.init::<IB>(&dev), &fixture("hf_llama"), lm_cfg);
    assert!(floats(&model.lm) == floats(&lm.unwrap()), "the LM changed");
    let wte = values(model.lm.wte.weight.val());
    let new = values(model.new_tokens.val());
    // new_tokens: the <image> row, then the <|endofchunk|> row.
    assert_ne!(
        new[..64],
        wte[81 * 64..82 * 64],
        "<image> row did not train"
    );
    assert_ne!(
        new[64..],
        wte[80 * 64..81 * 64],
        "<|endofchunk|> row did not train"
    );
    for x in &model.xattn {
        assert_ne!(x.attn_gate.val().into_scalar(), 0.0, "a gate did not train");
    }

    // Stopped at the step-2 checkpoint and resumed: the unbroken run's weights.
    let run2 = dir.path().join("resumed");
    resume_from_step_2(&run, flamingo_cfg(&s, &run2, 4));
    let (_, _, resumed) = open_flamingo::<IB>(&run2, &dev).unwrap();
    assert!(floats(&resumed) == floats(&model), "resumed run differs");

    // The export: OpenFlamingo's names and layouts.
    let out = std::env::var_os("ROOKERY_KEEP_EXPORT")
        .map(PathBuf::from)
        .unwrap_or(dir.path().join("export"));
    export_open_flamingo(&run, &out, false).unwrap();
    let t = read_f32(&out.join("checkpoint.safetensors")).unwrap();
    let xa = "lang_encoder.model.layers.1.gated_cross_attn_layer";
    for key in [
        "perceiver.latents",
        "perceiver.layers.5.0.to_kv.weight",
        "perceiver.layers.5.1.3.weight",
        "perceiver.norm.bias",
        &format!("{xa}.attn_gate"),
        &format!("{xa}.attn.to_kv.weight"),
        &format!("{xa}.ff.0.weight"),
        "lang_encoder.model.embed_tokens.weight",
        "lang_encoder.lm_head.weight",
    ] {
        assert!(t.contains_key(key), "{key} missing from {:?}", t.keys());
    }
    assert!(!t.keys().any(|k| k.starts_with("vision_encoder")));
    let (shape, embed) = &t["lang_encoder.model.embed_tokens.weight"];
    assert_eq!(shape, &vec![83, 64], "resized to the tokenizer's length");
    assert_eq!(embed[81 * 64..82 * 64], new[..64], "<image> row");
    assert_eq!(embed[80 * 64..81 * 64], new[64..], "<|endofchunk|> row");
    assert_eq!(embed[..80 * 64], wte[..80 * 64], "the LM's own rows");
    let gate = model.xattn[1].attn_gate.val().into_scalar();
    assert_eq!(t[&format!("{xa}.attn_gate")].1, vec![gate]);
    let kv = transpose((vec![48, 1024], values(model.xattn[1].to_kv.weight.val())));
    assert_eq!(t[&format!("{xa}.attn.to_kv.weight")], kv, "[out, in]");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["differs_from_open_flamingo_factory"],
        serde_json::json!([])
    );
    assert_eq!(config["media_token_id"], 81);
    if std::env::var_os("ROOKERY_KEEP_EXPORT").is_some() {
        keep_reference_logits(&model, &out);
    }
}

/// Rookery's logits for a fixed page ([`page`]), beside the export, for
/// check_open_flamingo.py.
fn keep_reference_logits(model: &rookery_model::flamingo::Flamingo<IB>, out: &Path) {
    let (ids, pixels) = page(model);
    let logits = values(page_logits(model));
    let vocab = model.lm.lm_head.weight.dims()[1];
    let v = serde_json::json!({"ids": ids, "pixels": pixels, "logits": logits, "vocab": vocab});
    std::fs::write(out.join("reference.json"), v.to_string()).unwrap();
}

/// An HF LM directory without its tokenizer is refused before any work, naming the file.
#[test]
fn an_hf_lm_without_its_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = SynthConfig {
        out: dir.path().join("synth"),
        ..Default::default()
    };
    let mut cfg = flamingo_cfg(&s, &dir.path().join("run"), 1);
    cfg.flamingo.lm_from = fixture("hf_gpt2");
    let e = rookery_train::stage::flamingo::with_lm_tokenizer(&cfg).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("hf_gpt2/tokenizer.json"), "{msg}");
    assert!(msg.contains("flamingo.lm_from"), "{msg}");
}

/// `[flamingo] vision_from` on an HF `SiglipVisionModel` saved alone (transformers 5 layout):
/// no class token, every patch token after `post_layernorm`; stage 2 trains on it and the
/// tower stays bit-identical to the file.
#[test]
fn stage_two_trains_on_an_hf_siglip_vision_tower() {
    let dir = tempfile::tempdir().unwrap();
    let s = synth(dir.path());
    let run = dir.path().join("run");
    let mut cfg = flamingo_cfg(&s, &run, 2);
    cfg.flamingo.vision_from = fixture("hf_siglip_vision");
    (
        cfg.flamingo.model.resampler.depth,
        cfg.flamingo.model.resampler.latents,
    ) = (1, 8);
    train::<B>(&cfg, &Default::default()).unwrap();
    let resolved = RunConfig::load(&run.join("config.toml"), &[]).unwrap();
    let siglip = resolved
        .flamingo
        .model
        .siglip
        .as_ref()
        .expect("a SigLIP tower");
    assert_eq!((siglip.vision.width, siglip.vision.eps), (48, 1e-6));
    // Images prepared as SigLIP's processor prepares them.
    let norm = rookery_data::loader::ImageNorm::siglip();
    assert_eq!(resolved.data.image_norm, norm);
    let dev = Default::default();
    let (_, _, model) = open_flamingo::<IB>(&run, &dev).unwrap();
    let vision = load_vision::<IB>(&fixture("hf_siglip_vision"), &dev).unwrap();
    assert!(floats(&model.vision) == floats(&vision), "vision changed");
    let tokens = model
        .vision
        .patch_tokens(Tensor::zeros([1, 3, 32, 32], &dev), true);
    assert_eq!(tokens.dims(), [1, 16, 48], "16 patches, no class token");
    for x in &model.xattn {
        assert_ne!(x.attn_gate.val().into_scalar(), 0.0, "a gate did not train");
    }
}

/// Stage 2 on a GPT-NeoX LM (the Pythia-style fixture: partial RoPE, parallel residual, an
/// untied head, a byte-level tokenizer whose start and end token is `<|endoftext|>`): it
/// trains, the LM stays bit-identical to the file, and the export carries OpenFlamingo's
/// GPT-NeoX names (`gpt_neox.layers`, `gpt_neox.embed_in`; no head: an untied one stays
/// frozen).
#[test]
fn stage_two_on_an_hf_neox_lm_trains_and_exports_gpt_neox_names() {
    let dir = tempfile::tempdir().unwrap();
    let s = synth(dir.path());
    let run = dir.path().join("run");
    let mut cfg = flamingo_cfg(&s, &run, 2);
    cfg.flamingo.lm_from = fixture("hf_neox_pythia");
    train::<B>(&cfg, &Default::default()).unwrap();

    let resolved = RunConfig::load(&run.join("config.toml"), &[]).unwrap();
    let sp = &resolved.data.special_tokens;
    assert_eq!(
        (sp.bos.as_str(), sp.eos.as_str(), sp.pad.as_str()),
        ("<|endoftext|>", "<|endoftext|>", "<PAD>")
    );
    let m = &resolved.flamingo.model;
    assert_eq!(m.lm.style, rookery_model::flamingo::LmStyle::Neox);
    assert!(m.lm.parallel_residual && !m.lm.tie_embeddings);
    let dev = Default::default();
    let (_, _, model) = open_flamingo::<IB>(&run, &dev).unwrap();
    let lm = rookery_interop::load_lm(m.lm.init::<IB>(&dev), &fixture("hf_neox_pythia"), &m.lm);
    assert!(floats(&model.lm) == floats(&lm.unwrap()), "the LM changed");
    for x in &model.xattn {
        assert_ne!(x.attn_gate.val().into_scalar(), 0.0, "a gate did not train");
    }

    let out = std::env::var_os("ROOKERY_KEEP_EXPORT_NEOX")
        .map(PathBuf::from)
        .unwrap_or(dir.path().join("export"));
    export_open_flamingo(&run, &out, false).unwrap();
    if std::env::var_os("ROOKERY_KEEP_EXPORT_NEOX").is_some() {
        keep_reference_logits(&model, &out);
    }
    let t = read_f32(&out.join("checkpoint.safetensors")).unwrap();
    let xa = "lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer";
    for key in [
        format!("{xa}.attn_gate"),
        format!("{xa}.attn.to_q.weight"),
        "lang_encoder.gpt_neox.embed_in.weight".into(),
    ] {
        assert!(t.contains_key(&key), "{key} missing from {:?}", t.keys());
    }
    assert!(!t
        .keys()
        .any(|k| k.contains("lm_head") || k.contains("embed_out")));

    // The export read back (`[flamingo] init_from`'s loader) into a model built on the same
    // files: the trained parts bit for bit, and the same logits.
    let ckpt = out.join("checkpoint.safetensors");
    let read_back = |file: &Path| read_back(m, "hf_neox_pythia", file);
    let (back, loaded) = read_back(&ckpt);
    assert_same_flamingo(&back, &model);
    assert_eq!(
        (loaded.embedding_rows, loaded.skipped),
        (tokenizer_len(&run), 0)
    );
    // An export saved again by open_flamingo itself (`filter_state_dict_to_trainable`,
    // `torch.save`: check_open_flamingo.py writes it beside the export) reads back as the
    // export does. Not part of CI.
    if let Some(pt) = std::env::var_os("ROOKERY_OF_CHECKPOINT_NEOX") {
        let pt = PathBuf::from(pt);
        let (theirs, loaded) = read_back(&pt);
        let (ours, _) = read_back(&pt.with_file_name("checkpoint.safetensors"));
        assert_same_flamingo(&theirs, &ours);
        eprintln!("open_flamingo's own checkpoint read back: {loaded:?}");
    }

    // A run continuing from it starts there: after one step its latents are within a step of
    // the export's; a fresh run's, drawn from another seed, are not.
    let latents = |run: &Path| {
        let (_, _, m) = open_flamingo::<IB>(run, &dev).unwrap();
        values(m.resampler.latents.val())
    };
    let one_step = |name: &str, init: Option<&Path>| {
        let run = dir.path().join(name);
        let mut c = flamingo_cfg(&s, &run, 1);
        c.flamingo.lm_from = fixture("hf_neox_pythia");
        c.flamingo.init_from = init.map(Path::to_path_buf).unwrap_or_default();
        c.train.seed = 7;
        train::<B>(&c, &Default::default()).unwrap();
        run
    };
    let (cont, fresh_run) = (one_step("cont", Some(&ckpt)), one_step("fresh", None));
    let want = values(model.resampler.latents.val());
    let dist = |a: &[f32]| {
        a.iter()
            .zip(&want)
            .fold(0f32, |w, (x, y)| w.max((x - y).abs()))
    };
    let (near, far) = (dist(&latents(&cont)), dist(&latents(&fresh_run)));
    assert!(near <= 2e-3 && far > 1e-2, "continued {near}, fresh {far}");
    let resolved = RunConfig::load(&cont.join("config.toml"), &[]).unwrap();
    assert_eq!(resolved.flamingo.init_sha256, sha(&ckpt));
}

fn sha(p: &Path) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// A model of `m` on the HF CLIP fixture and the LM fixture `lm`, its trained parts read from
/// the OpenFlamingo checkpoint `file` (`[flamingo] init_from`'s loader).
fn read_back(
    m: &rookery_model::flamingo::FlamingoConfig,
    lm: &str,
    file: &Path,
) -> (
    rookery_model::flamingo::Flamingo<IB>,
    rookery_interop::open_flamingo_import::Loaded,
) {
    let dev = Default::default();
    let mut fresh = m.init::<IB>(&dev);
    fresh.vision = load_vision::<IB>(&fixture("hf_clip"), &dev).unwrap();
    fresh.lm = rookery_interop::load_lm(fresh.lm, &fixture(lm), &m.lm).unwrap();
    rookery_interop::open_flamingo_import::load_trained(fresh.freeze(), m, file).unwrap()
}

/// Stage 2 on an MPT LM (the MPT-7B-style fixture: ALiBi, bias-free norms, a tied head,
/// GPT-NeoX's tokenizer): it trains, the LM stays bit-identical to the file, the export is
/// under OpenFlamingo's MPT names (`transformer.blocks`, `transformer.wte`, and `lm_head`:
/// tied) and reads back bit for bit. `ROOKERY_KEEP_EXPORT_MPT=DIR` keeps it for
/// check_open_flamingo.py, `ROOKERY_OF_CHECKPOINT_MPT` reads back what that script saved.
#[test]
fn stage_two_on_an_hf_mpt_lm_trains_exports_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = synth(dir.path());
    let run = dir.path().join("run");
    let mut cfg = flamingo_cfg(&s, &run, 2);
    cfg.flamingo.lm_from = fixture("hf_mpt");
    train::<B>(&cfg, &Default::default()).unwrap();
    let resolved = RunConfig::load(&run.join("config.toml"), &[]).unwrap();
    let m = &resolved.flamingo.model;
    assert_eq!(m.lm.style, rookery_model::flamingo::LmStyle::Mpt);
    assert!(m.lm.tie_embeddings);
    let dev = Default::default();
    let (_, _, model) = open_flamingo::<IB>(&run, &dev).unwrap();
    let lm = rookery_interop::load_lm(m.lm.init::<IB>(&dev), &fixture("hf_mpt"), &m.lm);
    assert!(floats(&model.lm) == floats(&lm.unwrap()), "the LM changed");
    for x in &model.xattn {
        assert_ne!(x.attn_gate.val().into_scalar(), 0.0, "a gate did not train");
    }
    let keep = std::env::var_os("ROOKERY_KEEP_EXPORT_MPT").map(PathBuf::from);
    let out = keep.clone().unwrap_or(dir.path().join("export"));
    export_open_flamingo(&run, &out, false).unwrap();
    if keep.is_some() {
        keep_reference_logits(&model, &out);
    }
    let ckpt = out.join("checkpoint.safetensors");
    let t = read_f32(&ckpt).unwrap();
    for key in [
        "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.attn.to_kv.weight",
        "lang_encoder.transformer.wte.weight",
        "lang_encoder.lm_head.weight",
    ] {
        assert!(t.contains_key(key), "{key} missing from {:?}", t.keys());
    }
    let (back, _) = read_back(m, "hf_mpt", &ckpt);
    assert_same_flamingo(&back, &model);
    // As the NeoX test: open_flamingo's own save of an export reads back as the export.
    if let Some(pt) = std::env::var_os("ROOKERY_OF_CHECKPOINT_MPT") {
        let pt = PathBuf::from(pt);
        let (theirs, loaded) = read_back(m, "hf_mpt", &pt);
        let (ours, _) = read_back(m, "hf_mpt", &pt.with_file_name("checkpoint.safetensors"));
        assert_same_flamingo(&theirs, &ours);
        eprintln!("open_flamingo's own checkpoint read back: {loaded:?}");
    }
}

/// The trained parts bit for bit, the new rows, and a page's logits.
fn assert_same_flamingo(
    a: &rookery_model::flamingo::Flamingo<IB>,
    b: &rookery_model::flamingo::Flamingo<IB>,
) {
    use rookery_interop::open_flamingo_export::trained_of;
    assert!(trained_of(a) == trained_of(b), "trained parts differ");
    assert!(values(a.new_tokens.val()) == values(b.new_tokens.val()));
    let logits = |m| values(page_logits(m));
    assert!(logits(a) == logits(b), "logits differ");
}

/// The length of a run's tokenizer.
fn tokenizer_len(run: &Path) -> usize {
    let cfg = RunConfig::load(&run.join("config.toml"), &[]).unwrap();
    let tk = rookery_data::TextTokenizer::load(&cfg.data.tokenizer, &cfg.data.special_tokens);
    tk.unwrap().vocab_size
}

/// A fixed page with two images: its token ids (`<image>` and `<|endofchunk|>` the model's
/// own, ids 1 and 2 around them) and its pixels `[1, 2, 3, 32, 32]`.
fn page(m: &rookery_model::flamingo::Flamingo<IB>) -> (Vec<i64>, Vec<f32>) {
    let (img, eoc) = (m.image_token, m.eoc_token);
    let ids = vec![1, img, 20, 30, 40, eoc, img, 50, 60, eoc, 2];
    let pixels = (0..2 * 3 * 32 * 32)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    (ids, pixels)
}

/// [`page`]'s logits `[1, T, V]`.
fn page_logits(m: &rookery_model::flamingo::Flamingo<IB>) -> Tensor<IB, 3> {
    let dev = Default::default();
    let (ids, pixels) = page(m);
    let t = ids.len();
    let tokens = Tensor::<IB, 2, Int>::from_data(TensorData::new(ids, [1, t]), &dev);
    let images = Tensor::<IB, 5>::from_data(TensorData::new(pixels, [1, 2, 3, 32, 32]), &dev);
    m.forward(tokens, images)
}

/// The model `[flamingo] init_from` reads `open_flamingo_ckpt/` into: the HF CLIP and the
/// Pythia-style GPT-NeoX fixtures, the checkpoint's small sizes, towers loaded and frozen.
fn small_neox_flamingo<Bk: Backend>(
    run: &Path,
    every: usize,
) -> (
    rookery_model::flamingo::FlamingoConfig,
    rookery_model::flamingo::Flamingo<Bk>,
) {
    let s = SynthConfig {
        out: run.join("synth"),
        ..Default::default()
    };
    let mut cfg = flamingo_cfg(&s, run, 1);
    cfg.flamingo.lm_from = fixture("hf_neox_pythia");
    let m = &mut cfg.flamingo.model;
    m.cross_attn_every_n_layers = every;
    (m.xattn_heads, m.xattn_dim_head, m.xattn_ff_mult) = (2, 8, 1);
    let r = &mut m.resampler;
    (r.latents, r.depth, r.heads, r.dim_head, r.ff_mult) = (4, 1, 2, 8, 1);
    let cfg = rookery_train::stage::flamingo::with_lm_tokenizer(&cfg).unwrap();
    let tk = rookery_data::TextTokenizer::load(&cfg.data.tokenizer, &cfg.data.special_tokens);
    let tk = tk.unwrap();
    let sp = rookery_data::interleaved::Specials::of(&tk).unwrap();
    let tokens = (sp.image as usize, sp.eoc as usize);
    let (r, _) = rookery_train::stage::flamingo::resolve(&cfg, tk.vocab_size, tokens).unwrap();
    let m = r.flamingo.model;
    let dev = Default::default();
    let mut model = m.init::<Bk>(&dev);
    model.vision = load_vision::<Bk>(&fixture("hf_clip"), &dev).unwrap();
    model.lm = rookery_interop::load_lm(model.lm, &fixture("hf_neox_pythia"), &m.lm).unwrap();
    (m, model.freeze())
}

/// OpenFlamingo's training checkpoint (a PyTorch pickle: `model_state_dict`, DDP's `module.`
/// prefix, frozen tensors beside the trained ones) and its flat safetensors twin give the same
/// model, whose trained parts, embedding and untied head are the file's values in rookery's
/// layouts (checked against the twin read by another reader).
#[test]
fn an_open_flamingo_training_checkpoint_sets_the_trained_parts() {
    use rookery_interop::open_flamingo_export::trained_of;
    use rookery_interop::open_flamingo_import::load_trained;
    let dir = tempfile::tempdir().unwrap();
    let (m, model) = small_neox_flamingo::<IB>(&dir.path().join("run"), 1);
    let ckpt = fixture("open_flamingo_ckpt");
    let (pt, from_pt) = load_trained(model.clone(), &m, &ckpt.join("checkpoint.pt")).unwrap();
    let st = ckpt.join("checkpoint.safetensors");
    let (st_model, from_st) = load_trained(model.clone(), &m, &st).unwrap();
    let n = from_pt.embedding_rows;
    assert_eq!(
        (from_pt.skipped, from_st.skipped),
        (2, 0),
        "frozen tensors skipped"
    );
    assert_eq!(from_st.embedding_rows, n);
    assert!(trained_of(&pt) == trained_of(&st_model));
    assert!(values(pt.lm.wte.weight.val()) == values(st_model.lm.wte.weight.val()));

    let theirs = read_f32(&st).unwrap();
    let x = "lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer";
    let ours = trained_of(&pt);
    assert!(ours["resampler.latents"] == theirs["perceiver.latents"]);
    assert_eq!(ours["xattn.1.attn_gate"], theirs[&format!("{x}.attn_gate")]);
    let to_q = transpose(theirs[&format!("{x}.attn.to_q.weight")].clone());
    assert!(
        ours["xattn.1.to_q.weight"] == to_q,
        "[out, in] -> [in, out]"
    );
    let embed = &theirs["lang_encoder.gpt_neox.embed_in.weight"].1;
    let wte = values(pt.lm.wte.weight.val());
    assert!(wte[..n * 64] == embed[..], "the embedding's rows");
    let head = transpose((vec![64, wte.len() / 64], values(pt.lm.lm_head.weight.val())));
    let embed_out = &theirs["lang_encoder.embed_out.weight"].1;
    assert!(head.1[..n * 64] == embed_out[..], "the untied head's rows");
    let row = |id: i64| embed[id as usize * 64..(id as usize + 1) * 64].to_vec();
    let new = values(pt.new_tokens.val());
    assert!(
        new == [row(pt.image_token), row(pt.eoc_token)].concat(),
        "new rows"
    );
    // Under autodiff the frozen parts stay frozen, the trained ones train.
    let (m, model) = small_neox_flamingo::<B>(&dir.path().join("ad"), 1);
    let (ad, _) = load_trained(model, &m, &st).unwrap();
    assert!(!ad.lm.wte.weight.is_require_grad() && !ad.lm.lm_head.weight.is_require_grad());
    assert!(ad.new_tokens.is_require_grad() && ad.xattn[0].to_q.weight.is_require_grad());
}

/// What does not fit the model is refused naming it, before any training: a trained tensor
/// missing, trained tensors of another layout left over (the checkpoint's gated blocks sit
/// before every layer, the model's before every second), a shape that differs, a NaN.
#[test]
fn an_open_flamingo_checkpoint_that_does_not_fit_is_refused_by_name() {
    use rookery_interop::open_flamingo_import::load_trained;
    let dir = tempfile::tempdir().unwrap();
    let st = fixture("open_flamingo_ckpt/checkpoint.safetensors");
    let theirs = read_f32(&st).unwrap();
    let (m, model) = small_neox_flamingo::<IB>(&dir.path().join("run"), 1);
    let x = "lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer";
    let write = |name: &str, t: &rookery_interop::tensors::Tensors| {
        let p = dir.path().join(name);
        rookery_interop::tensors::write(t, &p, false).unwrap();
        p
    };
    let mut dropped = theirs.clone();
    dropped.remove(&format!("{x}.ff.3.weight"));
    let mut reshaped = theirs.clone();
    reshaped.insert(
        format!("{x}.attn.to_q.weight"),
        (vec![8, 64], vec![0.0; 512]),
    );
    let mut diverged = theirs.clone();
    diverged.get_mut("perceiver.latents").unwrap().1[3] = f32::NAN;
    for (file, want) in [
        (write("dropped.safetensors", &dropped), "ff.3.weight"),
        (write("reshaped.safetensors", &reshaped), "to_q"),
        (write("diverged.safetensors", &diverged), "not all finite"),
    ] {
        let e = load_trained(model.clone(), &m, &file).err().unwrap();
        let msg = format!("{e:#}");
        assert!(
            msg.contains(want) && msg.contains(&*file.to_string_lossy()),
            "{msg}"
        );
    }
    let (m2, model2) = small_neox_flamingo::<IB>(&dir.path().join("run2"), 2);
    let e = load_trained(model2, &m2, &st).err().unwrap();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("layers.0.gated_cross_attn_layer") && msg.contains("no place"),
        "{msg}"
    );
}
