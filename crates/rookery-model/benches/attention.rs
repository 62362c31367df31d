//! Attention kernel at clip-tiny's shapes, forward and forward + backward, one thread (a rank
//! of clip-tiny's training runs on one core). `cargo bench -p rookery-model --bench attention`.
//! Prints the CPU model and `/proc/loadavg` beside the times: this machine is shared.

use std::time::Instant;

use burn::backend::{flex::Flex, Autodiff};
use burn::prelude::*;
use burn::tensor::Distribution;
use rookery_model::cpu::{attention, AttentionSpec};

type AD = Autodiff<Flex>;

/// The allocator and settings of the `rookery` binary, so that buffers are reused as in
/// training rather than faulted in from the OS on every call.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(unsafe_code)]
fn keep_freed_pages() {
    // SAFETY: sets one integer option of mimalloc (15: purge delay in v3; -1: never purge).
    unsafe { libmimalloc_sys::mi_option_set(15, -1) }
}

/// The fastest of `reps` runs of `f` in milliseconds, after two warm-up runs: other tenants of
/// a shared machine only ever add time, so the minimum is the steadiest figure.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

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
    let fwd = time(40, || {
        let y = attention(qkv.clone().detach(), spec.clone());
        let _ = y.into_data();
    });
    let both = time(40, || {
        let x = qkv.clone().detach().require_grad();
        let y = attention(x.clone(), spec.clone());
        let grads = (y * dy.clone()).sum().backward();
        let _ = x.grad(&grads).unwrap().into_data();
    });
    println!("{name:<28} forward {fwd:6.2} ms   forward+backward {both:6.2} ms (best of 40)");
}

fn main() {
    keep_freed_pages();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("{cpu}\nloadavg {}", load.trim());
    pool.install(|| {
        case("image 128 x 17, 8 x 16", 128, 17, 128, 8, false);
        case("text 128 x 20, 4 x 32 causal", 128, 20, 128, 4, true);
    });
}
