//! The scores CLIP_benchmark reports, from ranks.
//!
//! Everything here starts from one number per query: the **rank of its best positive**, the
//! count of candidates scoring strictly higher than the highest-scoring right answer (0 = the
//! top). From it:
//! - top-k accuracy (`acc1`, `acc5`): rank < k, as `output.topk(k)` contains the target;
//! - mean per-class recall (sklearn's `balanced_accuracy_score` of the argmax predictions): the
//!   top-1 hit rate of each class that has images, averaged over those classes;
//! - retrieval recall@k as CLIP_benchmark and the CLIP papers count it: a query is a hit when at
//!   least one of its positives is among the top k (images have several captions), averaged
//!   over queries.
//!
//! Ties are broken by position, as `torch.argmax` and `topk` break them: a candidate scoring
//! exactly as much as the best positive and standing before it ranks above it. So a degenerate
//! model (every class or caption the same embedding) scores what position alone gives, never a
//! perfect score (the committed fixture checks agreement with CLIP_benchmark's own code).

use std::collections::BTreeMap;

/// The rank of the best of `positives` (indices into `scores`) among all of `scores`: those
/// strictly greater, and those equal standing before it (the first positive among equals is
/// the best); `None` without a positive.
pub fn rank_of_best(scores: &[f32], positives: &[usize]) -> Option<usize> {
    let best = positives.iter().copied().reduce(|a, b| {
        match scores[b] > scores[a] || (scores[b] == scores[a] && b < a) {
            true => b,
            false => a,
        }
    })?;
    let s = scores[best];
    let ahead = scores
        .iter()
        .enumerate()
        .filter(|&(j, &x)| x > s || (x == s && j < best))
        .count();
    Some(ahead)
}

/// The fraction of `ranks` below `k`.
pub fn recall_at(ranks: &[usize], k: usize) -> f64 {
    if ranks.is_empty() {
        return f64::NAN;
    }
    ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
}

/// CLIP_benchmark's classification figures from each image's target rank and target class:
/// `acc1`, `acc5` (left out with fewer than 5 classes, where CLIP_benchmark writes NaN) and
/// `mean_per_class_recall`.
pub fn classification(ranks: &[usize], targets: &[usize], classes: usize) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    out.insert("acc1".into(), recall_at(ranks, 1));
    if classes >= 5 {
        out.insert("acc5".into(), recall_at(ranks, 5));
    }
    let mut per_class = vec![(0usize, 0usize); classes];
    for (&r, &t) in ranks.iter().zip(targets) {
        per_class[t].0 += usize::from(r == 0);
        per_class[t].1 += 1;
    }
    let present: Vec<f64> = per_class
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|&(hit, n)| hit as f64 / n as f64)
        .collect();
    let mean = present.iter().sum::<f64>() / present.len().max(1) as f64;
    out.insert("mean_per_class_recall".into(), mean);
    out
}

/// CLIP_benchmark's retrieval figures for each k: `image_retrieval_recall@k` (text queries,
/// one positive image each) and `text_retrieval_recall@k` (image queries, any of their
/// captions).
pub fn retrieval(
    text_ranks: &[usize],
    image_ranks: &[usize],
    ks: &[usize],
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for &k in ks {
        out.insert(
            format!("image_retrieval_recall@{k}"),
            recall_at(text_ranks, k),
        );
        out.insert(
            format!("text_retrieval_recall@{k}"),
            recall_at(image_ranks, k),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_counts_candidates_strictly_above_the_best_positive() {
        let s = [0.1, 0.9, 0.5, 0.7, 0.5];
        assert_eq!(rank_of_best(&s, &[1]), Some(0));
        assert_eq!(rank_of_best(&s, &[2]), Some(2));
        // Two positives: the better one (0.7) counts; only 0.9 beats it.
        assert_eq!(rank_of_best(&s, &[2, 3]), Some(1));
        assert_eq!(rank_of_best(&s, &[]), None);
    }

    #[test]
    fn ties_are_broken_by_position_so_a_degenerate_model_scores_no_better_than_position() {
        let s = [0.5, 0.5, 0.5];
        assert_eq!(rank_of_best(&s, &[0]), Some(0));
        assert_eq!(rank_of_best(&s, &[2]), Some(2));
        // Positives 1 and 2 tie: the first of them counts, behind candidate 0.
        assert_eq!(rank_of_best(&s, &[2, 1]), Some(1));
        // Every class the same score: top-1 only for class 0, as torch's argmax gives.
        let ranks: Vec<usize> = (0..3).map(|t| rank_of_best(&s, &[t]).unwrap()).collect();
        assert_eq!(classification(&ranks, &[0, 1, 2], 3)["acc1"], 1.0 / 3.0);
    }

    #[test]
    fn classification_by_hand() {
        // Three classes (no acc5); class 0: 2 of 3 right, class 1: 0 of 1, class 2: none.
        let ranks = [0, 0, 2, 1];
        let targets = [0, 0, 0, 1];
        let m = classification(&ranks, &targets, 3);
        assert_eq!(m["acc1"], 0.5);
        assert!(!m.contains_key("acc5"));
        // Mean over the classes that have images only: (2/3 + 0) / 2.
        assert!((m["mean_per_class_recall"] - 1.0 / 3.0).abs() < 1e-12);
        let m = classification(&[0, 4, 5], &[0, 1, 2], 6);
        assert!((m["acc5"] - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn retrieval_by_hand() {
        let m = retrieval(&[0, 3, 9, 12], &[1, 0], &[1, 5, 10]);
        assert_eq!(m["image_retrieval_recall@1"], 0.25);
        assert_eq!(m["image_retrieval_recall@5"], 0.5);
        assert_eq!(m["image_retrieval_recall@10"], 0.75);
        assert_eq!(m["text_retrieval_recall@1"], 0.5);
        assert_eq!(m["text_retrieval_recall@5"], 1.0);
    }
}
