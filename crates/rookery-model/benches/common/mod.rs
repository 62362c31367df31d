//! What the kernel benches share: the `rookery` binary's allocator and settings, the machine's
//! description, and best-of-N timing.

use std::time::Instant;

/// The allocator of the `rookery` binary, so that buffers are reused as in training rather
/// than faulted in from the OS on every call.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps freed pages (mimalloc v3 option 15, purge delay, to -1: never) with the guard
/// `rookery`'s main.rs uses (the option is only set when it reads back as v3's default 1000
/// ms, so another mimalloc layout is left alone, and never over `MIMALLOC_PURGE_DELAY`), and
/// prints the CPU model and `/proc/loadavg`: this machine is shared.
#[allow(unsafe_code)]
pub fn setup() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: reads and sets one integer option in mimalloc's option table.
        unsafe {
            if libmimalloc_sys::mi_option_get(15) == 1000 {
                libmimalloc_sys::mi_option_set(15, -1);
            }
        }
    }
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
}

/// The fastest of `reps` runs of `f` in milliseconds, after two warm-up runs: other tenants of
/// a shared machine only ever add time, so the minimum is the steadiest figure.
pub fn time(reps: usize, mut f: impl FnMut()) -> f64 {
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

/// Runs `f` on a pool of one thread: a rank of clip-tiny's training runs on one core.
pub fn on_one_thread(f: impl FnOnce() + Send) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build();
    pool.expect("a rayon pool of one thread").install(f)
}
