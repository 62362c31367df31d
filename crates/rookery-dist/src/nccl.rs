//! NCCL across processes and nodes (cargo feature `nccl`, on with `cuda`), through the same
//! cudarc 0.19 that burn's CUDA backend links, with NCCL loaded at run time, so it compiles on
//! machines without CUDA. One communicator per process; rank 0 makes the `ncclUniqueId` and
//! hands it out through the launcher's TCP rendezvous ([`crate::rendezvous`]).
//!
//! Limitation, stated plainly: buffers are staged through host memory (tensor -> host ->
//! cudarc device buffer -> NCCL -> host -> tensor). Handing burn's own device buffers to NCCL
//! needs cubecl's raw allocation handles and an `unsafe` pointer wrap, which was not written
//! without a GPU at hand to check it on.
//!
//! NCCL calls cannot be bounded from outside; a watchdog thread bounds `ncclCommInitRank` and
//! every collective: when one outlives its timeout it calls `ncclCommAbort` on the
//! communicator (through [`raw`], which keeps the handle cudarc's safe `Comm` hides) and ends
//! the process with an error naming the rank and call, so the launcher (which stops the other
//! ranks when one fails) never waits on a hang.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use burn::prelude::*;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use crate::comm::{to_f32, Communicator, DistError};

mod raw;
use raw::{Op, RawComm};

/// This process's NCCL communicator.
pub struct NcclComm<B: Backend> {
    comm: Arc<RawComm>,
    stream: Arc<CudaStream>,
    device: B::Device,
    watchdog: Arc<Watchdog>,
    /// `dist.timeout_s`: how long any collective may take, unless it says otherwise.
    timeout: Duration,
}

/// The call in flight: its name, when it started and how long it may take.
type Pending = Option<(&'static str, Instant, Duration)>;

/// What the watchdog thread watches: the call in flight, and the communicator it aborts
/// (once made: `ncclCommInitRank` is watched before it exists).
struct Watchdog {
    pending: Mutex<Pending>,
    comm: OnceLock<Arc<RawComm>>,
    stop: AtomicBool,
}

impl Watchdog {
    fn watch(&self, call: Pending) {
        *self.pending.lock().expect("watchdog lock") = call;
    }
}

/// Whether cudarc can open the NCCL library (under one of the names it tries).
#[allow(unsafe_code)]
pub fn library_loadable() -> bool {
    // SAFETY: only tries to dlopen the library under cudarc's candidate names; nothing is
    // called in it.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// How many GPUs this process sees (after `CUDA_VISIBLE_DEVICES`); 0 when the driver cannot
/// say.
pub fn visible_gpus() -> usize {
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

impl<B: Backend> NcclComm<B> {
    /// Joins the job as `rank` of `world` on GPU `ordinal`; `master` is rank 0's rendezvous
    /// address. The rendezvous and `ncclCommInitRank` (which waits for every rank) are
    /// bounded by `timeout` like the collectives.
    pub fn init(
        device: B::Device,
        ordinal: usize,
        rank: usize,
        world: usize,
        master: &str,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        let err = |op, msg: String| DistError::Backend { rank, op, msg };
        let id = if rank == 0 {
            let id = raw::unique_id().map_err(|e| err("ncclGetUniqueId", format!("{e:?}")))?;
            crate::rendezvous::serve(master, world, &raw::id_bytes(&id), timeout)
                .map_err(|m| err("rendezvous", m))?;
            id
        } else {
            let bytes =
                crate::rendezvous::fetch(master, timeout).map_err(|m| err("rendezvous", m))?;
            raw::id_from_bytes(&bytes).map_err(|m| err("rendezvous", m))?
        };
        let ctx = CudaContext::new(ordinal).map_err(|e| err("cuInit", format!("{e:?}")))?;
        ctx.bind_to_thread()
            .map_err(|e| err("cuCtxSetCurrent", format!("{e:?}")))?;
        let stream = ctx.default_stream();
        let watchdog = Arc::new(Watchdog {
            pending: Mutex::new(None),
            comm: OnceLock::new(),
            stop: AtomicBool::new(false),
        });
        spawn_watchdog(watchdog.clone(), rank);
        watchdog.watch(Some(("ncclCommInitRank", Instant::now(), timeout)));
        let comm = RawComm::init(world, id, rank);
        watchdog.watch(None);
        let comm = Arc::new(comm.map_err(|e| err("ncclCommInitRank", format!("{e:?}")))?);
        let _ = watchdog.comm.set(comm.clone());
        Ok(NcclComm {
            comm,
            stream,
            device,
            watchdog,
            timeout,
        })
    }

    /// Runs one staged collective: `t` to the GPU, `op` on it, the result back (the copy back
    /// waits for the collective: that wait is what the watchdog bounds).
    fn staged(
        &self,
        name: &'static str,
        t: Tensor<B, 1>,
        out_len: usize,
        timeout: Duration,
        op: Op,
    ) -> Result<Tensor<B, 1>, DistError> {
        let rank = self.rank();
        let err = |msg: String| DistError::Backend {
            rank,
            op: name,
            msg,
        };
        self.watchdog.watch(Some((name, Instant::now(), timeout)));
        let run = || -> Result<Vec<f32>, DistError> {
            let send: CudaSlice<f32> = self
                .stream
                .clone_htod(&to_f32(t))
                .map_err(|e| err(format!("{e:?}")))?;
            let mut recv = self
                .stream
                .alloc_zeros::<f32>(out_len)
                .map_err(|e| err(format!("{e:?}")))?;
            self.comm
                .launch(op, &send, &mut recv, &self.stream)
                .map_err(|e| err(format!("{e:?}")))?;
            self.stream
                .clone_dtoh(&recv)
                .map_err(|e| err(format!("{e:?}")))
        };
        let back = run();
        self.watchdog.watch(None);
        let back = back?;
        Ok(Tensor::from_floats(back.as_slice(), &self.device))
    }
}

impl<B: Backend> Drop for NcclComm<B> {
    fn drop(&mut self) {
        self.watchdog.stop.store(true, Ordering::Relaxed);
    }
}

/// Every 200 ms: when the call in flight has outlived its timeout, aborts the communicator
/// (`ncclCommAbort`: the blocked call returns, NCCL's own threads stop, its connections close
/// so peers see an error instead of waiting) and ends the process with an error naming the
/// rank and call. The launcher then stops the other ranks.
fn spawn_watchdog(w: Arc<Watchdog>, rank: usize) {
    std::thread::spawn(move || {
        while !w.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let late = w
                .pending
                .lock()
                .ok()
                .and_then(|p| *p)
                .filter(|(_, since, timeout)| since.elapsed() > *timeout);
            if let Some((op, _, timeout)) = late {
                let e = DistError::Timeout {
                    rank,
                    op,
                    secs: timeout.as_secs_f64(),
                    waiting_for: vec![],
                };
                tracing::error!("{e}; aborting the NCCL communicator and exiting");
                eprintln!("error: {e}; exiting");
                if let Some(c) = w.comm.get() {
                    c.abort();
                }
                std::process::exit(3);
            }
        }
    });
}

impl<B: Backend> Communicator<B> for NcclComm<B> {
    fn rank(&self) -> usize {
        self.comm.rank
    }
    fn world_size(&self) -> usize {
        self.comm.world
    }
    fn device(&self) -> &B::Device {
        &self.device
    }

    fn all_reduce_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let n = t.dims()[0];
        self.staged("all_reduce", t, n, self.timeout, Op::AllReduceSum)
    }

    fn all_gather(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let n = t.dims()[0] * self.world_size();
        self.staged("all_gather", t, n, self.timeout, Op::AllGather)
    }

    fn reduce_scatter_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let n = t.dims()[0] / self.world_size();
        self.staged("reduce_scatter", t, n, self.timeout, Op::ReduceScatterSum)
    }

    fn broadcast(&self, t: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>, DistError> {
        let n = t.dims()[0];
        self.staged("broadcast", t, n, self.timeout, Op::Broadcast { root })
    }

    /// A barrier that may take `timeout` (rank 0 evaluating or saving while the others wait,
    /// `dist.eval_timeout_s`) instead of the collectives' `dist.timeout_s`, which would make
    /// the watchdog end every waiting rank.
    fn barrier_timeout(&self, timeout: Duration) -> Result<(), DistError> {
        let ones = Tensor::ones([1], &self.device);
        self.staged("barrier", ones, 1, timeout, Op::AllReduceSum)
            .map(|_| ())
    }
}
