//! Collective communication between Trellis ranks (docs/design.md §4), behind one trait:
//! a TCP ring for CPU ranks (tests, CI, CPU training) and a no-op for world size 1; NCCL for
//! CUDA device memory ([`nccl`], feature `nccl`, on by default: it loads CUDA and NCCL at run
//! time and refuses clearly on a machine without them).
//!
//! Buffers are host `f32` slices; callers flatten gradients into buckets. A group that can
//! also move device memory (NCCL) hands out a [`DeviceCollective`] through
//! [`Collective::device`]; the host methods stay for control-plane agreements (step and
//! command numbers, barriers, small gathers), which an NCCL group runs over its TCP ring.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("collective: peer {peer} ({addr}) {what}: {source}; check that every rank of the group is running and reachable")]
    Peer {
        peer: usize,
        addr: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("collective: {0}")]
    Protocol(String),
    /// A peer failed authentication: the ring key check at the handshake, or a message's MAC.
    #[error("collective: peer {peer} ({addr}) {what}")]
    Auth {
        peer: usize,
        addr: String,
        what: String,
    },
    #[error("collective timed out after {0:?} waiting for a peer; a rank has probably died")]
    Timeout(std::time::Duration),
    /// The backend cannot run on this machine (NCCL without CUDA or without libnccl).
    #[error("collective backend unavailable: {0}")]
    Unavailable(String),
}
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A process group. Every rank must call the same collectives in the same order.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over all ranks, in place.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Replace `buf` on every rank with `root`'s.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Return once every rank has entered.
    fn barrier(&mut self) -> Result<()>;
    /// Max of one u64 over all ranks (used to agree a step or a command number).
    fn all_reduce_max_u64(&mut self, v: u64) -> Result<u64>;
    /// Min of one u64 over all ranks.
    fn all_reduce_min_u64(&mut self, v: u64) -> Result<u64>;
    /// The group's collective over device memory, when it has one (an NCCL group). Tensor
    /// collectives of CUDA tensors go through it; host buffers never do.
    fn device(&mut self) -> Option<&mut dyn DeviceCollective> {
        None
    }
}

/// A collective over CUDA device memory (NCCL), beside a group's host [`Collective`].
pub trait DeviceCollective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// In-place element-wise sum of `len` f32 at device address `ptr` over all ranks, enqueued
    /// on `stream` (null: the default stream).
    ///
    /// # Safety
    /// `ptr` must point to `len` f32 of device memory of this communicator's GPU that stay
    /// valid until the stream has run the operation.
    unsafe fn all_reduce_sum_f32(
        &mut self,
        ptr: *mut f32,
        len: usize,
        stream: *mut std::ffi::c_void,
    ) -> Result<()>;
    /// In-place broadcast of `len` f32 from `root`.
    ///
    /// # Safety
    /// As [`DeviceCollective::all_reduce_sum_f32`].
    unsafe fn broadcast_f32(
        &mut self,
        ptr: *mut f32,
        len: usize,
        root: usize,
        stream: *mut std::ffi::c_void,
    ) -> Result<()>;
}

/// World size 1: every collective is the identity.
#[derive(Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max_u64(&mut self, v: u64) -> Result<u64> {
        Ok(v)
    }
    fn all_reduce_min_u64(&mut self, v: u64) -> Result<u64> {
        Ok(v)
    }
}

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod ring;
pub use ring::{RingOptions, TcpRing};
