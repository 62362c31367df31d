//! Faults the training state must survive (docs/reliability.md): a second run into a run
//! directory, a crash at each phase of a checkpoint save (failpoints), corrupt checkpoints,
//! non-finite losses and a diverged run, and a resumed run's metrics.
//!
//! Failpoints are process-wide: every test here holds a `FailScenario`, which also makes them
//! take turns, and clears the failpoints when it ends.

mod common;
use common::{copy_dir, losses, tiny, weights};

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::module::ParamId;
use burn::optim::Optimizer;
use burn::record::{BinBytesRecorder, BinFileRecorder, FullPrecisionSettings, Recorder};
use fail::FailScenario;
use rookery_model::Clip;
use rookery_train::optim::AdamWOf;
use rookery_train::{checkpoint, train, RunConfig};

type B = Autodiff<Flex>;
type Record = <AdamWOf<B, Clip<B>> as Optimizer<Clip<B>, B>>::Record;

/// A checkpoint's optimizer state, parameter by parameter in id order (optim.bin holds a hash
/// map, whose order differs between saves of equal states).
fn optim_state(ckpt: &Path) -> Vec<(ParamId, Vec<u8>)> {
    let record: Record = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(ckpt.join("optim"), &Default::default())
        .unwrap();
    let mut v: Vec<(ParamId, Vec<u8>)> = record
        .into_iter()
        .map(|(id, r)| {
            let bytes = BinBytesRecorder::<FullPrecisionSettings>::default()
                .record(r, ())
                .unwrap();
            (id, bytes)
        })
        .collect();
    v.sort();
    v
}

fn ckpt(cfg: &RunConfig, step: usize) -> PathBuf {
    cfg.train
        .run_dir
        .join(format!("checkpoints/step-{step:08}"))
}

fn latest_name(cfg: &RunConfig) -> String {
    let p = checkpoint::latest(&cfg.train.run_dir).expect("a latest checkpoint");
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn steps_logged(run_dir: &Path) -> Vec<u64> {
    rookery_train::metrics::read_metrics(run_dir)
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect()
}

fn err_of(r: anyhow::Result<rookery_train::TrainSummary>) -> String {
    match r {
        Ok(_) => panic!("the run succeeded"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_second_run_never_deletes_the_first_runs_checkpoints() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let every = ["checkpoint.every=2", "checkpoint.keep=2"];
    let first = tiny(
        dir.path(),
        "run",
        &[&["train.steps=4"][..], &every].concat(),
    );
    train::<B>(&first, &Default::default()).unwrap();
    assert_eq!(latest_name(&first), "step-00000004");

    // The same run directory with fewer steps: refused before any work, nothing deleted.
    let second = tiny(
        dir.path(),
        "run",
        &[&["train.steps=2"][..], &every].concat(),
    );
    let err = err_of(train::<B>(&second, &Default::default()));
    assert!(
        err.contains("already holds 2 checkpoint(s)") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(latest_name(&first), "step-00000004");
    assert!(ckpt(&first, 4).join("manifest.json").exists());
    assert_eq!(steps_logged(&first.train.run_dir), vec![1, 2, 3, 4]);

    // --overwrite clears the earlier run first: its checkpoints and metrics go.
    let over = tiny(
        dir.path(),
        "run",
        &[&["train.steps=2", "train.overwrite=true"][..], &every].concat(),
    );
    train::<B>(&over, &Default::default()).unwrap();
    assert_eq!(latest_name(&over), "step-00000002");
    assert!(ckpt(&over, 2).join("manifest.json").exists());
    assert!(!ckpt(&over, 4).exists());
    assert_eq!(steps_logged(&over.train.run_dir), vec![1, 2]);

    // Resume and overwrite together contradict each other.
    let both = tiny(
        dir.path(),
        "run",
        &["train.overwrite=true", "train.resume=auto"],
    );
    let err = err_of(train::<B>(&both, &Default::default()));
    assert!(err.contains("contradict"), "{err}");
}

/// Trains `cfg` with the failpoint `fp` failing the second checkpoint save (step 4 of 4), then
/// checks the previous checkpoint is complete and `latest`, and that a resumed run ends with
/// the weights of `reference`'s uninterrupted run.
fn crash_in_save(fp: &str, dir: &Path, reference: &RunConfig) {
    let sets = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=3"];
    let cfg = tiny(dir, fp, &sets);
    fail::cfg(fp, "1*off->return").unwrap();
    let err = err_of(train::<B>(&cfg, &Default::default()));
    fail::remove(fp);
    assert!(err.contains("failpoint"), "{fp}: {err}");
    assert_eq!(latest_name(&cfg), "step-00000002", "{fp}");
    assert!(checkpoint::resolve(&cfg.train.run_dir).is_ok(), "{fp}");
    let tmp = cfg.train.run_dir.join("checkpoints/step-00000004.tmp");
    assert_eq!(tmp.exists(), fp != "checkpoint.before_latest", "{fp}");

    let resumed = tiny(dir, fp, &[&sets[..], &["train.resume=auto"]].concat());
    train::<B>(&resumed, &Default::default()).unwrap();
    assert!(!tmp.exists(), "{fp}: the unfinished save was not removed");
    assert_eq!(latest_name(&cfg), "step-00000004");
    let model = |c: &RunConfig| weights(c, &ckpt(c, 4).join("model.safetensors"));
    assert!(
        model(&cfg) == model(reference),
        "{fp}: resumed weights differ"
    );
    assert_eq!(steps_logged(&cfg.train.run_dir), vec![1, 2, 3, 4], "{fp}");
}

#[test]
fn a_crash_in_any_phase_of_a_save_keeps_the_previous_checkpoint() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let reference = tiny(
        dir.path(),
        "reference",
        &["train.steps=4", "checkpoint.every=2", "checkpoint.keep=3"],
    );
    train::<B>(&reference, &Default::default()).unwrap();
    for fp in [
        "checkpoint.after_weights",
        "checkpoint.after_optim",
        "checkpoint.before_rename",
        "checkpoint.before_latest",
    ] {
        crash_in_save(fp, dir.path(), &reference);
    }
}

#[test]
fn a_full_disk_or_read_only_run_directory_names_the_path_and_keeps_the_previous_checkpoint() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    for (errno, says) in [
        (28, "No space left on device"),
        (30, "Read-only file system"),
    ] {
        let cfg = tiny(
            dir.path(),
            &format!("errno-{errno}"),
            &["train.steps=4", "checkpoint.every=2", "checkpoint.keep=3"],
        );
        // A save writes three small files (state.json, config.toml, manifest.json): the
        // second save's first one is refused.
        fail::cfg("checkpoint.disk_full", &format!("3*off->return({errno})")).unwrap();
        let err = err_of(train::<B>(&cfg, &Default::default()));
        fail::remove("checkpoint.disk_full");
        assert!(
            err.contains("step-00000004.tmp/state.json") && err.contains(says),
            "{err}"
        );
        assert_eq!(latest_name(&cfg), "step-00000002");
        assert!(checkpoint::resolve(&cfg.train.run_dir).is_ok());
    }
}

#[test]
fn corrupt_checkpoints_are_refused_by_name_and_resume_takes_the_newest_good_one() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let sets = ["checkpoint.every=2", "checkpoint.keep=5"];
    let full = tiny(
        dir.path(),
        "full",
        &[&["train.steps=6"][..], &sets].concat(),
    );
    train::<B>(&full, &Default::default()).unwrap();

    // Each kind of damage, on a copy of the step-4 checkpoint: `resolve` (what eval, export
    // and stage 2 read through) refuses it, naming the file.
    type Damage = fn(&Path);
    let damage: [(&str, Damage); 4] = [
        ("model.safetensors", |d| flip(&d.join("model.safetensors"))),
        ("optim.bin", |d| truncate(&d.join("optim.bin"))),
        ("state.json", |d| {
            std::fs::remove_file(d.join("state.json")).unwrap()
        }),
        ("manifest.json", |d| truncate(&d.join("manifest.json"))),
    ];
    for (i, (file, hurt)) in damage.iter().enumerate() {
        let copy = dir.path().join(format!("damaged-{i}"));
        copy_dir(&ckpt(&full, 4), &copy);
        hurt(&copy);
        let err = format!("{:#}", checkpoint::resolve(&copy).unwrap_err());
        assert!(err.contains(file), "{file}: {err}");
    }

    // A run whose newest checkpoint (step 4) is corrupt resumes from step 2 and ends as the
    // uninterrupted run does.
    let cut = tiny(
        dir.path(),
        "cut",
        &[&["train.steps=6", "train.resume=auto"][..], &sets].concat(),
    );
    let ck = cut.train.run_dir.join("checkpoints");
    for step in [2, 4] {
        copy_dir(&ckpt(&full, step), &ck.join(format!("step-{step:08}")));
    }
    std::fs::write(ck.join("latest"), "step-00000004").unwrap();
    flip(&ck.join("step-00000004/model.safetensors"));
    assert_eq!(
        checkpoint::newest_verified(&cut.train.run_dir).unwrap(),
        Some(ck.join("step-00000002"))
    );
    train::<B>(&cut, &Default::default()).unwrap();
    let model = |c: &RunConfig| weights(c, &ckpt(c, 6).join("model.safetensors"));
    assert!(model(&full) == model(&cut));
}

fn flip(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

#[test]
fn a_non_finite_loss_skips_the_update_and_is_counted() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(
        dir.path(),
        "nan",
        &["train.steps=4", "checkpoint.every=1", "checkpoint.keep=5"],
    );
    fail::cfg("train.non_finite_loss", "return(3)").unwrap();
    train::<B>(&cfg, &Default::default()).unwrap();
    fail::remove("train.non_finite_loss");
    // Step 3 changed nothing: weights (byte for byte: the file's bytes depend on the values
    // only) and optimizer state are those of step 2.
    let model = |s| std::fs::read(ckpt(&cfg, s).join("model.safetensors")).unwrap();
    let optim = |s| optim_state(&ckpt(&cfg, s));
    assert!(model(2) == model(3), "weights changed on the skipped step");
    assert!(
        optim(2) == optim(3),
        "optimizer state changed on the skipped step"
    );
    assert!(
        model(3) != model(4) && optim(3) != optim(4),
        "step 4 changed nothing"
    );
    let m = rookery_train::metrics::read_metrics(&cfg.train.run_dir).unwrap();
    let skipped: Vec<u64> = m
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["skipped_steps"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, vec![0, 0, 1, 1]);
    assert!(losses(&cfg.train.run_dir)[2].is_nan());
}

#[test]
fn a_diverged_run_stops_with_an_error_and_never_saves_non_finite_weights() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(
        dir.path(),
        "diverged",
        &[
            "train.steps=30",
            "optim.lr=1e30",
            "optim.warmup_steps=0",
            "optim.grad_clip_norm=0",
            "train.max_bad_steps=3",
            "checkpoint.every=1",
            "checkpoint.keep=50",
        ],
    );
    let err = err_of(train::<B>(&cfg, &Default::default()));
    assert!(
        err.contains("3 steps in a row") && err.contains("max_bad_steps"),
        "{err}"
    );
    for e in std::fs::read_dir(cfg.train.run_dir.join("checkpoints")).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            let w = weights(&cfg, &p.join("model.safetensors"));
            assert!(w.iter().flatten().all(|x| x.is_finite()), "{}", p.display());
        }
    }
}

#[test]
fn a_resumed_run_logs_each_step_once_and_saves_reproducible_bytes() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let sets = ["checkpoint.every=2", "checkpoint.keep=5"];
    let cfg = tiny(dir.path(), "run", &[&["train.steps=4"][..], &sets].concat());
    train::<B>(&cfg, &Default::default()).unwrap();
    // As if killed after logging steps 3 and 4 but before the step-4 checkpoint.
    std::fs::remove_dir_all(ckpt(&cfg, 4)).unwrap();
    std::fs::write(
        cfg.train.run_dir.join("checkpoints/latest"),
        "step-00000002",
    )
    .unwrap();
    let first = losses(&cfg.train.run_dir);
    let resumed = tiny(
        dir.path(),
        "run",
        &[&["train.steps=4", "train.resume=auto"][..], &sets].concat(),
    );
    train::<B>(&resumed, &Default::default()).unwrap();
    assert_eq!(steps_logged(&cfg.train.run_dir), vec![1, 2, 3, 4]);
    assert_eq!(losses(&cfg.train.run_dir), first);

    // A second, identical run writes the same bytes (safetensors metadata in a fixed order).
    let again = tiny(
        dir.path(),
        "again",
        &[&["train.steps=4"][..], &sets].concat(),
    );
    train::<B>(&again, &Default::default()).unwrap();
    let read = |c: &RunConfig| std::fs::read(ckpt(c, 2).join("model.safetensors")).unwrap();
    assert!(
        read(&cfg) == read(&again),
        "model.safetensors differs between equal runs"
    );
    assert!(optim_state(&ckpt(&cfg, 2)) == optim_state(&ckpt(&again, 2)));
}

/// A first JPEG member of `shard`.
fn a_jpeg(shard: &str) -> Vec<u8> {
    let mut jpg = vec![];
    rookery_data::wds::read_shard(shard, |i| match i {
        rookery_data::wds::ShardItem::Sample(s) => match s.get("jpg") {
            Some(j) => {
                jpg = j.to_vec();
                false
            }
            None => true,
        },
        _ => true,
    });
    assert!(!jpg.is_empty(), "no jpg in {shard}");
    jpg
}

#[test]
fn bad_data_is_skipped_and_counted_in_a_training_run() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let probe = tiny(dir.path(), "probe", &[]);
    let good = rookery_data::expand_shards(&probe.data.train).unwrap();
    let bytes = std::fs::read(&good[0]).unwrap();
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("a-truncated.tar"), &bytes[..bytes.len() / 2 + 100]).unwrap();
    std::fs::write(bad.join("b-garbage.tar"), vec![0x5au8; 5000]).unwrap();
    let jpg = a_jpeg(&good[0]);
    let m = |e: &str, b: &[u8]| (e.to_string(), b.to_vec());
    let samples = vec![
        (
            "corrupt".into(),
            vec![m("jpg", &jpg[..jpg.len() / 3]), m("txt", b"x")],
        ),
        ("zero".into(), vec![m("jpg", b""), m("txt", b"x")]),
        ("nocaption".into(), vec![m("jpg", &jpg)]),
        ("latin1".into(), vec![m("jpg", &jpg), m("txt", b"caf\xe9")]),
    ];
    rookery_data::writer::write_shard(&bad.join("c-samples.tar"), samples).unwrap();
    // A shard that will be gone when the run resumes (deleted mid-run).
    let doomed = bad.join("d-deleted.tar");
    std::fs::copy(&good[1], &doomed).unwrap();
    let spec = format!(
        "{}::{}/{{a-truncated,b-garbage,c-samples,d-deleted}}.tar::pipe:false::pipe:cat {}",
        probe.data.train,
        bad.display(),
        good[1]
    );
    let extra = [
        format!("data.train={spec}"),
        "data.max_bad_fraction=0.5".into(),
        "data.workers=1".into(),
        // Two epochs and more (about 1,150 samples each): the deleted shard's turn comes
        // again after it is gone.
        "train.steps=200".into(),
    ];
    let cfg = tiny(
        dir.path(),
        "run",
        &extra.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    );
    let metrics = cfg.train.run_dir.join("metrics.jsonl");
    let deleter = std::thread::spawn(move || {
        // As soon as the first step is logged, long before epoch 0 ends (step ~70).
        while std::fs::read_to_string(&metrics).map_or(true, |t| t.is_empty()) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::fs::remove_file(&doomed).unwrap();
    });
    train::<B>(&cfg, &Default::default()).unwrap();
    deleter.join().unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt(&cfg, 200).join("state.json")).unwrap())
            .unwrap();
    let counts = &state["loaders"][0]["counts"]["by_reason"];
    let n = |k: &str| counts[k].as_u64().unwrap_or(0);
    assert!(n("undecodable image .jpg") >= 2, "{counts}");
    assert!(
        n("missing caption") >= 1 && n("caption is not UTF-8") >= 1,
        "{counts}"
    );
    assert!(
        n("broken tar") >= 3,
        "truncated, garbage and pipe:false: {counts}"
    );
    assert!(n("unreadable shard") >= 1, "the deleted shard: {counts}");
    let m = rookery_train::metrics::read_metrics(&cfg.train.run_dir).unwrap();
    let last = m.iter().rfind(|r| r["kind"] == "train").unwrap();
    assert!(last["bad_samples"].as_u64().unwrap() >= 8, "{last}");
}

#[test]
fn a_stalled_pipe_fails_the_run_naming_the_shard() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(
        dir.path(),
        "stalled",
        &[
            "data.train=pipe:sleep 30",
            "data.stall_timeout_s=1",
            "train.steps=2",
        ],
    );
    let t = std::time::Instant::now();
    let err = err_of(train::<B>(&cfg, &Default::default()));
    assert!(
        err.contains("pipe:sleep 30") && err.contains("stall_timeout_s"),
        "{err}"
    );
    assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
}

#[test]
fn a_panicking_rank_stops_the_others_naming_it_and_a_slow_evaluation_does_not() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "dist.world_size=2",
        "data.batch_size=8",
        "train.steps=6",
        "checkpoint.every=2",
        "checkpoint.keep=3",
        "dist.timeout_s=1",
    ];
    let cfg = tiny(dir.path(), "panic", &sets);
    fail::cfg("train.rank_panic", "return(1:5)").unwrap();
    let t = std::time::Instant::now();
    let err = err_of(train::<B>(&cfg, &Default::default()));
    fail::remove("train.rank_panic");
    assert!(
        err.contains("rank 1") && err.contains("injected panic of rank 1 at step 5"),
        "{err}"
    );
    assert!(t.elapsed().as_secs() < 30, "took {:?}", t.elapsed());
    assert_eq!(latest_name(&cfg), "step-00000004");
    assert!(checkpoint::resolve(&cfg.train.run_dir).is_ok());

    // Rank 0 evaluates for 3 s, three times the collective timeout: the others wait for it
    // (dist.eval_timeout_s), they do not time out.
    let slow = tiny(
        dir.path(),
        "slow-eval",
        &[&sets[..], &["train.eval_every=3", "train.steps=3"]].concat(),
    );
    fail::cfg("train.evaluate", "sleep(3000)").unwrap();
    let res = train::<B>(&slow, &Default::default());
    fail::remove("train.evaluate");
    res.unwrap();
}
