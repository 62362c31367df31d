//! The autodiff node shared by the one-input kernels (GELU, softmax): the forward runs now, and
//! the backward gets one saved tensor, the input or the output, with the incoming gradient.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};

use super::ADFlexTensor;

/// What the backward reads besides the gradient.
pub(super) enum Keep {
    Input,
    Output,
}

#[derive(Debug)]
struct Unary {
    backward: fn(FlexTensor, FlexTensor) -> FlexTensor,
}

impl Backward<Flex, 1> for Unary {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (saved, backward) = (ops.state, self.backward);
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| backward(saved, grad));
    }
}

/// `forward(x)` as a node of `x`'s graph whose backward is `backward(saved, grad)`.
pub(super) fn unary_node(
    x: ADFlexTensor,
    forward: fn(FlexTensor) -> FlexTensor,
    keep: Keep,
    backward: fn(FlexTensor, FlexTensor) -> FlexTensor,
) -> ADFlexTensor {
    match (Unary { backward })
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (saved, y) = match keep {
                Keep::Input => (x.primitive.clone(), forward(x.primitive)),
                Keep::Output => {
                    let y = forward(x.primitive);
                    (y.clone(), y)
                }
            };
            prep.finish(saved, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive)),
    }
}
