//! Next-token loss on interleaved sequences, exact over the global batch: the mean of
//! `-log p(token)` over every target token of every micro-batch on every rank.
//!
//! Each rank first learns the global number of target tokens (one scalar all-reduce), then
//! back-propagates `sum(its tokens' losses) / global count` micro-batch by micro-batch; the
//! gradients summed over ranks are then those of one process holding the whole batch.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rookery_data::pages::PageBatch;
use rookery_dist::{Communicator, DistError};
use rookery_eval::input::page_tensors;
use rookery_model::next_token::next_token_loss_sum;

use crate::leaves::fresh_leaves;
use crate::parallel::GradSync;
use crate::step::{LocalGrads, StepGrads, Timed};

/// The gradients and loss of one step of next-token training over this rank's
/// `micro`-batches, summed over ranks: [`causal_local`] finished by a [`GradSync`] of its own
/// (what a loop does; for tests). `logits(model, batch)` runs the model.
pub fn causal_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    micro: Vec<PageBatch>,
    comm: &dyn Communicator<B::InnerBackend>,
    bucket_elems: usize,
    logits: impl Fn(&M, &PageBatch, Tensor<B, 2, Int>) -> Tensor<B, 3>,
) -> Result<StepGrads, DistError> {
    let sync = GradSync::new(comm, bucket_elems);
    let local = causal_local(model, micro, comm, logits)?;
    sync.finish(model, local)
}

/// This rank's part of one step of next-token training: the loss of its tokens over the
/// global token count, and its gradients.
pub fn causal_local<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    micro: Vec<PageBatch>,
    comm: &dyn Communicator<B::InnerBackend>,
    logits: impl Fn(&M, &PageBatch, Tensor<B, 2, Int>) -> Tensor<B, 3>,
) -> Result<LocalGrads, DistError> {
    let comm = &Timed::new(comm);
    let device = comm.device().clone();
    let mine: f32 = micro.iter().flat_map(|b| b.targets.iter()).sum();
    let total: f32 = comm
        .all_reduce_sum(Tensor::from_floats([mine], &device))?
        .into_scalar()
        .elem();
    let total = total.max(1.0);
    let mut acc = GradientsAccumulator::<M>::new();
    let mut loss = 0.0f32;
    for (i, b) in micro.iter().enumerate() {
        // After the first micro-batch's backward: fresh leaves (crate::leaves).
        let fresh = (i > 0).then(|| fresh_leaves(model));
        let model = fresh.as_ref().unwrap_or(model);
        let (tokens, weights) = page_tensors::<B>(b, &device);
        let out = logits(model, b, tokens.clone());
        let l = next_token_loss_sum(out, tokens, weights) / total;
        loss += l.clone().into_scalar().elem::<f32>();
        acc.accumulate(model, GradientsParams::from_grads(l.backward(), model));
    }
    Ok(LocalGrads {
        grads: acc.grads(),
        loss_share: loss,
        comm_s: comm.secs(),
    })
}
