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
//! NCCL calls cannot be bounded from outside; a watchdog thread ends the process with an
//! error naming the rank and call when one outlives the timeout, so the launcher (which stops
//! the other ranks when one fails) never waits on a hang.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::prelude::*;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::comm::{to_f32, Communicator, DistError};

/// This process's NCCL communicator.
pub struct NcclComm<B: Backend> {
    comm: Comm,
    stream: Arc<CudaStream>,
    device: B::Device,
    watchdog: Arc<Watchdog>,
    /// `dist.timeout_s`: how long any collective may take, unless it says otherwise.
    timeout: Duration,
}

/// The collective in flight: its name, when it started and how long it may take.
type Pending = Option<(&'static str, Instant, Duration)>;

struct Watchdog {
    pending: Mutex<Pending>,
    stop: AtomicBool,
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
    /// Joins the job as `rank` of `world` on GPU `ordinal`; `master` is rank 0's
    /// `MASTER_ADDR:MASTER_PORT`.
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
            let id = Id::new().map_err(|e| err("ncclGetUniqueId", format!("{e:?}")))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            crate::rendezvous::serve(master, world, &bytes, timeout)
                .map_err(|m| err("rendezvous", m))?;
            id
        } else {
            let bytes =
                crate::rendezvous::fetch(master, timeout).map_err(|m| err("rendezvous", m))?;
            let mut raw = [0 as std::ffi::c_char; 128];
            if bytes.len() != raw.len() {
                return Err(err(
                    "rendezvous",
                    format!("got {} bytes, not an ncclUniqueId", bytes.len()),
                ));
            }
            for (r, b) in raw.iter_mut().zip(bytes) {
                *r = b as std::ffi::c_char;
            }
            Id::uninit(raw)
        };
        let ctx = CudaContext::new(ordinal).map_err(|e| err("cuInit", format!("{e:?}")))?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), rank, world, id)
            .map_err(|e| err("ncclCommInitRank", format!("{e:?}")))?;
        let watchdog = Arc::new(Watchdog {
            pending: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        spawn_watchdog(watchdog.clone(), rank);
        Ok(NcclComm {
            comm,
            stream,
            device,
            watchdog,
            timeout,
        })
    }

    /// Runs one staged collective: `t` to the GPU, `op` on it, the result back.
    fn staged(
        &self,
        name: &'static str,
        t: Tensor<B, 1>,
        out_len: usize,
        timeout: Duration,
        op: impl FnOnce(
            &Comm,
            &cudarc::driver::CudaSlice<f32>,
            &mut cudarc::driver::CudaSlice<f32>,
        ) -> Result<(), String>,
    ) -> Result<Tensor<B, 1>, DistError> {
        let rank = self.rank();
        let err = |msg: String| DistError::Backend {
            rank,
            op: name,
            msg,
        };
        *self.watchdog.pending.lock().expect("watchdog lock") =
            Some((name, Instant::now(), timeout));
        let run = || -> Result<Vec<f32>, DistError> {
            let send = self
                .stream
                .clone_htod(&to_f32(t))
                .map_err(|e| err(format!("{e:?}")))?;
            let mut recv = self
                .stream
                .alloc_zeros::<f32>(out_len)
                .map_err(|e| err(format!("{e:?}")))?;
            op(&self.comm, &send, &mut recv).map_err(err)?;
            self.stream
                .clone_dtoh(&recv)
                .map_err(|e| err(format!("{e:?}")))
        };
        let back = run();
        *self.watchdog.pending.lock().expect("watchdog lock") = None;
        let back = back?;
        Ok(Tensor::from_floats(back.as_slice(), &self.device))
    }
}

impl<B: Backend> Drop for NcclComm<B> {
    fn drop(&mut self) {
        self.watchdog.stop.store(true, Ordering::Relaxed);
    }
}

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
                tracing::error!("{e}; exiting");
                eprintln!("error: {e}; exiting");
                std::process::exit(3);
            }
        }
    });
}

impl<B: Backend> Communicator<B> for NcclComm<B> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn device(&self) -> &B::Device {
        &self.device
    }

    fn all_reduce_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let n = t.dims()[0];
        self.staged("all_reduce", t, n, self.timeout, |c, s, r| {
            c.all_reduce(s, r, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        })
    }

    fn all_gather(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let n = t.dims()[0] * self.world_size();
        self.staged("all_gather", t, n, self.timeout, |c, s, r| {
            c.all_gather(s, r).map(|_| ()).map_err(|e| format!("{e:?}"))
        })
    }

    fn reduce_scatter_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let n = t.dims()[0] / self.world_size();
        self.staged("reduce_scatter", t, n, self.timeout, |c, s, r| {
            c.reduce_scatter(s, r, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        })
    }

    fn broadcast(&self, t: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>, DistError> {
        let n = t.dims()[0];
        self.staged("broadcast", t, n, self.timeout, |c, s, r| {
            let src = (c.rank() == root).then_some(s);
            c.broadcast(src, r, root as i32)
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        })
    }

    /// A barrier that may take `timeout` (rank 0 evaluating or saving while the others wait,
    /// `dist.eval_timeout_s`) instead of the collectives' `dist.timeout_s`, which would make
    /// the watchdog end every waiting rank.
    fn barrier_timeout(&self, timeout: Duration) -> Result<(), DistError> {
        let ones = Tensor::ones([1], &self.device);
        self.staged("barrier", ones, 1, timeout, |c, s, r| {
            c.all_reduce(s, r, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        })
        .map(|_| ())
    }
}
