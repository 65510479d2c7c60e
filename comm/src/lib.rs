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
    /// `root` sends `pieces[r]` to rank `r`, and every rank receives its own piece into `mine`
    /// (`pieces` is read on `root` only, one [`Runs`] per rank, and may be `&[]` elsewhere;
    /// `mine.len()` must equal the length of the rank's piece). Pieces may differ in length
    /// and may be empty. Root's own piece is copied locally.
    ///
    /// The default moves every piece to every rank (a size table, then one [`broadcast`] per
    /// non-empty piece): correct on any backend, but a backend that can send a rank only its
    /// own piece ([`TcpRing`]) overrides it.
    ///
    /// [`broadcast`]: Collective::broadcast
    fn scatter(&mut self, root: usize, pieces: &[Runs<'_>], mine: &mut [f32]) -> Result<()> {
        let (w, me) = (self.world(), self.rank());
        check_scatter(root, w, me, pieces, mine.len())?;
        // Lengths as the bit patterns of two f32 words each (every backend copies them verbatim).
        let mut table = vec![0f32; 2 * w];
        if me == root {
            for (r, p) in pieces.iter().enumerate() {
                let n = runs_len(p) as u64;
                table[2 * r] = f32::from_bits(n as u32);
                table[2 * r + 1] = f32::from_bits((n >> 32) as u32);
            }
        }
        self.broadcast(&mut table, root)?;
        let len = |r: usize| {
            table[2 * r].to_bits() as usize | (table[2 * r + 1].to_bits() as usize) << 32
        };
        if len(me) != mine.len() {
            return Err(scatter_len_mismatch(me, root, len(me), mine.len()));
        }
        for r in (0..w).filter(|&r| r != root && len(r) > 0) {
            let mut buf = vec![0f32; len(r)];
            if me == root {
                copy_runs(pieces[r], &mut buf);
            }
            self.broadcast(&mut buf, root)?;
            if me == r {
                mine.copy_from_slice(&buf);
            }
        }
        if me == root {
            copy_runs(pieces[root], mine);
        }
        Ok(())
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

/// One rank's piece of a [`Collective::scatter`]: runs of values that travel back to back, so
/// a strided part (some columns of a row-major matrix: one run per row) needs no staging copy.
pub type Runs<'a> = &'a [&'a [f32]];

/// The number of values in `runs`.
pub fn runs_len(runs: &[&[f32]]) -> usize {
    runs.iter().map(|r| r.len()).sum()
}

/// Copy `runs` back to back into `out` (exactly as long).
fn copy_runs(runs: &[&[f32]], out: &mut [f32]) {
    let mut at = 0;
    for r in runs {
        out[at..at + r.len()].copy_from_slice(r);
        at += r.len();
    }
}

/// The checks every rank can make before a scatter: `root` is a rank, and on `root` one piece
/// per rank with its own piece as long as `mine`.
fn check_scatter(
    root: usize,
    world: usize,
    me: usize,
    pieces: &[Runs<'_>],
    mine: usize,
) -> Result<()> {
    if root >= world {
        return Err(Error::Protocol(format!(
            "scatter root {root} is not a rank of this world of {world}"
        )));
    }
    if me == root && pieces.len() != world {
        return Err(Error::Protocol(format!(
            "scatter: the root has {} pieces for a world of {world}; pass one per rank (empty ones included)",
            pieces.len()
        )));
    }
    if me == root && runs_len(pieces[me]) != mine {
        return Err(scatter_len_mismatch(me, root, runs_len(pieces[me]), mine));
    }
    Ok(())
}

fn scatter_len_mismatch(me: usize, root: usize, sent: usize, room: usize) -> Error {
    Error::Protocol(format!(
        "scatter from rank {root}: rank {me}'s piece has {sent} values but its buffer holds {room}; \
         every rank must expect exactly the piece the root sends it"
    ))
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
