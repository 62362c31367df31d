//! `[[eval.tasks]]` during training and `rookery eval --task` afterwards, on sets written in
//! CLIP_benchmark's layouts from the synthetic held-out shards: the figures land in
//! metrics.jsonl, the command gives the same numbers for the final checkpoint, and a set that
//! does not open is refused before any work.

mod common;
use common::{check, rookery, root, sets, BIN};

use std::path::Path;
use std::process::Command;

use rookery_data::synth::scene::SHAPES;
use rookery_data::wds::{read_shard, ShardItem};
use rookery_data::writer::write_shard;
use serde_json::Value;

/// The synthetic held-out shard as CLIP_benchmark's zero-shot export: image + `cls` (the
/// shape), class names and templates beside `test/`.
fn zero_shot_set(val_shard: &Path, out: &Path) {
    let mut samples = Vec::new();
    read_shard(val_shard.to_str().unwrap(), |item| {
        if let ShardItem::Sample(s) = item {
            let label: Value = serde_json::from_slice(s.get("json").unwrap()).unwrap();
            let shape = label["shape"].as_str().unwrap();
            let cls = SHAPES.iter().position(|x| *x == shape).unwrap();
            let (ext, img) = ["jpg", "png"]
                .iter()
                .find_map(|e| s.get(e).map(|b| (e.to_string(), b.to_vec())))
                .unwrap();
            let members = vec![(ext, img), ("cls".into(), cls.to_string().into())];
            samples.push((s.key.clone(), members));
        }
        true
    });
    std::fs::create_dir_all(out.join("test")).unwrap();
    write_shard(&out.join("test/0.tar"), samples).unwrap();
    std::fs::write(out.join("test/nshards.txt"), "1\n").unwrap();
    std::fs::write(out.join("classnames.txt"), SHAPES.join("\n")).unwrap();
    let templates = "{c}\na {c}\none small red {c}\n";
    std::fs::write(out.join("zeroshot_classification_templates.txt"), templates).unwrap();
}

fn last_eval(run: &Path) -> Value {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let evals: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "eval")
        .collect();
    evals.last().cloned().expect("an eval record")
}

#[test]
fn eval_tasks_score_during_training_and_match_rookery_eval() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = sets(d, "run", &[]);
    let val = d.join("synth/val");
    let shard = std::fs::read_dir(&val)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tar"))
        .unwrap();
    zero_shot_set(&shard, &d.join("shapes"));
    let tasks = format!(
        "eval.tasks=[{{task = \"zeroshot\", data = \"{}\"}}, {{task = \"retrieval\", data = \"{}\", name = \"pairs\", recall_k = [1, 5]}}]",
        d.join("shapes").display(),
        shard.display()
    );
    let run_set = [base.clone(), vec!["train.steps=3".into(), tasks.clone()]].concat();
    let out = check(
        rookery(&["train", "configs/clip-tiny.toml"], &run_set)
            .current_dir(root())
            .output()
            .unwrap(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("shapes/acc1"), "{stdout}");
    let during = last_eval(&d.join("run"));
    for key in [
        "shapes/acc1",
        "shapes/acc5",
        "shapes/mean_per_class_recall",
        "pairs/image_retrieval_recall@1",
        "pairs/text_retrieval_recall@5",
    ] {
        let v = during[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {during}"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }

    // The same set through `rookery eval` on the final checkpoint gives the same figures.
    let json = d.join("zs.json");
    let run = d.join("run");
    let out = check(
        Command::new(BIN)
            .arg("eval")
            .arg(&run)
            .args(["--task", "zeroshot", "--data"])
            .arg(d.join("shapes"))
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap(),
    );
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("shapes Zeroshot: acc1"), "{line}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let m = &report["report"]["metrics"];
    for key in ["acc1", "acc5", "mean_per_class_recall"] {
        let (a, b) = (
            m[key].as_f64().unwrap(),
            during[format!("shapes/{key}")].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-9,
            "{key}: rookery eval {a} vs training {b}"
        );
    }
    assert_eq!(report["report"]["images"], 32);

    // A set that does not open is refused before any work, naming the key.
    let bad = [
        base,
        vec![
            "train.steps=3".into(),
            "train.run_dir=".to_string() + d.join("run2").to_str().unwrap(),
            "eval.tasks=[{task = \"zeroshot\", data = \"/no/such/set\"}]".into(),
        ],
    ]
    .concat();
    let out = rookery(&["train", "configs/clip-tiny.toml"], &bad)
        .current_dir(root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("eval.tasks[0].data") && err.contains("/no/such/set"),
        "{err}"
    );
    assert!(
        !d.join("run2/metrics.jsonl").exists(),
        "no work before the refusal"
    );
}
