//! `[[eval.tasks]]` during training and `rookery eval --task` afterwards, on sets written in
//! CLIP_benchmark's layouts from the synthetic held-out shards: the figures land in
//! metrics.jsonl, the command gives the same numbers for the final checkpoint, and a set that
//! does not open is refused before any work.

mod common;
use common::{check, rookery, root, rows, sets, BIN};

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

/// `rookery eval --task zeroshot` on an HF SigLIP (rookery-eval's siglip_shared fixture) over an image
/// folder: the same predictions as the class embeddings built by hand from `rookery embed`'s
/// embeddings of the same images and prompts.
#[test]
fn zero_shot_of_an_hf_siglip_equals_its_embeddings_scored_by_hand() {
    let fx = root().join("crates/rookery-interop/fixtures");
    let weights = root().join("crates/rookery-eval/fixtures/siglip_shared");
    let tokenizer = fx.join("siglip_embed/tokenizer.json");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Words of the fixture tokenizer's small vocabulary, so the classes embed differently.
    let classes = ["red circle", "blue squares", "green triangle"];
    let templates = ["a {c}", "two {c} above"];
    let mut files = Vec::new();
    for i in 0..9u32 {
        let class = classes[i as usize % 3];
        let img = image::RgbImage::from_fn(24, 20, |x, y| {
            image::Rgb([
                (i * 29 + x * 7) as u8,
                (y * 11 + i * 3) as u8,
                (x * y + i) as u8,
            ])
        });
        let path = d.join("folder").join(class).join(format!("{i}.png"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(&path).unwrap();
        files.push((path, classes.iter().position(|c| *c == class).unwrap()));
    }
    files.sort(); // the folder's order: classes sorted, then files
    let tpl = d.join("templates.txt");
    std::fs::write(&tpl, templates.join("\n")).unwrap();
    let json = d.join("zs.json");
    let args = [
        "eval",
        weights.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
    ];
    let folder = d.join("folder");
    let more = [
        "--task",
        "zeroshot",
        "--data",
        folder.to_str().unwrap(),
        "--templates",
        tpl.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ];
    check(
        rookery(&[&args[..], &more[..]].concat(), &[])
            .output()
            .unwrap(),
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let got = report["report"]["metrics"]["acc1"].as_f64().unwrap();

    // By hand from `rookery embed`: the sorted classes, their prompts; ties to the first class,
    // as torch's argmax.
    let mut sorted = classes;
    sorted.sort();
    let prompts: Vec<String> = sorted
        .iter()
        .flat_map(|c| templates.map(|t| t.replace("{c}", c)))
        .collect();
    let emb = d.join("e.safetensors");
    let mut a = vec![
        "embed",
        "--weights",
        weights.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
        "--images",
    ];
    let paths: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
    a.extend(paths.iter().map(String::as_str));
    a.push("--texts");
    a.extend(prompts.iter().map(String::as_str));
    check(rookery(&a, &[]).output().unwrap());
    let (img, txt) = (rows(&emb, "image"), rows(&emb, "text"));
    let class_emb: Vec<Vec<f32>> = txt
        .chunks(2)
        .map(|p| {
            let m: Vec<f32> = (0..p[0].len()).map(|i| (p[0][i] + p[1][i]) / 2.0).collect();
            let n = m.iter().map(|x| x * x).sum::<f32>().sqrt();
            m.iter().map(|x| x / n).collect()
        })
        .collect();
    let right = img
        .iter()
        .zip(&files)
        .filter(|(e, (p, _))| {
            let scores: Vec<f32> = class_emb
                .iter()
                .map(|c| c.iter().zip(*e).map(|(a, b)| a * b).sum())
                .collect();
            let best = (0..3)
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                .unwrap();
            p.parent().unwrap().ends_with(sorted[best])
        })
        .count();
    let want = right as f64 / 9.0;
    assert!(
        (got - want).abs() < 1e-12,
        "rookery eval {got} vs by hand {want}"
    );
}
