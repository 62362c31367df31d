//! Interleaved documents (MMC4 and OBELICS layouts) and image-text pairs turned into
//! Flamingo training sequences the way OpenFlamingo builds them:
//!
//! `<sot> text… <image> text… <|endofchunk|> <image> text… <|endofchunk|> <eot> <pad>…`
//!
//! An `<image>` token stands where each image goes, `<|endofchunk|>` closes the text that
//! follows an image; images matched with a similarity under `min_sim` are dropped, at most
//! `max_images` are kept, and the sequence is cut at `max_tokens`. The loss falls only on text:
//! never on padding, `<sot>`, `<image>`, the text after an `<|endofchunk|>` up to the next
//! image, nor (when `mask_before_first_image`) the text before the first image.
//! `<|endofchunk|>` itself is a target, so the model learns where a chunk ends.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tokenize::TextTokenizer;

/// `[data.interleaved]`: how documents become sequences.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SequenceConfig {
    /// Tokens per sequence (OpenFlamingo: 256 for MMC4, 32 for pairs).
    pub max_tokens: usize,
    /// Images kept per sequence; later ones are dropped (their text stays).
    pub max_images: usize,
    /// MMC4 images matched to their sentence with a lower similarity are dropped.
    pub min_sim: f64,
    /// No loss on the text before the first image.
    pub mask_before_first_image: bool,
    /// Loss weight of the caption tokens of image-text pairs mixed into the stream (their
    /// shards listed in `data.train` beside the documents'), relative to documents' tokens.
    pub pairs_weight: f64,
    /// Frames kept per video (evenly sampled, first and last kept); 1 reads every video as
    /// its first frame. At most the resampler's `max_frames` (its time embeddings).
    pub max_frames: usize,
    /// A video of more frames than this is refused (skipped and counted), not sampled.
    pub max_video_frames: usize,
}

impl Default for SequenceConfig {
    fn default() -> Self {
        SequenceConfig {
            max_tokens: 256,
            max_images: 6,
            min_sim: 0.24,
            mask_before_first_image: true,
            pairs_weight: 1.0,
            max_frames: 1,
            max_video_frames: 256,
        }
    }
}

impl SequenceConfig {
    /// The checks of `[data.interleaved]` (`(key, reason)`), for the stages that read pages.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_tokens < 2 {
            return Err((
                "data.interleaved.max_tokens".into(),
                "must be at least 2".into(),
            ));
        }
        if self.pairs_weight.is_nan() || self.pairs_weight < 0.0 {
            return Err((
                "data.interleaved.pairs_weight".into(),
                "must be >= 0".into(),
            ));
        }
        if self.max_frames == 0 || self.max_video_frames < self.max_frames {
            return Err((
                "data.interleaved.max_frames".into(),
                format!(
                    "must be at least 1 and at most max_video_frames ({})",
                    self.max_video_frames
                ),
            ));
        }
        Ok(())
    }
}

use crate::media::{frame_members, is_frame, is_image, listed_frames, sample_frames};
pub use crate::media::{ImageRef, Medium};

/// A document as an ordered list of text and media (images and videos).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Text(String),
    Media(Medium),
}

impl Item {
    /// An image: a medium of one frame.
    pub fn image(r: ImageRef) -> Self {
        Item::Media(Medium::image(r))
    }
}

/// Why a document was skipped. Each names what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DocError {
    #[error("not a JSON document: {0}")]
    NotJson(String),
    #[error("field `{0}` is missing or has the wrong type")]
    Field(&'static str),
    #[error("image {image}: matched_text_index {index} is out of range (text_list has {len})")]
    IndexOutOfRange {
        image: usize,
        index: usize,
        len: usize,
    },
    #[error("image {0:?} is neither a member of the sample nor inline base64")]
    MissingImage(String),
    #[error("{0}")]
    Video(String),
    #[error("position {0}: exactly one of texts[i] and images[i] must be non-null")]
    BadPosition(usize),
    #[error("the document has no text")]
    EmptyText,
    #[error("no image left (all under min_sim, or none in the document)")]
    NoImages,
    #[error("every token is masked: nothing to learn from")]
    NoTargets,
}

/// MMC4: `text_list` and `image_info[{image_name, matched_text_index, matched_sim,
/// image_base64?}]`; each image goes before the sentence it is matched to. `members` are the
/// extensions of the sample's other members (where `image_name`s are looked up).
pub fn parse_mmc4(
    doc: &Value,
    members: &BTreeSet<String>,
    min_sim: f64,
) -> Result<Vec<Item>, DocError> {
    let texts = doc["text_list"]
        .as_array()
        .ok_or(DocError::Field("text_list"))?;
    let texts: Vec<&str> = texts
        .iter()
        .map(|t| t.as_str().ok_or(DocError::Field("text_list")))
        .collect::<Result<_, _>>()?;
    let info = doc["image_info"]
        .as_array()
        .ok_or(DocError::Field("image_info"))?;
    let mut before: Vec<Vec<Medium>> = vec![Vec::new(); texts.len()];
    for (i, im) in info.iter().enumerate() {
        let index = im["matched_text_index"]
            .as_u64()
            .ok_or(DocError::Field("image_info.matched_text_index"))? as usize;
        if index >= texts.len() {
            return Err(DocError::IndexOutOfRange {
                image: i,
                index,
                len: texts.len(),
            });
        }
        let sim = im["matched_sim"].as_f64().unwrap_or(1.0);
        if sim < min_sim {
            continue;
        }
        before[index].push(mmc4_medium(im, i, members)?);
    }
    let mut items = Vec::new();
    for (text, media) in texts.iter().zip(before) {
        items.extend(media.into_iter().map(Item::Media));
        items.push(Item::Text(text.to_string()));
    }
    Ok(items)
}

/// An `image_info` entry's medium: `frames` (a video's members), `image_base64`, or
/// `image_name`: a member, or a video whose frames are `{image_name}.frameNNN.jpg`.
pub fn mmc4_medium(im: &Value, i: usize, members: &BTreeSet<String>) -> Result<Medium, DocError> {
    let name = im["image_name"].as_str();
    if let Some(list) = im.get("frames") {
        let list = list
            .as_array()
            .ok_or(DocError::Field("image_info.frames"))?;
        let video = name.map_or_else(|| format!("image_info[{i}]"), str::to_string);
        return listed_frames(list, members, &video).map_err(DocError::Video);
    }
    if let Some(b) = im["image_base64"].as_str() {
        return Ok(Medium::image(ImageRef::Base64(b.to_string())));
    }
    let name = name.ok_or(DocError::Field("image_info.image_name"))?;
    named_medium(name, members).ok_or_else(|| DocError::MissingImage(name.to_string()))?
}

/// The member `name`, or the video whose frames are `{name}.frame000.jpg`, ... (`None`:
/// neither is in the sample).
fn named_medium(name: &str, members: &BTreeSet<String>) -> Option<Result<Medium, DocError>> {
    if members.contains(name) {
        return Some(Ok(Medium::image(ImageRef::Member(name.to_string()))));
    }
    let frames = frame_members(members, &format!("{name}."), name)?;
    Some(
        frames
            .map(|f| Medium {
                frames: f.into_iter().map(ImageRef::Member).collect(),
            })
            .map_err(|e| DocError::Video(e.to_string())),
    )
}

/// OBELICS: parallel `texts` / `images` lists, exactly one non-null per position. An image
/// entry names a member of the sample (its extension) or a video (`{name}.frameNNN.jpg`
/// members), else the k-th image member that is no video frame (sorted) is taken for the k-th
/// image; a list names a video's frames.
pub fn parse_obelics(doc: &Value, members: &BTreeSet<String>) -> Result<Vec<Item>, DocError> {
    let texts = doc["texts"].as_array().ok_or(DocError::Field("texts"))?;
    let images = doc["images"].as_array().ok_or(DocError::Field("images"))?;
    if texts.len() != images.len() {
        return Err(DocError::Field("texts/images (lengths differ)"));
    }
    let image_members: Vec<&String> = members
        .iter()
        .filter(|m| is_image(m) && !is_frame(m))
        .collect();
    let mut items = Vec::new();
    let mut k = 0;
    for (i, (t, im)) in texts.iter().zip(images).enumerate() {
        match (t.as_str(), im) {
            (Some(t), Value::Null) => items.push(Item::Text(t.to_string())),
            (None, Value::String(name)) if t.is_null() => {
                let medium = match named_medium(name, members) {
                    Some(m) => m?,
                    None => {
                        let member = image_members
                            .get(k)
                            .ok_or_else(|| DocError::MissingImage(name.clone()))?;
                        k += 1;
                        Medium::image(ImageRef::Member(member.to_string()))
                    }
                };
                items.push(Item::Media(medium));
            }
            (None, Value::Array(list)) if t.is_null() => {
                let medium = listed_frames(list, members, &format!("images[{i}]"))
                    .map_err(DocError::Video)?;
                items.push(Item::Media(medium));
            }
            _ => return Err(DocError::BadPosition(i)),
        }
    }
    Ok(items)
}

/// A training sequence: `tokens` and, per position, whether it is a loss target.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub tokens: Vec<i64>,
    pub targets: Vec<bool>,
    /// The media whose `<image>` tokens are in `tokens`, in order (videos with at most
    /// `max_frames` frames).
    pub images: Vec<Medium>,
}

/// Special token ids a sequence needs.
#[derive(Clone, Copy, Debug)]
pub struct Specials {
    pub sot: i64,
    pub eot: i64,
    pub pad: i64,
    pub image: i64,
    pub eoc: i64,
}

impl Specials {
    pub fn of(tk: &TextTokenizer) -> Result<Self, String> {
        let get = |t: &str| {
            tk.token_id(t)
                .map(|i| i as i64)
                .ok_or_else(|| format!("the tokenizer has no {t} token"))
        };
        Ok(Specials {
            sot: tk.sot as i64,
            eot: tk.eot as i64,
            pad: tk.pad as i64,
            image: get("<image>")?,
            eoc: get("<|endofchunk|>")?,
        })
    }
}

/// Builds the training sequence of a document's `items`.
pub fn build_sequence(
    items: &[Item],
    tk: &TextTokenizer,
    sp: Specials,
    cfg: &SequenceConfig,
) -> Result<Sequence, DocError> {
    if !items
        .iter()
        .any(|i| matches!(i, Item::Text(t) if !t.trim().is_empty()))
    {
        return Err(DocError::EmptyText);
    }
    let mut tokens = vec![sp.sot];
    let mut images = Vec::new();
    for item in items {
        match item {
            Item::Media(m) if images.len() < cfg.max_images => {
                let name = format!("medium {}", images.len());
                let m = sample_frames(m, cfg.max_frames, cfg.max_video_frames, &name)
                    .map_err(|e| DocError::Video(e.to_string()))?;
                if !images.is_empty() {
                    tokens.push(sp.eoc);
                }
                tokens.push(sp.image);
                images.push(m);
            }
            Item::Media(_) => {}
            Item::Text(t) => {
                let ids = tk.ids(t).map_err(|_| DocError::EmptyText)?;
                tokens.extend(ids.into_iter().map(|i| i as i64));
            }
        }
    }
    if images.is_empty() {
        return Err(DocError::NoImages);
    }
    tokens.extend([sp.eoc, sp.eot]);
    tokens.truncate(cfg.max_tokens);
    // An <image> the budget left without any text after it teaches nothing.
    while tokens.last() == Some(&sp.image) {
        tokens.pop();
    }
    let kept = tokens.iter().filter(|&&t| t == sp.image).count();
    images.truncate(kept);
    if kept == 0 {
        return Err(DocError::NoImages);
    }
    let targets = targets(&tokens, sp, cfg.mask_before_first_image);
    tokens.resize(cfg.max_tokens, sp.pad);
    let mut targets = targets;
    targets.resize(cfg.max_tokens, false);
    if !targets.iter().any(|&t| t) {
        return Err(DocError::NoTargets);
    }
    Ok(Sequence {
        tokens,
        targets,
        images,
    })
}

/// An image-text pair as a one-image sequence: `<sot><image>caption<|endofchunk|><eot>`.
pub fn pair_sequence(
    caption: &str,
    tk: &TextTokenizer,
    sp: Specials,
    max_tokens: usize,
) -> Result<Sequence, DocError> {
    let items = [
        Item::image(ImageRef::Member(String::new())),
        Item::Text(caption.into()),
    ];
    let cfg = SequenceConfig {
        max_tokens,
        max_images: 1,
        ..Default::default()
    };
    build_sequence(&items, tk, sp, &cfg)
}

/// Which of `tokens` (unpadded) the loss falls on.
fn targets(tokens: &[i64], sp: Specials, mask_before_first_image: bool) -> Vec<bool> {
    let mut seen_image = false;
    let mut after_eoc = false;
    tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if t == sp.image {
                (seen_image, after_eoc) = (true, false);
                return false;
            }
            // The start token by position: a GPT-2-style tokenizer's start token is its end
            // token, which is a target at the end.
            let start = i == 0 && t == sp.sot;
            let masked =
                start || t == sp.pad || after_eoc || (mask_before_first_image && !seen_image);
            if t == sp.eoc {
                after_eoc = true;
            }
            !masked
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tokenizer(dir: &std::path::Path) -> TextTokenizer {
        let path = dir.join("tok.json");
        let corpus = [
            "intro text here",
            "a red circle",
            "two blue squares",
            "q: how many? a: two",
        ];
        crate::tokenize::fit_word_level(corpus.into_iter(), &path).unwrap();
        TextTokenizer::from_file(&path).unwrap()
    }

    fn members(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn words(tk: &TextTokenizer, sp: Specials, s: &Sequence) -> Vec<String> {
        s.tokens
            .iter()
            .zip(&s.targets)
            .filter(|(&t, _)| t != sp.pad)
            .map(|(&t, &y)| {
                let w = match t {
                    t if t == sp.image => "<image>".to_string(),
                    t if t == sp.eoc => "<eoc>".to_string(),
                    t if t == sp.sot => "<sot>".to_string(),
                    t if t == sp.eot => "<eot>".to_string(),
                    t => tk.decode(&[t as u32]),
                };
                if y {
                    format!("{w}*")
                } else {
                    w
                }
            })
            .collect()
    }

    #[test]
    fn mmc4_document_becomes_a_masked_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let tk = tokenizer(dir.path());
        let sp = Specials::of(&tk).unwrap();
        let doc = json!({
            "text_list": ["intro text", "a red circle", "two blue squares"],
            "image_info": [
                {"image_name": "img0.jpg", "matched_text_index": 1, "matched_sim": 0.3},
                {"image_name": "img1.jpg", "matched_text_index": 2, "matched_sim": 0.1},
                {"image_name": "img2.png", "matched_text_index": 2, "matched_sim": 0.3}
            ]
        });
        let items = parse_mmc4(
            &doc,
            &members(&["json", "img0.jpg", "img1.jpg", "img2.png"]),
            0.24,
        )
        .unwrap();
        let s = build_sequence(
            &items,
            &tk,
            sp,
            &SequenceConfig {
                max_tokens: 16,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            s.images,
            vec![
                Medium::image(ImageRef::Member("img0.jpg".into())),
                Medium::image(ImageRef::Member("img2.png".into()))
            ]
        );
        // * marks loss targets: nothing before the first image, nothing after an <eoc> until the
        // next <image>, never <image> or padding; <eoc> itself is a target.
        assert_eq!(
            words(&tk, sp, &s).join(" "),
            "<sot> intro text <image> a* red* circle* <eoc>* <image> two* blue* squares* <eoc>* <eot>"
        );
        assert_eq!(s.tokens.len(), 16);
        let unmasked = SequenceConfig {
            max_tokens: 16,
            mask_before_first_image: false,
            ..Default::default()
        };
        let s = build_sequence(&items, &tk, sp, &unmasked).unwrap();
        assert!(words(&tk, sp, &s)
            .join(" ")
            .starts_with("<sot> intro* text* <image>"));
    }

    #[test]
    fn image_cap_and_token_budget() {
        let dir = tempfile::tempdir().unwrap();
        let tk = tokenizer(dir.path());
        let sp = Specials::of(&tk).unwrap();
        let img = |n: &str| Item::image(ImageRef::Member(n.into()));
        let items = vec![
            img("a"),
            Item::Text("a red circle".into()),
            img("b"),
            Item::Text("two blue squares".into()),
        ];
        let one = SequenceConfig {
            max_images: 1,
            max_tokens: 32,
            ..Default::default()
        };
        let s = build_sequence(&items, &tk, sp, &one).unwrap();
        assert_eq!(s.images.len(), 1);
        assert_eq!(s.tokens.iter().filter(|&&t| t == sp.image).count(), 1);
        // A budget that cuts the second image off drops it from the images too.
        let short = SequenceConfig {
            max_tokens: 7,
            ..Default::default()
        };
        let s = build_sequence(&items, &tk, sp, &short).unwrap();
        assert_eq!((s.tokens.len(), s.images.len()), (7, 1));
    }

    #[test]
    fn obelics_document_and_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let tk = tokenizer(dir.path());
        let sp = Specials::of(&tk).unwrap();
        let doc = json!({"texts": ["intro text", null, "a red circle"], "images": [null, "https://x/y.jpg", null]});
        let items = parse_obelics(&doc, &members(&["json", "0.jpg"])).unwrap();
        assert_eq!(items[1], Item::image(ImageRef::Member("0.jpg".into())));
        let s = build_sequence(&items, &tk, sp, &SequenceConfig::default()).unwrap();
        assert_eq!(
            words(&tk, sp, &s).join(" "),
            "<sot> intro text <image> a* red* circle* <eoc>* <eot>"
        );
        let p = pair_sequence("two blue squares", &tk, sp, 8).unwrap();
        assert_eq!(
            words(&tk, sp, &p).join(" "),
            "<sot> <image> two* blue* squares* <eoc>* <eot>"
        );
    }

    #[test]
    fn malformed_documents_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let tk = tokenizer(dir.path());
        let sp = Specials::of(&tk).unwrap();
        let m = members(&["img0.jpg"]);
        let info = |i: u64, name: &str| json!({"text_list": ["a red circle"], "image_info": [{"image_name": name, "matched_text_index": i, "matched_sim": 0.5}]});
        assert_eq!(
            parse_mmc4(&info(3, "img0.jpg"), &m, 0.24),
            Err(DocError::IndexOutOfRange {
                image: 0,
                index: 3,
                len: 1
            })
        );
        assert_eq!(
            parse_mmc4(&info(0, "img9.jpg"), &m, 0.24),
            Err(DocError::MissingImage("img9.jpg".into()))
        );
        assert_eq!(
            parse_mmc4(&json!({"image_info": []}), &m, 0.24),
            Err(DocError::Field("text_list"))
        );
        let empty = parse_mmc4(&json!({"text_list": ["  "], "image_info": [{"image_name": "img0.jpg", "matched_text_index": 0}]}), &m, 0.24).unwrap();
        assert_eq!(
            build_sequence(&empty, &tk, sp, &SequenceConfig::default()),
            Err(DocError::EmptyText)
        );
        let low = parse_mmc4(&json!({"text_list": ["a red circle"], "image_info": [{"image_name": "img0.jpg", "matched_text_index": 0, "matched_sim": 0.1}]}), &m, 0.24).unwrap();
        assert_eq!(
            build_sequence(&low, &tk, sp, &SequenceConfig::default()),
            Err(DocError::NoImages)
        );
        let both = json!({"texts": ["a", "b"], "images": [null, "x.jpg"]});
        assert_eq!(
            parse_obelics(&both, &members(&["x.jpg"])),
            Err(DocError::BadPosition(1))
        );
    }
}
