//! Processes on one or many nodes through MPI (rsmpi over OpenMPI): CPU collectives, and the
//! way ranks find each other under `mpirun` / `srun`.
//!
//! Calls are MPI's non-blocking collectives polled against a deadline. An MPI collective cannot
//! be cancelled, so a timeout prints the error and calls `MPI_Abort`, which ends every rank of
//! the job; a rank that dies is reported by `mpirun` itself, which then stops the others.

use std::time::{Duration, Instant};

use burn::prelude::*;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};

use crate::comm::{to_f32, Communicator, DistError};

/// This process's handle on `MPI_COMM_WORLD`.
pub struct MpiComm<B: Backend> {
    // Dropping the universe finalises MPI: it lives as long as the communicator.
    _universe: Universe,
    world: SimpleCommunicator,
    device: B::Device,
    timeout: Duration,
}

impl<B: Backend> MpiComm<B> {
    /// Initialises MPI (once per process).
    pub fn init(device: B::Device, timeout: Duration) -> Result<Self, DistError> {
        let universe = mpi::initialize().ok_or_else(|| DistError::Backend {
            rank: 0,
            op: "MPI_Init",
            msg: "MPI was already initialised in this process".into(),
        })?;
        let world = universe.world();
        Ok(MpiComm {
            _universe: universe,
            world,
            device,
            timeout,
        })
    }

    /// Polls `req` until it completes or the deadline passes; then there is no way back.
    fn finish<'a, D: ?Sized, S: mpi::request::Scope<'a>>(
        &self,
        op: &'static str,
        req: mpi::request::Request<'a, D, S>,
    ) {
        self.finish_within(op, self.timeout, req)
    }

    fn finish_within<'a, D: ?Sized, S: mpi::request::Scope<'a>>(
        &self,
        op: &'static str,
        timeout: Duration,
        mut req: mpi::request::Request<'a, D, S>,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if Instant::now() >= deadline {
                let e = DistError::Timeout {
                    rank: self.world.rank() as usize,
                    op,
                    secs: timeout.as_secs_f64(),
                    waiting_for: vec![],
                };
                tracing::error!("{e}; aborting the MPI job");
                eprintln!("error: {e}; aborting the MPI job");
                self.world.abort(3);
            }
            std::thread::yield_now();
        }
    }

    fn tensor(&self, v: Vec<f32>) -> Tensor<B, 1> {
        Tensor::from_floats(v.as_slice(), &self.device)
    }
}

impl<B: Backend> Communicator<B> for MpiComm<B> {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.world.size() as usize
    }
    fn device(&self) -> &B::Device {
        &self.device
    }

    fn all_reduce_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let send = to_f32(t);
        let mut recv = vec![0f32; send.len()];
        mpi::request::scope(|sc| {
            let req = self.world.immediate_all_reduce_into(
                sc,
                &send[..],
                &mut recv[..],
                SystemOperation::sum(),
            );
            self.finish("all_reduce", req);
        });
        Ok(self.tensor(recv))
    }

    fn all_gather(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let send = to_f32(t);
        let mut recv = vec![0f32; send.len() * self.world_size()];
        mpi::request::scope(|sc| {
            let req = self
                .world
                .immediate_all_gather_into(sc, &send[..], &mut recv[..]);
            self.finish("all_gather", req);
        });
        Ok(self.tensor(recv))
    }

    fn reduce_scatter_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let send = to_f32(t);
        let mut recv = vec![0f32; send.len() / self.world_size()];
        mpi::request::scope(|sc| {
            let req = self.world.immediate_reduce_scatter_block_into(
                sc,
                &send[..],
                &mut recv[..],
                SystemOperation::sum(),
            );
            self.finish("reduce_scatter", req);
        });
        Ok(self.tensor(recv))
    }

    fn broadcast(&self, t: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>, DistError> {
        let mut buf = to_f32(t);
        mpi::request::scope(|sc| {
            let req = self
                .world
                .process_at_rank(root as i32)
                .immediate_broadcast_into(sc, &mut buf[..]);
            self.finish("broadcast", req);
        });
        Ok(self.tensor(buf))
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.barrier_timeout(self.timeout)
    }

    fn barrier_timeout(&self, timeout: Duration) -> Result<(), DistError> {
        let req = self.world.immediate_barrier();
        self.finish_within("barrier", timeout, req);
        Ok(())
    }
}
