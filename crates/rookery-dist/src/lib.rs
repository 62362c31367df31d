//! rookery-dist: the collectives data-parallel training needs, behind one small trait
//! ([`Communicator`]), with real engines behind it:
//!
//! - [`local`]: ranks as threads of one process, through burn's own collectives
//!   (burn-collective); the default for several ranks on one machine and in tests;
//! - `mpi` (cargo feature `mpi`): processes on one or many nodes through OpenMPI;
//! - `nccl` (cargo feature `nccl`, on with `cuda`): GPUs across processes and nodes, the
//!   unique id handed out by [`rendezvous`];
//! - [`single`]: the world of one rank, where every collective is the identity.
//!
//! [`connect`] makes this process's communicator from `[dist]` ([`DistConfig`]) and the
//! launcher's environment. Every call is bounded by a timeout, so a dead peer becomes an error naming it, never a hang.
//! [`flat`] packs many tensors into a few flat buckets so gradients cross the wire in large
//! messages; [`launch`] reads ranks from the environment (torchrun, Slurm, OpenMPI).

pub mod comm;
pub mod config;
pub mod connect;
pub mod flat;
pub mod launch;
pub mod libs;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod single;

pub use comm::{check_same, Communicator, DistError, Pending};
pub use config::{DistBackend, DistConfig};
pub use connect::connect;
pub use local::LocalGroup;
pub use single::Single;
