//! Data parallelism over a [`Communicator`]: checking once that every rank holds the same
//! model ([`check_same_layout`]), making every rank start from rank 0's weights
//! ([`broadcast_weights`]), and summing each step's gradients and loss over ranks in flat
//! buckets ([`GradSync`], which the loop owns). `[dist]` itself is rookery-dist's.

use std::collections::VecDeque;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rookery_dist::flat::BucketLayout;
use rookery_dist::{Communicator, DistError, Pending};

use crate::step::{LocalGrads, StepGrads};

pub use rookery_dist::config::{DistBackend, DistConfig};

/// Checks once, before any collective on weights or gradients, that every rank holds the same
/// parameters in the same order with the same shapes and trainability, and buckets them by the
/// same size: what [`broadcast_weights`] and the gradient buckets pack. Ranks started from
/// different configs (an MPI or NCCL job whose ranks got different `--set`s) would otherwise
/// exchange unrelated tensors or hang on buckets of different lengths.
pub fn check_same_layout<AB: AutodiffBackend, M: Module<AB>>(
    model: &M,
    comm: &dyn Communicator<AB::InnerBackend>,
    bucket_elems: usize,
) -> Result<(), DistError> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mut layout = Layout {
        params: 0,
        trainable: 0,
        elems: 0,
        hash: 0xcbf2_9ce4_8422_2325, // FNV-1a's offset basis
    };
    model.visit(&mut layout);
    let mine = layout.encode(bucket_elems);
    let width = mine.len();
    let all: Vec<f32> = comm
        .all_gather(Tensor::from_floats(mine.as_slice(), comm.device()))?
        .into_data()
        .to_vec()
        .expect("f32 layout");
    let rows: Vec<&[f32]> = all.chunks(width).collect();
    match rows.iter().position(|r| *r != rows[0]) {
        None => Ok(()),
        Some(other) => Err(DistError::Mismatch {
            rank: comm.rank(),
            what: "the model's parameters (a rank built from another config?)".into(),
            detail: format!(
                "rank 0 has {}; rank {other} has {}",
                Layout::describe(rows[0]),
                Layout::describe(rows[other])
            ),
        }),
    }
}

/// The parameters as a rank holds them: counts and a hash of every shape and trainability.
struct Layout {
    params: u64,
    trainable: u64,
    elems: u64,
    hash: u64,
}

impl Layout {
    /// As f32 values below 2^16 each, exact through a sum of zero-filled slots.
    fn encode(&self, bucket_elems: usize) -> Vec<f32> {
        let chunks = |x: u64| (0..4).map(move |i| ((x >> (16 * i)) & 0xffff) as f32);
        [
            self.params,
            self.trainable,
            self.elems,
            bucket_elems as u64,
            self.hash,
        ]
        .into_iter()
        .flat_map(chunks)
        .collect()
    }

    fn describe(row: &[f32]) -> String {
        let v: Vec<u64> = row
            .chunks(4)
            .map(|c| c.iter().rev().fold(0u64, |acc, &x| (acc << 16) | x as u64))
            .collect();
        format!(
            "{} parameter tensors ({} trainable) of {} values, buckets of {} values, shapes hash {:016x}",
            v[0], v[1], v[2], v[3], v[4]
        )
    }
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Layout {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
        let dims = p.val().dims();
        let trainable = p.is_require_grad();
        self.params += 1;
        self.trainable += u64::from(trainable);
        self.elems += dims.iter().product::<usize>() as u64;
        // FNV-1a over the rank, each dimension and the trainability, in module order.
        let dims = dims.iter().map(|&d| d as u64);
        for x in [D as u64]
            .into_iter()
            .chain(dims)
            .chain([u64::from(trainable)])
        {
            for b in x.to_le_bytes() {
                self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
}

/// Data parallelism's part of one optimizer step: summing over ranks the gradients a stage
/// computed on this rank. A stage hands over the gradients that are final before its backward
/// ends ([`GradSync::start`]: their sums run while it goes on, e.g. the text tower's during the
/// image tower's backward) and returns the rest; the loop finishes the sums
/// ([`GradSync::finish`]). Stages never sum gradients themselves.
pub struct GradSync<'a, IB: Backend> {
    comm: &'a dyn Communicator<IB>,
    bucket_elems: usize,
    started: Vec<PendingGrads<IB>>,
}

impl<'a, IB: Backend> GradSync<'a, IB> {
    pub fn new(comm: &'a dyn Communicator<IB>, bucket_elems: usize) -> Self {
        GradSync {
            comm,
            bucket_elems,
            started: Vec::new(),
        }
    }

    /// Starts summing `grads` (final on this rank) over ranks; returns at once.
    pub fn start<AB: AutodiffBackend<InnerBackend = IB>, M: AutodiffModule<AB>>(
        &mut self,
        model: &M,
        grads: GradientsParams,
    ) {
        let pending = start_all_reduce_grads(model, grads, self.comm, self.bucket_elems);
        self.started.push(pending);
    }

    /// The step's global gradients and loss from this rank's part: the started sums, waited for
    /// in the order they started, then the sums of the remaining gradients and of the loss
    /// shares. The time spent here is added to the step's collective time.
    pub fn finish<AB: AutodiffBackend<InnerBackend = IB>, M: AutodiffModule<AB>>(
        self,
        model: &M,
        local: LocalGrads,
    ) -> Result<StepGrads, DistError> {
        let t = std::time::Instant::now();
        let mut all = GradientsAccumulator::<M>::new();
        for pending in self.started {
            all.accumulate(model, pending.wait(model)?);
        }
        let rest = all_reduce_grads(model, local.grads, self.comm, self.bucket_elems)?;
        all.accumulate(model, rest);
        let share = Tensor::from_floats([local.loss_share], self.comm.device());
        let loss = self.comm.all_reduce_sum(share)?.into_scalar().elem();
        Ok(StepGrads {
            grads: all.grads(),
            loss,
            comm_s: local.comm_s + t.elapsed().as_secs_f64(),
        })
    }
}

/// Sums `grads` over ranks, packed in buckets of `bucket_elems` in module order (the same on
/// every rank, since every rank holds the same model).
pub fn all_reduce_grads<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    model: &M,
    grads: GradientsParams,
    comm: &dyn Communicator<AB::InnerBackend>,
    bucket_elems: usize,
) -> Result<GradientsParams, DistError> {
    start_all_reduce_grads(model, grads, comm, bucket_elems).wait(model)
}

/// Starts [`all_reduce_grads`] and returns while the sums may still be running (see
/// [`Communicator::all_reduce_sum_start`]), so that the caller can go on with the backward
/// pass of another part of the model.
pub fn start_all_reduce_grads<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    model: &M,
    grads: GradientsParams,
    comm: &dyn Communicator<AB::InnerBackend>,
    bucket_elems: usize,
) -> PendingGrads<AB::InnerBackend> {
    if comm.world_size() == 1 {
        return PendingGrads { grads, sums: None };
    }
    let mut take = TakeGrads::<AB::InnerBackend> {
        grads,
        ids: Vec::new(),
        flat: Vec::new(),
    };
    model.visit(&mut take);
    let (buckets, layout) = rookery_dist::flat::pack(take.flat, bucket_elems);
    let pending = comm.all_reduce_sum_start(buckets);
    PendingGrads {
        grads: take.grads,
        sums: Some((take.ids, pending, layout)),
    }
}

/// Gradients on their way across ranks.
#[must_use = "the started sums must be waited for before the next collective"]
pub struct PendingGrads<IB: Backend> {
    /// What is not being summed (everything, in a world of one).
    grads: GradientsParams,
    /// The parameters whose gradients are being summed, in bucket order.
    sums: Option<(Vec<ParamId>, Pending<IB>, BucketLayout)>,
}

impl<IB: Backend> PendingGrads<IB> {
    /// Waits for the sums and puts them back in place of the local gradients.
    pub fn wait<AB: AutodiffBackend<InnerBackend = IB>, M: AutodiffModule<AB>>(
        self,
        model: &M,
    ) -> Result<GradientsParams, DistError> {
        let Some((ids, pending, layout)) = self.sums else {
            return Ok(self.grads);
        };
        let summed = layout.unpack(pending.wait()?);
        let mut put = PutGrads {
            grads: self.grads,
            next: ids.into_iter().zip(summed).collect(),
        };
        model.visit(&mut put);
        Ok(put.grads)
    }
}

struct TakeGrads<IB: Backend> {
    grads: GradientsParams,
    ids: Vec<ParamId>,
    flat: Vec<Tensor<IB, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for TakeGrads<AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
        if let Some(g) = self.grads.remove::<AB::InnerBackend, D>(p.id) {
            let n = g.shape().num_elements();
            self.ids.push(p.id);
            self.flat.push(g.reshape([n]));
        }
    }
}

struct PutGrads<IB: Backend> {
    grads: GradientsParams,
    next: VecDeque<(ParamId, Tensor<IB, 1>)>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for PutGrads<AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
        if self.next.front().is_some_and(|(id, _)| *id == p.id) {
            let (_, g) = self.next.pop_front().expect("front exists");
            let shape: [usize; D] = p.shape().dims();
            self.grads
                .register::<AB::InnerBackend, D>(p.id, g.reshape(shape));
        }
    }
}

/// Every rank takes rank 0's weights (in buckets), so replicas start identical whatever each
/// rank's own initialisation did (several ranks seeding one process-wide RNG need not).
pub fn broadcast_weights<AB: AutodiffBackend, M: Module<AB>>(
    model: M,
    comm: &dyn Communicator<AB::InnerBackend>,
    bucket_elems: usize,
) -> Result<M, DistError> {
    if comm.world_size() == 1 {
        return Ok(model);
    }
    let mut take = TakeWeights::<AB::InnerBackend> { flat: Vec::new() };
    model.visit(&mut take);
    let sent = rookery_dist::flat::bucketed(take.flat, bucket_elems, |b| comm.broadcast(b, 0))?;
    Ok(model.map(&mut PutWeights { next: sent.into() }))
}

struct TakeWeights<IB: Backend> {
    flat: Vec<Tensor<IB, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for TakeWeights<AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
        let t = p.val().inner();
        let n = t.shape().num_elements();
        self.flat.push(t.reshape([n]));
    }
}

struct PutWeights<IB: Backend> {
    next: VecDeque<Tensor<IB, 1>>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for PutWeights<AB::InnerBackend> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let flat = self.next.pop_front().expect("one tensor per parameter");
        let require_grad = p.is_require_grad();
        p.map(|t| {
            let shape: [usize; D] = t.shape().dims();
            Tensor::from_inner(flat.reshape(shape)).set_require_grad(require_grad)
        })
    }
}
