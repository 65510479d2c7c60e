//! NCCL for CUDA ranks (docs/design.md §4), through `cudarc`, which loads `libcuda` and `libnccl` at
//! run time: this module builds everywhere and refuses, with [`Error::Unavailable`], on a
//! machine without a CUDA driver or without NCCL (never a panic: every entry point checks
//! `is_culib_present()` before touching either library).
//!
//! The [`Collective`](crate::Collective) trait moves host `f32` slices; NCCL moves device
//! memory on a CUDA stream, so it has its own small trait, [`DeviceCollective`], over raw
//! device pointers (`Tensor::data_ptr()` of a contiguous fp32 CUDA tensor) and the stream
//! libtorch computes on (the default stream, null, unless the caller changed it). An
//! [`NcclGroup`] pairs a communicator with the group's host collective (the TCP ring, for
//! control-plane agreements): the trainer sees one [`Collective`].
//!
//! Rendezvous: one rank calls [`unique_id`] and every rank of the group must receive the same
//! 128 bytes before [`NcclComm::new`]. In Trellis the coordinator relays them like the TCP
//! ring's peer addresses: every NCCL-capable worker offers fresh ids (in `Hello`, then after
//! every assignment), the coordinator takes one from each group's rank 0 and puts it into every
//! rank's assignment (next to `group_token`), and each rank builds its communicator from it
//! (docs/parallelism.md, "NCCL").
//!
//! Library names: cudarc looks for `libnccl.so`, `libnccl.so.<major>`…; the pip package
//! `nvidia-nccl-cu13` ships only `libnccl.so.2`, so provide a `libnccl.so` symlink on
//! `LD_LIBRARY_PATH` (docs/design.md §10).
pub use crate::DeviceCollective;
use crate::{Collective, Error, Result};
use cudarc::nccl::{result as nccl, sys};
use std::ffi::c_void;

/// The NCCL unique id of one communicator (128 opaque bytes, relayed to every rank).
#[derive(Clone, PartialEq, Eq)]
pub struct UniqueId(pub [u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId({:02x?}…)", &self.0[..8])
    }
}

/// Whether NCCL can run here: the CUDA driver library and NCCL both load. The error says
/// which is missing and what to do.
pub fn available() -> Result<()> {
    // SAFETY: these only try to dlopen the libraries by name.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver {
        return Err(Error::Unavailable(
            "NCCL needs CUDA, but no CUDA driver (libcuda.so) is installed on this machine; \
             use the TCP ring backend (CPU ranks) or run on a GPU machine"
                .into(),
        ));
    }
    let lib = unsafe { sys::is_culib_present() };
    if !lib {
        return Err(Error::Unavailable(
            "the CUDA driver is present but libnccl.so cannot be loaded; install NCCL (e.g. pip \
             nvidia-nccl-cu13) and put a libnccl.so symlink to libnccl.so.2 on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

fn nccl_err(what: &str, e: nccl::NcclError) -> Error {
    Error::Protocol(format!("NCCL {what} failed: {e:?}"))
}

/// A fresh unique id (call on one rank, relay to the others). Works without a GPU once NCCL
/// loads.
pub fn unique_id() -> Result<UniqueId> {
    available()?;
    let id = nccl::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    let mut out = [0u8; 128];
    for (o, c) in out.iter_mut().zip(id.internal.iter()) {
        *o = *c as u8;
    }
    Ok(UniqueId(out))
}

/// One rank's NCCL communicator.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time (`&mut self`).
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish_non_exhaustive()
    }
}

impl NcclComm {
    /// Join the communicator `id` as `rank` of `world` (blocks until every rank has joined).
    /// The calling thread's current CUDA device must be this rank's GPU (libtorch sets it for
    /// the device its tensors live on). Refuses with [`Error::Unavailable`] without CUDA/NCCL.
    pub fn new(rank: usize, world: usize, id: &UniqueId) -> Result<NcclComm> {
        if world == 0 || rank >= world {
            return Err(Error::Protocol(format!(
                "bad NCCL parameters: rank {rank}, world {world}; need 0 <= rank < world"
            )));
        }
        available()?;
        let mut raw = sys::ncclUniqueId { internal: [0; 128] };
        for (o, b) in raw.internal.iter_mut().zip(id.0.iter()) {
            *o = *b as _;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is 128 bytes as NCCL expects.
        unsafe { nccl::comm_init_rank(&mut comm, world as i32, raw, rank as i32) }
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(NcclComm { comm, rank, world })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: the communicator was created by ncclCommInitRank and is destroyed once.
            let _ = unsafe { nccl::comm_destroy(self.comm) };
        }
    }
}

impl DeviceCollective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    unsafe fn all_reduce_sum_f32(
        &mut self,
        ptr: *mut f32,
        len: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        nccl::all_reduce(
            ptr as *const c_void,
            ptr as *mut c_void,
            len,
            sys::ncclDataType_t::ncclFloat32,
            sys::ncclRedOp_t::ncclSum,
            self.comm,
            stream as sys::cudaStream_t,
        )
        .map(|_| ())
        .map_err(|e| nccl_err("ncclAllReduce", e))
    }
    unsafe fn broadcast_f32(
        &mut self,
        ptr: *mut f32,
        len: usize,
        root: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        if root >= self.world {
            return Err(Error::Protocol(format!(
                "broadcast root {root} is not a rank of this world of {}",
                self.world
            )));
        }
        nccl::broadcast(
            ptr as *const c_void,
            ptr as *mut c_void,
            len,
            sys::ncclDataType_t::ncclFloat32,
            root as i32,
            self.comm,
            stream as sys::cudaStream_t,
        )
        .map(|_| ())
        .map_err(|e| nccl_err("ncclBroadcast", e))
    }
}

/// A process group whose tensors move over NCCL and whose control-plane agreements (u64
/// maxima, barriers, host buffers) move over `host`, the group's TCP ring.
pub struct NcclGroup {
    host: Box<dyn Collective>,
    comm: NcclComm,
}

impl NcclGroup {
    /// `comm` and `host` must be the same group (same rank, same world).
    pub fn new(host: Box<dyn Collective>, comm: NcclComm) -> Result<NcclGroup> {
        if host.rank() != comm.rank || host.world() != comm.world {
            return Err(Error::Protocol(format!(
                "NCCL communicator is rank {} of {} but the group's ring is rank {} of {}",
                comm.rank,
                comm.world,
                host.rank(),
                host.world()
            )));
        }
        Ok(NcclGroup { host, comm })
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world(&self) -> usize {
        self.host.world()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.host.all_reduce_sum(buf)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.host.broadcast(buf, root)
    }
    fn barrier(&mut self) -> Result<()> {
        self.host.barrier()
    }
    fn all_reduce_max_u64(&mut self, v: u64) -> Result<u64> {
        self.host.all_reduce_max_u64(v)
    }
    fn all_reduce_min_u64(&mut self, v: u64) -> Result<u64> {
        self.host.all_reduce_min_u64(v)
    }
    /// The ring's scatter (each rank gets only its piece): the reshard's host transport.
    fn scatter(&mut self, root: usize, pieces: &[crate::Runs<'_>], mine: &mut [f32]) -> Result<()> {
        self.host.scatter(root, pieces, mine)
    }
    fn device(&mut self) -> Option<&mut dyn DeviceCollective> {
        Some(&mut self.comm)
    }
}
