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
//!   every tensor each old slice is broadcast by its holder and every new rank cuts its own
//!   slice from the assembled tensor. Simple (every rank receives the whole tensor) and needs
//!   the old holders to be members of the new TP group (true for TP growing 1 → 2 → 4 with the
//!   old ranks kept).
//!
//! [`DEFAULT`] is the faster of the two as measured by `examples/reshard_bench.rs` on CPU
//! (docs/benchmarks.md).
use crate::model::{Llama, Shard};
use crate::optim::Moments;
use crate::parallel::{broadcast_bytes, from_vec, to_vec};
use crate::trainer::Trainer;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tch::Tensor;
use trellis_core::checkpoint::{moment_names, shard_dim, TrainerState};

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
pub fn from_peers(
    new: &mut Trainer,
    old: Option<&Trainer>,
    old_tp: usize,
    holders: &[usize],
) -> Result<ReshardReport> {
    let t0 = Instant::now();
    let me = new.tp_comm_mut().rank();
    if holders.len() != old_tp || holders.iter().any(|&h| h >= new.tp()) {
        return Err(Error::Invalid(format!(
            "reshard from peers: {} holders for old tp {old_tp}, each must be a rank of the new TP group of {}",
            holders.len(),
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
    // The training state, from the holder of old slice 0.
    let st_bytes = match old {
        Some(o) if mine_old == Some(0) => serde_json::to_vec(&o.state())
            .map_err(|e| Error::Invalid(format!("cannot serialise the trainer state: {e}")))?,
        _ => Vec::new(),
    };
    let st_bytes = broadcast_bytes(new.tp_comm_mut(), holders[0], &st_bytes)?;
    let st: TrainerState = serde_json::from_slice(&st_bytes)
        .map_err(|e| Error::Invalid(format!("reshard from peers: bad trainer state: {e}")))?;
    crate::parallel::check_tp(&st.model, new.tp())?;
    let new_shard = Shard {
        rank: me,
        tp: new.tp(),
    };
    let old_shard = |o: usize| Shard {
        rank: o,
        tp: old_tp,
    };
    let device = new.device();
    // One tensor (a parameter or a moment): assemble it from the old slices, keep mine.
    let fetch = |new: &mut Trainer,
                 name: &str,
                 full: &[usize],
                 local_old: Option<&Tensor>|
     -> Result<Tensor> {
        let comm = new.tp_comm_mut();
        let d = shard_dim(name);
        let owners: Vec<usize> = match d {
            Some(_) => (0..old_tp).collect(),
            None => vec![0],
        };
        let mut pieces = Vec::with_capacity(owners.len());
        for o in owners {
            let shape: Vec<i64> = old_shard(o)
                .local_shape(name, full)
                .iter()
                .map(|&x| x as i64)
                .collect();
            let mut buf = match (mine_old, local_old) {
                (Some(m), Some(t)) if m == o => to_vec(t),
                _ => vec![0f32; shape.iter().product::<i64>() as usize],
            };
            comm.broadcast(&mut buf, holders[o])?;
            pieces.push(from_vec(&buf, &shape, device));
        }
        let whole = match d {
            Some(d) if pieces.len() > 1 => Tensor::cat(&pieces, d as i64),
            _ => pieces.pop().expect("one piece"),
        };
        Ok(new_shard.slice(name, &whole))
    };
    let mut tensors = HashMap::new();
    let mut moments = HashMap::new();
    for (name, full) in st.model.tensor_shapes() {
        let p = old
            .and_then(|o| o.model().parameter(&name))
            .map(|t| t.detach());
        let m = old.and_then(|o| {
            let p = o.model().parameter(&name)?;
            Some(o.optimizer().moments_of(&name, p))
        });
        let w = fetch(new, &name, &full, p.as_ref())?;
        let [n1, n2] = moment_names(&name);
        let exp_avg = fetch(new, &n1, &full, m.as_ref().map(|m| &m.exp_avg))?;
        let exp_avg_sq = fetch(new, &n2, &full, m.as_ref().map(|m| &m.exp_avg_sq))?;
        tensors.insert(name.clone(), w);
        moments.insert(
            name,
            Moments {
                exp_avg,
                exp_avg_sq,
            },
        );
    }
    let model = Llama::from_tensors_shard(&st.model, device, new_shard, &mut tensors);
    new.install(st, model, Some(moments));
    Ok(ReshardReport {
        path: ReshardPath::Peers,
        seconds: t0.elapsed().as_secs_f64(),
        bytes: state_bytes(new),
    })
}
