//! The symmetric InfoNCE loss of CLIP: the mean of the image->text and text->image
//! cross-entropies over `exp(logit_scale) * img @ txt^T`, targets on the diagonal.
//!
//! Written for one rank's rows against everyone's columns, so data-parallel training can pass
//! all-gathered features as `img_all`/`txt_all` and this rank's offset in them; with one rank
//! the local and global features are the same tensors and `offset` is 0.

use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, log_softmax};

/// Mean cross-entropy of `logits` `[N, C]` against the class index `offset + row`.
fn diagonal_cross_entropy<B: Backend>(logits: Tensor<B, 2>, offset: usize) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let device = logits.device();
    let targets =
        Tensor::<B, 1, Int>::arange(offset as i64..(offset + n) as i64, &device).reshape([n, 1]);
    -log_softmax(logits, 1).gather(1, targets).mean()
}

/// InfoNCE for local rows `img_local`/`txt_local` `[n, E]` against all columns
/// `img_all`/`txt_all` `[N, E]` whose rows `offset..offset+n` are the local ones.
///
/// `txt_all` may hold more rows after the `N` captions: hard-negative captions (NegCLIP,
/// Yuksekgonul et al. 2023), which are extra columns of image->text only, since they have no
/// image of their own.
///
/// Returns the mean over the local rows of `(CE_i2t + CE_t2i) / 2`; averaging it over ranks
/// gives the loss of one process over the whole batch.
pub fn clip_loss_rows<B: Backend>(
    img_local: Tensor<B, 2>,
    txt_local: Tensor<B, 2>,
    img_all: Tensor<B, 2>,
    txt_all: Tensor<B, 2>,
    logit_scale: Tensor<B, 1>,
    offset: usize,
) -> Tensor<B, 1> {
    let scale = logit_scale.exp().unsqueeze::<2>(); // [1, 1]
    let logits_per_image = img_local.matmul(txt_all.transpose()) * scale.clone();
    let logits_per_text = txt_local.matmul(img_all.transpose()) * scale;
    (diagonal_cross_entropy(logits_per_image, offset)
        + diagonal_cross_entropy(logits_per_text, offset))
        / 2.0
}

/// InfoNCE over one batch held entirely by this process.
pub fn clip_loss<B: Backend>(
    img: Tensor<B, 2>,
    txt: Tensor<B, 2>,
    logit_scale: Tensor<B, 1>,
) -> Tensor<B, 1> {
    clip_loss_rows(img.clone(), txt.clone(), img, txt, logit_scale, 0)
}

/// SigLIP (Zhai et al. 2023): `-sum_ij log sigmoid(z_ij * (exp(logit_scale) * img_i . txt_j +
/// logit_bias)) / n_total`, with z_ij = 1 on the diagonal and -1 elsewhere.
///
/// Takes this rank's image rows `img_local` `[n, E]` (global rows `offset..offset+n`) against
/// text columns given as `txt_chunks` (every rank's text embeddings, in rank order) and sums
/// over them one chunk at a time, so no `[N, N]` matrix exists anywhere. Divided by the global
/// batch `n_total`, the ranks' values add up to the loss over the whole batch.
pub fn siglip_loss_rows<B: Backend>(
    img_local: Tensor<B, 2>,
    txt_chunks: Vec<Tensor<B, 2>>,
    logit_scale: Tensor<B, 1>,
    logit_bias: Tensor<B, 1>,
    offset: usize,
    n_total: usize,
) -> Tensor<B, 1> {
    let [n, _] = img_local.dims();
    let device = img_local.device();
    let (scale, bias) = (
        logit_scale.exp().unsqueeze::<2>(),
        logit_bias.unsqueeze::<2>(),
    );
    let rows =
        Tensor::<B, 1, Int>::arange(offset as i64..(offset + n) as i64, &device).reshape([n, 1]);
    let mut total = Tensor::<B, 1>::zeros([1], &device);
    let mut start = 0;
    for txt in txt_chunks {
        let [c, _] = txt.dims();
        let logits = img_local.clone().matmul(txt.transpose()) * scale.clone() + bias.clone();
        let cols =
            Tensor::<B, 1, Int>::arange(start as i64..(start + c) as i64, &device).reshape([1, c]);
        let z = rows.clone().equal(cols).float() * 2.0 - 1.0;
        total = total + log_sigmoid(logits * z).sum();
        start += c;
    }
    -total / n_total as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    type B = Autodiff<Flex>;

    /// Loss and gradients by hand in f64: d/dI of the loss for row-normalised inputs.
    fn reference(
        img: &[f64],
        txt: &[f64],
        n: usize,
        e: usize,
        s: f64,
    ) -> (f64, Vec<f64>, Vec<f64>, f64) {
        let dot = |a: &[f64], i: usize, b: &[f64], j: usize| {
            (0..e).map(|k| a[i * e + k] * b[j * e + k]).sum::<f64>()
        };
        let logits: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..n).map(|j| s.exp() * dot(img, i, txt, j)).collect())
            .collect();
        let softmax = |row: Vec<f64>| {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
            row.iter().map(|x| (x - m).exp() / z).collect::<Vec<_>>()
        };
        let p_i2t: Vec<Vec<f64>> = (0..n).map(|i| softmax(logits[i].clone())).collect();
        let p_t2i: Vec<Vec<f64>> = (0..n)
            .map(|j| softmax((0..n).map(|i| logits[i][j]).collect()))
            .collect();
        let loss = (0..n)
            .map(|i| -(p_i2t[i][i].ln() + p_t2i[i][i].ln()))
            .sum::<f64>()
            / (2.0 * n as f64);
        // dL/dlogits[i][j] = ((p_i2t[i][j] - δij) + (p_t2i[j][i] - δij)) / 2n
        let g: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        (p_i2t[i][j] + p_t2i[j][i] - 2.0 * (i == j) as u8 as f64) / (2.0 * n as f64)
                    })
                    .collect()
            })
            .collect();
        let mut gi = vec![0.0; n * e];
        let mut gt = vec![0.0; n * e];
        let mut gs = 0.0;
        for i in 0..n {
            for j in 0..n {
                gs += g[i][j] * logits[i][j];
                for k in 0..e {
                    gi[i * e + k] += g[i][j] * s.exp() * txt[j * e + k];
                    gt[j * e + k] += g[i][j] * s.exp() * img[i * e + k];
                }
            }
        }
        (loss, gi, gt, gs)
    }

    #[test]
    fn loss_and_gradients_match_f64_reference() {
        let dev = Default::default();
        let (n, e) = (6, 5);
        B::seed(&dev, 11);
        let img = Tensor::<B, 2>::random([n, e], Distribution::Normal(0.0, 1.0), &dev);
        let txt = Tensor::<B, 2>::random([n, e], Distribution::Normal(0.0, 1.0), &dev);
        let (img, txt) = (
            crate::clip::l2_normalize(img).detach().require_grad(),
            crate::clip::l2_normalize(txt).detach().require_grad(),
        );
        let s = 1.3f64;
        let scale = Tensor::<B, 1>::from_data([s as f32], &dev).require_grad();
        let loss = clip_loss(img.clone(), txt.clone(), scale.clone());
        let to64 = |t: &Tensor<B, 2>| t.to_data().convert::<f64>().to_vec::<f64>().unwrap();
        let (want, gi, gt, gs) = reference(&to64(&img), &to64(&txt), n, e, s);
        let got: f32 = loss.clone().into_scalar();
        assert!((got as f64 - want).abs() < 1e-5, "loss {got} vs {want}");
        let grads = loss.backward();
        let check = |got: Vec<f32>, want: &[f64], what: &str| {
            for (a, b) in got.iter().zip(want) {
                assert!((*a as f64 - b).abs() < 1e-5, "{what}: {a} vs {b}");
            }
        };
        check(
            img.grad(&grads).unwrap().to_data().to_vec().unwrap(),
            &gi,
            "d/d img",
        );
        check(
            txt.grad(&grads).unwrap().to_data().to_vec().unwrap(),
            &gt,
            "d/d txt",
        );
        check(
            scale.grad(&grads).unwrap().to_data().to_vec().unwrap(),
            &[gs],
            "d/d logit_scale",
        );
    }

    /// Hard-negative captions after the `n` captions are image->text columns only.
    #[test]
    fn hard_negatives_are_extra_image_to_text_columns() {
        let dev = Default::default();
        let (n, e, s) = (5, 4, 1.7f64);
        B::seed(&dev, 13);
        let rand = |rows| {
            let t = Tensor::<B, 2>::random([rows, e], Distribution::Normal(0.0, 1.0), &dev);
            crate::clip::l2_normalize(t).detach().require_grad()
        };
        let (img, txt, neg) = (rand(n), rand(n), rand(n));
        let scale = Tensor::<B, 1>::from_data([s as f32], &dev);
        let columns = Tensor::cat(vec![txt.clone(), neg.clone()], 0);
        let loss = clip_loss_rows(img.clone(), txt.clone(), img.clone(), columns, scale, 0);
        let to64 = |t: &Tensor<B, 2>| t.to_data().convert::<f64>().to_vec::<f64>().unwrap();
        let (vi, vt, vn) = (to64(&img), to64(&txt), to64(&neg));
        let dot = |a: &[f64], i: usize, b: &[f64], j: usize| -> f64 {
            s.exp() * (0..e).map(|k| a[i * e + k] * b[j * e + k]).sum::<f64>()
        };
        let lse = |xs: Vec<f64>| {
            let m = xs.iter().cloned().fold(f64::MIN, f64::max);
            m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        };
        let (mut want, mut g_neg) = (0.0, vec![0.0; n * e]);
        for i in 0..n {
            let row: Vec<f64> = (0..n)
                .map(|j| dot(&vi, i, &vt, j))
                .chain((0..n).map(|j| dot(&vn, j, &vi, i)))
                .collect();
            let z = lse(row.clone());
            let col = lse((0..n).map(|j| dot(&vt, i, &vi, j)).collect());
            want += (z - row[i] + col - dot(&vt, i, &vi, i)) / (2.0 * n as f64);
            // d/d neg_j of the image->text term: p(neg_j | img_i) * exp(s) * img_i / 2n.
            for j in 0..n {
                let p = (row[n + j] - z).exp();
                for k in 0..e {
                    g_neg[j * e + k] += p * s.exp() * vi[i * e + k] / (2.0 * n as f64);
                }
            }
        }
        let got: f32 = loss.clone().into_scalar();
        assert!((got as f64 - want).abs() < 1e-5, "loss {got} vs {want}");
        let g: Vec<f32> = neg
            .grad(&loss.backward())
            .unwrap()
            .to_data()
            .to_vec()
            .unwrap();
        for (a, b) in g.iter().zip(&g_neg) {
            assert!((*a as f64 - b).abs() < 1e-5, "d/d neg: {a} vs {b}");
        }
    }

    #[test]
    fn rows_against_gathered_columns_average_to_the_full_loss() {
        let dev = Default::default();
        B::seed(&dev, 3);
        let img = crate::clip::l2_normalize(Tensor::<B, 2>::random(
            [8, 4],
            Distribution::Normal(0.0, 1.0),
            &dev,
        ));
        let txt = crate::clip::l2_normalize(Tensor::<B, 2>::random(
            [8, 4],
            Distribution::Normal(0.0, 1.0),
            &dev,
        ));
        let s = Tensor::<B, 1>::from_data([2.0f32], &dev);
        let full: f32 = clip_loss(img.clone(), txt.clone(), s.clone()).into_scalar();
        let half = |r: std::ops::Range<usize>, off| {
            clip_loss_rows(
                img.clone().slice(s![r.clone(), ..]),
                txt.clone().slice(s![r, ..]),
                img.clone(),
                txt.clone(),
                s.clone(),
                off,
            )
            .into_scalar()
        };
        let split: f32 = (half(0..4, 0) + half(4..8, 4)) / 2.0;
        assert!((full - split).abs() < 1e-6, "{full} vs {split}");
    }

    #[test]
    fn siglip_matches_f64_reference_and_splits_over_ranks() {
        let dev = Default::default();
        B::seed(&dev, 5);
        let (n, e) = (6, 4);
        let norm = |t| crate::clip::l2_normalize(t);
        let img = norm(Tensor::<B, 2>::random(
            [n, e],
            Distribution::Normal(0.0, 1.0),
            &dev,
        ));
        let txt = norm(Tensor::<B, 2>::random(
            [n, e],
            Distribution::Normal(0.0, 1.0),
            &dev,
        ));
        let (s, b) = (2.3f64, -1.5f64);
        let scale = Tensor::<B, 1>::from_data([s as f32], &dev);
        let bias = Tensor::<B, 1>::from_data([b as f32], &dev);
        let to64 = |t: &Tensor<B, 2>| t.to_data().convert::<f64>().to_vec::<f64>().unwrap();
        let (vi, vt) = (to64(&img), to64(&txt));
        let mut want = 0.0;
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = (0..e).map(|k| vi[i * e + k] * vt[j * e + k]).sum();
                let z = if i == j { 1.0 } else { -1.0 };
                let x = z * (s.exp() * dot + b);
                want -= -(1.0 + (-x).exp()).ln();
            }
        }
        want /= n as f64;
        let full: f32 = siglip_loss_rows(
            img.clone(),
            vec![txt.clone()],
            scale.clone(),
            bias.clone(),
            0,
            n,
        )
        .into_scalar();
        assert!((full as f64 - want).abs() < 1e-5, "{full} vs {want}");
        // Two "ranks" of 3 rows each, text in two chunks: the shares add up to the whole.
        let chunks = vec![
            txt.clone().slice(s![0..3, ..]),
            txt.clone().slice(s![3..6, ..]),
        ];
        let share = |r: std::ops::Range<usize>| -> f32 {
            let off = r.start;
            siglip_loss_rows(
                img.clone().slice(s![r, ..]),
                chunks.clone(),
                scale.clone(),
                bias.clone(),
                off,
                n,
            )
            .into_scalar()
        };
        let split = share(0..3) + share(3..6);
        assert!((full - split).abs() < 1e-5, "{full} vs {split}");
    }
}
