//! The checkpoint format (DESIGN §5).
//!
//! ```text
//! <root>/<job>/step-<N>/
//!     model-tp<r>-of-<n>.safetensors   weights, TP-sharded (one file per TP rank)
//!     optim-tp<r>-of-<n>.safetensors   Adam moments `<param>.exp_avg`, `<param>.exp_avg_sq`
//!     trainer_state.json               step, tokens, generation, config, layout, cursor, schedule
//!     manifest.json                    every file (size, sha256), every logical tensor and its slices
//! <root>/<job>/latest                  "step-<N>", advanced only after commit
//! ```
//!
//! Writers put shard files in `step-<N>.tmp/`, report them ([`ShardReport`]), and one process
//! finalises (manifest + state, fsync, rename). Readers verify every hash on open and read only
//! the slices the requested TP rank needs.
use crate::config::ModelConfig;
use crate::growth::OptimizerPolicy;
use crate::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "trellis-checkpoint/v1";

/// A dense fp32 tensor on the host, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Which file family a tensor lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ShardKind {
    Model,
    Optim,
}

/// The parallel layout a checkpoint was written with (any layout can read it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub dp: usize,
    pub tp: usize,
}

/// The LR schedule in force: warmup then cosine from `peak_lr` to `min_lr` over
/// `[start_step, end_step)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub start_step: u64,
    pub end_step: u64,
    pub peak_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
}

/// One growth that happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrowthRecord {
    pub generation: u64,
    pub at_step: u64,
    pub tokens: u64,
    pub operator: String,
    pub factor: usize,
    pub optimizer: OptimizerPolicy,
    pub from_layers: usize,
    pub to_layers: usize,
}

/// A mask ramp in progress (operator `random` with `mask_ramp_steps`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskState {
    pub layers: Vec<usize>,
    pub start_step: u64,
    pub ramp_steps: u64,
}

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub job: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    pub generation: u64,
    pub model: ModelConfig,
    pub layout: Layout,
    /// Global sample index of the next training sample (DESIGN §6).
    pub data_cursor: u64,
    pub seed: u64,
    pub schedule: ScheduleState,
    /// Adam's step count `t` (bias correction); restarts at 0 under `reset`.
    pub optimizer_step: u64,
    /// Index of the next growth stage of the job spec still to fire.
    pub next_growth_stage: usize,
    #[serde(default)]
    pub growth_history: Vec<GrowthRecord>,
    #[serde(default)]
    pub mask: Option<MaskState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the checkpoint directory.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Where one slice of a logical tensor lives: rows/cols `[offset, offset+length)` of
/// `shard_dim` (the whole tensor when `shard_dim` is `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceEntry {
    pub file: String,
    pub offset: usize,
    pub length: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub kind: ShardKind,
    /// Global shape.
    pub shape: Vec<usize>,
    pub dtype: String,
    pub shard_dim: Option<usize>,
    pub slices: Vec<SliceEntry>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub files: Vec<FileEntry>,
    pub tensors: BTreeMap<String, TensorEntry>,
}

/// What one writer produced: its files and the slices in them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ShardReport {
    pub files: Vec<FileEntry>,
    pub tensors: BTreeMap<String, TensorEntry>,
}

/// The TP sharding rule (Megatron): column-parallel `q,k,v,gate,up` split dim 0, row-parallel
/// `o,down` split dim 1, everything else replicated. Moments (`<param>.exp_avg[_sq]`) follow
/// their parameter.
pub fn shard_dim(name: &str) -> Option<usize> {
    todo!("H1 {name}")
}

/// The half-open range of `len` that TP rank `rank` of `tp` holds (even split; `len % tp == 0`).
pub fn shard_range(len: usize, rank: usize, tp: usize) -> std::ops::Range<usize> {
    todo!("H1 {len} {rank} {tp}")
}

/// The temp dir writers use for step `step` under `job_root` (`<root>/<job>`).
pub fn tmp_dir(job_root: &Path, step: u64) -> PathBuf {
    job_root.join(format!("step-{step}.tmp"))
}

/// The final dir of step `step`.
pub fn step_dir(job_root: &Path, step: u64) -> PathBuf {
    job_root.join(format!("step-{step}"))
}

/// Write this TP rank's shard of `model` and `optim` (tensors already local to this rank, or
/// full when `tp == 1`) into `tmp` as `model-tp<r>-of-<n>.safetensors` / `optim-…`, fsynced.
/// `optim` may be empty (no file written then).
pub fn write_shard(
    tmp: &Path,
    tp_rank: usize,
    tp: usize,
    model: &[(String, HostTensor)],
    optim: &[(String, HostTensor)],
) -> Result<ShardReport> {
    todo!("H1 {tmp:?} {tp_rank} {tp} {} {}", model.len(), optim.len())
}

/// Write a full (unsharded) state as `tp` shard files at once: used by single-process writers
/// and by offline tools.
pub fn write_full(
    tmp: &Path,
    tp: usize,
    model: &[(String, HostTensor)],
    optim: &[(String, HostTensor)],
) -> Result<ShardReport> {
    todo!("H1 {tmp:?} {tp} {} {}", model.len(), optim.len())
}

/// Merge the reports, write `manifest.json` and `trainer_state.json`, fsync, rename `tmp` to
/// its final `step-<N>` name (N = `state.step`). Does **not** move `latest`: call
/// [`set_latest`] once the checkpoint is committed.
pub fn finalize(tmp: &Path, state: &TrainerState, reports: &[ShardReport]) -> Result<PathBuf> {
    todo!("H1 {tmp:?} {} {}", state.step, reports.len())
}

/// An opened, verified checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub state: TrainerState,
}

impl Checkpoint {
    /// Open `dir`, checking every file's size and sha256 against the manifest (a mismatch is
    /// [`crate::Error::HashMismatch`] naming the file) and that the tensors match the config.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        todo!("H1 {dir:?}")
    }

    /// Names of the logical tensors of `kind`, sorted.
    pub fn names(&self, kind: ShardKind) -> Vec<String> {
        todo!("H1 {kind:?}")
    }

    /// Read the part of logical tensor `name` that TP rank `tp_rank` of `tp` holds, touching only
    /// the files whose slices overlap it.
    pub fn read(&self, name: &str, tp_rank: usize, tp: usize) -> Result<HostTensor> {
        todo!("H1 {name} {tp_rank} {tp}")
    }

    /// The whole logical tensor.
    pub fn read_full(&self, name: &str) -> Result<HostTensor> {
        self.read(name, 0, 1)
    }
}

/// Point `<job_root>/latest` at `dir` (atomic write + rename).
pub fn set_latest(job_root: &Path, dir: &Path) -> Result<()> {
    todo!("H1 {job_root:?} {dir:?}")
}

/// The directory `latest` points at, if any.
pub fn latest(job_root: &Path) -> Result<Option<PathBuf>> {
    todo!("H1 {job_root:?}")
}

/// Committed (final-named) checkpoints, oldest first, as (step, dir).
pub fn list(job_root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    todo!("H1 {job_root:?}")
}

/// Remove all but the newest `keep` committed checkpoints (never the one `latest` names) and any
/// stale `.tmp` dirs older than the newest committed one.
pub fn gc(job_root: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    todo!("H1 {job_root:?} {keep}")
}
