//! Tensor and data parallelism around the single-device model (docs/design.md §Parallel layout).
//!
//! * [`Groups`]: a rank's two process groups. World = DP × TP; rank `(d, t)` is in the TP group
//!   of the ranks `(d, ·)` (they hold the slices of one model replica and see the same data) and
//!   in the DP group of the ranks `(·, t)` (they hold the same slice and average its gradients).
//! * [`tp`]: the Megatron forward/backward of a [`Shard`](crate::model::Shard) with the graph
//!   cut at every TP boundary and backward run segment by segment.
//! * [`grad_norm`]: the global gradient norm across TP slices (for clipping).
//! * [`reshard`]: moving a trainer's state to another layout, from a checkpoint or from peers.
//!
//! Tensors move through one code path, [`all_reduce_sum_`] and [`broadcast_`], on fp32
//! contiguous tensors: a CUDA tensor in a group with a device collective (NCCL) is reduced in
//! device memory, a CPU tensor over the host ring in its own memory (no copy). The DP gradient
//! buckets and the TP cuts use only these, so the CPU tests run the code a GPU runs up to the
//! backend call. Control-plane agreements (u64 maxima, barriers, the gathers below, scalars)
//! stay on the group's host [`Collective`] (an NCCL group's TCP ring).
pub mod reshard;
pub mod tp;

use crate::host::host_f32_mut;
use crate::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};
use tch::{Device, Kind, Tensor};
use trellis_comm::{Collective, Solo};
use trellis_core::checkpoint::shard_dim;
use trellis_core::config::ModelConfig;

/// A rank's process groups: `dp` averages gradients of the same slice across replicas, `tp`
/// joins the slices of one replica. A group of world size 1 may be [`Solo`].
pub struct Groups {
    pub dp: Box<dyn Collective>,
    pub tp: Box<dyn Collective>,
}

impl Groups {
    /// Data parallelism only (TP = 1).
    pub fn dp_only(dp: Box<dyn Collective>) -> Groups {
        Groups {
            dp,
            tp: Box::new(Solo),
        }
    }
}

/// Rank `(dp_rank, tp_rank)` of a DP × TP world as one global rank (TP-major: the ranks of one
/// TP group are adjacent, which keeps the chatty TP traffic inside a node).
pub fn global_rank(dp_rank: usize, tp_rank: usize, tp: usize) -> usize {
    dp_rank * tp + tp_rank
}

/// The inverse of [`global_rank`]: `(dp_rank, tp_rank)`.
pub fn split_rank(rank: usize, tp: usize) -> (usize, usize) {
    (rank / tp, rank % tp)
}

/// Whether `cfg` splits evenly across `tp` ranks (heads, KV heads, FFN width); the error says
/// which does not.
pub fn check_tp(cfg: &ModelConfig, tp: usize) -> Result<()> {
    if tp == 0 {
        return Err(Error::Invalid("tp must be at least 1".into()));
    }
    for (what, n) in [
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("intermediate_size", cfg.intermediate_size),
    ] {
        if n % tp != 0 {
            return Err(Error::Invalid(format!(
                "{what} = {n} is not divisible by tp = {tp}; choose a tp that divides the heads, the KV heads and the FFN width"
            )));
        }
    }
    Ok(())
}

/// A tensor's values as a host `f32` vector.
pub fn to_vec(t: &Tensor) -> Vec<f32> {
    let h = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let n = h.numel();
    let mut buf = vec![0f32; n];
    h.copy_data(&mut buf, n);
    buf
}

/// A host vector as an fp32 tensor of `shape` on `device`.
pub fn from_vec(buf: &[f32], shape: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(buf).view(shape).to_device(device)
}

/// Element-wise sum of `t` over the group (fp32, on `t`'s device; no graph), as a new tensor
/// (`t` is left alone: it may be saved by the graph). Identity (a detached fp32 view) for
/// world size 1.
pub fn all_reduce_tensor(comm: &mut dyn Collective, t: &Tensor) -> Result<Tensor> {
    if comm.world() == 1 {
        return Ok(t.detach().to_kind(Kind::Float));
    }
    let mut out = t.detach().to_kind(Kind::Float).copy().contiguous();
    all_reduce_sum_(comm, &mut out)?;
    Ok(out)
}

/// `t` must be a defined, contiguous fp32 tensor (the collectives read its memory as `f32`).
fn check_flat_f32(t: &Tensor, what: &str) -> Result<()> {
    if !t.defined() || t.kind() != Kind::Float || !t.is_contiguous() {
        return Err(Error::Invalid(format!(
            "{what} needs a contiguous fp32 tensor, got {}",
            if t.defined() {
                format!("{:?} (contiguous: {})", t.kind(), t.is_contiguous())
            } else {
                "an undefined tensor".into()
            }
        )));
    }
    Ok(())
}

/// In-place element-wise sum of the contiguous fp32 tensor `t` over the group: NCCL in device
/// memory for a CUDA tensor of an NCCL group (on the default stream, which libtorch computes
/// on), the host collective on the tensor's own memory for a CPU tensor. A CUDA tensor in a
/// group without a device collective (never assigned by the coordinator, which refuses CUDA
/// groups without NCCL; possible in a hand-built group) goes through a host copy.
pub fn all_reduce_sum_(comm: &mut dyn Collective, t: &mut Tensor) -> Result<()> {
    // A group of one is the identity, except an NCCL group of one (only `gpu_check` builds
    // one: the coordinator gives a group of one the `solo` backend), which runs NCCL.
    if t.numel() == 0 || (comm.world() == 1 && comm.device().is_none()) {
        return Ok(());
    }
    check_flat_f32(t, "all-reduce")?;
    let n = t.numel();
    if t.device().is_cuda() {
        if let Some(dev) = comm.device() {
            // SAFETY: `t` is a contiguous fp32 CUDA tensor of `n` elements that outlives the
            // call; the reduction is enqueued on the default stream, before any later kernel.
            unsafe { dev.all_reduce_sum_f32(t.data_ptr() as *mut f32, n, std::ptr::null_mut())? };
            return Ok(());
        }
        let mut buf = to_vec(t);
        comm.all_reduce_sum(&mut buf)?;
        tch::no_grad(|| t.copy_(&from_vec(&buf, &t.size(), t.device())));
        return Ok(());
    }
    comm.all_reduce_sum(host_f32_mut(t))?;
    Ok(())
}

/// In-place broadcast of the contiguous fp32 tensor `t` from group rank `root` (the same
/// backends as [`all_reduce_sum_`]).
pub fn broadcast_(comm: &mut dyn Collective, t: &mut Tensor, root: usize) -> Result<()> {
    if t.numel() == 0 || (comm.world() == 1 && comm.device().is_none()) {
        return Ok(());
    }
    check_flat_f32(t, "broadcast")?;
    let n = t.numel();
    if t.device().is_cuda() {
        if let Some(dev) = comm.device() {
            // SAFETY: as in `all_reduce_sum_`.
            unsafe { dev.broadcast_f32(t.data_ptr() as *mut f32, n, root, std::ptr::null_mut())? };
            return Ok(());
        }
        let mut buf = to_vec(t);
        comm.broadcast(&mut buf, root)?;
        tch::no_grad(|| t.copy_(&from_vec(&buf, &t.size(), t.device())));
        return Ok(());
    }
    comm.broadcast(host_f32_mut(t), root)?;
    Ok(())
}

/// Every rank's bytes, by rank (one [`broadcast_bytes`] per rank).
pub fn all_gather_bytes(comm: &mut dyn Collective, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
    (0..comm.world())
        .map(|r| broadcast_bytes(comm, r, mine))
        .collect()
}

/// `root`'s bytes on every rank (`mine` is read on `root` only). Bytes travel as the bit
/// patterns of f32 words, which every backend copies verbatim.
pub fn broadcast_bytes(comm: &mut dyn Collective, root: usize, mine: &[u8]) -> Result<Vec<u8>> {
    if comm.world() == 1 {
        return Ok(mine.to_vec());
    }
    let is_root = comm.rank() == root;
    let len = comm.all_reduce_max_u64(if is_root { mine.len() as u64 } else { 0 })? as usize;
    let mut words = vec![0f32; len.div_ceil(4)];
    if is_root {
        for (i, c) in mine.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            words[i] = f32::from_bits(u32::from_le_bytes(b));
        }
    }
    comm.broadcast(&mut words, root)?;
    let mut bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| w.to_bits().to_le_bytes())
        .collect();
    bytes.truncate(len);
    Ok(bytes)
}

/// Every rank's `value` (serialised as JSON), by rank.
pub fn all_gather_json<T: Serialize + DeserializeOwned>(
    comm: &mut dyn Collective,
    value: &T,
) -> Result<Vec<T>> {
    let mine = serde_json::to_vec(value)
        .map_err(|e| Error::Invalid(format!("cannot serialise for a gather: {e}")))?;
    all_gather_bytes(comm, &mine)?
        .into_iter()
        .map(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| Error::Invalid(format!("a peer sent an unreadable value: {e}")))
        })
        .collect()
}

/// The global L2 norm of the gradients of a TP-sharded model: squares of the split parameters'
/// gradients are summed over the TP group, the replicated ones (identical on every TP rank)
/// counted once. Equals [`crate::optim::AdamW::grad_norm`] of the unsplit model.
pub fn grad_norm(params: &[(String, Tensor)], tp: &mut dyn Collective) -> Result<f64> {
    let (mut split, mut replicated) = (0f64, 0f64);
    tch::no_grad(|| {
        for (name, p) in params {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let sq = g
                .to_kind(Kind::Double)
                .square()
                .sum(Kind::Double)
                .double_value(&[]);
            if shard_dim(name).is_some() {
                split += sq;
            } else {
                replicated += sq;
            }
        }
    });
    if tp.world() > 1 {
        // f32 on the wire (relative error ~1e-7: ample for clipping and the report).
        let mut buf = [split as f32];
        tp.all_reduce_sum(&mut buf)?;
        split = buf[0] as f64;
    }
    Ok((split + replicated).sqrt())
}
