//! The NCCL communicator through cudarc's `result` layer: its handle stays ours, so the
//! watchdog can call `ncclCommAbort` from its own thread while a collective blocks (NCCL's
//! documented way to unblock one). cudarc's safe `Comm` keeps the handle private and aborts
//! only when dropped, which the blocked thread never reaches. Every call mirrors cudarc's
//! safe wrapper of the same name (`cudarc::nccl::safe`), pointer for pointer.

#![allow(unsafe_code)]

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result::{self, NcclError};
use cudarc::nccl::sys;

/// A communicator this process joined; aborted once, on the watchdog's call or when dropped.
pub struct RawComm {
    handle: sys::ncclComm_t,
    ended: AtomicBool,
    pub rank: usize,
    pub world: usize,
}

// SAFETY: an NCCL communicator is a handle NCCL locks internally; rookery issues collectives
// from one thread and `ncclCommAbort` is documented as callable from another thread to stop
// them. The `ended` flag makes sure the handle is released exactly once.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

/// The collectives rookery uses, on f32 buffers.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    AllReduceSum,
    AllGather,
    ReduceScatterSum,
    Broadcast { root: usize },
}

pub fn unique_id() -> Result<sys::ncclUniqueId, NcclError> {
    result::get_uniqueid()
}

pub fn id_bytes(id: &sys::ncclUniqueId) -> Vec<u8> {
    id.internal.iter().map(|&c| c as u8).collect()
}

pub fn id_from_bytes(bytes: &[u8]) -> Result<sys::ncclUniqueId, String> {
    let mut internal = [0 as std::ffi::c_char; 128];
    if bytes.len() != internal.len() {
        return Err(format!("got {} bytes, not an ncclUniqueId", bytes.len()));
    }
    for (r, b) in internal.iter_mut().zip(bytes) {
        *r = *b as std::ffi::c_char;
    }
    Ok(sys::ncclUniqueId { internal })
}

impl RawComm {
    /// `ncclCommInitRank` on the CUDA context bound to this thread; blocks until every rank
    /// has joined.
    pub fn init(world: usize, id: sys::ncclUniqueId, rank: usize) -> Result<Self, NcclError> {
        let mut handle = MaybeUninit::uninit();
        // SAFETY: `handle` is written by NCCL before it returns success; as in cudarc's
        // `Comm::from_rank`.
        let handle = unsafe {
            result::comm_init_rank(handle.as_mut_ptr(), world as i32, id, rank as i32)?;
            handle.assume_init()
        };
        Ok(RawComm {
            handle,
            ended: AtomicBool::new(false),
            rank,
            world,
        })
    }

    /// Enqueues `op` from `send` into `recv` on `stream` (it returns before the collective
    /// ends; a copy back on the stream waits for it).
    pub fn launch(
        &self,
        op: Op,
        send: &CudaSlice<f32>,
        recv: &mut CudaSlice<f32>,
        stream: &CudaStream,
    ) -> Result<(), NcclError> {
        let f32 = sys::ncclDataType_t::ncclFloat32;
        let sum = sys::ncclRedOp_t::ncclSum;
        // Element counts as NCCL takes them: the send buffer's (all-reduce, all-gather), the
        // receive buffer's (reduce-scatter, broadcast).
        let (sent, received) = (send.len(), recv.len());
        // The records make later work on `stream` wait for these buffers, as cudarc's do.
        let (src, _src) = send.device_ptr(stream);
        let (dst, _dst) = recv.device_ptr_mut(stream);
        let (src, dst, s) = (src as *const _, dst as *mut _, stream.cu_stream() as _);
        let h = self.handle;
        // SAFETY: both buffers are live device allocations of the sizes NCCL reads and writes
        // (the caller sized `recv`: count, world * count, or count / world), on `stream`.
        let r = unsafe {
            match op {
                Op::AllReduceSum => result::all_reduce(src, dst, sent, f32, sum, h, s),
                Op::AllGather => result::all_gather(src, dst, sent, f32, h, s),
                Op::ReduceScatterSum => result::reduce_scatter(src, dst, received, f32, sum, h, s),
                Op::Broadcast { root } => {
                    result::broadcast(src, dst, received, f32, root as i32, h, s)
                }
            }
        };
        r.map(|_| ())
    }

    /// `ncclCommAbort`, once: stops what is in flight and frees the communicator.
    pub fn abort(&self) {
        if !self.ended.swap(true, Ordering::SeqCst) {
            // SAFETY: the handle came from `ncclCommInitRank` and is released only here.
            let _ = unsafe { result::comm_abort(self.handle) };
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        self.abort();
    }
}
