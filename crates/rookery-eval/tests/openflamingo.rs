//! Few-shot evaluation in OpenFlamingo's layouts and prompts, with a stand-in model that
//! records what it was shown and answers from a table: the prompts are OpenFlamingo's, the
//! demonstrations are drawn as documented, and the scores are the metrics' on the cut answers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rookery_eval::openflamingo::data::{load_captions, load_vqa};
use rookery_eval::openflamingo::{
    evaluate, Example, FewShotConfig, FewShotTask, Generate, Prompts,
};
use serde_json::json;

/// Answers each prompt from `answers` (keyed by the query's image file name) and keeps what
/// it was given.
struct Oracle {
    answers: HashMap<String, String>,
    seen: Vec<(String, Vec<PathBuf>)>,
}

impl Generate for Oracle {
    fn generate(
        &mut self,
        prompts: &[String],
        images: &[Vec<PathBuf>],
    ) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for (p, files) in prompts.iter().zip(images) {
            self.seen.push((p.clone(), files.clone()));
            let query = files
                .last()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push(self.answers.get(&query).cloned().unwrap_or_default());
        }
        Ok(out)
    }
}

fn vqa_set(dir: &Path) -> Vec<Example> {
    let images = dir.join("val2014");
    std::fs::create_dir_all(&images).unwrap();
    let mut questions = Vec::new();
    let mut annotations = Vec::new();
    for i in 0..6u64 {
        let image_id = 1000 + i;
        std::fs::write(
            images.join(format!("COCO_val2014_{image_id:012}.jpg")),
            b"x",
        )
        .unwrap();
        questions.push(json!({"image_id": image_id, "question": format!("How many cats {i}?"), "question_id": 10 * i}));
        let answers: Vec<_> = (0..10)
            .map(|a| json!({"answer": if a < 7 { "two" } else { "2 cats" }, "answer_id": a + 1}))
            .collect();
        let kind = if i % 2 == 0 { "number" } else { "other" };
        annotations.push(json!({"question_id": 10 * i, "image_id": image_id, "answers": answers, "answer_type": kind}));
    }
    let q = dir.join("questions.json");
    let a = dir.join("annotations.json");
    std::fs::write(&q, json!({"questions": questions}).to_string()).unwrap();
    std::fs::write(&a, json!({"annotations": annotations}).to_string()).unwrap();
    load_vqa(&q, &a, &images).unwrap()
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn vqa_prompts_demos_and_scores_are_open_flamingos() {
    let dir = tempfile::tempdir().unwrap();
    let set = vqa_set(dir.path());
    assert_eq!(set.len(), 6);
    assert_eq!(set[2].question.as_deref(), Some("How many cats 2?"));
    assert_eq!(name(&set[2].image), "COCO_val2014_000000001002.jpg");
    // Queries 0 to 2 answered right (after the cut), 3 wrong, 4 and 5 with "2 cats" (3 of the
    // other annotators: 1).
    let mut answers = HashMap::new();
    for (i, a) in [
        "2 Question:How",
        "two, I think",
        "Two",
        "three",
        "2 cats",
        "2 cats",
    ]
    .iter()
    .enumerate()
    {
        answers.insert(name(&set[i].image), a.to_string());
    }
    let mut oracle = Oracle {
        answers,
        seen: Vec::new(),
    };
    let cfg = FewShotConfig {
        task: FewShotTask::Vqa,
        shots: vec![0, 2],
        seed: 7,
        batch: 4,
        prompts: Prompts::default(),
        rices: None,
    };
    let report = evaluate(&cfg, &set, &set, &mut oracle).unwrap();
    // "2": matches 7 of the annotators ("two" normalised), min(1, 7/3) or 6/3 when one of them
    // is left out: 1. "three": 0. "2 cats": 3 of them, 2 when one of those is left out:
    // (7 * 1 + 3 * 2/3) / 10 = 0.9.
    let want = (3.0 + 0.0 + 0.9 + 0.9) / 6.0;
    for k in ["0shot", "2shot"] {
        let got = report.scores[&format!("vqa_accuracy_{k}")];
        assert!((got - want).abs() < 1e-12, "{k}: {got} vs {want}");
    }
    let number = (1.0 + 1.0 + 0.9) / 3.0; // queries 0, 2, 4
    assert!((report.scores["vqa_accuracy_2shot_number"] - number).abs() < 1e-12);

    // 0 shots: two text-only demonstrations, the query's image alone.
    let (p, files) = &oracle.seen[0];
    assert_eq!(files.len(), 1);
    assert!(!p[..p.rfind("<image>").unwrap()].contains("<image>"), "{p}");
    assert_eq!(p.matches("<|endofchunk|>").count(), 2);
    assert!(
        p.ends_with("<image>Question:How many cats 0? Short answer:"),
        "{p}"
    );
    // 2 shots: two demonstrations with their images, never the query itself, as drawn again
    // with the same seed.
    let two_shot = &oracle.seen[6..];
    for (i, (p, files)) in two_shot.iter().enumerate() {
        assert_eq!(files.len(), 3);
        assert!(
            !files[..2].contains(&set[i].image),
            "query {i} shown as its own demonstration"
        );
        assert!(p.starts_with("<image>Question:How many cats"), "{p}");
        assert!(
            p.contains(" Short answer:two<|endofchunk|><image>Question:"),
            "{p}"
        );
        let demos =
            rookery_eval::openflamingo::draw_demos(&set, 2, &set[i].image, &[7, 2, i as u64])
                .unwrap();
        let want: Vec<PathBuf> = demos.iter().map(|&d| set[d].image.clone()).collect();
        assert_eq!(files[..2], want[..]);
    }
}

#[test]
fn captions_in_karpathys_and_cocos_layouts_score_cider() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("val2014")).unwrap();
    let caps = [
        ["a red bus on a street", "a bus driving down a road"],
        ["two cats on a sofa", "cats sleeping on a couch"],
        ["a man surfing a wave", "a surfer on a big wave"],
    ];
    let mut images = Vec::new();
    for (i, c) in caps.iter().enumerate() {
        std::fs::write(d.join(format!("val2014/img{i}.jpg")), b"x").unwrap();
        let split = if i == 2 { "train" } else { "test" };
        images.push(json!({"filepath": "val2014", "filename": format!("img{i}.jpg"), "split": split, "cocoid": i, "sentences": [{"raw": c[0]}, {"raw": c[1]}]}));
    }
    let karpathy = d.join("dataset_coco.json");
    std::fs::write(&karpathy, json!({"images": images}).to_string()).unwrap();
    let test = load_captions(&karpathy, d, "test").unwrap();
    let train = load_captions(&karpathy, d, "train").unwrap();
    assert_eq!((test.len(), train.len()), (2, 1));
    assert_eq!(test[1].answers, caps[1]);
    // COCO's own layout: the same captions, annotations apart.
    let coco = d.join("captions_val2014.json");
    let imgs: Vec<_> = (0..3)
        .map(|i| json!({"id": 40 + i, "file_name": format!("img{i}.jpg")}))
        .collect();
    let anns: Vec<_> = caps
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            c.iter()
                .map(move |t| json!({"image_id": 40 + i, "caption": t}))
        })
        .collect();
    std::fs::write(
        &coco,
        json!({"images": imgs, "annotations": anns}).to_string(),
    )
    .unwrap();
    let all = load_captions(&coco, &d.join("val2014"), "test").unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].answers, caps[0]);

    // A model that repeats each image's first caption, with OpenFlamingo's tail to cut.
    let answers: HashMap<String, String> = all
        .iter()
        .map(|e| (name(&e.image), format!("\"{}\"Output:junk", e.answers[0])))
        .collect();
    let mut oracle = Oracle {
        answers,
        seen: Vec::new(),
    };
    let cfg = FewShotConfig {
        task: FewShotTask::Captioning,
        shots: vec![1],
        seed: 0,
        batch: 2,
        prompts: Prompts::default(),
        rices: None,
    };
    let report = evaluate(&cfg, &all, &all, &mut oracle).unwrap();
    let cands: Vec<String> = all
        .iter()
        .map(|e| rookery_eval::cider::tokenize(&e.answers[0]))
        .collect();
    let refs: Vec<Vec<String>> = all
        .iter()
        .map(|e| {
            e.answers
                .iter()
                .map(|a| rookery_eval::cider::tokenize(a))
                .collect()
        })
        .collect();
    let (want, _) = rookery_eval::cider::cider_d(&cands, &refs);
    assert!(
        (report.scores["cider_1shot"] - want).abs() < 1e-12,
        "{:?} vs {want}",
        report.scores
    );
    let (p, _) = &oracle.seen[0];
    assert!(
        p.starts_with("<image>Output:") && p.ends_with("<|endofchunk|><image>Output:"),
        "{p}"
    );
}

#[test]
fn a_question_without_annotation_or_image_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("img")).unwrap();
    let q = d.join("q.json");
    let a = d.join("a.json");
    std::fs::write(
        &q,
        json!({"questions": [{"image_id": 5, "question": "why?", "question_id": 77}]}).to_string(),
    )
    .unwrap();
    std::fs::write(&a, json!({"annotations": []}).to_string()).unwrap();
    let e = format!("{:#}", load_vqa(&q, &a, &d.join("img")).unwrap_err());
    assert!(
        e.contains("q.json") && e.contains("77") && e.contains("a.json"),
        "{e}"
    );
    let answers = json!([{"answer": "because"}]);
    std::fs::write(
        &a,
        json!({"annotations": [{"question_id": 77, "answers": answers}]}).to_string(),
    )
    .unwrap();
    let e = format!("{:#}", load_vqa(&q, &a, &d.join("img")).unwrap_err());
    assert!(e.contains("image_id 5"), "{e}");
}

#[test]
fn rices_shows_the_most_similar_images_last_never_the_query_itself() {
    let dir = tempfile::tempdir().unwrap();
    let set = vqa_set(dir.path()); // 6 examples, each its own image
                                   // 2-d unit embeddings at angles: query 0 is example 0's image; by cosine to it, example 0
                                   // (itself, excluded) > 3 > 5 > 1 > ...
    let at = |deg: f32| vec![deg.to_radians().cos(), deg.to_radians().sin()];
    let support: Vec<Vec<f32>> = [0.0, 80.0, 170.0, 10.0, 120.0, 40.0].map(at).to_vec();
    let rices = rookery_eval::openflamingo::Rices::from_embeddings(support.clone(), support);
    assert_eq!(rices.demos(0, 3, &set, &set[0].image), vec![1, 5, 3]);
    let mut oracle = Oracle {
        answers: HashMap::new(),
        seen: Vec::new(),
    };
    let cfg = FewShotConfig {
        task: FewShotTask::Vqa,
        shots: vec![2],
        seed: 0,
        batch: 6,
        prompts: Prompts::default(),
        rices: Some(rices),
    };
    evaluate(&cfg, &set, &set, &mut oracle).unwrap();
    let (_, files) = &oracle.seen[0];
    assert_eq!(
        files[..],
        [
            set[5].image.clone(),
            set[3].image.clone(),
            set[0].image.clone()
        ]
    );
}
