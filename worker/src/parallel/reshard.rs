//! Resharding: moving a trainer's state to another TP layout (docs/design.md §Parallel layout,
//! §Checkpoint format), e.g. when a growth makes the model too large for one rank and the
//! planner re-plans TP = 1 → 2.
//!
//! Two paths, both ending in the same state (model slice, optimizer moments, step, schedule,
//! data cursor, growth history):
//!
//! * [`from_checkpoint`]: every rank of the new layout reads exactly its slices of a committed
//!   checkpoint ([`Checkpoint::read`](trellis_core::checkpoint::Checkpoint::read): only the
//!   files overlapping its slice are touched, every file's hash verified on open). Works for
//!   any old and new layout and needs no old rank alive.
//! * [`from_peers`]: the ranks holding the old slices send them over the new TP group: for
//!   every tensor each holder keeps locally what falls in its own new slice and scatters to
//!   every other rank only the part of its slice that rank's new slice needs. Needs the old
//!   holders to be members of the new TP group (true for TP growing 1 → 2 → 4 with the old
//!   ranks kept); a shrinking TP (2 → 1) goes through the checkpoint.
//!
//! [`DEFAULT`] is the faster of the two as measured by `examples/reshard_bench.rs` on CPU
//! (docs/benchmarks.md).
use crate::host::{host_f32, host_f32_mut};
use crate::model::{Llama, Shard};
use crate::optim::Moments;
use crate::parallel::broadcast_bytes;
use crate::trainer::Trainer;
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use trellis_comm::Collective;
use trellis_core::checkpoint::{moment_names, shard_dim, shard_range, TrainerState};

/// Which way a reshard moves the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReshardPath {
    /// Every new rank reads its slices of the committed checkpoint.
    Checkpoint,
    /// The old holders send their slices over the new TP group.
    Peers,
}

/// The path to use when both are possible (measured: docs/benchmarks.md, "Resharding").
pub const DEFAULT: ReshardPath = ReshardPath::Peers;

/// What one rank's reshard did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReshardReport {
    pub path: ReshardPath,
    pub seconds: f64,
    /// Bytes of model and optimizer state this rank ended up holding.
    pub bytes: u64,
}

fn state_bytes(t: &Trainer) -> u64 {
    let params: u64 = t
        .model()
        .named_parameters()
        .iter()
        .map(|(_, p)| p.numel() as u64)
        .sum();
    params * 4 * 3
}

/// The checkpoint path: restore `new` (a trainer already built for the new layout) from the
/// committed checkpoint `dir`, reading only its own slices.
pub fn from_checkpoint(new: &mut Trainer, dir: &Path) -> Result<ReshardReport> {
    let t0 = Instant::now();
    new.restore(dir)?;
    Ok(ReshardReport {
        path: ReshardPath::Checkpoint,
        seconds: t0.elapsed().as_secs_f64(),
        bytes: state_bytes(new),
    })
}

/// The peers path. Every rank of `new`'s TP group calls it; `old` is this rank's trainer in the
/// old layout if it holds an old slice, `old_tp` the old TP degree, and `holders[o]` the rank
/// (in the new TP group) that holds old slice `o`. The state (step, schedule, cursor, …) comes
/// from the holder of old slice 0. On success `new` holds its slice of the old state.
///
/// Only what each rank lacks travels: for every tensor and old slice, the holder copies the
/// part of its slice that falls in its own new slice locally and [scatters](Collective::scatter)
/// to every other rank just the part that falls in that rank's new slice (a replicated tensor
/// goes whole to the ranks that do not hold old slice 0). Pieces go from the old tensors'
/// memory (a column slice as one run per row, gathered by the ring segment by segment, not
/// staged whole) and arrive in the new tensors' memory (allocated once, uninitialised); only a
/// part that is not contiguous in the new slice (row-parallel `o_proj`/`down_proj` when a new
/// slice spans old ones, e.g. TP 2 → 3) is received into a staging buffer first. The parts a
/// holder keeps are copied by a second thread while it sends. Moments that are not allocated
/// yet (a fresh optimizer after a `reset` growth) stay unallocated and are not sent.
pub fn from_peers(
    new: &mut Trainer,
    old: Option<&Trainer>,
    old_tp: usize,
    holders: &[usize],
) -> Result<ReshardReport> {
    let t0 = Instant::now();
    let me = new.tp_comm_mut().rank();
    let distinct = holders.iter().collect::<HashSet<_>>().len() == holders.len();
    if holders.len() != old_tp || !distinct || holders.iter().any(|&h| h >= new.tp()) {
        return Err(Error::Invalid(format!(
            "reshard from peers: holders {holders:?} for old tp {old_tp}: need one per old slice, each a different rank of the new TP group of {}",
            new.tp()
        )));
    }
    let mine_old: Option<usize> = holders.iter().position(|&h| h == me);
    if mine_old.is_some() != old.is_some() {
        return Err(Error::Invalid(format!(
            "reshard from peers: rank {me} {} an old trainer but the holder list says it {}",
            if old.is_some() { "has" } else { "has no" },
            if mine_old.is_some() {
                "holds a slice"
            } else {
                "holds none"
            }
        )));
    }
    if let (Some(o), Some(old)) = (mine_old, old) {
        if old.tp() != old_tp || old.tp_rank() != o {
            return Err(Error::Invalid(format!(
                "reshard from peers: rank {me} holds old slice {} of {}, the holder list says {o} of {old_tp}",
                old.tp_rank(),
                old.tp()
            )));
        }
    }
    // The training state and which parameters have no moments yet, from the holder of old
    // slice 0.
    let head = match old {
        Some(o) if mine_old == Some(0) => {
            let unallocated: Vec<String> = o
                .model()
                .named_parameters()
                .iter()
                .filter(|(n, _)| !o.optimizer().moments.contains_key(n))
                .map(|(n, _)| n.clone())
                .collect();
            serde_json::to_vec(&(o.state(), unallocated))
                .map_err(|e| Error::Invalid(format!("cannot serialise the trainer state: {e}")))?
        }
        _ => Vec::new(),
    };
    let head = broadcast_bytes(new.tp_comm_mut(), holders[0], &head)?;
    let (st, unallocated): (TrainerState, HashSet<String>) = serde_json::from_slice(&head)
        .map_err(|e| Error::Invalid(format!("reshard from peers: bad trainer state: {e}")))?;
    crate::parallel::check_tp(&st.model, new.tp())?;
    let moved = Moved {
        me,
        new_tp: new.tp(),
        old_tp,
        holders,
    };
    let device = new.device();
    let missing = |name: &str| {
        Error::Invalid(format!(
            "reshard from peers: rank {me}'s old model has no {name}; every old slice must be of the model in the state"
        ))
    };
    let mut tensors = HashMap::new();
    let mut moments = HashMap::new();
    // The parts a rank keeps from its own old slice are copied by a second thread while this
    // one sends and receives (a copy is memory-bound, a send mostly the kernel's and the MAC's);
    // the scope joins it before anything reads the new tensors.
    std::thread::scope(|s| -> Result<()> {
        let (local, jobs) = mpsc::channel::<(Tensor, Tensor)>();
        s.spawn(move || {
            tch::no_grad(|| {
                for (mut dst, src) in jobs {
                    dst.copy_(&src);
                }
            })
        });
        tch::no_grad(|| -> Result<()> {
            for (name, full) in st.model.tensor_shapes() {
                let p = old
                    .map(|o| o.model().parameter(&name).ok_or_else(|| missing(&name)))
                    .transpose()?;
                let comm = new.tp_comm_mut();
                tensors.insert(name.clone(), moved.tensor(comm, &local, &name, &full, p)?);
                if unallocated.contains(&name) {
                    continue;
                }
                let m = old.zip(p).map(|(o, p)| o.optimizer().moments_of(&name, p));
                let [n1, n2] = moment_names(&name);
                let exp_avg =
                    moved.tensor(comm, &local, &n1, &full, m.as_ref().map(|m| &m.exp_avg))?;
                let exp_avg_sq =
                    moved.tensor(comm, &local, &n2, &full, m.as_ref().map(|m| &m.exp_avg_sq))?;
                moments.insert(
                    name,
                    Moments {
                        exp_avg,
                        exp_avg_sq,
                    },
                );
            }
            Ok(())
        })
    })?;
    if device != Device::Cpu {
        for t in tensors.values_mut() {
            *t = t.to_device(device);
        }
        for m in moments.values_mut() {
            m.exp_avg = m.exp_avg.to_device(device);
            m.exp_avg_sq = m.exp_avg_sq.to_device(device);
        }
    }
    let model = Llama::from_tensors_shard(&st.model, device, moved.new_shard(), &mut tensors);
    new.install(st, model, Some(moments));
    Ok(ReshardReport {
        path: ReshardPath::Peers,
        seconds: t0.elapsed().as_secs_f64(),
        bytes: state_bytes(new),
    })
}

/// Who holds what in a peers reshard.
struct Moved<'a> {
    me: usize,
    new_tp: usize,
    old_tp: usize,
    holders: &'a [usize],
}

impl Moved<'_> {
    fn new_shard(&self) -> Shard {
        Shard {
            rank: self.me,
            tp: self.new_tp,
        }
    }

    /// The part of tensor `name`'s dimension `d` (its shard dimension, 0 for a replicated
    /// tensor) that old slice `o` holds: a replicated tensor is taken from old slice 0 whole.
    fn old_range(&self, name: &str, n: usize, o: usize) -> Range<usize> {
        match shard_dim(name) {
            Some(_) => shard_range(n, o, self.old_tp),
            None if o == 0 => 0..n,
            None => 0..0,
        }
    }

    /// The part new rank `r` holds.
    fn new_range(&self, name: &str, n: usize, r: usize) -> Range<usize> {
        match shard_dim(name) {
            Some(_) => shard_range(n, r, self.new_tp),
            None => 0..n,
        }
    }

    /// This rank's new slice of tensor `name` (global shape `full`), as an fp32 host tensor;
    /// `local_old` is this rank's old slice if it holds one; the part it keeps of that is sent
    /// to `local` to copy (it is complete once `local`'s thread is done). Every rank calls it
    /// for every tensor in the same order.
    fn tensor(
        &self,
        comm: &mut dyn Collective,
        local: &mpsc::Sender<(Tensor, Tensor)>,
        name: &str,
        full: &[usize],
        local_old: Option<&Tensor>,
    ) -> Result<Tensor> {
        let d = shard_dim(name).unwrap_or(0);
        let n = full[d];
        let mine = self.new_range(name, n, self.me);
        let shape: Vec<i64> = self
            .new_shard()
            .local_shape(name, full)
            .iter()
            .map(|&x| x as i64)
            .collect();
        let dst = Tensor::empty(&shape, (Kind::Float, Device::Cpu));
        // `mine`'s part `r` of dst, by global index along d.
        let part =
            |r: &Range<usize>| dst.narrow(d as i64, (r.start - mine.start) as i64, r.len() as i64);
        let src = local_old.map(|t| {
            t.detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous()
        });
        for o in 0..self.old_tp {
            let h = self.holders[o];
            let held = self.old_range(name, n, o);
            let overlap = |r: usize| intersect(&held, &self.new_range(name, n, r));
            // Nothing to send when no other rank needs a part of this old slice.
            let sends = (0..self.new_tp).any(|r| r != h && !overlap(r).is_empty());
            if h == self.me {
                let src = src.as_ref().expect("a holder has its old slice");
                let cut = |r: &Range<usize>| {
                    src.narrow(d as i64, (r.start - held.start) as i64, r.len() as i64)
                };
                let own = overlap(self.me);
                if !own.is_empty() {
                    local.send((part(&own), cut(&own))).map_err(|_| {
                        Error::Invalid("reshard from peers: the local copy thread is gone".into())
                    })?;
                }
                if sends {
                    // Straight from the old slice's memory: one run for a row slice, one run
                    // per row for a column slice.
                    let (values, shape) = (host_f32(src), src.size());
                    let pieces: Vec<Vec<&[f32]>> = (0..self.new_tp)
                        .map(|r| {
                            let ov = overlap(r);
                            match r != h && !ov.is_empty() {
                                true => runs(
                                    values,
                                    &shape,
                                    d,
                                    (ov.start - held.start)..(ov.end - held.start),
                                ),
                                false => Vec::new(),
                            }
                        })
                        .collect();
                    let refs: Vec<&[&[f32]]> = pieces.iter().map(|p| p.as_slice()).collect();
                    comm.scatter(h, &refs, &mut [])?;
                }
            } else if sends {
                let own = overlap(self.me);
                if own.is_empty() {
                    comm.scatter(h, &[], &mut [])?;
                } else {
                    let mut view = part(&own);
                    if view.is_contiguous() {
                        comm.scatter(h, &[], host_f32_mut(&mut view))?;
                    } else {
                        let mut staged = Tensor::empty(view.size(), (Kind::Float, Device::Cpu));
                        comm.scatter(h, &[], host_f32_mut(&mut staged))?;
                        view.copy_(&staged);
                    }
                }
            }
        }
        Ok(dst)
    }
}

/// Indices `range` of dimension `d` of a contiguous tensor (`values`, `shape`) as runs of
/// contiguous values, in order.
fn runs<'a>(values: &'a [f32], shape: &[i64], d: usize, range: Range<usize>) -> Vec<&'a [f32]> {
    let inner: usize = shape[d + 1..].iter().map(|&x| x as usize).product();
    let (stride, len) = (shape[d] as usize * inner, range.len() * inner);
    values
        .chunks_exact(stride.max(1))
        .map(|block| &block[range.start * inner..range.start * inner + len])
        .collect()
}

fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let (s, e) = (a.start.max(b.start), a.end.min(b.end));
    s..e.max(s)
}
