//! Next-token loss on interleaved sequences, exact over the global batch: the mean of
//! `-log p(token)` over every target token of every micro-batch on every rank.
//!
//! Each rank first learns the global number of target tokens (one scalar all-reduce), then
//! back-propagates `sum(its tokens' losses) / global count` micro-batch by micro-batch; the
//! gradients summed over ranks are then those of one process holding the whole batch.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use rookery_data::pages::PageBatch;
use rookery_dist::{Communicator, DistError};

use crate::leaves::fresh_leaves;
use crate::parallel::all_reduce_grads;
use crate::step::{StepGrads, Timed};

/// `sum_t w[t] * -log softmax(logits[t - 1])[tokens[t]]`: the loss of predicting each
/// weighted token from the positions before it (`logits` `[B, T, V]`, the rest `[B, T]`).
pub fn next_token_loss_sum<B: Backend>(
    logits: Tensor<B, 3>,
    tokens: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, t, _] = logits.dims();
    let pred = logits.slice(s![.., 0..t - 1, ..]);
    let next = tokens.slice(s![.., 1..t]).reshape([b, t - 1, 1]);
    let w = weights.slice(s![.., 1..t]);
    let picked = log_softmax(pred, 2).gather(2, next).reshape([b, t - 1]);
    (picked * w).sum().neg()
}

/// A page batch's tokens `[B, T]` and target weights `[B, T]`.
pub fn page_tensors<B: Backend>(
    b: &PageBatch,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let (n, t) = (b.batch_size, b.context_length);
    let tokens = Tensor::from_data(TensorData::new(b.tokens.clone(), [n, t]), device);
    let weights = Tensor::from_data(TensorData::new(b.targets.clone(), [n, t]), device);
    (tokens, weights)
}

/// A page batch's images `[B, N, 3, S, S]` (only models that read images need them).
pub fn page_images<B: Backend>(b: &PageBatch, device: &B::Device) -> Tensor<B, 5> {
    let s = b.image_size;
    Tensor::from_data(
        TensorData::new(b.images.clone(), [b.batch_size, b.max_images, 3, s, s]),
        device,
    )
}

/// The gradients of one step of next-token training over this rank's `micro`-batches;
/// `logits(model, batch)` runs the model.
pub fn causal_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    micro: Vec<PageBatch>,
    comm: &dyn Communicator<B::InnerBackend>,
    bucket_elems: usize,
    logits: impl Fn(&M, &PageBatch, Tensor<B, 2, Int>) -> Tensor<B, 3>,
) -> Result<StepGrads, DistError> {
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
    let grads = all_reduce_grads(model, acc.grads(), comm, bucket_elems)?;
    let loss = comm.all_reduce_sum(Tensor::from_floats([loss], &device))?;
    Ok(StepGrads {
        grads,
        loss: loss.into_scalar().elem(),
        comm_s: comm.secs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn loss_is_the_weighted_sum_of_next_token_negative_log_likelihoods() {
        let dev = Default::default();
        // One row, 3 positions, vocabulary 2.
        let logits = Tensor::<Flex, 3>::from_floats([[[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]]], &dev);
        let tokens = Tensor::<Flex, 2, Int>::from_ints([[1, 0, 1]], &dev);
        let weights = Tensor::<Flex, 2>::from_floats([[1.0, 1.0, 0.5]], &dev);
        let got: f32 = next_token_loss_sum(logits, tokens, weights)
            .into_scalar()
            .elem();
        // Token 1 (0) from position 0: -log(e^0 / (e^0 + e^1)); token 2 (1) from position 1,
        // weight 0.5: -log(e^0 / (e^2 + e^0)). Token 0's weight never counts.
        let want = (1.0f64 + 1f64.exp()).ln() + 0.5 * (1.0 + 2f64.exp()).ln();
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }
}
