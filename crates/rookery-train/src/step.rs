//! The gradients of one optimizer step of contrastive training, exact over the global batch.
//!
//! With `negatives = "global"` (the default), every rank's micro-batches together form the
//! batch whose similarity matrix the loss sees, as if one process held all of it:
//!
//! 1. embed this rank's micro-batches (one tracked forward when there is a single micro-batch;
//!    with several, a forward without a graph now and a tracked one per micro-batch later, as
//!    GradCache does, so only one micro-batch's activations are alive at a time);
//! 2. all-gather the embeddings of every rank;
//! 3. compute this rank's share of the loss (its rows against all columns) on the gathered
//!    embeddings as leaves, and back-propagate it to them and to `logit_scale`/`logit_bias`;
//! 4. reduce-scatter the embedding gradients: each rank receives the full gradient of the
//!    global loss with respect to its own embeddings;
//! 5. push that gradient through the encoders with the surrogate `sum(z * dL/dz)`, micro-batch
//!    by micro-batch, accumulating parameter gradients; the text tower goes first;
//! 6. hand the text tower's gradients to the loop's [`GradSync`] as soon as they are final
//!    (their sums cross ranks while the image tower's backward runs, where the engine works in
//!    the background) and return the rest with this rank's loss share; the loop sums them.
//!
//! Hard-negative captions (`Micro::neg_tokens`, NegCLIP) go through the text tower with the
//! captions and are gathered with them; they are extra image->text columns for every image of
//! the global batch.
//!
//! Every rank's shares add up to the global loss, so step 6's sum is the gradient of one
//! process over the whole batch, up to float summation order.
//!
//! `negatives = "local"` is the cheaper variant (open_clip without `--gather-with-grad`, or
//! plain accumulation): each micro-batch on each rank is a batch of its own, and the gradient
//! is the mean over them.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rookery_dist::{Communicator, DistError, Pending};
use rookery_model::loss::{clip_loss_rows, siglip_loss_rows};
use rookery_model::Clip;

use crate::leaves::fresh_leaves;
use crate::parallel::GradSync;

/// One micro-batch of this rank.
pub struct Micro<B: Backend> {
    pub images: Tensor<B, 4>,
    pub tokens: Tensor<B, 2, Int>,
    /// One hard-negative caption per pair (NegCLIP): extra image->text negatives, `[m, T]`.
    pub neg_tokens: Option<Tensor<B, 2, Int>>,
    /// The patches each image keeps under patch dropout, `[m, K]` (`None`: all of them).
    pub patches: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> Micro<B> {
    /// Pairs in this micro-batch.
    fn len(&self) -> usize {
        self.images.dims()[0]
    }

    /// Captions, then hard negatives when there are any: one text-tower batch of `k * m` rows.
    fn texts(&self) -> Tensor<B, 2, Int> {
        match &self.neg_tokens {
            None => self.tokens.clone(),
            Some(neg) => Tensor::cat(vec![self.tokens.clone(), neg.clone()], 0),
        }
    }
}

/// Rows `0..m` of every `[k * m, E]` block (captions) and, with `k == 2`, rows `m..2m` (hard
/// negatives), each concatenated over the blocks.
fn split_texts<B: Backend>(blocks: Vec<Tensor<B, 2>>, sizes: &[usize], k: usize) -> Tensor<B, 2> {
    let pick = |part: usize| -> Vec<Tensor<B, 2>> {
        let rows = |t: &Tensor<B, 2>, m: usize| t.clone().slice(s![part * m..(part + 1) * m, ..]);
        blocks.iter().zip(sizes).map(|(t, &m)| rows(t, m)).collect()
    };
    Tensor::cat((0..k).flat_map(pick).collect(), 0)
}

/// Which pairs are negatives of each other (`train.negatives`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Negatives {
    /// Everything in the global batch (all ranks, all micro-batches).
    Global,
    /// Only the same micro-batch on the same rank.
    Local,
}

/// What a stage's step produced on this rank, before data parallelism sums it
/// ([`GradSync::finish`]): its gradients not handed over early, and its share of the global
/// batch's loss (the shares of all ranks add up to it).
pub struct LocalGrads {
    pub grads: GradientsParams,
    pub loss_share: f32,
    /// Seconds spent in the stage's own collectives (features gathered for the loss).
    pub comm_s: f64,
}

/// What one step produced: gradients summed over ranks, and the global batch's loss.
pub struct StepGrads {
    pub grads: GradientsParams,
    pub loss: f32,
    /// Seconds spent in collectives.
    pub comm_s: f64,
}

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// The gradients and loss of one optimizer step over `micro` (this rank's micro-batches),
/// summed over ranks: [`contrastive_local`] finished by a [`GradSync`] of its own (what a loop
/// does; for tests, benches and parity checks).
pub fn contrastive_grads<B: AutodiffBackend>(
    model: &Clip<B>,
    micro: Vec<Micro<B>>,
    comm: &dyn Communicator<Inner<B>>,
    negatives: Negatives,
    bucket_elems: usize,
) -> Result<StepGrads, DistError> {
    let mut sync = GradSync::new(comm, bucket_elems);
    let local = contrastive_local(model, micro, comm, negatives, &mut sync)?;
    sync.finish(model, local)
}

/// This rank's part of one optimizer step over `micro`: the contrastive loss over the global
/// batch (`negatives`), its gradients on this rank, the text tower's handed to `sync` early
/// with global negatives so their sums overlap the image tower's backward.
pub fn contrastive_local<B: AutodiffBackend>(
    model: &Clip<B>,
    micro: Vec<Micro<B>>,
    comm: &dyn Communicator<Inner<B>>,
    negatives: Negatives,
    sync: &mut GradSync<'_, Inner<B>>,
) -> Result<LocalGrads, DistError> {
    let comm = &Timed::new(comm);
    let (grads, loss_share) = match negatives {
        Negatives::Global => global_negatives(model, micro, comm, sync)?,
        Negatives::Local => local_negatives(model, micro, comm.world_size()),
    };
    Ok(LocalGrads {
        grads,
        loss_share,
        comm_s: comm.secs(),
    })
}

/// A communicator that adds up the time its calls take.
pub(crate) struct Timed<'a, IB: Backend> {
    inner: &'a dyn Communicator<IB>,
    secs: Rc<Cell<f64>>,
}

impl<'a, IB: Backend> Timed<'a, IB> {
    pub(crate) fn new(inner: &'a dyn Communicator<IB>) -> Self {
        Timed {
            inner,
            secs: Rc::new(Cell::new(0.0)),
        }
    }

    /// Seconds spent in collectives so far.
    pub(crate) fn secs(&self) -> f64 {
        self.secs.get()
    }

    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.secs.set(self.secs.get() + t.elapsed().as_secs_f64());
        out
    }
}

impl<IB: Backend> Communicator<IB> for Timed<'_, IB> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn device(&self) -> &IB::Device {
        self.inner.device()
    }
    fn all_reduce_sum(&self, t: Tensor<IB, 1>) -> Result<Tensor<IB, 1>, DistError> {
        self.time(|| self.inner.all_reduce_sum(t))
    }
    fn all_gather(&self, t: Tensor<IB, 1>) -> Result<Tensor<IB, 1>, DistError> {
        self.time(|| self.inner.all_gather(t))
    }
    fn reduce_scatter_sum(&self, t: Tensor<IB, 1>) -> Result<Tensor<IB, 1>, DistError> {
        self.time(|| self.inner.reduce_scatter_sum(t))
    }
    /// Only the time spent waiting counts: the sums run while the caller computes.
    fn all_reduce_sum_start(&self, bufs: Vec<Tensor<IB, 1>>) -> Pending<IB> {
        let pending = self.time(|| self.inner.all_reduce_sum_start(bufs));
        let secs = self.secs.clone();
        Pending::new(move || {
            let t = Instant::now();
            let out = pending.wait();
            secs.set(secs.get() + t.elapsed().as_secs_f64());
            out
        })
    }
}

/// This rank's share of the loss for its rows `offset..offset+n` of the gathered embeddings;
/// `neg_all` (hard-negative captions, InfoNCE only) are extra image->text columns.
fn loss_share<B: AutodiffBackend>(
    model: &Clip<B>,
    img_all: Tensor<B, 2>,
    txt_all: Tensor<B, 2>,
    neg_all: Option<Tensor<B, 2>>,
    offset: usize,
    n: usize,
    world: usize,
) -> Tensor<B, 1> {
    let n_total = img_all.dims()[0];
    let img = img_all.clone().slice(s![offset..offset + n, ..]);
    let scale = model.logit_scale.val();
    match &model.logit_bias {
        None => {
            let txt = txt_all.clone().slice(s![offset..offset + n, ..]);
            let columns = match neg_all {
                None => txt_all,
                Some(neg) => Tensor::cat(vec![txt_all, neg], 0),
            };
            clip_loss_rows(img, txt, img_all, columns, scale, offset) * (n as f32 / n_total as f32)
        }
        Some(bias) => {
            assert!(neg_all.is_none(), "hard negatives need the InfoNCE loss");
            let chunk = n_total / world;
            let chunks = (0..world)
                .map(|q| txt_all.clone().slice(s![q * chunk..(q + 1) * chunk, ..]))
                .collect();
            siglip_loss_rows(img, chunks, scale, bias.val(), offset, n_total)
        }
    }
}

/// Steps 1-6 of the module docs: the gradients summed over ranks, and this rank's loss share.
///
/// With hard negatives, each rank's text embeddings are `k = 2` blocks of `n` rows (captions,
/// then negatives), and they travel beside the images through the gather and reduce-scatter.
fn global_negatives<B: AutodiffBackend>(
    model: &Clip<B>,
    micro: Vec<Micro<B>>,
    comm: &dyn Communicator<Inner<B>>,
    sync: &mut GradSync<'_, Inner<B>>,
) -> Result<(GradientsParams, f32), DistError> {
    let (w, r) = (comm.world_size(), comm.rank());
    let sizes: Vec<usize> = micro.iter().map(Micro::len).collect();
    let k = if micro[0].neg_tokens.is_some() { 2 } else { 1 };
    assert!(
        micro.iter().all(|mb| mb.neg_tokens.is_some() == (k == 2)),
        "hard negatives in some micro-batches but not in others"
    );
    // 1. Embeddings: tracked when one micro-batch (reused in step 5), else graph-free.
    let mut tracked = Vec::new();
    let (imgs, txts): (Vec<_>, Vec<_>) = if micro.len() == 1 {
        let mb = &micro[0];
        let z = (
            model.encode_image_kept(mb.images.clone(), mb.patches.clone()),
            model.encode_text(mb.texts()),
        );
        let inner = (z.0.clone().inner(), z.1.clone().inner());
        tracked.push(z);
        vec![inner].into_iter().unzip()
    } else {
        let m = model.valid();
        micro
            .iter()
            .map(|mb| {
                (
                    m.encode_image_kept(
                        mb.images.clone().inner(),
                        mb.patches.clone().map(|p| p.inner()),
                    ),
                    m.encode_text(mb.texts().inner()),
                )
            })
            .unzip()
    };
    let (img_loc, txt_loc) = (Tensor::cat(imgs, 0), split_texts(txts, &sizes, k));
    let [n, e] = img_loc.dims();
    let (ni, nt) = (n * e, k * n * e);
    // 2. Gather, one call: rank q's slot holds [its images, its texts (and negatives)].
    let both = Tensor::cat(vec![img_loc.reshape([ni]), txt_loc.reshape([nt])], 0);
    let all = comm.all_gather(both)?.reshape([w, ni + nt]);
    let img_all = Tensor::<B, 2>::from_inner(all.clone().slice(s![.., 0..ni]).reshape([w * n, e]))
        .require_grad();
    let txt_slots =
        Tensor::<B, 3>::from_inner(all.slice(s![.., ni..ni + nt]).reshape([w, k * n, e]))
            .require_grad();
    let block = |j: usize| {
        txt_slots
            .clone()
            .slice(s![.., j * n..(j + 1) * n, ..])
            .reshape([w * n, e])
    };
    let (txt_all, neg_all) = (block(0), (k == 2).then(|| block(1)));
    // 3. This rank's share of the loss, back to the gathered leaves and the loss's own params.
    let share = loss_share(model, img_all.clone(), txt_all, neg_all, r * n, n, w);
    let loss: f32 = share.clone().into_scalar().elem();
    let g = share.backward();
    let (g_img, g_txt) = (img_all.grad(&g), txt_slots.grad(&g));
    let mut acc = GradientsAccumulator::<Clip<B>>::new();
    acc.accumulate(model, GradientsParams::from_grads(g, model));
    // 4. Reduce-scatter: rank q's slot again holds [its images, its texts].
    let g_both = Tensor::cat(
        vec![
            g_img.expect("gathered images are leaves").reshape([w, ni]),
            g_txt.expect("gathered texts are leaves").reshape([w, nt]),
        ],
        1,
    );
    let mine = comm.reduce_scatter_sum(g_both.reshape([w * (ni + nt)]))?;
    let g_img = mine.clone().slice(0..ni).reshape([n, e]);
    let g_txt = mine.slice(ni..ni + nt).reshape([k * n, e]);
    // 5. Through the encoders, one micro-batch at a time, text tower first: once the last
    //    micro-batch's text backward is done, the text tower's gradients are final and cross
    //    ranks (6.) while the image tower's backward runs.
    let mut acc_txt = GradientsAccumulator::<Clip<B>>::new();
    let trains = Trains::of(model);
    let (mut tracked, last) = (tracked.into_iter(), micro.len() - 1);
    let mut at = 0;
    for (i, (mb, m)) in micro.into_iter().zip(sizes).enumerate() {
        // With several micro-batches each tracked forward comes after a backward, so it runs
        // on fresh leaves (crate::leaves: otherwise another rank thread's backward can drop
        // part of its graph).
        let fresh = (tracked.len() == 0).then(|| fresh_leaves(model));
        let owner = fresh.as_ref().unwrap_or(model);
        let (zi, zt) = tracked.next().unwrap_or_else(|| {
            (
                owner.encode_image_kept(mb.images.clone(), mb.patches.clone()),
                owner.encode_text(mb.texts()),
            )
        });
        let gi = Tensor::<B, 2>::from_inner(g_img.clone().slice(s![at..at + m, ..]));
        let rows = (0..k).map(|j| g_txt.clone().slice(s![j * n + at..j * n + at + m, ..]));
        let gt = Tensor::<B, 2>::from_inner(Tensor::cat(rows.collect(), 0));
        if trains.text {
            let text = (zt * gt).sum().backward();
            acc_txt.accumulate(model, GradientsParams::from_grads(text, owner));
        }
        if i == last {
            // The text tower's gradients are final: their sums run during the image backward.
            sync.start(model, acc_txt.grads());
        }
        if trains.image {
            let image = (zi * gi).sum().backward();
            acc.accumulate(model, GradientsParams::from_grads(image, owner));
        }
        at += m;
    }
    // 6. The rest (image tower, logit scale) for the loop to sum (crate::parallel::GradSync).
    Ok((acc.grads(), loss))
}

/// Which towers have parameters to train: a locked one (LiT, `model.*.locked`) gets no
/// backward at all.
struct Trains {
    image: bool,
    text: bool,
}

impl Trains {
    fn of<B: AutodiffBackend>(model: &Clip<B>) -> Self {
        Trains {
            image: any_trained(&model.visual),
            text: any_trained(&model.text),
        }
    }
}

/// Whether some parameter of `m` requires a gradient.
fn any_trained<B: AutodiffBackend, M: burn::module::Module<B>>(m: &M) -> bool {
    struct Any(bool);
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Any {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B, D>>) {
            self.0 |= p.is_require_grad();
        }
    }
    let mut a = Any(false);
    m.visit(&mut a);
    a.0
}

fn local_negatives<B: AutodiffBackend>(
    model: &Clip<B>,
    micro: Vec<Micro<B>>,
    world: usize,
) -> (GradientsParams, f32) {
    let parts = (micro.len() * world) as f32;
    let mut acc = GradientsAccumulator::<Clip<B>>::new();
    let mut loss = 0.0;
    for (i, mb) in micro.into_iter().enumerate() {
        // After the first micro-batch's backward: fresh leaves (crate::leaves).
        let fresh = (i > 0).then(|| fresh_leaves(model));
        let model = fresh.as_ref().unwrap_or(model);
        let n = mb.len();
        let img = model.encode_image_kept(mb.images.clone(), mb.patches.clone());
        let texts = model.encode_text(mb.texts());
        let txt = texts.clone().slice(s![0..n, ..]);
        let neg = mb
            .neg_tokens
            .is_some()
            .then(|| texts.slice(s![n..2 * n, ..]));
        let l = loss_share(model, img, txt, neg, 0, n, 1) / parts;
        loss += l.clone().into_scalar().elem::<f32>();
        acc.accumulate(model, GradientsParams::from_grads(l.backward(), model));
    }
    (acc.grads(), loss)
}
