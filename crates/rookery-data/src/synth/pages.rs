//! Interleaved "pages" in the MMC4 layout: a document JSON with `text_list` and `image_info`
//! (`image_name`, `matched_text_index`, `matched_sim`), its images as tar members of the same
//! sample. The texts talk about the images (counts, colors, shapes, comparisons), so a model that
//! reads images in context can answer; `qa` lists the questions for few-shot evaluation.

use serde::Serialize;
use serde_json::json;

use super::scene::{Group, Scene, COLORS, COUNT_WORDS, SHAPES};
use crate::rng::Rng;

/// Words the page templates use besides the scene vocabulary.
pub const PAGE_WORDS: &[&str] = &[
    "q", "a", ":", "?", ".", "how", "many", "what", "color", "shape", "is", "it", "are", "the",
    "shapes", "which", "image", "has", "more", "first", "second", "third", "fourth", "here",
    "some", "pictures", "look", "at", "these", "images", "page", "about", "this", "shows", "photo",
    "of", "an", "with", "there", "fifth", "sixth",
];
const ORDINALS: [&str; 6] = ["first", "second", "third", "fourth", "fifth", "sixth"];
const INTROS: [&str; 3] = [
    "here are some pictures.",
    "look at these images.",
    "a page about shapes.",
];

/// A question about one image (or, for `compare`, about the whole page).
#[derive(Clone, Debug, Serialize)]
pub struct Qa {
    pub image: usize,
    pub kind: &'static str,
    pub question: String,
    pub answer: String,
}

/// Builds one page: returns its JSON document and its images' scenes (in `image_info` order).
pub fn page(rng: &mut Rng, n_images: usize, p_low_sim: f64) -> (serde_json::Value, Vec<Scene>) {
    let mut texts = vec![INTROS[rng.below(INTROS.len())].to_string()];
    let (mut info, mut qa, mut scenes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n_images {
        let g = Group::random(rng);
        let scene = Scene::with_groups(rng, vec![g], None);
        let (text, q) = chunk_text(rng, i, &g, &scene);
        texts.push(text);
        qa.extend(q);
        // matched_sim below OpenFlamingo's 0.24 threshold for a few images exercises the filter.
        let sim = if rng.bool(p_low_sim) {
            rng.uniform(0.05, 0.2)
        } else {
            rng.uniform(0.26, 0.42)
        };
        info.push(json!({ "image_name": format!("img{i}.jpg"), "matched_text_index": i + 1, "matched_sim": sim }));
        scenes.push(scene);
    }
    let counts: Vec<u8> = scenes.iter().map(|s| s.groups[0].count).collect();
    let max = *counts.iter().max().expect("at least one image");
    if counts.iter().filter(|&&c| c == max).count() == 1 {
        let k = counts.iter().position(|&c| c == max).expect("max exists");
        let (question, answer) = (
            "q: which image has more shapes?".to_string(),
            format!("the {} image.", ORDINALS[k]),
        );
        texts.push(format!("{question} a: {answer}"));
        qa.push(Qa {
            image: k,
            kind: "compare",
            question,
            answer,
        });
    }
    let doc = json!({ "text_list": texts, "image_info": info, "qa": qa });
    (doc, scenes)
}

/// The text that follows image `i`: a caption or a question with its answer.
fn chunk_text(rng: &mut Rng, i: usize, g: &Group, scene: &Scene) -> (String, Option<Qa>) {
    let (kind, question, answer) = match rng.below(4) {
        0 => return (format!("this image shows {}.", scene.caption(rng)), None),
        1 => (
            "count",
            format!("q: how many {}?", super::scene::plural(SHAPES[g.shape], 2)),
            format!("{}.", COUNT_WORDS[g.count as usize]),
        ),
        2 => (
            "color",
            "q: what color are the shapes?".to_string(),
            format!("{}.", COLORS[g.color]),
        ),
        _ => (
            "shape",
            "q: what shape is it?".to_string(),
            format!("{}.", SHAPES[g.shape]),
        ),
    };
    let text = format!("{question} a: {answer}");
    (
        text,
        Some(Qa {
            image: i,
            kind,
            question,
            answer,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_layout_is_mmc4() {
        let mut rng = Rng::new(2);
        let (doc, scenes) = page(&mut rng, 3, 0.0);
        let texts = doc["text_list"].as_array().unwrap();
        let info = doc["image_info"].as_array().unwrap();
        assert_eq!(scenes.len(), 3);
        assert_eq!(info.len(), 3);
        for (i, im) in info.iter().enumerate() {
            assert_eq!(im["image_name"], format!("img{i}.jpg"));
            let t = im["matched_text_index"].as_u64().unwrap() as usize;
            assert!(t < texts.len());
            assert!(im["matched_sim"].as_f64().unwrap() > 0.24);
        }
        for q in doc["qa"].as_array().unwrap() {
            let i = q["image"].as_u64().unwrap() as usize;
            if q["kind"] == "count" {
                assert_eq!(
                    q["answer"],
                    format!("{}.", COUNT_WORDS[scenes[i].groups[0].count as usize])
                );
            }
        }
    }
}
