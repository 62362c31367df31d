//! The next-token loss of causal language models (and of Flamingo, whose loss falls only on
//! text tokens): weighted, summed, so callers choose the normaliser (the global token count in
//! data-parallel training, the scored tokens in evaluation).

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

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
