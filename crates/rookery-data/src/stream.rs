//! The raw sample stream of one rank: shards split across ranks and reader workers, a
//! deterministic per-epoch shard order, a bounded shuffle buffer per worker, and a position
//! from which a restarted stream yields exactly the samples the uninterrupted one would have.
//!
//! Splitting follows open_clip/webdataset: the epoch's shard order is the same on every rank
//! (seeded by (seed, epoch)); global worker `g = rank * workers + w` of `W = world * workers`
//! takes the shards at positions `i` with `i % W == g`. Workers are read round-robin, so the
//! order of samples depends on the data and the seed only, never on thread timing.
//!
//! A worker's state holds references (shard cursor, sample index) to the samples in its shuffle
//! buffer instead of the samples: on resume those few samples are re-read from their shards.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::wds::{read_shard, RawSample, ShardItem};

/// How a stream walks its shards.
#[derive(Clone, Debug, Default)]
pub struct StreamSpec {
    pub shards: Vec<String>,
    pub rank: usize,
    pub world: usize,
    pub workers: usize,
    pub seed: u64,
    /// Shuffle shard order per epoch and samples through a buffer of this size (0: no shuffle).
    pub shuffle_buffer: usize,
    /// Draw shards with replacement, endlessly (webdataset's `resampled`).
    pub resampled: bool,
    /// Stop after one epoch (evaluation) instead of rolling over.
    pub single_epoch: bool,
    /// Shards left out of an epoch's order because a run on another number of ranks finished
    /// them ([`crate::resplit`]); empty otherwise. Taken from the position on resume.
    pub skip: BTreeMap<u64, BTreeSet<String>>,
    /// How long to wait for a worker's next item before reporting it stalled (`None`: forever).
    pub stall_timeout: Option<std::time::Duration>,
}

/// Reference to a sample: its shard's place in the worker's epoch list and its index there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleRef {
    pub cursor: u32,
    pub index: u32,
}

/// The exact state of one reader worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerState {
    pub epoch: u64,
    /// Position in this epoch's shard list of the shard being read.
    pub cursor: usize,
    /// Next sample index to read in that shard.
    pub offset: u64,
    /// Shuffle RNG.
    pub rng: Rng,
    /// Samples waiting in the shuffle buffer, in buffer order.
    pub buffer: Vec<SampleRef>,
    /// True once a single-epoch stream has nothing left.
    pub done: bool,
}

/// The position of a whole rank's stream: every worker's state and whose turn is next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub workers: Vec<WorkerState>,
    pub next_worker: usize,
    /// The spec's `skip` this position was taken with (it shapes the workers' shard lists).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skip: BTreeMap<u64, BTreeSet<String>>,
}

/// What a stream yields, in a deterministic order.
pub enum StreamItem {
    Sample {
        sample: RawSample,
        epoch: u64,
    },
    /// A shard that failed or held nothing; its samples before the failure were delivered.
    Bad {
        shard: String,
        reason: String,
    },
    /// A worker produced nothing within the stall timeout while reading `shard`.
    Stalled {
        shard: String,
        seconds: f64,
    },
}

struct Msg {
    item: StreamItem,
    state: WorkerState,
}

/// A running stream: reader threads feeding bounded channels, consumed round-robin.
pub struct ShardStream {
    rx: Vec<Option<Receiver<Msg>>>,
    /// The shard each worker is reading (named when it stalls).
    reading: Vec<Arc<Mutex<String>>>,
    stall_timeout: Option<std::time::Duration>,
    position: StreamPosition,
    _threads: Vec<JoinHandle<()>>,
}

impl StreamSpec {
    /// Workers per rank; refuses splits that would leave a rank without shards.
    pub(crate) fn plan(&self) -> Result<usize, String> {
        let n = self.shards.len();
        if n == 0 {
            return Err("no shards".into());
        }
        if !self.resampled && n < self.world {
            return Err(format!("{n} shards cannot feed {} ranks: each rank needs at least one shard (or set resampled = true)", self.world));
        }
        // More workers than shards would leave workers idle forever.
        let per_rank = if self.resampled {
            self.workers
        } else {
            self.workers.min(n / self.world).max(1)
        };
        Ok(per_rank)
    }

    /// The shard URLs worker `g` of `total` reads in `epoch`.
    pub fn worker_shards(&self, epoch: u64, g: usize, total: usize) -> Vec<String> {
        let n = self.shards.len();
        if self.resampled {
            let mut rng = Rng::derive(&[self.seed, epoch, g as u64, 0x5e5a]);
            return (0..n.div_ceil(total))
                .map(|_| self.shards[rng.below(n)].clone())
                .collect();
        }
        let mut order: Vec<usize> = (0..n).collect();
        if self.shuffle_buffer > 0 {
            Rng::derive(&[self.seed, epoch, 0x0bde]).shuffle(&mut order);
        }
        if let Some(skip) = self.skip.get(&epoch) {
            order.retain(|&i| !skip.contains(&self.shards[i]));
        }
        order
            .into_iter()
            .skip(g)
            .step_by(total)
            .map(|i| self.shards[i].clone())
            .collect()
    }

    pub(crate) fn fresh_state(&self, epoch: u64, g: usize) -> WorkerState {
        WorkerState {
            epoch,
            cursor: 0,
            offset: 0,
            rng: Rng::derive(&[self.seed, epoch, g as u64, 0x5bff]),
            buffer: vec![],
            done: false,
        }
    }
}

impl ShardStream {
    /// Starts the reader threads, from `position` if given (it must come from the same spec).
    pub fn start(mut spec: StreamSpec, position: Option<StreamPosition>) -> Result<Self, String> {
        if let Some(p) = &position {
            spec.skip = p.skip.clone();
        }
        let per_rank = spec.plan()?;
        let total = per_rank * spec.world;
        let position = match position {
            Some(p) if p.workers.len() == per_rank => p,
            Some(p) => {
                return Err(format!(
                    "loader position has {} workers, this run has {per_rank}",
                    p.workers.len()
                ))
            }
            None => StreamPosition {
                workers: (0..per_rank)
                    .map(|w| spec.fresh_state(0, spec.rank * per_rank + w))
                    .collect(),
                next_worker: 0,
                skip: spec.skip.clone(),
            },
        };
        let (mut rx, mut threads) = (Vec::new(), Vec::new());
        let reading: Vec<Arc<Mutex<String>>> = (0..position.workers.len())
            .map(|_| Default::default())
            .collect();
        for (w, state) in position.workers.iter().enumerate() {
            if state.done {
                rx.push(None);
                continue;
            }
            let (tx, r) = bounded::<Msg>(64);
            let (spec, state, at) = (spec.clone(), state.clone(), reading[w].clone());
            let g = spec.rank * per_rank + w;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("shard-reader-{w}"))
                    .spawn(move || run_worker(spec, g, total, state, tx, at))
                    .map_err(|e| e.to_string())?,
            );
            rx.push(Some(r));
        }
        Ok(ShardStream {
            rx,
            reading,
            stall_timeout: spec.stall_timeout,
            position,
            _threads: threads,
        })
    }

    /// The position after the last item returned.
    pub fn position(&self) -> &StreamPosition {
        &self.position
    }

    /// The next item, or `None` when every worker of a single-epoch stream is done.
    pub fn next_item(&mut self) -> Option<StreamItem> {
        let n = self.rx.len();
        for _ in 0..n {
            let w = self.position.next_worker;
            self.position.next_worker = (w + 1) % n;
            let Some(r) = &self.rx[w] else { continue };
            let got = match self.stall_timeout {
                Some(t) => r.recv_timeout(t).map_err(|e| e.is_timeout()),
                None => r.recv().map_err(|_| false),
            };
            match got {
                Ok(msg) => {
                    self.position.workers[w] = msg.state;
                    return Some(msg.item);
                }
                Err(true) => {
                    // Nothing came back to this worker's turn: the caller stops the stream.
                    self.position.next_worker = w;
                    let shard = self.reading[w]
                        .lock()
                        .map(|s| s.clone())
                        .unwrap_or_default();
                    let seconds = self.stall_timeout.map_or(0.0, |t| t.as_secs_f64());
                    return Some(StreamItem::Stalled { shard, seconds });
                }
                Err(false) => {
                    self.position.workers[w].done = true;
                    self.rx[w] = None;
                }
            }
        }
        None
    }
}

impl Iterator for ShardStream {
    type Item = StreamItem;
    fn next(&mut self) -> Option<StreamItem> {
        self.next_item()
    }
}

/// One reader worker: epochs of shards through the shuffle buffer into `tx`.
fn run_worker(
    spec: StreamSpec,
    g: usize,
    total: usize,
    mut st: WorkerState,
    tx: Sender<Msg>,
    reading: Arc<Mutex<String>>,
) {
    let mut shards = spec.worker_shards(st.epoch, g, total);
    let mut buffer = restore_buffer(&shards, &st.buffer);
    st.buffer = buffer.iter().map(|(r, _)| *r).collect();
    loop {
        while st.cursor < shards.len() {
            let url = shards[st.cursor].clone();
            if let Ok(mut r) = reading.lock() {
                r.clone_from(&url);
            }
            let (mut seen, mut alive, mut broken) = (0u64, true, false);
            read_shard(&url, |item| match item {
                ShardItem::Sample(s) => {
                    seen += 1;
                    if s.index < st.offset {
                        return true; // resuming mid-shard: already delivered before the stop
                    }
                    st.offset = s.index + 1;
                    alive = push(&spec, &mut st, &mut buffer, s, &tx);
                    alive
                }
                ShardItem::Broken(e) => {
                    broken = true;
                    alive = send(
                        &tx,
                        &st,
                        StreamItem::Bad {
                            shard: url.clone(),
                            reason: e.to_string(),
                        },
                    );
                    false
                }
            });
            if !alive {
                return;
            }
            if seen == 0 && st.offset == 0 && !broken {
                let bad = StreamItem::Bad {
                    shard: url.clone(),
                    reason: "empty shard: no samples".into(),
                };
                if !send(&tx, &st, bad) {
                    return;
                }
            }
            st.cursor += 1;
            st.offset = 0;
        }
        while !buffer.is_empty() {
            let k = st.rng.below(buffer.len());
            let (_, s) = buffer.swap_remove(k);
            st.buffer.swap_remove(k);
            if !emit(&tx, &st, s) {
                return;
            }
        }
        if spec.single_epoch {
            return;
        }
        st = spec.fresh_state(st.epoch + 1, g);
        shards = spec.worker_shards(st.epoch, g, total);
    }
}

/// Adds a sample to the shuffle buffer and, once it is full, emits a random one.
fn push(
    spec: &StreamSpec,
    st: &mut WorkerState,
    buffer: &mut Vec<(SampleRef, RawSample)>,
    s: RawSample,
    tx: &Sender<Msg>,
) -> bool {
    let r = SampleRef {
        cursor: st.cursor as u32,
        index: s.index as u32,
    };
    if spec.shuffle_buffer == 0 {
        return emit(tx, st, s);
    }
    buffer.push((r, s));
    st.buffer.push(r);
    if buffer.len() < spec.shuffle_buffer {
        return true;
    }
    let k = st.rng.below(buffer.len());
    let (_, out) = buffer.swap_remove(k);
    st.buffer.swap_remove(k);
    emit(tx, st, out)
}

fn emit(tx: &Sender<Msg>, st: &WorkerState, sample: RawSample) -> bool {
    send(
        tx,
        st,
        StreamItem::Sample {
            sample,
            epoch: st.epoch,
        },
    )
}

fn send(tx: &Sender<Msg>, st: &WorkerState, item: StreamItem) -> bool {
    tx.send(Msg {
        item,
        state: st.clone(),
    })
    .is_ok()
}

/// Re-reads the samples a saved shuffle buffer referred to, in buffer order.
fn restore_buffer(shards: &[String], refs: &[SampleRef]) -> Vec<(SampleRef, RawSample)> {
    let mut wanted: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for r in refs {
        wanted.entry(r.cursor).or_default().push(r.index);
    }
    let mut found: BTreeMap<(u32, u32), RawSample> = BTreeMap::new();
    for (cursor, mut idx) in wanted {
        idx.sort_unstable();
        let last = *idx.last().expect("non-empty");
        read_shard(&shards[cursor as usize], |item| match item {
            ShardItem::Sample(s) => {
                let i = s.index as u32;
                if idx.binary_search(&i).is_ok() {
                    found.insert((cursor, i), s);
                }
                i < last
            }
            ShardItem::Broken(_) => false,
        });
    }
    refs.iter()
        .filter_map(|r| found.remove(&(r.cursor, r.index)).map(|s| (*r, s)))
        .collect()
}
