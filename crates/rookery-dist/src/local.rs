//! Ranks as threads of one process, one device each, through burn-collective (burn's own
//! in-process collectives: a server thread that sums what every registered peer sends).
//!
//! burn-collective calls block until every peer has arrived, with no timeout. Each call runs on
//! a helper thread while the rank waits on it in short slices, checking a shared board: a rank
//! that returns an error or panics marks itself failed there at once, so its peers give up with
//! an error naming it instead of hanging, and a peer that is merely slow becomes a timeout
//! naming the ranks that had not arrived.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::collective::{self, CollectiveConfig, CollectiveError, PeerId, ReduceOperation};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use crossbeam_channel::RecvTimeoutError;

use crate::comm::{Communicator, DistError, Pending};

/// How often a waiting rank looks at the board.
const POLL: Duration = Duration::from_millis(20);

/// burn-collective keeps one server per backend type per process: one group at a time.
static GROUP: Mutex<()> = Mutex::new(());

/// What each rank has done: how many collectives it entered, and whether it failed.
#[derive(Default)]
struct Board {
    entered: Mutex<Vec<u64>>,
    failed: Mutex<Vec<Option<String>>>,
}

impl Board {
    fn new(world: usize) -> Self {
        Board {
            entered: Mutex::new(vec![0; world]),
            failed: Mutex::new(vec![None; world]),
        }
    }
    fn enter(&self, rank: usize) -> u64 {
        let mut e = lock(&self.entered);
        e[rank] += 1;
        e[rank]
    }
    fn fail(&self, rank: usize, why: String) {
        lock(&self.failed)[rank].get_or_insert(why);
    }
    fn failed_peer(&self, me: usize) -> Option<(usize, String)> {
        let f = lock(&self.failed);
        (0..f.len())
            .filter(|&r| r != me)
            .find_map(|r| f[r].clone().map(|why| (r, why)))
    }
    fn behind(&self, count: u64) -> Vec<usize> {
        let e = lock(&self.entered);
        (0..e.len()).filter(|&r| e[r] < count).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One rank's handle on the group.
pub struct LocalComm<B: Backend> {
    rank: usize,
    world: usize,
    device: B::Device,
    board: Arc<Board>,
    timeout: Duration,
}

impl<B: Backend> LocalComm<B> {
    fn id(&self) -> PeerId {
        PeerId::from(self.rank)
    }

    /// Runs `job` (a blocking burn-collective call) within the timeout, watching the board.
    fn call<R: Send + 'static>(
        &self,
        op: &'static str,
        job: impl FnOnce() -> Result<R, CollectiveError> + Send + 'static,
    ) -> Result<R, DistError> {
        self.call_within(op, self.timeout, job)
    }

    fn call_within<R: Send + 'static>(
        &self,
        op: &'static str,
        timeout: Duration,
        job: impl FnOnce() -> Result<R, CollectiveError> + Send + 'static,
    ) -> Result<R, DistError> {
        self.start(op, timeout, job).wait()
    }

    /// Runs `job` on a helper thread and returns at once; [`Waiter::wait`] collects it.
    fn start<R: Send + 'static>(
        &self,
        op: &'static str,
        timeout: Duration,
        job: impl FnOnce() -> Result<R, CollectiveError> + Send + 'static,
    ) -> Waiter<R> {
        let count = self.board.enter(self.rank);
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(job());
        });
        Waiter {
            rx,
            op,
            rank: self.rank,
            board: self.board.clone(),
            count,
            timeout,
        }
    }
}

/// A collective running on a helper thread.
struct Waiter<R> {
    rx: crossbeam_channel::Receiver<Result<R, CollectiveError>>,
    op: &'static str,
    rank: usize,
    board: Arc<Board>,
    count: u64,
    timeout: Duration,
}

impl<R> Waiter<R> {
    /// Waits for the result in short slices, watching the board; the timeout counts from here,
    /// so time the caller spent computing after the start is not held against the peers.
    fn wait(self) -> Result<R, DistError> {
        let (op, rank) = (self.op, self.rank);
        let backend_err = |msg: String| DistError::Backend { rank, op, msg };
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.rx.recv_timeout(POLL) {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => return Err(backend_err(format!("{e:?}"))),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(backend_err("the collective call panicked".into()))
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if let Some((failed, reason)) = self.board.failed_peer(rank) {
                return Err(DistError::PeerFailed {
                    rank,
                    op,
                    failed,
                    reason,
                });
            }
            if Instant::now() >= deadline {
                return Err(DistError::Timeout {
                    rank,
                    op,
                    secs: self.timeout.as_secs_f64(),
                    waiting_for: self.board.behind(self.count),
                });
            }
        }
    }
}

impl<B: Backend> Communicator<B> for LocalComm<B> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn device(&self) -> &B::Device {
        &self.device
    }

    fn all_reduce_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
        let (id, prim) = (self.id(), t.into_primitive().tensor());
        let out = self.call("all_reduce", move || {
            collective::all_reduce::<B>(id, prim, ReduceOperation::Sum)
        })?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// The sums run one after another on a helper thread, while this rank goes on computing.
    fn all_reduce_sum_start(&self, bufs: Vec<Tensor<B, 1>>) -> Pending<B> {
        let id = self.id();
        let prims: Vec<_> = bufs
            .into_iter()
            .map(|t| t.into_primitive().tensor())
            .collect();
        let waiter = self.start("all_reduce", self.timeout, move || {
            prims
                .into_iter()
                .map(|p| collective::all_reduce::<B>(id, p, ReduceOperation::Sum))
                .collect::<Result<Vec<_>, _>>()
        });
        Pending::new(move || {
            let sums = waiter.wait()?;
            Ok(sums
                .into_iter()
                .map(|p| Tensor::from_primitive(TensorPrimitive::Float(p)))
                .collect())
        })
    }

    fn broadcast(&self, t: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>, DistError> {
        let id = self.id();
        let mine = (self.rank == root).then(|| t.into_primitive().tensor());
        let out = self.call("broadcast", move || collective::broadcast::<B>(id, mine))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn barrier_timeout(&self, timeout: Duration) -> Result<(), DistError> {
        let (id, one) = (self.id(), Tensor::<B, 1>::ones([1], &self.device));
        let one = one.into_primitive().tensor();
        self.call_within("barrier", timeout, move || {
            collective::all_reduce::<B>(id, one, ReduceOperation::Sum)
        })
        .map(|_| ())
    }
}

/// A group of in-process ranks.
pub struct LocalGroup;

impl LocalGroup {
    /// Runs `f` on `world` rank threads (rank r on `device(r)`), each with its communicator,
    /// and returns every rank's result in rank order. An error or panic on one rank makes the
    /// others' pending collectives fail with an error naming it.
    pub fn run<B, T, E, F>(
        world: usize,
        device: impl Fn(usize) -> B::Device,
        timeout: Duration,
        f: F,
    ) -> Vec<Result<T, String>>
    where
        B: Backend,
        T: Send,
        E: std::fmt::Display,
        F: Fn(&LocalComm<B>) -> Result<T, E> + Sync,
    {
        let _group = lock(&GROUP);
        collective::reset_collective::<B>();
        let board = Arc::new(Board::new(world));
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let comm = LocalComm {
                        rank,
                        world,
                        device: device(rank),
                        board: board.clone(),
                        timeout,
                    };
                    let f = &f;
                    std::thread::Builder::new()
                        .name(format!("rank-{rank}"))
                        .spawn_scoped(s, move || run_rank(comm, f))
                        .expect("spawn a rank thread")
                })
                .collect();
            let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
            joined
                .into_iter()
                .map(|r| r.unwrap_or_else(|_| Err("rank thread panicked".into())))
                .collect()
        });
        collective::reset_collective::<B>();
        results
    }
}

/// One rank's life: register, run, finish; any failure is posted on the board at once.
fn run_rank<B, T, E, F>(comm: LocalComm<B>, f: &F) -> Result<T, String>
where
    B: Backend,
    E: std::fmt::Display,
    F: Fn(&LocalComm<B>) -> Result<T, E>,
{
    let (id, dev, world) = (comm.id(), comm.device.clone(), comm.world);
    let config = CollectiveConfig::default().with_num_devices(world);
    let outcome = comm
        .call("register", move || {
            collective::register::<B>(id, dev, config)
        })
        .map_err(|e| e.to_string())
        .and_then(|_| match catch_unwind(AssertUnwindSafe(|| f(&comm))) {
            Ok(r) => r.map_err(|e| format!("{e:#}")),
            Err(p) => Err(format!("panicked: {}", panic_message(&p))),
        })
        .and_then(|t| {
            comm.call("finish", move || collective::finish_collective::<B>(id))
                .map(|_| t)
                .map_err(|e| e.to_string())
        });
    if let Err(why) = &outcome {
        comm.board.fail(comm.rank, why.clone());
    }
    outcome
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    fn floats(t: Tensor<B, 1>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn collectives_on_three_threads() {
        let out = LocalGroup::run::<B, _, DistError, _>(
            3,
            |_| Default::default(),
            Duration::from_secs(30),
            |c| {
                let r = c.rank() as f32;
                let dev = *c.device();
                let t = Tensor::<B, 1>::from_floats([r, 10.0 * r], &dev);
                let sum = floats(c.all_reduce_sum(t.clone())?);
                let gathered = floats(c.all_gather(t.clone())?);
                let six = Tensor::<B, 1>::from_floats([r; 6], &dev);
                let scattered = floats(c.reduce_scatter_sum(six)?);
                let b = floats(c.broadcast(t, 2)?);
                c.barrier()?;
                Ok((sum, gathered, scattered, b))
            },
        );
        for (rank, res) in out.into_iter().enumerate() {
            let (sum, gathered, scattered, b) = res.unwrap();
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 10.0, 2.0, 20.0]);
            assert_eq!(scattered, vec![3.0, 3.0], "rank {rank}");
            assert_eq!(b, vec![2.0, 20.0]);
        }
    }

    /// Rank 0 must get its `start` back before rank 1 has even entered the sums, and be able
    /// to work meanwhile; a blocking start would leave rank 1 waiting for the signal forever.
    #[test]
    fn started_sums_run_while_the_rank_computes() {
        let signal = std::sync::atomic::AtomicBool::new(false);
        let out = LocalGroup::run::<B, _, DistError, _>(
            2,
            |_| Default::default(),
            Duration::from_secs(30),
            |c| {
                let r = c.rank() as f32;
                let bufs = vec![
                    Tensor::<B, 1>::from_floats([r, 1.0], c.device()),
                    Tensor::<B, 1>::from_floats([10.0 * r], c.device()),
                ];
                if c.rank() == 1 {
                    let since = Instant::now();
                    while !signal.load(std::sync::atomic::Ordering::SeqCst) {
                        assert!(since.elapsed() < Duration::from_secs(10), "start blocked");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                let pending = c.all_reduce_sum_start(bufs);
                signal.store(true, std::sync::atomic::Ordering::SeqCst);
                let sums: Vec<Vec<f32>> = pending.wait()?.into_iter().map(floats).collect();
                let after = floats(c.all_reduce_sum(Tensor::from_floats([r], c.device()))?);
                Ok((sums, after))
            },
        );
        for res in out {
            let (sums, after) = res.unwrap();
            assert_eq!(sums, vec![vec![1.0, 2.0], vec![10.0]]);
            assert_eq!(after, vec![1.0]);
        }
    }

    #[test]
    fn a_failed_rank_is_named_by_its_peers() {
        let start = Instant::now();
        let out = LocalGroup::run::<B, _, DistError, _>(
            2,
            |_| Default::default(),
            Duration::from_secs(60),
            |c| {
                if c.rank() == 1 {
                    panic!("disk on fire");
                }
                c.barrier()
            },
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "peers must not wait the timeout"
        );
        let e0 = out[0].as_ref().unwrap_err();
        assert!(
            e0.contains("rank 1 failed") && e0.contains("disk on fire"),
            "{e0}"
        );
        assert!(out[1].as_ref().unwrap_err().contains("disk on fire"));
    }

    #[test]
    fn a_missing_rank_times_out_naming_it() {
        let out = LocalGroup::run::<B, _, DistError, _>(
            2,
            |_| Default::default(),
            Duration::from_millis(500),
            |c| {
                if c.rank() == 1 {
                    std::thread::sleep(Duration::from_secs(2));
                    return Ok(());
                }
                c.barrier()
            },
        );
        let e0 = out[0].as_ref().unwrap_err();
        assert!(e0.contains("timed out") && e0.contains("[1]"), "{e0}");
    }
}
