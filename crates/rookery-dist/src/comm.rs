//! The collective interface. Tensors are 1-D and live on the *inner* (non-autodiff) backend:
//! collectives are not differentiable, and callers that need gradients through them build the
//! chain rule themselves (see rookery-train's gathered contrastive step).

use burn::prelude::*;

/// Why a collective failed. Every variant names the rank it concerns.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DistError {
    #[error("rank {rank}: `{op}` timed out after {secs:.0} s waiting for rank(s) {waiting_for:?}")]
    Timeout {
        rank: usize,
        op: &'static str,
        secs: f64,
        waiting_for: Vec<usize>,
    },
    #[error("rank {rank}: `{op}` abandoned: rank {failed} failed: {reason}")]
    PeerFailed {
        rank: usize,
        op: &'static str,
        failed: usize,
        reason: String,
    },
    #[error("rank {rank}: ranks disagree on {what}: {detail}")]
    Mismatch {
        rank: usize,
        what: String,
        detail: String,
    },
    #[error("rank {rank}: `{op}`: {msg}")]
    Backend {
        rank: usize,
        op: &'static str,
        msg: String,
    },
}

/// What data-parallel training needs from a group of ranks. Only `all_reduce_sum` is required;
/// the rest have exact default implementations on top of it, which engines with native calls
/// (MPI, NCCL) override.
pub trait Communicator<B: Backend> {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The device this rank's tensors live on.
    fn device(&self) -> &B::Device;

    /// Element-wise sum over ranks.
    fn all_reduce_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError>;

    /// Every rank's `t` (all of the same length), concatenated in rank order. Built from a sum
    /// over zero-filled buffers holding one rank's slot each: exact, since x + 0 = x.
    fn all_gather(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let (w, r, n) = (self.world_size(), self.rank(), t.dims()[0]);
        if w == 1 {
            return Ok(t);
        }
        let device = t.device();
        let mut parts = Vec::with_capacity(3);
        if r > 0 {
            parts.push(Tensor::zeros([r * n], &device));
        }
        parts.push(t);
        if r + 1 < w {
            parts.push(Tensor::zeros([(w - r - 1) * n], &device));
        }
        self.all_reduce_sum(Tensor::cat(parts, 0))
    }

    /// Starts summing each of `bufs` over ranks, in order, and returns at once where the engine
    /// can let the sums run in the background (in-process ranks can), so the caller may compute
    /// meanwhile; other engines finish them before returning. No other collective may be
    /// called on this communicator until the [`Pending`] has been waited for.
    fn all_reduce_sum_start(&self, bufs: Vec<Tensor<B, 1>>) -> Pending<B> {
        Pending::ready(bufs.into_iter().map(|b| self.all_reduce_sum(b)).collect())
    }

    /// Sum over ranks, then this rank's `1/world` slice of it (length divisible by world).
    fn reduce_scatter_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let (w, r, n) = (self.world_size(), self.rank(), t.dims()[0]);
        if w == 1 {
            return Ok(t);
        }
        let chunk = n / w;
        Ok(self.all_reduce_sum(t)?.slice(r * chunk..(r + 1) * chunk))
    }

    /// `root`'s `t` on every rank (`t` gives the shape on the others).
    fn broadcast(&self, t: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>, DistError> {
        if self.world_size() == 1 {
            return Ok(t);
        }
        let mine = if self.rank() == root {
            t.clone()
        } else {
            t.zeros_like()
        };
        self.all_reduce_sum(mine)
    }

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), DistError> {
        self.all_reduce_sum(Tensor::ones([1], self.device()))
            .map(|_| ())
    }

    /// A barrier that may wait `timeout` instead of the usual limit: for ranks waiting while
    /// rank 0 evaluates or writes a checkpoint.
    fn barrier_timeout(&self, timeout: std::time::Duration) -> Result<(), DistError> {
        let _ = timeout;
        self.barrier()
    }
}

/// Collectives under way, from [`Communicator::all_reduce_sum_start`].
#[must_use = "a started collective must be waited for before the next one"]
pub struct Pending<B: Backend> {
    wait: Box<dyn FnOnce() -> Result<Vec<Tensor<B, 1>>, DistError>>,
}

impl<B: Backend> Pending<B> {
    /// Already finished.
    pub fn ready(result: Result<Vec<Tensor<B, 1>>, DistError>) -> Self {
        Pending::new(move || result)
    }

    /// Finished by calling `wait`.
    pub fn new(wait: impl FnOnce() -> Result<Vec<Tensor<B, 1>>, DistError> + 'static) -> Self {
        Pending {
            wait: Box::new(wait),
        }
    }

    /// Blocks until every started sum is done, and returns them in order.
    pub fn wait(self) -> Result<Vec<Tensor<B, 1>>, DistError> {
        (self.wait)()
    }
}

/// Every rank's bytes, in rank order (lengths may differ). Bytes travel as f32 values 0..=255,
/// which are exact.
pub fn all_gather_bytes<B: Backend>(
    comm: &dyn Communicator<B>,
    bytes: &[u8],
) -> Result<Vec<Vec<u8>>, DistError> {
    let (w, device) = (comm.world_size(), comm.device());
    let len = Tensor::<B, 1>::from_floats([bytes.len() as f32], device);
    let lens: Vec<usize> = to_f32(comm.all_gather(len)?)
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let max = lens.iter().copied().max().unwrap_or(0);
    let mut padded: Vec<f32> = bytes.iter().map(|&b| b as f32).collect();
    padded.resize(max, 0.0);
    let all = to_f32(comm.all_gather(Tensor::from_floats(padded.as_slice(), device))?);
    Ok((0..w)
        .map(|r| {
            all[r * max..r * max + lens[r]]
                .iter()
                .map(|&x| x as u8)
                .collect()
        })
        .collect())
}

/// Refuses to go on unless every rank passes the same `hash` of `what` (e.g. the resolved
/// config): ranks that disagree would silently train different models.
pub fn check_same<B: Backend>(
    comm: &dyn Communicator<B>,
    what: &str,
    hash: u64,
) -> Result<(), DistError> {
    let all = all_gather_bytes(comm, &hash.to_le_bytes())?;
    let differ: Vec<usize> = (0..all.len()).filter(|&r| all[r] != all[0]).collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(DistError::Mismatch {
        rank: comm.rank(),
        what: what.to_string(),
        detail: format!("rank(s) {differ:?} differ from rank 0"),
    })
}

pub(crate) fn to_f32<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data")
}
