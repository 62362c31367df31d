//! Few-shot evaluation sets in the layouts OpenFlamingo's evaluation reads.
//!
//! - **VQA** (VQAv2, OK-VQA, VizWiz, TextVQA): a questions file `{"questions": [{"image_id",
//!   "question", "question_id"}]}` and an annotations file `{"annotations": [{"question_id",
//!   "answers": [{"answer"}], "answer_type"}]}`, images in a directory. An `image_id` that is a
//!   file name is taken as is (VizWiz); a number is the image whose file name ends in it, COCO's
//!   `COCO_val2014_000000123456.jpg` or TextVQA's `123456.jpg`. A directory in place of an
//!   image is a video, its image files the frames in name order.
//! - **Captions**: Karpathy's `dataset_coco.json` (`{"images": [{"filepath", "filename",
//!   "split", "sentences": [{"raw"}]}]}`, images at `DIR/filepath/filename`, one split taken),
//!   or COCO's own `captions_*.json` (`{"images": [{"id", "file_name"}], "annotations":
//!   [{"image_id", "caption"}]}`, images at `DIR/file_name`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// One evaluation example: an image, a question (VQA) and the reference answers or captions.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub id: String,
    pub image: PathBuf,
    pub question: Option<String>,
    /// Human answers (VQA: usually ten) or reference captions.
    pub answers: Vec<String>,
    /// VQA's `answer_type` (`yes/no`, `number`, `other`), for per-type accuracy.
    pub kind: Option<String>,
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", path.display()))
}

fn array<'a>(v: &'a Value, key: &str, path: &Path) -> Result<&'a Vec<Value>> {
    v[key]
        .as_array()
        .with_context(|| format!("{}: no `{key}` list", path.display()))
}

/// A VQA set: every question with its annotation and image.
pub fn load_vqa(questions: &Path, annotations: &Path, images: &Path) -> Result<Vec<Example>> {
    let (q, a) = (read_json(questions)?, read_json(annotations)?);
    let mut ann: HashMap<String, &Value> = HashMap::new();
    for x in array(&a, "annotations", annotations)? {
        ann.insert(x["question_id"].to_string(), x);
    }
    let by_number = ImageIndex::of(images)?;
    let mut out = Vec::new();
    for (i, x) in array(&q, "questions", questions)?.iter().enumerate() {
        let qid = x["question_id"].to_string();
        let Some(a) = ann.get(&qid) else {
            bail!(
                "{}: question {qid} has no annotation in {}",
                questions.display(),
                annotations.display()
            );
        };
        let question = x["question"].as_str().with_context(|| {
            format!(
                "{}: question #{i} has no `question` text",
                questions.display()
            )
        })?;
        let answers: Vec<String> = a["answers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x["answer"].as_str().map(str::to_string))
            .collect();
        if answers.is_empty() {
            bail!("{}: question {qid} has no answers", annotations.display());
        }
        out.push(Example {
            id: qid,
            image: by_number.find(&x["image_id"], images)?,
            question: Some(question.to_string()),
            answers,
            kind: a["answer_type"].as_str().map(str::to_string),
        });
    }
    Ok(out)
}

/// A captions set (either layout, see the module docs); `split` picks Karpathy's split.
pub fn load_captions(path: &Path, images: &Path, split: &str) -> Result<Vec<Example>> {
    let v = read_json(path)?;
    let list = array(&v, "images", path)?;
    let mut out = Vec::new();
    if v.get("annotations").is_none() {
        // Karpathy: sentences inside each image.
        for x in list {
            let s = x["split"].as_str().unwrap_or_default();
            if s != split && !(split == "train" && s == "restval") {
                continue;
            }
            let file = Path::new(x["filepath"].as_str().unwrap_or(""))
                .join(x["filename"].as_str().unwrap_or(""));
            let answers: Vec<String> = x["sentences"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["raw"].as_str().map(str::to_string))
                .collect();
            let id = x
                .get("cocoid")
                .or(x.get("imgid"))
                .map(Value::to_string)
                .unwrap_or_default();
            out.push(caption_example(id, images.join(file), answers, path)?);
        }
        if out.is_empty() {
            bail!("{}: no image in split {split:?}", path.display());
        }
        return Ok(out);
    }
    let mut caps: HashMap<String, Vec<String>> = HashMap::new();
    for a in array(&v, "annotations", path)? {
        if let Some(c) = a["caption"].as_str() {
            caps.entry(a["image_id"].to_string())
                .or_default()
                .push(c.to_string());
        }
    }
    for x in list {
        let id = x["id"].to_string();
        let file = x["file_name"].as_str().unwrap_or_default();
        let answers = caps.remove(&id).unwrap_or_default();
        out.push(caption_example(id, images.join(file), answers, path)?);
    }
    Ok(out)
}

fn caption_example(
    id: String,
    image: PathBuf,
    answers: Vec<String>,
    path: &Path,
) -> Result<Example> {
    if answers.is_empty() {
        bail!("{}: image {id} has no caption", path.display());
    }
    Ok(Example {
        id,
        image,
        question: None,
        answers,
        kind: None,
    })
}

/// A medium's files: an image file alone, or a video's frames, the image files of a directory
/// in name order.
pub fn media_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut frames: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("listing {}", path.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", path.display()))?;
    frames.retain(|p| {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        rookery_data::media::is_image(&ext.to_ascii_lowercase())
    });
    frames.sort();
    if frames.is_empty() {
        bail!(
            "{}: a video directory without frames (image files)",
            path.display()
        );
    }
    Ok(frames)
}

/// The images (or videos: directories of frames) of a directory by the number their name ends
/// in.
struct ImageIndex(HashMap<u64, PathBuf>);

impl ImageIndex {
    fn of(dir: &Path) -> Result<Self> {
        let mut map = HashMap::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let p = e?.path();
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let digits: String = stem
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(n) = digits.chars().rev().collect::<String>().parse::<u64>() {
                map.insert(n, p);
            }
        }
        Ok(ImageIndex(map))
    }

    fn find(&self, id: &Value, dir: &Path) -> Result<PathBuf> {
        let found = match id {
            Value::String(name) => Some(dir.join(name)).filter(|p| p.exists()),
            other => other.as_u64().and_then(|n| self.0.get(&n).cloned()),
        };
        found.with_context(|| format!("{}: no image for image_id {id}", dir.display()))
    }
}
