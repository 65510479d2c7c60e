//! Collective communication between Trellis ranks (docs/design.md §4), behind one trait:
//! a TCP ring for CPU ranks (tests, CI, CPU training) and a no-op for world size 1; NCCL for
//! CUDA device memory ([`nccl`], feature `nccl`, on by default: it loads CUDA and NCCL at run
//! time and refuses clearly on a machine without them).
//!
//! Buffers are host `f32` slices; callers flatten gradients into buckets.

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
    /// `root` sends `pieces[r]` to rank `r`, and every rank receives its own piece into `mine`
    /// (`pieces` is read on `root` only, one slice per rank, and may be `&[]` elsewhere;
    /// `mine.len()` must equal the length of the rank's piece). Pieces may differ in length
    /// and may be empty. Root's own piece is copied locally.
    ///
    /// The default moves every piece to every rank (a size table, then one [`broadcast`] per
    /// non-empty piece): correct on any backend, but a backend that can send a rank only its
    /// own piece ([`TcpRing`]) overrides it.
    ///
    /// [`broadcast`]: Collective::broadcast
    fn scatter(&mut self, root: usize, pieces: &[&[f32]], mine: &mut [f32]) -> Result<()> {
        let (w, me) = (self.world(), self.rank());
        check_scatter(root, w, me, pieces, mine.len())?;
        // Lengths as the bit patterns of two f32 words each (every backend copies them verbatim).
        let mut table = vec![0f32; 2 * w];
        if me == root {
            for (r, p) in pieces.iter().enumerate() {
                let n = p.len() as u64;
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
            let mut buf = if me == root {
                pieces[r].to_vec()
            } else {
                vec![0f32; len(r)]
            };
            self.broadcast(&mut buf, root)?;
            if me == r {
                mine.copy_from_slice(&buf);
            }
        }
        if me == root {
            mine.copy_from_slice(pieces[root]);
        }
        Ok(())
    }
}

/// The checks every rank can make before a scatter: `root` is a rank, and on `root` one piece
/// per rank with its own piece as long as `mine`.
fn check_scatter(
    root: usize,
    world: usize,
    me: usize,
    pieces: &[&[f32]],
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
    if me == root && pieces[me].len() != mine {
        return Err(scatter_len_mismatch(me, root, pieces[me].len(), mine));
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
