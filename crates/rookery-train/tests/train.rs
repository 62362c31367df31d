//! End-to-end CLIP training on a tiny synthetic set: the loss falls, a resumed run ends with
//! the same weights as one that never stopped, and bad checkpoints are refused.

mod common;
use common::{copy_dir, losses, tiny, weights};

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::prelude::Tensor;
use rookery_train::{checkpoint, train, RunConfig};

type B = Autodiff<Flex>;

#[test]
fn loss_falls_and_eval_reports_recall() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(dir.path(), "run", &["train.steps=300"]);
    let s = train::<B>(&cfg, &Default::default()).unwrap();
    let l = losses(&cfg.train.run_dir);
    let (first, last) = (
        l[..5].iter().sum::<f64>() / 5.0,
        l[l.len() - 5..].iter().sum::<f64>() / 5.0,
    );
    assert!(last < first - 0.3, "loss did not fall: {first} -> {last}");
    let Some(rookery_train::stage::Report::Clip(e)) = s.eval else {
        panic!("final CLIP eval")
    };
    assert_eq!(e.n, 48);
    assert!(
        e.i2t_r10 > 1.5 * 10.0 * e.chance_r1,
        "R@10 {} not above 1.5x chance",
        e.i2t_r10
    );
    let scale = rookery_train::metrics::read_metrics(&cfg.train.run_dir)
        .unwrap()
        .iter()
        .filter_map(|r| r["logit_scale"].as_f64())
        .collect::<Vec<_>>();
    assert!(
        (scale.last().unwrap() - scale[0]).abs() > 0.01,
        "logit_scale is not learned: {} -> {}",
        scale[0],
        scale.last().unwrap()
    );
    assert!(cfg.train.run_dir.join("metrics.png").exists());
    // 300 steps x 16 samples over 512 training samples: the stream rolled into later epochs
    let epochs: Vec<u64> = rookery_train::metrics::read_metrics(&cfg.train.run_dir)
        .unwrap()
        .iter()
        .filter_map(|r| r["epoch"].as_u64())
        .collect();
    assert_eq!(
        (epochs[0], *epochs.last().unwrap() >= 8),
        (0, true),
        "{epochs:?}"
    );
    let resolved = RunConfig::load(&cfg.train.run_dir.join("config.toml"), &[]).unwrap();
    assert!(
        resolved.model.text.vocab_size > 6,
        "the run directory holds the fully resolved config"
    );
}

/// Why `checkpoint::load` refuses `dir` for a run of `cfg`.
fn load_error(dir: &Path, cfg: &RunConfig) -> String {
    let model = cfg.model.init::<B>(&Default::default());
    let optim = burn::optim::AdamWConfig::new().init::<B, rookery_model::Clip<B>>();
    match checkpoint::load(dir, cfg, model, optim, &Default::default()) {
        Ok(_) => panic!("{} was accepted", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn resume_is_exact_and_bad_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let full = tiny(
        dir.path(),
        "full",
        &[
            "train.steps=6",
            "checkpoint.every=3",
            "checkpoint.keep=5",
            "train.accum_steps=2",
        ],
    );
    train::<B>(&full, &Default::default()).unwrap();
    // a run "stopped" at step 3: its directory holds only the step-3 checkpoint
    let cut = tiny(
        dir.path(),
        "cut",
        &[
            "train.steps=6",
            "checkpoint.every=3",
            "checkpoint.keep=5",
            "train.accum_steps=2",
            "train.resume=auto",
        ],
    );
    let src = full.train.run_dir.join("checkpoints/step-00000003");
    let ck = stopped_at(&src, &cut);
    train::<B>(&cut, &Default::default()).unwrap();
    let a = weights(
        &full,
        &full
            .train
            .run_dir
            .join("checkpoints/step-00000006/model.safetensors"),
    );
    let b = weights(&full, &ck.join("step-00000006/model.safetensors"));
    assert_eq!(a.len(), 38, "every tensor compared");
    assert!(
        a == b,
        "resumed weights differ from the uninterrupted run (bit-exact expected on CPU)"
    );
    assert_eq!(
        losses(&full.train.run_dir)[3..],
        losses(&cut.train.run_dir)[..],
        "resumed run saw different samples"
    );

    // a corrupt checkpoint is refused, naming the file
    let bad = dir.path().join("bad-ck");
    copy_dir(&src, &bad);
    let mut bytes = std::fs::read(bad.join("model.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(bad.join("model.safetensors"), bytes).unwrap();
    let err = load_error(&bad, &full);
    assert!(
        err.contains("corrupt") && err.contains("model.safetensors"),
        "{err}"
    );

    // a different model shape is refused, naming both
    let other = tiny(dir.path(), "other", &["model.vision.width=64"]);
    let err = load_error(&src, &other);
    assert!(
        err.contains("different model") && err.contains("width: 64") && err.contains("width: 32"),
        "{err}"
    );

    // a section the stage does not train is not compared: a CLIP run resumes under another [lm]
    let mut unrelated = RunConfig::load(&src.join("config.toml"), &[]).unwrap();
    (unrelated.lm.width, unrelated.lm.layers) = (64, 3);
    let model = unrelated.model.init::<B>(&Default::default());
    let optim = burn::optim::AdamWConfig::new().init::<B, rookery_model::Clip<B>>();
    if let Err(e) = checkpoint::load(&src, &unrelated, model, optim, &Default::default()) {
        panic!("a CLIP checkpoint refused for another [lm]: {e}");
    }

    // the checkpoint keeps the tokenizer it was trained with; another one is refused
    assert_eq!(
        std::fs::read(src.join("tokenizer.json")).unwrap(),
        std::fs::read(&full.data.tokenizer).unwrap()
    );
    let mut retokenized = RunConfig::load(&src.join("config.toml"), &[]).unwrap();
    retokenized.data.tokenizer = dir.path().join("other-tokenizer.json");
    let text = std::fs::read_to_string(&full.data.tokenizer).unwrap();
    let swapped = text.replacen("\"small\"", "\"tiny\"", 1);
    assert_ne!(text, swapped, "the tokenizer names the word swapped here");
    std::fs::write(&retokenized.data.tokenizer, swapped).unwrap();
    let err = load_error(&src, &retokenized);
    assert!(
        err.contains("tokenizer") && err.contains("other-tokenizer.json"),
        "{err}"
    );
}

#[test]
fn two_rank_training_resumes_exactly_and_continues_on_another_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let args = |run| {
        tiny(
            dir.path(),
            run,
            &[
                "dist.world_size=2",
                "data.batch_size=8",
                "train.accum_steps=2",
                "train.steps=4",
                "checkpoint.every=2",
                "checkpoint.keep=5",
                "train.resume=auto",
                // The kept patches must come back with the samples after a resume.
                "model.vision.patch_dropout=0.5",
                // Length-sorted text groups (rows per rank and micro-batch: 4 + 4).
                "model.text.length_buckets=2",
            ],
        )
    };
    let full = args("full");
    train::<B>(&full, &Default::default()).unwrap();
    let ck2 = full.train.run_dir.join("checkpoints/step-00000002");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck2.join("state.json")).unwrap()).unwrap();
    assert_eq!(
        state["loaders"].as_array().unwrap().len(),
        2,
        "one position per rank"
    );
    assert_eq!(
        state["samples_seen"],
        2 * 2 * 2 * 8,
        "steps x ranks x micro x batch"
    );

    let cut = args("cut");
    let ck = stopped_at(&ck2, &cut);
    train::<B>(&cut, &Default::default()).unwrap();
    let a = weights(
        &full,
        &full
            .train
            .run_dir
            .join("checkpoints/step-00000004/model.safetensors"),
    );
    let b = weights(&full, &ck.join("step-00000004/model.safetensors"));
    assert!(
        a == b,
        "2-rank resume differs from the uninterrupted 2-rank run"
    );
    assert_eq!(
        losses(&full.train.run_dir)[2..],
        losses(&cut.train.run_dir)[..]
    );

    // Resuming the 2-rank checkpoint on 1 rank, without patch dropout (FLIP's unmasked
    // tuning) and without length buckets, continues from the same step and weights.
    let one = tiny(
        dir.path(),
        "one",
        &["data.batch_size=16", "train.steps=3", "train.resume=auto"],
    );
    let ck1 = stopped_at(&ck2, &one);
    let s = train::<B>(&one, &Default::default()).unwrap();
    assert_eq!(s.steps, 3);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck1.join("step-00000003/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["loaders"].as_array().unwrap().len(), 1);
}

/// Makes `run`'s directory look like a run stopped right after checkpoint `src` (its only
/// checkpoint, named `latest`); returns its checkpoints directory.
fn stopped_at(src: &Path, run: &RunConfig) -> std::path::PathBuf {
    let ck = run.train.run_dir.join("checkpoints");
    let name = src.file_name().unwrap();
    copy_dir(src, &ck.join(name));
    std::fs::write(ck.join("latest"), name.to_str().unwrap()).unwrap();
    ck
}

#[test]
fn export_round_trips_in_f32_and_bf16_with_open_clip_names() {
    use burn::prelude::{Int, TensorData};
    let dir = tempfile::tempdir().unwrap();
    // CLIP's own tower, without a patch stem (which open_clip and HF lack; next test).
    let clip_tower = "model.vision.stem_patch=0";
    let cfg = tiny(dir.path(), "run", &["train.steps=2", clip_tower]);
    let s = train::<B>(&cfg, &Default::default()).unwrap();
    let mut mc = cfg.model.clone();
    mc.text.vocab_size = rookery_data::TextTokenizer::from_file(&cfg.data.tokenizer)
        .unwrap()
        .vocab_size;
    let dev = Default::default();
    let model = checkpoint::load_weights(
        mc.init::<Flex>(&dev),
        &s.model_dir.join("model.safetensors"),
    )
    .unwrap();
    let images = Tensor::<Flex, 4>::random(
        [3, 3, 32, 32],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let tokens = Tensor::<Flex, 2, Int>::from_data(
        TensorData::new(
            vec![2i64, 7, 9, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0].repeat(3),
            [3, 16],
        ),
        &dev,
    );
    let out = |m: &rookery_model::Clip<Flex>| {
        (
            m.encode_image(images.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
            m.encode_text(tokens.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
        )
    };
    let want = out(&model);
    for (bf16, tol) in [(false, 0.0f32), (true, 3e-2)] {
        let exp = dir.path().join(if bf16 { "bf16" } else { "f32" });
        rookery_interop::open_clip::export(&model, &mc, Some(&cfg.data.tokenizer), &exp, bf16)
            .unwrap();
        assert_eq!(
            rookery_interop::open_clip::exported_config(&exp).unwrap(),
            mc
        );
        let back = rookery_interop::open_clip::load_exported(mc.init::<Flex>(&dev), &exp).unwrap();
        let got = out(&back);
        let err = want
            .0
            .iter()
            .chain(&want.1)
            .zip(got.0.iter().chain(&got.1))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err <= tol, "bf16={bf16}: max error {err}");
        // open_clip names and PyTorch layouts
        let bytes = std::fs::read(exp.join(rookery_interop::open_clip::WEIGHTS)).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let in_proj = &header["visual.transformer.resblocks.0.attn.in_proj_weight"];
        assert_eq!(
            in_proj["shape"],
            serde_json::json!([96, 32]),
            "[out, in] like torch"
        );
        assert_eq!(in_proj["dtype"], if bf16 { "BF16" } else { "F32" });
        for k in [
            "token_embedding.weight",
            "positional_embedding",
            "ln_final.weight",
            "text_projection",
            "visual.conv1.weight",
            "visual.proj",
            "logit_scale",
            "transformer.resblocks.0.mlp.c_fc.bias",
        ] {
            assert!(header.get(k).is_some(), "missing {k}");
        }
    }
    // HF transformers names: q/k/v split out of in_proj, [out, in] layouts, 0-d logit_scale
    let hf = dir.path().join("hf");
    rookery_interop::hf_clip_export::export_hf(&model, &mc, &hf, false).unwrap();
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let q = &header["vision_model.encoder.layers.0.self_attn.q_proj.weight"];
    assert_eq!(q["shape"], serde_json::json!([32, 32]));
    assert_eq!(header["logit_scale"]["shape"], serde_json::json!([]));
    assert_eq!(
        header["visual_projection.weight"]["shape"],
        serde_json::json!([32, 32])
    );
    assert_eq!(
        header["text_model.embeddings.position_embedding.weight"]["shape"],
        serde_json::json!([16, 32])
    );
    // k_proj.bias is the middle third of in_proj.bias
    let k = &header["text_model.encoder.layers.0.self_attn.k_proj.bias"]["data_offsets"];
    let (a, b) = (
        k[0].as_u64().unwrap() as usize + 8 + n,
        k[1].as_u64().unwrap() as usize + 8 + n,
    );
    let got: Vec<f32> = bytes[a..b]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let in_bias = model.text.transformer.resblocks[0]
        .attn
        .in_proj
        .bias
        .as_ref()
        .unwrap()
        .val()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(got, in_bias[32..64]);
    // Cross-check with HF transformers itself when a Python with it is named (see docs/benchmarks.md).
    if let Ok(py) = std::env::var("ROOKERY_HF_PYTHON") {
        let io = serde_json::json!({
            "images": images.clone().into_data().to_vec::<f32>().unwrap(), "image_shape": [3, 3, 32, 32],
            "tokens": tokens.clone().into_data().convert::<i64>().to_vec::<i64>().unwrap(), "token_shape": [3, 16],
            "img_feat": want.0, "txt_feat": want.1, "logit_scale": model.logit_scale.val().into_data().to_vec::<f32>().unwrap()[0],
        });
        std::fs::write(dir.path().join("io.json"), io.to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../benches/reference/check_hf_export.py");
        let out = std::process::Command::new(py)
            .arg(script)
            .arg(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("OK"),
            "HF transformers disagrees: {text}"
        );
        eprintln!("{text}");
    }
    // and training can start from an export
    let from = tiny(
        dir.path(),
        "from",
        &[
            "train.steps=1",
            clip_tower,
            &format!("model.init_from={}", dir.path().join("f32").display()),
        ],
    );
    train::<B>(&from, &Default::default()).unwrap();
}

/// A tower with a patch stem exports under rookery's names and loads back bit for bit, and
/// the export says open_clip cannot load it; the HF export is refused, naming the key.
#[test]
fn a_stem_tower_exports_for_rookery_only() {
    let dev = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(
        dir.path(),
        "run",
        &["model.vision.stem_patch=4", "model.vision.stem_width=8"],
    );
    let model = cfg.model.init::<Flex>(&dev);
    let images = Tensor::<Flex, 4>::random(
        [2, 3, 32, 32],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let feats = |m: &rookery_model::Clip<Flex>| {
        let v = m.encode_image(images.clone()).into_data();
        v.to_vec::<f32>().unwrap()
    };
    let exp = dir.path().join("exp");
    rookery_interop::open_clip::export(&model, &cfg.model, None, &exp, false).unwrap();
    let back =
        rookery_interop::open_clip::load_exported(cfg.model.init::<Flex>(&dev), &exp).unwrap();
    assert_eq!(feats(&back), feats(&model));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exp.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["open_clip"]["loadable"], false);
    let why = config["open_clip"]["why"].as_str().unwrap();
    assert!(why.contains("model.vision.stem_patch"), "{why}");
    let err = rookery_interop::hf_clip_export::export_hf(
        &model,
        &cfg.model,
        &dir.path().join("hf"),
        false,
    )
    .expect_err("HF has no patch stem");
    assert!(err.to_string().contains("model.vision.stem_patch"), "{err}");
    assert!(!dir.path().join("hf").exists());
}

/// `model.init_from` reads an HF CLIP directory as it is and takes its shapes; a tokenizer
/// that does not fit its text tower is refused before any work, naming both.
#[test]
fn init_from_a_pretrained_hf_clip_takes_its_shapes_and_checks_the_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rookery-interop/fixtures/hf_clip");
    let cfg = tiny(
        dir.path(),
        "lit",
        &[
            &format!("model.init_from={}", hf.display()),
            "train.steps=1",
        ],
    );
    let err = format!("{:#}", train::<B>(&cfg, &Default::default()).unwrap_err());
    assert!(
        err.contains("model.init_from")
            && err.contains("data.tokenizer")
            && err.contains("the model's text tower 100"),
        "{err}"
    );
    assert!(
        !cfg.train.run_dir.exists(),
        "refused before the run directory was made"
    );
}

/// The tensors of one tower of the CLIP checkpoint `path`, in module order.
fn tower(cfg: &RunConfig, path: &Path, image: bool) -> Vec<Vec<f32>> {
    let m = checkpoint::load_weights(cfg.model.init::<Flex>(&Default::default()), path).unwrap();
    match image {
        true => common::floats(&m.visual),
        false => common::floats(&m.text),
    }
}

/// LiT: with `[model.vision] locked`, two thread ranks with two micro-batches each train the
/// text tower while the image tower stays bit-identical and has no optimizer state.
#[test]
fn a_locked_image_tower_stays_as_it_was_and_has_no_optimizer_state() {
    use burn::optim::Optimizer;
    use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(
        dir.path(),
        "lit",
        &[
            "model.vision.locked=true",
            "dist.world_size=2",
            "data.batch_size=8",
            "train.accum_steps=2",
            "train.steps=3",
            "checkpoint.every=1",
            "checkpoint.keep=5",
        ],
    );
    let s = train::<B>(&cfg, &Default::default()).unwrap();
    let resolved = RunConfig::load(&cfg.train.run_dir.join("config.toml"), &[]).unwrap();
    let ck = |n: usize| {
        cfg.train
            .run_dir
            .join(format!("checkpoints/step-{n:08}/model.safetensors"))
    };
    assert!(tower(&resolved, &ck(1), true) == tower(&resolved, &ck(3), true));
    assert!(tower(&resolved, &ck(1), false) != tower(&resolved, &ck(3), false));
    assert!(s.final_loss.is_finite());
    type Record = <rookery_train::optim::AdamWOf<B, rookery_model::Clip<B>> as Optimizer<
        rookery_model::Clip<B>,
        B,
    >>::Record;
    let record: Record = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(ck(3).with_file_name("optim"), &Default::default())
        .unwrap();
    let text_and_scale = tower(&resolved, &ck(3), false).len() + 1;
    assert_eq!(
        record.len(),
        text_and_scale,
        "only the text tower and logit_scale have Adam state"
    );
}
