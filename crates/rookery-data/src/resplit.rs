//! Continuing a stream on another number of ranks (or workers).
//!
//! A worker's position (epoch, shard cursor, shuffle buffer) only means something for the split
//! that wrote it, so it cannot be carried over. Instead the new run restarts at the earliest
//! epoch any old worker was in, with every shard an old worker had *finished* in that epoch or a
//! later one left out of those epochs' orders (`StreamSpec::skip`), and splits what is left
//! across its own ranks and workers as usual:
//!
//! - a finished shard (read to its end with none of its samples still waiting in a shuffle
//!   buffer) is neither repeated nor skipped;
//! - a partly read shard (the one a worker was reading, or one with samples still in a shuffle
//!   buffer) is read again from its start: the samples it had already delivered are seen twice;
//! - a shard no old worker had reached is read once, as usual.
//!
//! Resampled streams (shards drawn with replacement) have no finished shards; they restart at
//! the epoch after the latest one, so they do not replay the same draws.

use std::collections::{BTreeMap, BTreeSet};

use crate::stream::{StreamPosition, StreamSpec, WorkerState};

/// The position for `spec`'s rank (of `spec.world`) that continues the run whose ranks were at
/// `old` (one position per old rank, in rank order, all from the same shards and seed).
pub fn resplit(spec: &StreamSpec, old: &[StreamPosition]) -> Result<StreamPosition, String> {
    let per_rank_old = old
        .first()
        .map(|p| p.workers.len())
        .ok_or("no old positions")?;
    if old.iter().any(|p| p.workers.len() != per_rank_old) {
        return Err("old ranks had different worker counts".into());
    }
    let workers: Vec<(usize, &WorkerState)> = old
        .iter()
        .enumerate()
        .flat_map(|(r, p)| {
            p.workers
                .iter()
                .enumerate()
                .map(move |(w, s)| (r * per_rank_old + w, s))
        })
        .collect();
    let epochs = workers.iter().map(|(_, s)| s.epoch);
    let (first, last) = (epochs.clone().min().unwrap_or(0), epochs.max().unwrap_or(0));
    let per_rank = spec.plan()?;
    let fresh = |epoch| StreamPosition {
        workers: (0..per_rank)
            .map(|w| spec.fresh_state(epoch, spec.rank * per_rank + w))
            .collect(),
        next_worker: 0,
        skip: BTreeMap::new(),
    };
    if spec.resampled {
        return Ok(fresh(last + 1));
    }
    let old_spec = StreamSpec {
        skip: old[0].skip.clone(),
        ..spec.clone()
    };
    let mut skip = old_spec.skip.clone();
    skip.retain(|&e, _| e >= first);
    for (g, st) in workers {
        for epoch in first..=st.epoch {
            let list = old_spec.worker_shards(epoch, g, old.len() * per_rank_old);
            let done = finished(&list, st, epoch);
            skip.entry(epoch).or_default().extend(done);
        }
    }
    skip.retain(|_, s| !s.is_empty());
    let mut pos = fresh(first);
    pos.skip = skip;
    Ok(pos)
}

/// The shards of `list` (a worker's shards in `epoch`) that it had finished.
fn finished(list: &[String], st: &WorkerState, epoch: u64) -> BTreeSet<String> {
    if epoch < st.epoch || st.done {
        // The worker moved past this epoch: its buffer was drained at the epoch's end.
        return list.iter().cloned().collect();
    }
    let buffered: BTreeSet<usize> = st.buffer.iter().map(|r| r.cursor as usize).collect();
    list.iter()
        .take(st.cursor)
        .enumerate()
        .filter(|(i, _)| !buffered.contains(i))
        .map(|(_, s)| s.clone())
        .collect()
}
