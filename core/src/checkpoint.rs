//! The checkpoint format (docs/design.md §5).
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
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "trellis-checkpoint/v1";
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The trainer state's file name.
pub const TRAINER_STATE: &str = "trainer_state.json";
/// An optional tokenizer a writer may copy into the checkpoint dir before [`finalize`].
pub const TOKENIZER: &str = "tokenizer.json";
/// Hugging Face files kept beside `tokenizer.json` when a checkpoint is imported, carried by
/// growth and copied into exports (each optional).
pub const HF_SIDECARS: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];
/// The pointer file `<job_root>/latest`.
pub const LATEST: &str = "latest";
/// The only dtype written and read.
pub const DTYPE: &str = "F32";
/// Suffixes of the Adam moment tensors in `optim-…` files.
pub const MOMENT_SUFFIXES: &[&str] = &[".exp_avg", ".exp_avg_sq"];

/// A dense fp32 tensor on the host, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor of `shape` from `data`; refuses a length that does not match the shape.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<HostTensor> {
        let t = HostTensor { shape, data };
        t.check("tensor")?;
        Ok(t)
    }

    pub fn zeros(shape: &[usize]) -> HostTensor {
        HostTensor::full(shape, 0.0)
    }

    pub fn full(shape: &[usize], value: f32) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            data: vec![value; shape.iter().product()],
        }
    }

    /// Number of elements the shape calls for.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn check(&self, name: &str) -> Result<()> {
        self.view().check(name)
    }

    /// A borrow of this tensor, for the writers that take [`TensorView`]s.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            shape: &self.shape,
            data: &self.data,
        }
    }

    /// Rows/cols `range` of dimension `dim` (a copy).
    pub fn narrow(&self, dim: usize, range: std::ops::Range<usize>) -> Result<HostTensor> {
        if dim >= self.shape.len() || range.start > range.end || range.end > self.shape[dim] {
            return Err(Error::InvalidConfig(format!(
                "cannot take {range:?} of dim {dim} of a tensor of shape {:?}",
                self.shape
            )));
        }
        let outer: usize = self.shape[..dim].iter().product();
        let inner: usize = self.shape[dim + 1..].iter().product();
        let len = self.shape[dim];
        let n = range.len();
        let mut data = Vec::with_capacity(outer * n * inner);
        for o in 0..outer {
            let start = (o * len + range.start) * inner;
            data.extend_from_slice(&self.data[start..start + n * inner]);
        }
        let mut shape = self.shape.clone();
        shape[dim] = n;
        Ok(HostTensor { shape, data })
    }

    /// Little-endian bytes of the data (a borrow on little-endian hosts).
    pub fn le_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        f32_le_bytes(&self.data)
    }

    /// A tensor from little-endian f32 bytes.
    pub fn from_le_bytes(shape: Vec<usize>, bytes: &[u8]) -> Result<HostTensor> {
        if bytes.len() % 4 != 0 {
            return Err(Error::InvalidConfig(format!(
                "{} bytes are not a whole number of f32 values",
                bytes.len()
            )));
        }
        let data = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        HostTensor::new(shape, data)
    }
}

fn f32_le_bytes(data: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and no invalid bit patterns as bytes; u8 has alignment 1;
        // the byte length is exactly the f32 slice's size and the borrow keeps `data` alive.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data))
        })
    }
    #[cfg(not(target_endian = "little"))]
    {
        std::borrow::Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// A safetensors view of a borrowed f32 tensor.
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        f32_le_bytes(self.data)
    }
    fn data_len(&self) -> usize {
        std::mem::size_of_val(self.data)
    }
}

/// A dense fp32 tensor, row-major, borrowed: a [`HostTensor`]'s ([`HostTensor::view`]) or
/// memory the caller keeps alive and unchanged while it is written (a growth checkpoint's
/// snapshot is written straight from the tensors it shares, without a host copy).
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub shape: &'a [usize],
    pub data: &'a [f32],
}

impl TensorView<'_> {
    fn check(&self, name: &str) -> Result<()> {
        let numel: usize = self.shape.iter().product();
        if numel != self.data.len() {
            return Err(Error::InvalidConfig(format!(
                "tensor {name} has shape {:?} ({numel} elements) but {} values",
                self.shape,
                self.data.len()
            )));
        }
        Ok(())
    }
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
    /// Global sample index of the next training sample (docs/design.md §6).
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
    let param = moment_param(name).unwrap_or(name);
    let suffix = param.strip_suffix(".weight")?;
    if ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
        .iter()
        .any(|p| suffix.ends_with(&format!(".{p}")))
    {
        Some(0)
    } else if ["o_proj", "down_proj"]
        .iter()
        .any(|p| suffix.ends_with(&format!(".{p}")))
    {
        Some(1)
    } else {
        None
    }
}

/// For an Adam moment name `<param>.exp_avg` / `<param>.exp_avg_sq`, the parameter's name.
pub fn moment_param(name: &str) -> Option<&str> {
    // `.exp_avg_sq` first: `.exp_avg` is not a suffix of it, but keep the order explicit.
    name.strip_suffix(".exp_avg_sq")
        .or_else(|| name.strip_suffix(".exp_avg"))
}

/// The names of the two Adam moments of parameter `param`.
pub fn moment_names(param: &str) -> [String; 2] {
    [format!("{param}.exp_avg"), format!("{param}.exp_avg_sq")]
}

/// The half-open range of `len` that TP rank `rank` of `tp` holds (even split; `len % tp == 0`).
/// For a `len` that `tp` does not divide the split is balanced (`len·r/tp .. len·(r+1)/tp`);
/// `tp = 0` is treated as 1 and a rank past the end gets an empty range.
pub fn shard_range(len: usize, rank: usize, tp: usize) -> std::ops::Range<usize> {
    let tp = tp.max(1);
    let rank = rank.min(tp);
    let start = len * rank / tp;
    let end = (len * (rank + 1) / tp).min(len);
    start.min(end)..end
}

/// The temp dir writers use for step `step` under `job_root` (`<root>/<job>`).
pub fn tmp_dir(job_root: &Path, step: u64) -> PathBuf {
    job_root.join(format!("step-{step}.tmp"))
}

/// The final dir of step `step`.
pub fn step_dir(job_root: &Path, step: u64) -> PathBuf {
    job_root.join(format!("step-{step}"))
}

/// The shard file name of `kind` for TP rank `tp_rank` of `tp`.
pub fn shard_file_name(kind: ShardKind, tp_rank: usize, tp: usize) -> String {
    let family = match kind {
        ShardKind::Model => "model",
        ShardKind::Optim => "optim",
    };
    format!("{family}-tp{tp_rank}-of-{tp}.safetensors")
}

fn ck_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn check_tp(tp_rank: usize, tp: usize) -> Result<()> {
    if tp == 0 || tp_rank >= tp {
        return Err(Error::Layout(format!(
            "tensor-parallel rank {tp_rank} of {tp} is not valid; the rank must lie in 0..tp and tp ≥ 1"
        )));
    }
    Ok(())
}

/// sha256 (hex) and size of a file, streamed.
pub fn file_digest(path: &Path) -> Result<(u64, String)> {
    let mut f =
        File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

pub(crate) fn fsync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("cannot fsync {}", path.display()), e))
}

/// Write `bytes` to `path` and fsync it.
pub(crate) fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

/// Write `tensors` as one plain safetensors file (F32, header metadata `{"format": "pt"}`, which
/// Python `safetensors` and `transformers` accept), fsync it and return its size and sha256.
/// The entry's `path` is the file name.
/// An f32 rounded to bfloat16 (round to nearest, ties to even; NaN stays a quiet NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    (rounded >> 16) as u16
}

struct Bf16View<'a> {
    shape: &'a [usize],
    data: Vec<u8>,
}

impl safetensors::View for Bf16View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// [`write_safetensors`] with every tensor rounded to bfloat16 (for exports; checkpoints keep
/// fp32).
pub fn write_safetensors_bf16(path: &Path, tensors: &[(&str, &HostTensor)]) -> Result<()> {
    for (name, t) in tensors {
        t.check(name)?;
    }
    let views = tensors.iter().map(|(name, t)| {
        let data = t
            .data
            .iter()
            .flat_map(|&x| f32_to_bf16(x).to_le_bytes())
            .collect();
        (
            name.to_string(),
            Bf16View {
                shape: &t.shape,
                data,
            },
        )
    });
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| ck_err(path, format!("cannot write safetensors file: {e}")))?;
    fsync_path(path)
}

pub fn write_safetensors(path: &Path, tensors: &[(&str, &HostTensor)]) -> Result<FileEntry> {
    let views: Vec<(&str, TensorView)> = tensors.iter().map(|(n, t)| (*n, t.view())).collect();
    write_safetensors_views(path, &views)
}

/// [`write_safetensors`] of borrowed tensors.
pub fn write_safetensors_views(path: &Path, tensors: &[(&str, TensorView)]) -> Result<FileEntry> {
    for (name, t) in tensors {
        t.check(name)?;
    }
    let views = tensors.iter().map(|(name, t)| {
        (
            name.to_string(),
            F32View {
                shape: t.shape,
                data: t.data,
            },
        )
    });
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| ck_err(path, format!("cannot write safetensors file: {e}")))?;
    fsync_path(path)?;
    let (size, sha256) = file_digest(path)?;
    Ok(FileEntry {
        path: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        size,
        sha256,
    })
}

/// Read every tensor of a safetensors file (F32 only), in name order.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, HostTensor)>> {
    let map = map_file(path)?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| ck_err(path, format!("not a valid safetensors file: {e}")))?;
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let view = st
                .tensor(&name)
                .map_err(|e| ck_err(path, format!("tensor {name}: {e}")))?;
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(ck_err(
                    path,
                    format!("tensor {name} is {:?}; only F32 is supported", view.dtype()),
                ));
            }
            let t = HostTensor::from_le_bytes(view.shape().to_vec(), view.data())?;
            Ok((name, t))
        })
        .collect()
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f =
        File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    // SAFETY: checkpoint files are immutable once finalized; a concurrent writer would be a
    // bug elsewhere, and the data is re-validated (shape, dtype) before use.
    unsafe { memmap2::Mmap::map(&f) }
        .map_err(|e| Error::io(format!("cannot mmap {}", path.display()), e))
}

fn write_shard_refs(
    tmp: &Path,
    tp_rank: usize,
    tp: usize,
    model: &[(&str, &HostTensor)],
    optim: &[(&str, &HostTensor)],
) -> Result<ShardReport> {
    let m: Vec<(&str, TensorView)> = model.iter().map(|(n, t)| (*n, t.view())).collect();
    let o: Vec<(&str, TensorView)> = optim.iter().map(|(n, t)| (*n, t.view())).collect();
    write_shard_views(tmp, tp_rank, tp, &m, &o)
}

/// [`write_shard`] of borrowed tensors.
pub fn write_shard_views(
    tmp: &Path,
    tp_rank: usize,
    tp: usize,
    model: &[(&str, TensorView)],
    optim: &[(&str, TensorView)],
) -> Result<ShardReport> {
    check_tp(tp_rank, tp)?;
    std::fs::create_dir_all(tmp)
        .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
    let mut report = ShardReport::default();
    for (kind, tensors) in [(ShardKind::Model, model), (ShardKind::Optim, optim)] {
        let file = shard_file_name(kind, tp_rank, tp);
        let mut selected: Vec<(&str, TensorView)> = Vec::new();
        for &(name, t) in tensors.iter() {
            t.check(name)?;
            let dim = shard_dim(name);
            let (shape, offset, length) = match dim {
                None => {
                    if tp_rank != 0 {
                        continue; // replicated: only TP rank 0 writes it
                    }
                    (t.shape.to_vec(), 0, t.shape.first().copied().unwrap_or(1))
                }
                Some(d) => {
                    if d >= t.shape.len() {
                        return Err(ck_err(
                            tmp,
                            format!(
                                "tensor {name} has shape {:?} but is split on dim {d}; pass 2-D weights",
                                t.shape
                            ),
                        ));
                    }
                    let local = t.shape[d];
                    let mut global = t.shape.to_vec();
                    global[d] = local * tp;
                    (global, tp_rank * local, local)
                }
            };
            let entry = TensorEntry {
                kind,
                shape,
                dtype: DTYPE.to_string(),
                shard_dim: dim,
                slices: vec![SliceEntry {
                    file: file.clone(),
                    offset,
                    length,
                }],
            };
            if report.tensors.insert(name.to_string(), entry).is_some() {
                return Err(ck_err(
                    tmp,
                    format!("tensor {name} is given twice; every tensor name must be unique"),
                ));
            }
            selected.push((name, t));
        }
        if selected.is_empty() {
            continue;
        }
        report
            .files
            .push(write_safetensors_views(&tmp.join(&file), &selected)?);
    }
    Ok(report)
}

/// Write this TP rank's shard of `model` and `optim` (tensors already local to this rank, or
/// full when `tp == 1`) into `tmp` as `model-tp<r>-of-<n>.safetensors` / `optim-…`, fsynced.
/// `optim` may be empty (no file written then). Replicated tensors (norms, embeddings,
/// `lm_head`) are written only by TP rank 0; other ranks may pass them or not.
pub fn write_shard(
    tmp: &Path,
    tp_rank: usize,
    tp: usize,
    model: &[(String, HostTensor)],
    optim: &[(String, HostTensor)],
) -> Result<ShardReport> {
    let m: Vec<(&str, &HostTensor)> = model.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let o: Vec<(&str, &HostTensor)> = optim.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_shard_refs(tmp, tp_rank, tp, &m, &o)
}

/// Write a full (unsharded) state as `tp` shard files at once: used by single-process writers
/// and by offline tools.
pub fn write_full(
    tmp: &Path,
    tp: usize,
    model: &[(String, HostTensor)],
    optim: &[(String, HostTensor)],
) -> Result<ShardReport> {
    let m: Vec<(&str, &HostTensor)> = model.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let o: Vec<(&str, &HostTensor)> = optim.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_full_refs(tmp, tp, &m, &o)
}

pub(crate) fn write_full_refs(
    tmp: &Path,
    tp: usize,
    model: &[(&str, &HostTensor)],
    optim: &[(&str, &HostTensor)],
) -> Result<ShardReport> {
    check_tp(0, tp)?;
    if tp == 1 {
        return write_shard_refs(tmp, 0, 1, model, optim);
    }
    // Slice every sharded tensor for every rank; replicated ones go to rank 0 by reference.
    let slice_all = |tensors: &[(&str, &HostTensor)],
                     r: usize|
     -> Result<Vec<(String, Option<HostTensor>)>> {
        let mut out = Vec::with_capacity(tensors.len());
        for &(name, t) in tensors {
            t.check(name)?;
            match shard_dim(name) {
                None => out.push((name.to_string(), None)),
                Some(d) => {
                    let len = t.shape.get(d).copied().ok_or_else(|| {
                        ck_err(
                            tmp,
                            format!(
                                "tensor {name} has shape {:?} but is split on dim {d}",
                                t.shape
                            ),
                        )
                    })?;
                    if len % tp != 0 {
                        return Err(Error::Layout(format!(
                            "tensor {name} has {len} rows/cols on dim {d}, not divisible by tp {tp}; choose a tp that divides it"
                        )));
                    }
                    out.push((
                        name.to_string(),
                        Some(t.narrow(d, shard_range(len, r, tp))?),
                    ));
                }
            }
        }
        Ok(out)
    };
    let mut reports = Vec::with_capacity(tp);
    for r in 0..tp {
        let ms = slice_all(model, r)?;
        let os = slice_all(optim, r)?;
        let m: Vec<(&str, &HostTensor)> = ms
            .iter()
            .zip(model.iter())
            .filter_map(|((n, s), (_, full))| match s {
                Some(s) => Some((n.as_str(), s)),
                None if r == 0 => Some((n.as_str(), *full)),
                None => None,
            })
            .collect();
        let o: Vec<(&str, &HostTensor)> = os
            .iter()
            .zip(optim.iter())
            .filter_map(|((n, s), (_, full))| match s {
                Some(s) => Some((n.as_str(), s)),
                None if r == 0 => Some((n.as_str(), *full)),
                None => None,
            })
            .collect();
        reports.push(write_shard_refs(tmp, r, tp, &m, &o)?);
    }
    merge_reports(tmp, &reports)
}

/// Merge shard reports (from every TP rank, or several writers) into one: files by name,
/// tensors with their slices gathered and sorted. Conflicting descriptions are refused.
pub fn merge_reports(dir: &Path, reports: &[ShardReport]) -> Result<ShardReport> {
    let mut files: BTreeMap<String, FileEntry> = BTreeMap::new();
    let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
    for r in reports {
        for f in &r.files {
            match files.get(&f.path) {
                Some(prev) if prev != f => {
                    return Err(ck_err(
                        dir,
                        format!(
                            "file {} is reported twice with different size or hash",
                            f.path
                        ),
                    ))
                }
                _ => {
                    files.insert(f.path.clone(), f.clone());
                }
            }
        }
        for (name, e) in &r.tensors {
            match tensors.get_mut(name) {
                None => {
                    tensors.insert(name.clone(), e.clone());
                }
                Some(prev) => {
                    if prev.kind != e.kind
                        || prev.shape != e.shape
                        || prev.dtype != e.dtype
                        || prev.shard_dim != e.shard_dim
                    {
                        return Err(ck_err(
                            dir,
                            format!(
                                "tensor {name} is reported with different descriptions: {:?} {:?} split {:?} vs {:?} {:?} split {:?}",
                                prev.kind, prev.shape, prev.shard_dim, e.kind, e.shape, e.shard_dim
                            ),
                        ));
                    }
                    for s in &e.slices {
                        if !prev.slices.contains(s) {
                            prev.slices.push(s.clone());
                        }
                    }
                }
            }
        }
    }
    for e in tensors.values_mut() {
        e.slices
            .sort_by(|a, b| (a.offset, &a.file).cmp(&(b.offset, &b.file)));
    }
    Ok(ShardReport {
        files: files.into_values().collect(),
        tensors,
    })
}

/// Check that the slices of every tensor tile it exactly and live in listed files.
fn check_slices(
    tensors: &BTreeMap<String, TensorEntry>,
    files: &BTreeSet<&str>,
) -> std::result::Result<(), String> {
    for (name, e) in tensors {
        if e.dtype != DTYPE {
            return Err(format!(
                "tensor {name} has dtype {}; only {DTYPE} is supported",
                e.dtype
            ));
        }
        for s in &e.slices {
            if !files.contains(s.file.as_str()) {
                return Err(format!(
                    "tensor {name} has a slice in {}, which is not a file of the checkpoint",
                    s.file
                ));
            }
        }
        match e.shard_dim {
            None => {
                if e.slices.len() != 1 {
                    return Err(format!(
                        "replicated tensor {name} must have exactly one slice, has {}",
                        e.slices.len()
                    ));
                }
            }
            Some(d) => {
                let len = *e.shape.get(d).ok_or_else(|| {
                    format!("tensor {name} of shape {:?} is split on dim {d}", e.shape)
                })?;
                let mut next = 0;
                for s in &e.slices {
                    if s.offset != next {
                        return Err(format!(
                            "tensor {name}: slices do not tile dim {d} (expected one starting at {next}, found {}..{}); did every TP rank report its shard?",
                            s.offset,
                            s.offset + s.length
                        ));
                    }
                    next = s.offset + s.length;
                }
                if next != len {
                    return Err(format!(
                        "tensor {name}: slices cover 0..{next} of dim {d}, which has {len}; did every TP rank report its shard?"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Check the model tensors against the config: every tensor present, the right shape, no extra
/// ones; moments of known parameters have their parameter's shape.
fn check_against_config(
    tensors: &BTreeMap<String, TensorEntry>,
    cfg: &ModelConfig,
) -> std::result::Result<(), String> {
    let expected = cfg.tensor_shapes();
    let shapes: BTreeMap<&str, &Vec<usize>> =
        expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => return Err(format!("model tensor {name} (shape {shape:?}) is missing")),
            Some(e) if e.kind != ShardKind::Model => {
                return Err(format!("tensor {name} is stored as {:?}, expected model", e.kind))
            }
            Some(e) if &e.shape != shape => {
                return Err(format!(
                    "tensor {name} has shape {:?} in the checkpoint but the model config needs {shape:?}",
                    e.shape
                ))
            }
            _ => {}
        }
    }
    for (name, e) in tensors {
        match e.kind {
            ShardKind::Model => {
                if !shapes.contains_key(name.as_str()) {
                    return Err(format!(
                        "model tensor {name} is not part of the model config ({} layers)",
                        cfg.num_hidden_layers
                    ));
                }
            }
            ShardKind::Optim => {
                if let Some(shape) = moment_param(name).and_then(|p| shapes.get(p)) {
                    if &&e.shape != shape {
                        return Err(format!(
                            "optimizer tensor {name} has shape {:?} but its parameter has {shape:?}",
                            e.shape
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Merge the reports, write `manifest.json` and `trainer_state.json`, fsync, rename `tmp` to
/// its final `step-<N>` name (N = `state.step`). Does **not** move `latest`: call
/// [`set_latest`] once the checkpoint is committed.
///
/// The manifest lists every file in `tmp` except itself: the shard files, `trainer_state.json`
/// and whatever else the writer put there beforehand (e.g. `tokenizer.json`). An existing
/// `step-<N>` is replaced: it is renamed to `step-<N>.old`, the new dir renamed into place, then
/// the old one removed (a crash in between leaves `step-<N>.old`, which [`gc`] removes).
pub fn finalize(tmp: &Path, state: &TrainerState, reports: &[ShardReport]) -> Result<PathBuf> {
    let parent = tmp
        .parent()
        .ok_or_else(|| ck_err(tmp, "the temp dir has no parent directory"))?;
    let dest = step_dir(parent, state.step);
    finalize_into(tmp, &dest, state, reports)?;
    Ok(dest)
}

/// [`finalize`] with an explicit destination (offline tools write to any directory).
pub fn finalize_into(
    tmp: &Path,
    dest: &Path,
    state: &TrainerState,
    reports: &[ShardReport],
) -> Result<()> {
    if !tmp.is_dir() {
        return Err(ck_err(
            tmp,
            "the temp dir does not exist; write the shards first",
        ));
    }
    if tmp == dest {
        return Err(ck_err(tmp, "the temp dir and the destination are the same"));
    }
    let merged = merge_reports(tmp, reports)?;
    {
        let names: BTreeSet<&str> = merged.files.iter().map(|f| f.path.as_str()).collect();
        check_slices(&merged.tensors, &names).map_err(|m| ck_err(tmp, m))?;
    }
    state
        .model
        .validate()
        .map_err(|e| ck_err(tmp, format!("trainer state: {e}")))?;
    check_against_config(&merged.tensors, &state.model).map_err(|m| ck_err(tmp, m))?;
    let reported: BTreeMap<&str, &FileEntry> =
        merged.files.iter().map(|f| (f.path.as_str(), f)).collect();
    for f in &merged.files {
        let p = tmp.join(&f.path);
        let meta = std::fs::metadata(&p)
            .map_err(|e| Error::io(format!("reported shard file {} is missing", p.display()), e))?;
        if meta.len() != f.size {
            return Err(ck_err(
                &p,
                format!(
                    "the file has {} bytes but its writer reported {}",
                    meta.len(),
                    f.size
                ),
            ));
        }
    }

    let state_json = serde_json::to_vec_pretty(state)
        .map_err(|e| ck_err(tmp, format!("cannot serialise trainer state: {e}")))?;
    write_file_synced(&tmp.join(TRAINER_STATE), &state_json)?;

    let mut entries = Vec::new();
    let rd = std::fs::read_dir(tmp)
        .map_err(|e| Error::io(format!("cannot list {}", tmp.display()), e))?;
    let mut names = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("cannot list {}", tmp.display()), e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name == MANIFEST {
            continue;
        }
        let ft = ent
            .file_type()
            .map_err(|e| Error::io(format!("cannot stat {}", ent.path().display()), e))?;
        if !ft.is_file() {
            return Err(ck_err(
                &ent.path(),
                "a checkpoint dir may hold only plain files; remove this entry",
            ));
        }
        names.push(name);
    }
    names.sort();
    for name in names {
        let p = tmp.join(&name);
        let entry = match reported.get(name.as_str()) {
            Some(f) => (*f).clone(),
            None => {
                let (size, sha256) = file_digest(&p)?;
                FileEntry {
                    path: name.clone(),
                    size,
                    sha256,
                }
            }
        };
        fsync_path(&p)?;
        entries.push(entry);
    }
    let manifest = Manifest {
        format: FORMAT.to_string(),
        files: entries,
        tensors: merged.tensors,
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| ck_err(tmp, format!("cannot serialise manifest: {e}")))?;
    write_file_synced(&tmp.join(MANIFEST), &manifest_json)?;
    fsync_path(tmp)?;

    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|e| {
            Error::io(
                format!("cannot rename {} to {}", from.display(), to.display()),
                e,
            )
        })
    };
    // A crash inside an earlier replace left only `step-<N>.old`: put it back first, so the
    // replace below starts from a good copy.
    recover_replaced(dest)?;
    if dest.exists() {
        let old = old_dir(dest);
        if old.exists() {
            remove_dir(&old)?;
        }
        // Until the rename below, `step-<N>.old` is the good copy; [`recover_replaced`] (run
        // by the next finalize, by [`gc`] and [`gc_keeping`], and by the coordinator before it
        // verifies a restore point) renames it back if a crash comes in between.
        rename(dest, &old)?;
        rename(tmp, dest)?;
        sync_parent(dest)?;
        remove_dir(&old)?;
    } else {
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p)
                .map_err(|e| Error::io(format!("cannot create {}", p.display()), e))?;
        }
        rename(tmp, dest)?;
    }
    sync_parent(dest)
}

fn old_dir(dest: &Path) -> PathBuf {
    let mut old = dest.as_os_str().to_owned();
    old.push(".old");
    PathBuf::from(old)
}

/// Undo a replace interrupted between its two renames: when `dir` is missing and `dir.old`
/// (the previous good copy) exists, rename it back. Returns whether it did.
pub fn recover_replaced(dir: &Path) -> Result<bool> {
    let old = old_dir(dir);
    if dir.exists() || !old.is_dir() {
        return Ok(false);
    }
    std::fs::rename(&old, dir).map_err(|e| {
        Error::io(
            format!("cannot restore {} to {}", old.display(), dir.display()),
            e,
        )
    })?;
    sync_parent(dir)?;
    Ok(true)
}

fn sync_parent(p: &Path) -> Result<()> {
    match p.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => fsync_path(parent),
        _ => fsync_path(Path::new(".")),
    }
}

fn remove_dir(p: &Path) -> Result<()> {
    std::fs::remove_dir_all(p).map_err(|e| Error::io(format!("cannot remove {}", p.display()), e))
}

/// An opened, verified checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub state: TrainerState,
}

fn plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\\')
}

impl Checkpoint {
    /// Open `dir`, checking every file's size and sha256 against the manifest (a mismatch is
    /// [`crate::Error::HashMismatch`] naming the file) and that the tensors match the config.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let mpath = dir.join(MANIFEST);
        let text = std::fs::read(&mpath).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ck_err(
                    dir,
                    "no manifest.json: not a committed checkpoint (a .tmp dir is an unfinished write); choose another checkpoint",
                )
            } else {
                Error::io(format!("cannot read {}", mpath.display()), e)
            }
        })?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| ck_err(&mpath, format!("invalid manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(ck_err(
                &mpath,
                format!(
                    "format '{}' is not supported; this build reads {FORMAT}",
                    manifest.format
                ),
            ));
        }
        for f in &manifest.files {
            if !plain_file_name(&f.path) || f.path == MANIFEST {
                return Err(ck_err(
                    &mpath,
                    format!("manifest lists an invalid file name '{}'", f.path),
                ));
            }
            let p = dir.join(&f.path);
            if !p.is_file() {
                return Err(ck_err(&p, "the file listed in the manifest is missing; restore it or load an older checkpoint"));
            }
            let (_, sha) = file_digest(&p)?;
            let size = std::fs::metadata(&p)
                .map_err(|e| Error::io(format!("cannot stat {}", p.display()), e))?
                .len();
            if sha != f.sha256 || size != f.size {
                return Err(Error::HashMismatch {
                    path: p,
                    expected: f.sha256.clone(),
                    actual: sha,
                });
            }
        }
        if !manifest.files.iter().any(|f| f.path == TRAINER_STATE) {
            return Err(ck_err(
                &mpath,
                "the manifest does not list trainer_state.json",
            ));
        }
        let spath = dir.join(TRAINER_STATE);
        let stext = std::fs::read(&spath)
            .map_err(|e| Error::io(format!("cannot read {}", spath.display()), e))?;
        let state: TrainerState = serde_json::from_slice(&stext)
            .map_err(|e| ck_err(&spath, format!("invalid trainer state: {e}")))?;
        state
            .model
            .validate()
            .map_err(|e| ck_err(&spath, format!("trainer state: {e}")))?;
        let files: BTreeSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        check_slices(&manifest.tensors, &files).map_err(|m| ck_err(dir, m))?;
        check_against_config(&manifest.tensors, &state.model).map_err(|m| ck_err(dir, m))?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            manifest,
            state,
        })
    }

    /// Names of the logical tensors of `kind`, sorted.
    pub fn names(&self, kind: ShardKind) -> Vec<String> {
        self.manifest
            .tensors
            .iter()
            .filter(|(_, e)| e.kind == kind)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether the checkpoint holds optimizer moments.
    pub fn has_optim(&self) -> bool {
        self.manifest
            .tensors
            .values()
            .any(|e| e.kind == ShardKind::Optim)
    }

    /// Whether the checkpoint holds a file `name` (e.g. `tokenizer.json`).
    pub fn has_file(&self, name: &str) -> bool {
        self.manifest.files.iter().any(|f| f.path == name)
    }

    /// Read the part of logical tensor `name` that TP rank `tp_rank` of `tp` holds, touching only
    /// the files whose slices overlap it. Replicated tensors come back whole for every rank.
    pub fn read(&self, name: &str, tp_rank: usize, tp: usize) -> Result<HostTensor> {
        let mut out = HostTensor::zeros(&self.slice_shape(name, tp_rank, tp)?);
        self.read_into(name, tp_rank, tp, &mut out.data)?;
        Ok(out)
    }

    /// The shape of what [`Checkpoint::read`] returns.
    pub fn slice_shape(&self, name: &str, tp_rank: usize, tp: usize) -> Result<Vec<usize>> {
        let (e, dim, range) = self.locate(name, tp_rank, tp)?;
        let mut shape = e.shape.clone();
        if let Some(r) = range {
            shape[dim] = r.len();
        }
        Ok(shape)
    }

    /// [`Checkpoint::read`] into `out` (row-major, exactly as long as the slice), e.g. the
    /// memory of the tensor it is for: every value written once, nothing allocated.
    pub fn read_into(&self, name: &str, tp_rank: usize, tp: usize, out: &mut [f32]) -> Result<()> {
        let (e, dim, range) = self.locate(name, tp_rank, tp)?;
        let mut out_shape = e.shape.clone();
        if let Some(r) = &range {
            out_shape[dim] = r.len();
        }
        let want: usize = out_shape.iter().product();
        if out.len() != want {
            return Err(Error::Layout(format!(
                "cannot read tensor {name} {out_shape:?} into a buffer of {} values; it needs {want}",
                out.len()
            )));
        }
        let outer: usize = e.shape[..dim.min(e.shape.len())].iter().product();
        let inner: usize = if e.shape.is_empty() {
            1
        } else {
            e.shape[dim + 1..].iter().product()
        };
        let out_len = out_shape.get(dim).copied().unwrap_or(1);
        for s in &e.slices {
            let (lo, hi) = match &range {
                None => (0, s.length),
                Some(r) => (r.start.max(s.offset), r.end.min(s.offset + s.length)),
            };
            if range.is_some() && lo >= hi {
                continue; // this file holds nothing this rank needs
            }
            let path = self.dir.join(&s.file);
            let map = map_file(&path)?;
            let st = safetensors::SafeTensors::deserialize(&map)
                .map_err(|err| ck_err(&path, format!("not a valid safetensors file: {err}")))?;
            let view = st.tensor(name).map_err(|err| {
                ck_err(
                    &path,
                    format!("tensor {name} listed in the manifest is not in this file: {err}"),
                )
            })?;
            let mut local_shape = e.shape.clone();
            if e.shard_dim.is_some() {
                local_shape[dim] = s.length;
            }
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != local_shape.as_slice() {
                return Err(ck_err(
                    &path,
                    format!(
                        "tensor {name} is {:?} {:?} in the file, the manifest says F32 {:?}",
                        view.dtype(),
                        view.shape(),
                        local_shape
                    ),
                ));
            }
            let bytes = view.data();
            if e.shard_dim.is_none() {
                copy_le_f32(out, bytes);
                continue;
            }
            let src_off = range.as_ref().map_or(0, |_| lo - s.offset);
            let dst_off = range.as_ref().map_or(0, |r| lo - r.start);
            let n = (hi - lo) * inner;
            for o in 0..outer {
                let src = (o * s.length + src_off) * inner;
                let dst = (o * out_len + dst_off) * inner;
                copy_le_f32(&mut out[dst..dst + n], &bytes[src * 4..(src + n) * 4]);
            }
        }
        Ok(())
    }

    /// Tensor `name`'s manifest entry, its shard dimension (0 when replicated) and the range of
    /// it that TP rank `tp_rank` of `tp` holds (`None`: the whole tensor).
    fn locate(
        &self,
        name: &str,
        tp_rank: usize,
        tp: usize,
    ) -> Result<(&TensorEntry, usize, Option<std::ops::Range<usize>>)> {
        check_tp(tp_rank, tp)?;
        let e =
            self.manifest.tensors.get(name).ok_or_else(|| {
                ck_err(&self.dir, format!("the checkpoint has no tensor '{name}'"))
            })?;
        let (dim, range) = match e.shard_dim {
            None => (0, None),
            Some(d) => {
                let len = e.shape[d];
                if len % tp != 0 {
                    return Err(Error::Layout(format!(
                        "tensor {name} has {len} rows/cols on dim {d}, not divisible by tp {tp}; choose a tp that divides it"
                    )));
                }
                (d, Some(shard_range(len, tp_rank, tp)))
            }
        };
        Ok((e, dim, range))
    }

    /// The whole logical tensor.
    pub fn read_full(&self, name: &str) -> Result<HostTensor> {
        self.read(name, 0, 1)
    }
}

fn copy_le_f32(dst: &mut [f32], src: &[u8]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// Point `<job_root>/latest` at `dir` (atomic write + rename). `dir` must be a checkpoint dir
/// directly under `job_root`; `latest` holds its name (`step-<N>`).
pub fn set_latest(job_root: &Path, dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(ck_err(
            dir,
            "cannot point latest at a directory that does not exist",
        ));
    }
    let canon = |p: &Path| {
        std::fs::canonicalize(p)
            .map_err(|e| Error::io(format!("cannot resolve {}", p.display()), e))
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ck_err(dir, "not a checkpoint directory name"))?;
    let parent = canon(dir)?.parent().map(Path::to_path_buf);
    if parent.as_deref() != Some(canon(job_root)?.as_path()) {
        return Err(ck_err(
            dir,
            format!(
                "latest can only name a checkpoint directly under {}",
                job_root.display()
            ),
        ));
    }
    let tmp = job_root.join(format!("{LATEST}.tmp"));
    if let Err(e) = write_file_synced(&tmp, format!("{name}\n").as_bytes()) {
        // A full disk: leave no partial `latest.tmp` behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let dest = job_root.join(LATEST);
    std::fs::rename(&tmp, &dest).map_err(|e| {
        Error::io(
            format!("cannot rename {} to {}", tmp.display(), dest.display()),
            e,
        )
    })?;
    fsync_path(job_root)
}

/// The directory `latest` points at, if any.
pub fn latest(job_root: &Path) -> Result<Option<PathBuf>> {
    let p = job_root.join(LATEST);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot read {}", p.display()), e)),
    };
    let name = text.trim();
    if !plain_file_name(name) {
        return Err(ck_err(
            &p,
            format!("latest holds '{name}', not a checkpoint name; fix or remove it"),
        ));
    }
    let dir = job_root.join(name);
    if !dir.is_dir() {
        return Err(ck_err(
            &p,
            format!("latest names {name}, which does not exist; point it at an existing checkpoint (or remove it)"),
        ));
    }
    Ok(Some(dir))
}

fn parse_step_name(name: &str) -> Option<(u64, &str)> {
    let rest = name.strip_prefix("step-")?;
    let (num, suffix) = match rest.find('.') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((num.parse().ok()?, suffix))
}

fn step_entries(job_root: &Path) -> Result<Vec<(u64, String, PathBuf)>> {
    let rd = match std::fs::read_dir(job_root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("cannot list {}", job_root.display()), e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("cannot list {}", job_root.display()), e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if !ent.path().is_dir() {
            continue;
        }
        if let Some((step, suffix)) = parse_step_name(&name) {
            out.push((step, suffix.to_string(), ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Committed (final-named) checkpoints, oldest first, as (step, dir).
pub fn list(job_root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    Ok(step_entries(job_root)?
        .into_iter()
        .filter(|(_, suffix, _)| suffix.is_empty())
        .map(|(step, _, p)| (step, p))
        .collect())
}

/// Remove all but the newest `keep` committed checkpoints (never the one `latest` names) and any
/// stale `.tmp` dirs older than the newest committed one (also `.old` leftovers of a replace,
/// once the replace is complete; an interrupted one is undone). Standalone mode only: under a
/// coordinator rank 0 collects with [`gc_keeping`], after the coordinator recorded the commit.
pub fn gc(job_root: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    recover_all_replaced(job_root)?;
    let latest = latest(job_root)?;
    let latest = latest.and_then(|p| std::fs::canonicalize(p).ok());
    let committed = list(job_root)?;
    let newest = committed.last().map(|(s, _)| *s);
    let mut removed = Vec::new();
    let cut = committed.len().saturating_sub(keep);
    for (_, dir) in &committed[..cut] {
        if latest.is_some() && std::fs::canonicalize(dir).ok() == latest {
            continue;
        }
        remove_dir(dir)?;
        removed.push(dir.clone());
    }
    if let Some(newest) = newest {
        for (step, suffix, dir) in step_entries(job_root)? {
            let stale = (suffix == ".tmp" && step < newest) || suffix == ".old";
            if stale {
                remove_dir(&dir)?;
                removed.push(dir);
            }
        }
    }
    Ok(removed)
}

fn recover_all_replaced(job_root: &Path) -> Result<()> {
    for (step, suffix, _) in step_entries(job_root)? {
        if suffix == ".old" {
            recover_replaced(&step_dir(job_root, step))?;
        }
    }
    Ok(())
}

/// Garbage collection under a coordinator, run by rank 0 right after it finalized checkpoint
/// `newest`: remove every committed `step-N` with `N < newest` that is not in `keep` (the steps
/// the coordinator has recorded and keeps — its restore point among them), `.tmp` dirs older
/// than `newest` (interrupted or aborted writes) and `.old` leftovers of a complete replace.
/// Anything not in `keep` was retired by a commit the coordinator already recorded, or was never
/// recorded at all. Never touches `step-N.unusable`, or anything at or after `newest`.
pub fn gc_keeping(job_root: &Path, keep: &BTreeSet<u64>, newest: u64) -> Result<Vec<PathBuf>> {
    recover_all_replaced(job_root)?;
    let mut removed = Vec::new();
    for (step, suffix, dir) in step_entries(job_root)? {
        let stale = match suffix.as_str() {
            "" => step < newest && !keep.contains(&step),
            ".tmp" => step < newest,
            ".old" => true,
            _ => false,
        };
        if stale {
            remove_dir(&dir)?;
            removed.push(dir);
        }
    }
    Ok(removed)
}
