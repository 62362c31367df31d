//! Host batches as device tensors, the one place both training and evaluation make them.

use burn::prelude::*;
use rookery_data::pages::PageBatch;
use rookery_data::ImageTextBatch;
use rookery_model::flamingo::Flamingo;
use rookery_model::text::{trim_context, used_context};

/// The batch as tensors, its tokens cut to the positions the text tower uses.
pub fn batch_tensors<B: Backend>(
    b: &ImageTextBatch,
    eot_token: usize,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 2, Int>) {
    let images = image_tensor(b, device);
    let keep = used_context(&b.tokens, b.context_length, eot_token);
    let tokens = token_tensor(&b.tokens, b.batch_size, b.context_length, keep, device);
    (images, tokens)
}

/// The batch's images `[N, 3, S, S]`.
pub fn image_tensor<B: Backend>(b: &ImageTextBatch, device: &B::Device) -> Tensor<B, 4> {
    let s = b.image_size;
    let data = TensorData::new(b.images.clone(), [b.batch_size, 3, s, s]);
    Tensor::from_data(data, device)
}

/// `[rows, ctx]` token ids as a tensor of their first `keep` positions: from
/// [`used_context`], this is exact (see there).
pub fn token_tensor<B: Backend>(
    ids: &[i64],
    rows: usize,
    ctx: usize,
    keep: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let ids = trim_context(ids, ctx, keep);
    Tensor::from_data(TensorData::new(ids, [rows, keep]), device)
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

/// A page batch's media `[B, N, F, 3, S, S]` (only models that read images need them).
pub fn page_media<B: Backend>(b: &PageBatch, device: &B::Device) -> Tensor<B, 6> {
    let (s, f) = (b.image_size, b.max_frames);
    let shape = [b.batch_size, b.max_images, f, 3, s, s];
    Tensor::from_data(TensorData::new(b.images.clone(), shape), device)
}

/// Next-token logits of a page batch: its tokens with its media.
pub fn page_logits<B: Backend>(
    model: &Flamingo<B>,
    tokens: Tensor<B, 2, Int>,
    b: &PageBatch,
    device: &B::Device,
) -> Tensor<B, 3> {
    model.forward_media(tokens, page_media(b, device), Some(&b.frames))
}
