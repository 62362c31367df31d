//! CIDEr-D for captions, as pycocoevalcap computes it (the COCO caption evaluation that
//! OpenFlamingo and lmms-eval report), with its tokenisation written out.
//!
//! **Tokenisation** ([`tokenize`]): pycocoevalcap runs Stanford's PTBTokenizer (CoreNLP 3.4.1,
//! `-preserveLines -lowerCase`) and drops the tokens in its punctuation list. The rules here are
//! the ones captions meet: lower case; words split on spaces; brackets split off and renamed as
//! PTB does (`(` -> `-lrb-`; lower-cased, so pycocoevalcap's filter, which lists `-LRB-`, keeps
//! them); opening and closing quotes split off (`"` -> `` `` ``/`''`); `$` split off the front, `%` and `, ; : ! ?` off the back; a final `.` split off unless the word is an
//! abbreviation (`u.s.a.`, `p.m.`, `mr.`); `...` one token; contractions split before their
//! apostrophe (`dog's` -> `dog 's`, `isn't` -> `is n't`, `can't` -> `ca n't`) and `cannot`,
//! `gonna`, `wanna` split as PTB splits them; what is inside a word stays (`black-and-white`,
//! `1,000`, `3.5`, `5:30`, `birds/ducks`). Then ``` `` ' `` ` . ? ! , : - -- ... ; ``` are
//! dropped. The fixture (fixtures/generate_captioning.py) compares this with the Java
//! tokenizer on captions with each of these.
//!
//! **CIDEr-D** ([`cider_d`]): each sentence is a vector of 1- to 4-gram counts weighted by
//! `log(images) - log(max(1, document frequency))`, the document frequency counted over the
//! reference sets; per n, the similarity of candidate and reference is the clipped dot product
//! `sum min(c, r) * r` over the norms, times `exp(-delta^2 / (2 * 6^2))` where delta is the
//! difference in length (pycocoevalcap counts the *bigrams* as the length); the score is the
//! mean over n and references, times 10. The corpus score is the mean over images.

use std::collections::HashMap;

/// Tokens pycocoevalcap drops after tokenising.
const DROPPED: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Words whose final period belongs to them.
const ABBREVIATIONS: [&str; 12] = [
    "mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "co.", "no.",
];

/// A caption as pycocoevalcap's tokenizer leaves it: its tokens joined by spaces.
pub fn tokenize(caption: &str) -> String {
    let lower = caption.replace('\n', " ").to_lowercase();
    let mut out: Vec<String> = Vec::new();
    for word in lower.split_whitespace() {
        split_word(word, &mut out);
    }
    out.retain(|t| !DROPPED.contains(&t.as_str()));
    out.join(" ")
}

/// One space-separated word as PTB tokens (see the module docs).
fn split_word(word: &str, out: &mut Vec<String>) {
    let mut w = word;
    // Leading marks.
    loop {
        let Some(c) = w.chars().next() else { return };
        let tok = match c {
            '(' => "-lrb-",
            '[' => "-lsb-",
            '{' => "-lcb-",
            '"' => "``",
            '\'' | '`' if w.len() > 1 => "`",
            '$' if w.len() > 1 => "$",
            _ => break,
        };
        out.push(tok.to_string());
        w = &w[c.len_utf8()..];
    }
    // Trailing marks, collected backwards.
    let mut tail: Vec<String> = Vec::new();
    loop {
        if w.ends_with("...") && w.len() > 3 {
            tail.push("...".into());
            w = &w[..w.len() - 3];
            continue;
        }
        let Some(c) = w.chars().last() else { break };
        let tok = match c {
            ')' => "-rrb-",
            ']' => "-rsb-",
            '}' => "-rcb-",
            '"' => "''",
            ',' | ';' | ':' | '!' | '?' | '%' if w.len() > 1 => &w[w.len() - 1..],
            '\'' if w.len() > 1 && !w.ends_with("''") => "'",
            '.' if w.len() > 1 && !is_abbreviation(w) => ".",
            _ => break,
        };
        tail.push(tok.to_string());
        w = &w[..w.len() - c.len_utf8()];
    }
    if !w.is_empty() {
        contractions(w, out);
    }
    out.extend(tail.into_iter().rev());
}

/// `u.s.a.`, `p.m.`, `e.g.` (letters between periods) and the common titles.
fn is_abbreviation(w: &str) -> bool {
    let inner = &w[..w.len() - 1];
    ABBREVIATIONS.contains(&w)
        || (inner.contains('.') && inner.split('.').all(|p| p.chars().all(char::is_alphabetic)))
}

/// A word with its contraction split off, as PTB splits them.
fn contractions(w: &str, out: &mut Vec<String>) {
    for (whole, a, b) in [
        ("cannot", "can", "not"),
        ("gonna", "gon", "na"),
        ("wanna", "wan", "na"),
    ] {
        if w == whole {
            out.push(a.into());
            out.push(b.into());
            return;
        }
    }
    if w.len() > 3 && w.ends_with("n't") {
        out.push(w[..w.len() - 3].into());
        out.push("n't".into());
        return;
    }
    for suffix in ["'s", "'m", "'d", "'ll", "'re", "'ve"] {
        if w.len() > suffix.len() && w.ends_with(suffix) {
            out.push(w[..w.len() - suffix.len()].into());
            out.push(suffix.into());
            return;
        }
    }
    out.push(w.into());
}

type Counts = HashMap<Vec<String>, f64>;

/// 1- to 4-gram counts of a tokenised sentence.
fn ngrams(sentence: &str) -> Counts {
    let words: Vec<String> = sentence.split_whitespace().map(str::to_string).collect();
    let mut counts = Counts::new();
    for n in 1..=4 {
        for w in words.windows(n) {
            *counts.entry(w.to_vec()).or_default() += 1.0;
        }
    }
    counts
}

/// A sentence's tf-idf vectors per n, their norms, and its length (its bigram count, as
/// pycocoevalcap counts it).
struct Vector {
    weights: [HashMap<Vec<String>, f64>; 4],
    norms: [f64; 4],
    length: f64,
}

fn vector(counts: &Counts, df: &HashMap<Vec<String>, f64>, log_images: f64) -> Vector {
    let mut v = Vector {
        weights: Default::default(),
        norms: [0.0; 4],
        length: 0.0,
    };
    for (gram, &tf) in counts {
        let n = gram.len() - 1;
        let w = tf * (log_images - df.get(gram).copied().unwrap_or(0.0).max(1.0).ln());
        v.weights[n].insert(gram.clone(), w);
        v.norms[n] += w * w;
        if n == 1 {
            v.length += tf;
        }
    }
    v.norms = v.norms.map(f64::sqrt);
    v
}

/// The summed per-n similarity of candidate `c` to reference `r`, over 4.
fn similarity(c: &Vector, r: &Vector) -> f64 {
    let delta = c.length - r.length;
    let penalty = (-(delta * delta) / (2.0 * 6.0 * 6.0)).exp();
    let mut total = 0.0;
    for n in 0..4 {
        let mut val: f64 = c.weights[n]
            .iter()
            .map(|(g, &w)| {
                let rw = r.weights[n].get(g).copied().unwrap_or(0.0);
                w.min(rw) * rw
            })
            .sum();
        if c.norms[n] != 0.0 && r.norms[n] != 0.0 {
            val /= c.norms[n] * r.norms[n];
        }
        total += val * penalty;
    }
    total / 4.0
}

/// CIDEr-D of each candidate against its references (both already [`tokenize`]d), and their
/// mean: pycocoevalcap's `Cider().compute_score`.
pub fn cider_d(candidates: &[String], references: &[Vec<String>]) -> (f64, Vec<f64>) {
    assert_eq!(
        candidates.len(),
        references.len(),
        "one reference set per candidate"
    );
    let refs: Vec<Vec<Counts>> = references
        .iter()
        .map(|rs| rs.iter().map(|r| ngrams(r)).collect())
        .collect();
    let mut df: HashMap<Vec<String>, f64> = HashMap::new();
    for rs in &refs {
        let mut seen: Vec<&Vec<String>> = rs.iter().flat_map(|r| r.keys()).collect();
        seen.sort();
        seen.dedup();
        for g in seen {
            *df.entry(g.clone()).or_default() += 1.0;
        }
    }
    let log_images = (refs.len() as f64).ln();
    let scores: Vec<f64> = candidates
        .iter()
        .zip(&refs)
        .map(|(c, rs)| {
            let cv = vector(&ngrams(c), &df, log_images);
            let sum: f64 = rs
                .iter()
                .map(|r| similarity(&cv, &vector(r, &df, log_images)))
                .sum();
            sum / rs.len().max(1) as f64 * 10.0
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
    (mean, scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenisation_by_hand() {
        assert_eq!(
            tokenize("The dog's hat isn't grey."),
            "the dog 's hat is n't grey"
        );
        assert_eq!(
            tokenize("A man (wearing a hat) says \"hi\"!"),
            "a man -lrb- wearing a hat -rrb- says hi"
        );
        assert_eq!(
            tokenize("1,000 birds/ducks at 5:30 p.m."),
            "1,000 birds/ducks at 5:30 p.m."
        );
        assert_eq!(
            tokenize("a black-and-white photo..."),
            "a black-and-white photo"
        );
    }

    #[test]
    fn a_candidate_equal_to_every_reference_scores_ten_times_its_idf_share() {
        // Two images, each described the same way by all references: the candidate that
        // repeats them has cosine 1 for every n whose n-grams are not in every image.
        let refs = vec![
            vec!["a red bus on a road".to_string(); 3],
            vec!["two cats on a sofa".to_string(); 3],
        ];
        let (_, s) = cider_d(&["a red bus on a road".into(), "two dogs".into()], &refs);
        // "on a" occurs in both images (idf 0), so the 1- to 4-gram vectors lose those terms
        // but stay parallel: cosine 1 for each n.
        assert!((s[0] - 10.0).abs() < 1e-9, "{s:?}");
        assert!(s[1] < s[0]);
    }
}
