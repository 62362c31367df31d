//! This process's communicator from `[dist]` and the launcher's environment.

use burn::prelude::Backend;

use crate::config::{DistBackend, DistConfig};
use crate::launch::RankEnv;
use crate::{Communicator, Single};

/// A communicator with the device this rank computes on.
pub type Connected<B> = (Box<dyn Communicator<B>>, burn::prelude::Device<B>);

/// The communicator of this process for `cfg.backend`: MPI (ranks from `mpirun`/`srun`) or
/// NCCL (ranks, addresses and the rendezvous port from `rookery launch`, torchrun-style
/// variables or Slurm; one GPU per rank), checked against `cfg.world_size`; a lone rank for
/// `local` with `world_size = 1`. `device(i)` is the device of node-local index `i`. Thread
/// ranks (`local`, `world_size > 1`) live in one process and start through
/// [`crate::LocalGroup::run`] instead: asked for here, they are refused.
pub fn connect<B: Backend>(
    cfg: &DistConfig,
    device: impl Fn(usize) -> B::Device,
) -> Result<Connected<B>, String> {
    match cfg.backend {
        DistBackend::Local if cfg.world_size == 1 => {
            let dev = device(0);
            Ok((Box::new(Single::<B>::new(dev.clone())), dev))
        }
        DistBackend::Local => Err(format!(
            "dist.world_size = {} thread ranks start through LocalGroup::run, not connect",
            cfg.world_size
        )),
        DistBackend::Mpi => mpi::<B>(cfg, device),
        DistBackend::Nccl => nccl::<B>(cfg, device),
    }
}

#[cfg(feature = "mpi")]
fn mpi<B: Backend>(
    cfg: &DistConfig,
    device: impl Fn(usize) -> B::Device,
) -> Result<Connected<B>, String> {
    // The node-local rank picks the device; MPI itself numbers the ranks.
    let local = RankEnv::detect()?.map_or(0, |e| e.local_rank);
    let dev = device(local);
    let comm =
        crate::mpi::MpiComm::<B>::init(dev.clone(), cfg.timeout()).map_err(|e| e.to_string())?;
    let w = comm.world_size();
    if cfg.world_size != 1 && cfg.world_size != w {
        return Err(format!(
            "dist.world_size = {} but the MPI job has {w} ranks",
            cfg.world_size
        ));
    }
    Ok((Box::new(comm), dev))
}

#[cfg(not(feature = "mpi"))]
fn mpi<B: Backend>(_: &DistConfig, _: impl Fn(usize) -> B::Device) -> Result<Connected<B>, String> {
    let _ = RankEnv::detect;
    Err("dist.backend = \"mpi\" needs a build with the `mpi` feature (cargo build --release --features mpi; OpenMPI and libclang installed)".into())
}

#[cfg(feature = "nccl")]
fn nccl<B: Backend>(
    cfg: &DistConfig,
    device: impl Fn(usize) -> B::Device,
) -> Result<Connected<B>, String> {
    let env = RankEnv::detect()?.ok_or(
        "dist.backend = \"nccl\" needs a launcher: rookery launch, torchrun-style variables, Slurm or mpirun",
    )?;
    let rdzv = std::env::var("ROOKERY_RDZV_PORT").ok();
    let port = crate::rendezvous::port(env.master_port, rdzv.as_deref())?;
    let master = format!(
        "{}:{port}",
        env.master_addr.as_deref().unwrap_or("127.0.0.1")
    );
    let ordinal = crate::launch::gpu_index(env.local_rank, crate::nccl::visible_gpus());
    let dev = device(ordinal);
    let comm = crate::nccl::NcclComm::<B>::init(
        dev.clone(),
        ordinal,
        env.rank,
        env.world_size,
        &master,
        cfg.timeout(),
    )
    .map_err(|e| e.to_string())?;
    if cfg.world_size != 1 && cfg.world_size != env.world_size {
        return Err(format!(
            "dist.world_size = {} but the launcher started {} ranks",
            cfg.world_size, env.world_size
        ));
    }
    Ok((Box::new(comm), dev))
}

#[cfg(not(feature = "nccl"))]
fn nccl<B: Backend>(
    _: &DistConfig,
    _: impl Fn(usize) -> B::Device,
) -> Result<Connected<B>, String> {
    Err("dist.backend = \"nccl\" needs a build with the `cuda` feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn a_lone_local_rank_connects_and_thread_ranks_and_missing_features_are_refused() {
        let one = DistConfig::default();
        let (comm, _) = connect::<Flex>(&one, |_| Default::default()).unwrap();
        assert_eq!((comm.rank(), comm.world_size()), (0, 1));
        let threads = DistConfig {
            world_size: 2,
            ..Default::default()
        };
        let e = connect::<Flex>(&threads, |_| Default::default())
            .err()
            .unwrap();
        assert!(e.contains("LocalGroup::run"), "{e}");
        #[cfg(not(feature = "nccl"))]
        {
            let nccl = DistConfig {
                backend: DistBackend::Nccl,
                ..Default::default()
            };
            let e = connect::<Flex>(&nccl, |_| Default::default())
                .err()
                .unwrap();
            assert!(e.contains("`cuda` feature"), "{e}");
        }
    }
}
