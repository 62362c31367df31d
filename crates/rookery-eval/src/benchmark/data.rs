//! Evaluation sets in the layouts CLIP_benchmark reads, found from one `--data` argument.
//!
//! - CLIP_benchmark's webdataset export: `DIR/{split}/nshards.txt` and `DIR/{split}/{0..n-1}.tar`,
//!   with `classnames.txt`, `zeroshot_classification_templates.txt` and `dataset_type.txt`
//!   (`retrieval` or absent) in `DIR`. A sample is an image (`webp`, `png`, `jpg`, `jpeg`) with
//!   `cls` (its class index, as text) or `txt` (its captions, one a line).
//! - Any shard spec rookery reads (brace ranges, a directory of `.tar`, a list file); the three
//!   text files are looked for beside the first shard, then one directory up (where the export
//!   puts them, above `test/`).
//! - An image folder `DIR/class_name/*.jpg`: classes are the sub-directory names in sorted order
//!   (torchvision's `ImageFolder`), displayed as `classnames.txt` in `DIR` says if present.
//!
//! `--classnames` and `--templates` files override what is found.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rookery_data::wds::RawSample;

/// The image members a sample may hold, in the order CLIP_benchmark tries them.
pub const IMAGE_EXTS: [&str; 4] = ["webp", "png", "jpg", "jpeg"];

/// Where the samples are.
#[derive(Clone, Debug)]
pub enum Source {
    /// Webdataset shards.
    Shards(Vec<String>),
    /// Image files and their class indices.
    Folder(Vec<(PathBuf, usize)>),
}

/// An evaluation set: its samples, and the class names, templates and type beside them.
#[derive(Clone, Debug)]
pub struct BenchmarkSet {
    /// A short name for reports: the directory's name.
    pub name: String,
    pub source: Source,
    pub classnames: Option<Vec<String>>,
    pub templates: Option<Vec<String>>,
    /// `dataset_type.txt`'s word (`retrieval`, `classification`, `multilabel`) when present.
    pub dataset_type: Option<String>,
}

impl BenchmarkSet {
    /// Finds the set `data` names (see the module docs); `split` picks CLIP_benchmark's split
    /// directory.
    pub fn open(
        data: &str,
        split: &str,
        classnames: Option<&Path>,
        templates: Option<&Path>,
    ) -> Result<Self> {
        let dir = Path::new(data);
        let (source, meta_dirs) = if dir.join(split).join("nshards.txt").is_file() {
            (
                Source::Shards(export_shards(dir, split)?),
                vec![dir.to_path_buf()],
            )
        } else if dir.is_dir() && has_class_folders(dir)? {
            (Source::Folder(folder_images(dir)?), vec![dir.to_path_buf()])
        } else {
            let shards = rookery_data::expand_shards(data)
                .with_context(|| format!("--data {data}: neither CLIP_benchmark's layout ({data}/{split}/nshards.txt), an image folder nor shards"))?;
            let first = shard_dir(&shards[0]);
            let up = first.parent().map(Path::to_path_buf);
            (
                Source::Shards(shards),
                [Some(first), up].into_iter().flatten().collect(),
            )
        };
        let find = |given: Option<&Path>, name: &str| -> Option<PathBuf> {
            given
                .map(Path::to_path_buf)
                .or_else(|| meta_dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
        };
        let mut classnames = match find(classnames, "classnames.txt") {
            Some(p) => Some(read_lines(&p, "class name")?),
            None => None,
        };
        if let (Source::Folder(_), None) = (&source, &classnames) {
            classnames = Some(folder_classes(dir)?);
        }
        let templates = match find(templates, "zeroshot_classification_templates.txt") {
            Some(p) => Some(read_templates(&p)?),
            None => None,
        };
        let dataset_type = match find(None, "dataset_type.txt") {
            Some(p) => Some(
                std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .trim()
                    .to_lowercase(),
            ),
            None => None,
        };
        let name = set_name(&meta_dirs, split).unwrap_or_else(|| data.to_string());
        Ok(BenchmarkSet {
            name,
            source,
            classnames,
            templates,
            dataset_type,
        })
    }
}

/// The set's directory name for reports (the split directory's parent for shards in `test/`).
fn set_name(meta_dirs: &[PathBuf], split: &str) -> Option<String> {
    let names: Vec<String> = meta_dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    names
        .iter()
        .find(|n| *n != split)
        .or(names.first())
        .cloned()
}

/// The image member of a shard sample: its extension and bytes.
pub fn image_of(s: &RawSample) -> Option<(&'static str, &[u8])> {
    IMAGE_EXTS
        .iter()
        .find_map(|&ext| s.get(ext).map(|b| (ext, b)))
}

/// `DIR/{split}/{0..n-1}.tar` as `nshards.txt` gives n.
fn export_shards(dir: &Path, split: &str) -> Result<Vec<String>> {
    let f = dir.join(split).join("nshards.txt");
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    let n: usize = text
        .trim()
        .parse()
        .with_context(|| format!("{}: {:?} is not a shard count", f.display(), text.trim()))?;
    let shards: Vec<String> = (0..n)
        .map(|i| {
            dir.join(split)
                .join(format!("{i}.tar"))
                .display()
                .to_string()
        })
        .collect();
    if let Some(missing) = shards.iter().find(|s| !Path::new(s).is_file()) {
        bail!("{}: says {n} shards, but {missing} is missing", f.display());
    }
    Ok(shards)
}

fn shard_dir(shard: &str) -> PathBuf {
    Path::new(shard)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Whether `dir` has a sub-directory holding an image file.
fn has_class_folders(dir: &Path) -> Result<bool> {
    Ok(!folder_images(dir).unwrap_or_default().is_empty())
}

/// The class sub-directories of `dir`, sorted.
fn folder_classes(dir: &Path) -> Result<Vec<String>> {
    let mut classes = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            classes.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    classes.sort();
    Ok(classes)
}

/// Every image file under `dir/class/`, sorted, with its class index.
fn folder_images(dir: &Path) -> Result<Vec<(PathBuf, usize)>> {
    let mut out = Vec::new();
    for (c, class) in folder_classes(dir)?.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(class))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        files.sort();
        out.extend(files.into_iter().map(|f| (f, c)));
    }
    Ok(out)
}

/// The lines of `path`, trimmed; a blank line is refused (it would shift every class after it).
fn read_lines(path: &Path, what: &str) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    if let Some(i) = lines.iter().position(String::is_empty) {
        bail!("{}: line {} is blank, not a {what}", path.display(), i + 1);
    }
    if lines.is_empty() {
        bail!("{}: no {what} in it", path.display());
    }
    Ok(lines)
}

/// Templates, each with `{c}` where the class name goes.
fn read_templates(path: &Path) -> Result<Vec<String>> {
    let lines = read_lines(path, "template")?;
    if let Some(i) = lines.iter().position(|t| !t.contains("{c}")) {
        bail!(
            "{}: line {} ({:?}) has no {{c}} for the class name",
            path.display(),
            i + 1,
            lines[i]
        );
    }
    Ok(lines)
}

/// A template with the class name in place of `{c}`, as `template.format(c=name)`.
pub fn fill(template: &str, class: &str) -> String {
    template.replace("{c}", class)
}
