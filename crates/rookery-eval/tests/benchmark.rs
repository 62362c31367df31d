//! CLIP_benchmark-style evaluation: the metric code against CLIP_benchmark's own numbers
//! (fixtures/generate.py), and whole evaluations on small sets written in its layouts, scored
//! again here by hand (plain loops, sorting, no code shared with the crate's scoring).

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::prelude::*;
use rookery_data::loader::{load_image, Mode};
use rookery_data::writer::write_shard;
use rookery_data::{DataConfig, TextTokenizer};
use rookery_eval::benchmark::{BenchmarkSet, Runner, Task};
use rookery_eval::embed::TextEncoder;
use rookery_eval::metrics::{classification, rank_of_best, retrieval};
use rookery_model::{Clip, ClipConfig};
use serde_json::Value;

type B = Flex;

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clip_benchmark_metrics.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn classification_scores_match_clip_benchmark() {
    let f = &fixture()["classification"];
    let logits = matrix(&f["logits"]);
    let target = indices(&f["target"]);
    let ranks: Vec<usize> = logits
        .iter()
        .zip(&target)
        .map(|(row, &t)| rank_of_best(row, &[t]).unwrap())
        .collect();
    let m = classification(&ranks, &target, f["classes"].as_u64().unwrap() as usize);
    for key in ["acc1", "acc5", "mean_per_class_recall"] {
        let want = f[key].as_f64().unwrap();
        assert!(
            (m[key] - want).abs() < 1e-12,
            "{key}: {} vs CLIP_benchmark {want}",
            m[key]
        );
    }
}

#[test]
fn retrieval_scores_match_clip_benchmark() {
    let f = &fixture()["retrieval"];
    let scores = matrix(&f["scores"]); // [texts, images]
    let owner = indices(&f["texts_image_index"]);
    let images = scores[0].len();
    let text_ranks: Vec<usize> = scores
        .iter()
        .zip(&owner)
        .map(|(row, &i)| rank_of_best(row, &[i]).unwrap())
        .collect();
    let image_ranks: Vec<usize> = (0..images)
        .map(|i| {
            let column: Vec<f32> = scores.iter().map(|r| r[i]).collect();
            let mine: Vec<usize> = (0..owner.len()).filter(|&t| owner[t] == i).collect();
            rank_of_best(&column, &mine).unwrap()
        })
        .collect();
    let m = retrieval(&text_ranks, &image_ranks, &indices(&f["ks"]));
    let want = f["metrics"].as_object().unwrap();
    assert_eq!(m.len(), want.len());
    for (key, w) in want {
        // CLIP_benchmark averages in float32.
        assert!(
            (m[key] - w.as_f64().unwrap()).abs() < 1e-6,
            "{key}: {} vs CLIP_benchmark {w}",
            m[key]
        );
    }
}

// --- whole evaluations on sets in CLIP_benchmark's layouts ---

const CLASSES: [&str; 4] = ["red square", "blue dot", "green", "yellow thing"];
const TEMPLATES: &str = "a photo of a {c}.\nan image of the {c}\n";

/// A small PNG whose colours depend on `seed`.
fn png(seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(20, 14, |x, y| {
        let v = (seed * 37 + x * 11 + y * 7) % 256;
        image::Rgb([v as u8, (v * 3 % 256) as u8, (255 - v) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn tokenizer(dir: &Path) -> TextTokenizer {
    let path = dir.join("tokenizer.json");
    let words =
        TEMPLATES.replace("{c}", &CLASSES.join(" ")) + " caption one two three four five six seven";
    rookery_data::tokenize::fit_word_level(std::iter::once(words), &path).unwrap();
    TextTokenizer::from_file(&path).unwrap()
}

fn model(tk: &TextTokenizer) -> Clip<B> {
    let mut cfg = ClipConfig {
        embed_dim: 16,
        ..Default::default()
    };
    cfg.vision.image_size = 32;
    cfg.vision.width = 32;
    cfg.vision.layers = 1;
    cfg.text.width = 32;
    cfg.text.layers = 1;
    cfg.text.context_length = 16;
    cfg.text.vocab_size = tk.vocab_size;
    cfg.text.eot_token = tk.eot as usize;
    cfg.init::<B>(&Default::default())
}

/// `task` on `set` with the test's CLIP, 4 images a batch.
fn run(
    m: &Clip<B>,
    tk: &TextTokenizer,
    task: Task,
    set: &BenchmarkSet,
    ks: &[usize],
) -> anyhow::Result<rookery_eval::benchmark::BenchmarkReport> {
    let dev = Default::default();
    let towers = TextEncoder {
        model: m,
        tokenizer: tk,
        ctx: 16,
        device: &dev,
    };
    let data = data_cfg();
    let runner = Runner::<B> {
        towers: &towers,
        data: &data,
        batch: 4,
        device: &dev,
    };
    runner.run(task, set, ks)
}

fn data_cfg() -> DataConfig {
    DataConfig {
        image_size: 32,
        context_length: 16,
        ..Default::default()
    }
}

/// Unit-length embedding of one text, tokenized into the whole context (no trimming).
fn text_emb(m: &Clip<B>, tk: &TextTokenizer, text: &str) -> Vec<f32> {
    let mut ids = vec![0i64; 16];
    tk.encode_into(text, &mut ids).unwrap();
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, 16]), &Default::default());
    m.encode_text(t).into_data().to_vec().unwrap()
}

fn image_emb(m: &Clip<B>, bytes: &[u8]) -> Vec<f32> {
    let px = load_image(&data_cfg(), Mode::Eval, "png", bytes, &[]).unwrap();
    let t = Tensor::<B, 4>::from_data(TensorData::new(px, [1, 3, 32, 32]), &Default::default());
    m.encode_image(t).into_data().to_vec().unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalized(v: Vec<f32>) -> Vec<f32> {
    let n = dot(&v, &v).sqrt();
    v.into_iter().map(|x| x / n).collect()
}

type Members = (String, Vec<(String, Vec<u8>)>);

/// Writes CLIP_benchmark's export layout: `dir/test/{0,1}.tar`, nshards, class names,
/// templates. Samples `(key, image seed, class)`; two bad ones are added (undecodable,
/// class out of range).
fn write_export(dir: &Path, samples: &[(String, u32, usize)]) {
    std::fs::create_dir_all(dir.join("test")).unwrap();
    let mut members: Vec<Members> = samples
        .iter()
        .map(|(k, s, c)| {
            (
                k.clone(),
                vec![
                    ("png".into(), png(*s)),
                    ("cls".into(), c.to_string().into_bytes()),
                ],
            )
        })
        .collect();
    let bad_image = vec![
        ("png".into(), b"not a png".to_vec()),
        ("cls".into(), b"1".to_vec()),
    ];
    members.insert(2, ("bad-image".into(), bad_image));
    members.push((
        "bad-class".into(),
        vec![("webp".into(), png(3)), ("cls".into(), b"7".to_vec())],
    ));
    let half = members.len() / 2;
    write_shard(&dir.join("test/0.tar"), members[..half].to_vec()).unwrap();
    write_shard(&dir.join("test/1.tar"), members[half..].to_vec()).unwrap();
    std::fs::write(dir.join("test/nshards.txt"), "2\n").unwrap();
    std::fs::write(dir.join("classnames.txt"), CLASSES.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("zeroshot_classification_templates.txt"), TEMPLATES).unwrap();
}

fn samples() -> Vec<(String, u32, usize)> {
    // Class 3 has no image: the mean per-class recall must leave it out.
    (0..13)
        .map(|i| (format!("s{i:07}"), 100 + i, (i as usize * 5) % 3))
        .collect()
}

#[test]
fn zero_shot_on_clip_benchmarks_export_layout_scores_as_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let tk = tokenizer(dir.path());
    let m = model(&tk);
    let set_dir = dir.path().join("toyset");
    write_export(&set_dir, &samples());
    let set = BenchmarkSet::open(set_dir.to_str().unwrap(), "test", None, None).unwrap();
    let report = run(&m, &tk, Task::Zeroshot, &set, &[1]).unwrap();
    assert_eq!(
        (report.images, report.skipped, report.dataset.as_str()),
        (13, 2, "toyset")
    );

    // By hand: each class the renormalised mean of its two prompts' embeddings.
    let class_emb: Vec<Vec<f32>> = CLASSES
        .iter()
        .map(|c| {
            let embs: Vec<Vec<f32>> = TEMPLATES
                .lines()
                .map(|t| text_emb(&m, &tk, &t.replace("{c}", c)))
                .collect();
            let mean = (0..16)
                .map(|d| embs.iter().map(|e| e[d]).sum::<f32>() / 2.0)
                .collect();
            normalized(mean)
        })
        .collect();
    let (mut right, mut per_class) = (0usize, [(0usize, 0usize); 4]);
    for (_, seed, class) in samples() {
        let img = image_emb(&m, &png(seed));
        let scores: Vec<f32> = class_emb.iter().map(|c| dot(&img, c)).collect();
        let best = (0..4)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        right += usize::from(best == class);
        per_class[class].0 += usize::from(best == class);
        per_class[class].1 += 1;
    }
    let acc1 = right as f64 / 13.0;
    let recalls: Vec<f64> = per_class
        .iter()
        .filter(|c| c.1 > 0)
        .map(|&(r, n)| r as f64 / n as f64)
        .collect();
    let mpcr = recalls.iter().sum::<f64>() / recalls.len() as f64;
    let got = &report.metrics;
    assert!((got["acc1"] - acc1).abs() < 1e-12, "{got:?} vs {acc1}");
    assert!(
        (got["mean_per_class_recall"] - mpcr).abs() < 1e-12,
        "{got:?} vs {mpcr}"
    );
    assert!(!got.contains_key("acc5"), "4 classes: no top-5");
    assert_eq!(report.texts, 8);

    // The same images as an image folder (class_name/*.png), names and templates given.
    let folder = dir.path().join("folder");
    for (k, seed, class) in samples() {
        let d = folder.join(format!("{class}-{}", CLASSES[class].replace(' ', "_")));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("{k}.png")), png(seed)).unwrap();
    }
    let names = dir.path().join("names.txt");
    std::fs::write(&names, CLASSES.join("\n")).unwrap();
    let tpl = set_dir.join("zeroshot_classification_templates.txt");
    let f = BenchmarkSet::open(folder.to_str().unwrap(), "test", Some(&names), Some(&tpl)).unwrap();
    let r = run(&m, &tk, Task::Zeroshot, &f, &[1]).unwrap();
    assert_eq!((r.images, r.skipped), (13, 0));
    assert_eq!(r.metrics, report.metrics);
    // Without names, the sorted folder names are the classes.
    let f = BenchmarkSet::open(folder.to_str().unwrap(), "test", None, Some(&tpl)).unwrap();
    assert_eq!(
        f.classnames.unwrap(),
        ["0-red_square", "1-blue_dot", "2-green"]
    );
}

#[test]
fn retrieval_with_several_captions_scores_as_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let tk = tokenizer(dir.path());
    let m = model(&tk);
    // Captions are all different, so no two score exactly the same (the stable sort below
    // would order ties by position, as the ranks do).
    let words = ["one", "two", "three", "four", "five", "six", "seven"];
    let mut items = Vec::new();
    for i in 0..9usize {
        let caps: Vec<String> = (0..(i % 3 + 1))
            .map(|j| format!("caption {} {} {}", words[i % 7], words[j], words[i / 7]))
            .collect();
        items.push((format!("s{i:07}"), 200 + i as u32, caps));
    }
    let members: Vec<Members> = items
        .iter()
        .map(|(k, s, caps)| {
            let txt = caps.join("\n").into_bytes();
            (
                k.clone(),
                vec![("png".into(), png(*s)), ("txt".into(), txt)],
            )
        })
        .chain([("no-caption".to_string(), vec![("png".to_string(), png(1))])])
        .collect();
    // Shards named by a brace spec, dataset_type.txt one directory up.
    std::fs::create_dir_all(dir.path().join("ret/test")).unwrap();
    write_shard(&dir.path().join("ret/test/0.tar"), members[..5].to_vec()).unwrap();
    write_shard(&dir.path().join("ret/test/1.tar"), members[5..].to_vec()).unwrap();
    std::fs::write(dir.path().join("ret/dataset_type.txt"), "retrieval\n").unwrap();
    let spec = format!("{}/ret/test/{{0..1}}.tar", dir.path().display());
    let set = BenchmarkSet::open(&spec, "test", None, None).unwrap();
    assert_eq!(set.dataset_type.as_deref(), Some("retrieval"));
    let err = run(&m, &tk, Task::Zeroshot, &set, &[1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("retrieval"), "{err}");
    let ks = [1, 2, 5];
    let report = run(&m, &tk, Task::Retrieval, &set, &ks).unwrap();
    assert_eq!((report.images, report.texts, report.skipped), (9, 18, 1));

    // By hand: sort every candidate list, find the first positive's position.
    let imgs: Vec<Vec<f32>> = items
        .iter()
        .map(|(_, s, _)| image_emb(&m, &png(*s)))
        .collect();
    let mut texts = Vec::new();
    for (i, (_, _, caps)) in items.iter().enumerate() {
        texts.extend(caps.iter().map(|c| (i, text_emb(&m, &tk, c))));
    }
    let first_positive = |mut s: Vec<(f32, bool)>| {
        s.sort_by(|a, b| b.0.total_cmp(&a.0));
        s.iter().position(|x| x.1).unwrap()
    };
    let t2i: Vec<usize> = texts
        .iter()
        .map(|(o, t)| {
            first_positive(
                imgs.iter()
                    .enumerate()
                    .map(|(i, im)| (dot(t, im), i == *o))
                    .collect(),
            )
        })
        .collect();
    let i2t: Vec<usize> = imgs
        .iter()
        .enumerate()
        .map(|(i, im)| first_positive(texts.iter().map(|(o, t)| (dot(t, im), *o == i)).collect()))
        .collect();
    for k in ks {
        let r = |v: &[usize]| v.iter().filter(|&&p| p < k).count() as f64 / v.len() as f64;
        let got_i = report.metrics[&format!("image_retrieval_recall@{k}")];
        let got_t = report.metrics[&format!("text_retrieval_recall@{k}")];
        assert!(
            (got_i - r(&t2i)).abs() < 1e-12,
            "image recall@{k}: {got_i} vs {}",
            r(&t2i)
        );
        assert!(
            (got_t - r(&i2t)).abs() < 1e-12,
            "text recall@{k}: {got_t} vs {}",
            r(&i2t)
        );
    }
}

#[test]
fn bad_sets_are_refused_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("set");
    write_export(&d, &samples());
    let open = |c: Option<&Path>, t: Option<&Path>| {
        let r = BenchmarkSet::open(d.to_str().unwrap(), "test", c, t);
        format!("{:#}", r.map(|_| ()).unwrap_err())
    };
    let bad_t: PathBuf = dir.path().join("t.txt");
    std::fs::write(&bad_t, "a photo of a {c}.\na photo of a thing\n").unwrap();
    let e = open(None, Some(&bad_t));
    assert!(
        e.contains("t.txt") && e.contains("line 2") && e.contains("{c}"),
        "{e}"
    );
    let bad_c = dir.path().join("c.txt");
    std::fs::write(&bad_c, "cat\n\ndog\n").unwrap();
    let e = open(Some(&bad_c), None);
    assert!(e.contains("c.txt") && e.contains("line 2"), "{e}");
    std::fs::write(d.join("test/nshards.txt"), "3\n").unwrap();
    let e = open(None, None);
    assert!(e.contains("nshards.txt") && e.contains("2.tar"), "{e}");
    let e = BenchmarkSet::open("/nonexistent/set", "test", None, None).unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent/set"), "{e:#}");
}
