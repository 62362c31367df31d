//! Attention kernel at clip-tiny's shapes, forward and forward + backward, one thread (a rank
//! of clip-tiny's training runs on one core). `cargo bench -p rookery-model --bench attention`.
//! Prints the CPU model and `/proc/loadavg` beside the times: this machine is shared.

use burn::backend::{flex::Flex, Autodiff};
use burn::prelude::*;
use burn::tensor::Distribution;
use rookery_model::cpu::{attention, AttentionSpec};

mod common;

type AD = Autodiff<Flex>;

fn case(name: &str, batch: usize, t: usize, d: usize, heads: usize, causal: bool) {
    let device = Default::default();
    let spec = AttentionSpec {
        batch,
        heads,
        causal,
        rows: None,
    };
    let qkv = Tensor::<AD, 2>::random([batch * t, 3 * d], Distribution::Normal(0.0, 1.0), &device);
    let dy = Tensor::<AD, 2>::random([batch * t, d], Distribution::Normal(0.0, 1.0), &device);
    let fwd = common::time(40, || {
        let y = attention(qkv.clone().detach(), spec.clone());
        let _ = y.into_data();
    });
    let both = common::time(40, || {
        let x = qkv.clone().detach().require_grad();
        let y = attention(x.clone(), spec.clone());
        let grads = (y * dy.clone()).sum().backward();
        let _ = x.grad(&grads).unwrap().into_data();
    });
    println!("{name:<28} forward {fwd:6.2} ms   forward+backward {both:6.2} ms (best of 40)");
}

fn main() {
    common::setup();
    common::on_one_thread(|| {
        case("image 128 x 17, 8 x 16", 128, 17, 128, 8, false);
        case("text 128 x 20, 4 x 32 causal", 128, 20, 128, 4, true);
    });
}
