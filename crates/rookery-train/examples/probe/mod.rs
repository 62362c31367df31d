//! What the probe examples share: the frozen tower's patch tokens of many images, and a
//! head's accuracy. (A directory module, so that cargo does not take it for an example.)

use burn::backend::Flex;
use burn::prelude::*;
use rookery_model::flamingo::VisionTower;

/// The tower's patch tokens `[N, frames, P, D]` of `px`: N x `frames` images of `size`²
/// pixels, CHW each (the class token dropped, as stage 2 does), run 200 media at a time.
pub fn patch_tokens(
    vision: &VisionTower<Flex>,
    px: &[f32],
    frames: usize,
    size: usize,
    device: &Device<Flex>,
) -> Tensor<Flex, 4> {
    let per = 3 * size * size;
    let chunks = px.chunks(200 * frames * per).map(|c| {
        let m = c.len() / per;
        let x =
            Tensor::<Flex, 4>::from_data(TensorData::new(c.to_vec(), [m, 3, size, size]), device);
        let t = vision.patch_tokens(x, false);
        let [_, p, d] = t.dims();
        t.reshape([m / frames, frames, p, d])
    });
    Tensor::cat(chunks.collect(), 0)
}

/// The share of rows of `logits` `[N, C]` whose highest class is `label(row)`.
pub fn accuracy(logits: Tensor<Flex, 2>, label: impl Fn(usize) -> usize) -> f32 {
    let n = logits.dims()[0];
    let pred: Vec<i64> = logits
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    let right = pred
        .iter()
        .enumerate()
        .filter(|(i, p)| **p as usize == label(*i))
        .count();
    right as f32 / n as f32
}
