//! Everything one rank needs to train: model, optimizer, schedule, data, and the DP collective.
//!
//! The coordinator's worker agent (and the standalone `trellis-worker train`) drive a
//! [`Trainer`] step by step: [`Trainer::step`], [`Trainer::evaluate`], checkpoint writing,
//! [`Trainer::restore`] and [`Trainer::grow`]. A `Trainer` is `Send` (move it to the dedicated
//! training thread that owns all tensors) but not `Sync`.
//!
//! Determinism: weights come from seeded per-tensor streams ([`crate::init`]), the data order
//! from the global cursor (docs/design.md §Data cursor), and nothing else is random, so the same
//! seed and data give the same losses and a resume from a checkpoint continues bit for bit.
use crate::grow::GrowthTimings;
use crate::host::{host_f32, host_f32_mut, to_host};
use crate::model::{Llama, Precision, Shard};
use crate::optim::{AdamW, AdamWConfig, Moments};
use crate::parallel::{self, Groups};
pub use crate::report::StepReport;
use crate::schedule::lr_at;
use crate::{Error, Result};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use trellis_comm::Collective;
use trellis_core::checkpoint::{
    self, Checkpoint, GrowthRecord, HostTensor, Layout, MaskState, ScheduleState, ShardKind,
    ShardReport, TensorView, TrainerState,
};
use trellis_core::config::ModelConfig;
use trellis_core::growth::{GrowthSpec, OptimizerPolicy};
use trellis_core::job::{GrowthStage, JobSpec};
use trellis_data::{PreparedData, Sampler};

/// Elements per gradient bucket for the DP all-reduce (64 MiB of f32).
pub const BUCKET_ELEMENTS: usize = 16 << 20;

/// The LR settings in force after a `reset` growth (the paper: 3e-4 → 3e-5, re-warmup).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostGrowthSchedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
}

impl From<&GrowthStage> for PostGrowthSchedule {
    fn from(s: &GrowthStage) -> Self {
        PostGrowthSchedule {
            lr: s.lr,
            min_lr: s.min_lr,
            warmup_steps: s.warmup_steps,
        }
    }
}

/// Parse `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let dev = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => {
                return Err(Error::Invalid(format!(
                    "unknown device '{s}'; use cpu, cuda or cuda:N"
                )))
            }
        },
    };
    if let Device::Cuda(n) = dev {
        if !tch::Cuda::is_available() || n >= tch::Cuda::device_count() as usize {
            return Err(Error::Invalid(format!(
                "device {s} requested but libtorch sees {} CUDA device(s); use device = \"cpu\" or run on a GPU machine with the CUDA build of libtorch",
                if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 }
            )));
        }
    }
    Ok(dev)
}

/// Explain how two configs differ, field by field.
/// Load a checkpoint's model (and, if present, optimizer) state, verifying every shape.
/// Returns (model, optimizer moments or `None` if the checkpoint has none).
pub fn load_model(
    ck: &Checkpoint,
    device: Device,
) -> Result<(Llama, Option<HashMap<String, Moments>>)> {
    load_model_shard(ck, device, Shard::FULL)
}

/// Tensor `name`'s slice for `shard`, read from `ck` straight into a new (uninitialised) fp32
/// host tensor ([`Checkpoint::read_into`]: no intermediate host copy), then moved to `device`.
fn read_slice(
    ck: &Checkpoint,
    name: &str,
    shard: Shard,
    device: Device,
) -> trellis_core::Result<Tensor> {
    let shape: Vec<i64> = ck
        .slice_shape(name, shard.rank, shard.tp)?
        .iter()
        .map(|&d| d as i64)
        .collect();
    let mut t = Tensor::empty(shape.as_slice(), (Kind::Float, Device::Cpu));
    ck.read_into(name, shard.rank, shard.tp, host_f32_mut(&mut t))?;
    Ok(t.to_device(device))
}

fn dims_of(t: &Tensor) -> Vec<usize> {
    t.size().iter().map(|&d| d as usize).collect()
}

/// [`load_model`] for TP rank `shard.rank` of `shard.tp`: reads only that rank's slices
/// ([`Checkpoint::read_into`]), whatever layout the checkpoint was written with.
pub fn load_model_shard(
    ck: &Checkpoint,
    device: Device,
    shard: Shard,
) -> Result<(Llama, Option<HashMap<String, Moments>>)> {
    let cfg = &ck.state.model;
    cfg.validate()?;
    parallel::check_tp(cfg, shard.tp)?;
    let dir = ck.dir.display().to_string();
    let mut tensors = HashMap::new();
    for (name, shape) in cfg.tensor_shapes() {
        let shape = shard.local_shape(&name, &shape);
        let t = read_slice(ck, &name, shard, device).map_err(|e| match e {
            trellis_core::Error::HashMismatch { .. } => Error::Core(e),
            other => Error::Invalid(format!(
                "checkpoint {dir}: cannot read tensor {name}: {other}; the checkpoint does not fit its own config"
            )),
        })?;
        if dims_of(&t) != shape {
            return Err(Error::Invalid(format!(
                "checkpoint {dir}: tensor {name} has shape {:?} but its config needs {shape:?}",
                dims_of(&t)
            )));
        }
        tensors.insert(name, t);
    }
    let optim_names = ck.names(ShardKind::Optim);
    let moments = if optim_names.is_empty() {
        None
    } else {
        let mut m = HashMap::new();
        for (name, shape) in cfg.tensor_shapes() {
            let shape = shard.local_shape(&name, &shape);
            let read = |suffix: &str| -> Result<Tensor> {
                let n = format!("{name}.{suffix}");
                let t = read_slice(ck, &n, shard, device).map_err(|e| {
                    Error::Invalid(format!("checkpoint {dir}: optimizer state {n}: {e}"))
                })?;
                if dims_of(&t) != shape {
                    return Err(Error::Invalid(format!(
                        "checkpoint {dir}: {n} has shape {:?}, expected {shape:?}",
                        dims_of(&t)
                    )));
                }
                Ok(t)
            };
            let exp_avg = read("exp_avg")?;
            let exp_avg_sq = read("exp_avg_sq")?;
            m.insert(
                name,
                Moments {
                    exp_avg,
                    exp_avg_sq,
                },
            );
        }
        Some(m)
    };
    let model = Llama::from_tensors_shard(cfg, device, shard, &mut tensors);
    Ok((model, moments))
}

/// Plan every growth stage of `spec` from `cfg` in order, so a stage that would be refused
/// (factor < 2, a bad stacking list, …) is refused before any training, not at its step.
pub fn check_growth_stages(spec: &JobSpec, cfg: &ModelConfig) -> Result<()> {
    let mut cfg = cfg.clone();
    for (i, stage) in spec.growth.iter().enumerate() {
        let gs = stage.spec()?;
        let plan = trellis_core::growth::plan(&cfg, &gs).map_err(|e| {
            Error::Invalid(format!(
                "growth[{i}] (at step {}): {e}",
                spec.growth_step(i)
            ))
        })?;
        cfg = plan.new;
    }
    Ok(())
}

/// One tensor of a snapshot: copied to the host, or shared with the trainer (a growth's
/// snapshot, [`Trainer::snapshot_growth_checkpoint_shards`]) and copied when written.
enum Snap {
    Host(HostTensor),
    Shared(Tensor),
}

impl Snap {
    /// What gets written: the host copy, or a shared tensor itself when it already is
    /// contiguous fp32 in host memory (no copy; any other is copied to the host here).
    fn into_written(self) -> Written {
        match self {
            Snap::Host(h) => Written::Host(h),
            Snap::Shared(t)
                if t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() =>
            {
                let shape = t.size().iter().map(|&d| d as usize).collect();
                Written::InPlace(t, shape)
            }
            Snap::Shared(t) => Written::Host(to_host(&t)),
        }
    }
}

enum Written {
    Host(HostTensor),
    /// A shared tensor (contiguous fp32 on the CPU) and its shape.
    InPlace(Tensor, Vec<usize>),
}

impl Written {
    fn view(&self) -> TensorView<'_> {
        match self {
            Written::Host(h) => h.view(),
            // Nothing writes to it meanwhile: a shared snapshot is a growth checkpoint's, whose
            // tensors the rank no longer changes (the growth replaced them, or the rank takes
            // no step until this write is done).
            Written::InPlace(t, shape) => TensorView {
                shape,
                data: host_f32(t),
            },
        }
    }
}

/// A rank's checkpoint shards, ready to be written ([`Trainer::snapshot_checkpoint_shards`]).
pub struct ShardWrite {
    tmp: PathBuf,
    tp_rank: usize,
    tp: usize,
    model: Vec<(String, Snap)>,
    optim: Vec<(String, Snap)>,
}

impl ShardWrite {
    /// Write and fsync the shard files; their report for the commit.
    pub fn write(self) -> Result<ShardReport> {
        let prepare = |v: Vec<(String, Snap)>| -> Vec<(String, Written)> {
            v.into_iter().map(|(n, s)| (n, s.into_written())).collect()
        };
        let (model, optim) = (prepare(self.model), prepare(self.optim));
        fn views(v: &[(String, Written)]) -> Vec<(&str, TensorView<'_>)> {
            v.iter().map(|(n, w)| (n.as_str(), w.view())).collect()
        }
        Ok(checkpoint::write_shard_views(
            &self.tmp,
            self.tp_rank,
            self.tp,
            &views(&model),
            &views(&optim),
        )?)
    }
}

/// Everything for one rank.
pub struct Trainer {
    spec: JobSpec,
    out_dir: PathBuf,
    dp_rank: usize,
    dp: usize,
    comm: Box<dyn Collective>,
    /// Tensor parallelism: this rank's index in its TP group, the group's size and collective
    /// (`Solo` at TP = 1). The model holds slice `tp_rank` of `tp`.
    tp_rank: usize,
    tp: usize,
    tp_comm: Box<dyn Collective>,
    device: Device,
    data: PreparedData,
    sampler: Sampler,
    model: Llama,
    optim: AdamW,
    schedule: ScheduleState,
    step: u64,
    tokens: u64,
    cursor: u64,
    generation: u64,
    next_growth_stage: usize,
    growth_history: Vec<GrowthRecord>,
    mask: Option<MaskState>,
    eval_windows: Vec<u64>,
    /// Data-cursor windows `[from, to)` to skip (set by the coordinator after a NaN batch):
    /// when the cursor reaches `from` it jumps to `to`.
    skip: Vec<(u64, u64)>,
}

fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Trainer>();
}

impl Trainer {
    /// A fresh trainer for rank `dp_rank` of `dp`: prepares the data (tokenizer and token files,
    /// cached under `spec.data.cache_dir` or `<out_dir>/data`), builds the model from the job
    /// seed (identical on every rank) and a fresh optimizer.
    pub fn new(
        spec: &JobSpec,
        out_dir: &Path,
        dp_rank: usize,
        dp: usize,
        comm: Box<dyn Collective>,
    ) -> Result<Trainer> {
        Trainer::with_groups(spec, out_dir, dp_rank, dp, Groups::dp_only(comm))
    }

    /// [`Trainer::new`] for rank `(dp_rank, groups.tp.rank())` of a DP × TP world: `groups.dp`
    /// joins the ranks holding the same slice (world `dp`), `groups.tp` the slices of this
    /// replica (its world is the TP degree). Every rank of a TP group reads the same samples.
    pub fn with_groups(
        spec: &JobSpec,
        out_dir: &Path,
        dp_rank: usize,
        dp: usize,
        groups: Groups,
    ) -> Result<Trainer> {
        Trainer::build(spec, out_dir, dp_rank, dp, groups, true)
    }

    /// [`Trainer::with_groups`] restored from the committed checkpoint `dir` ([`Trainer::restore`]),
    /// without drawing the fresh weights the restore would replace.
    pub fn restored(
        spec: &JobSpec,
        out_dir: &Path,
        dp_rank: usize,
        dp: usize,
        groups: Groups,
        dir: &Path,
    ) -> Result<Trainer> {
        let mut t = Trainer::build(spec, out_dir, dp_rank, dp, groups, false)?;
        t.restore(dir)?;
        Ok(t)
    }

    /// [`Trainer::with_groups`] with its weights allocated but not drawn and no optimizer
    /// moments: the target of a peers reshard ([`parallel::reshard::from_peers`]), which
    /// replaces the whole state (drawing a fresh init first would cost seconds at 100M+
    /// parameters). Not trainable until filled.
    pub fn for_reshard(
        spec: &JobSpec,
        out_dir: &Path,
        dp_rank: usize,
        dp: usize,
        groups: Groups,
    ) -> Result<Trainer> {
        Trainer::build(spec, out_dir, dp_rank, dp, groups, false)
    }

    fn build(
        spec: &JobSpec,
        out_dir: &Path,
        dp_rank: usize,
        dp: usize,
        groups: Groups,
        init: bool,
    ) -> Result<Trainer> {
        let Groups {
            dp: comm,
            tp: tp_comm,
        } = groups;
        let (tp_rank, tp) = (tp_comm.rank(), tp_comm.world());
        if dp == 0 || dp_rank >= dp || spec.train.global_batch / dp * dp != spec.train.global_batch
        {
            return Err(Error::Invalid(format!(
                "rank {dp_rank} of {dp}: global_batch {} must be a multiple of dp and rank < dp",
                spec.train.global_batch
            )));
        }
        if comm.world() != dp {
            return Err(Error::Invalid(format!(
                "the collective has world size {} but dp = {dp}",
                comm.world()
            )));
        }
        if let Some(t) = spec.train.threads {
            tch::set_num_threads(t as i32);
        }
        let device = parse_device(&spec.train.device)?;
        let cache = spec
            .data
            .cache_dir
            .clone()
            .unwrap_or_else(|| out_dir.join("data"));
        let data = trellis_data::prepare(&spec.data, &cache)?;
        let tok_vocab = data.tokenizer.vocab_size();
        let cfg = spec.model_config(tok_vocab)?;
        if cfg.vocab_size != tok_vocab {
            return Err(Error::Invalid(format!(
                "the tokenizer has {tok_vocab} tokens but model.vocab_size is {}; remove model.vocab_size or use a matching tokenizer",
                cfg.vocab_size
            )));
        }
        check_growth_stages(spec, &cfg)?;
        parallel::check_tp(&cfg, tp)?;
        let seq = spec.data.seq_len;
        let nwin = data.train.num_windows(seq);
        if nwin < spec.train.global_batch as u64 {
            return Err(Error::Invalid(format!(
                "the training split has only {nwin} windows of {seq} tokens, fewer than one global batch ({}); use more data or a smaller batch",
                spec.train.global_batch
            )));
        }
        let vwin = data.valid.num_windows(seq);
        if vwin == 0 {
            return Err(Error::Invalid(format!(
                "the validation split {} is shorter than one window of {seq} tokens",
                spec.data.valid.display()
            )));
        }
        if spec.train.activation_checkpointing && tp > 1 {
            return Err(Error::Invalid(format!(
                "[train] activation_checkpointing is implemented for tp = 1 only but this rank has tp = {tp}; turn it off or use data parallelism"
            )));
        }
        let (precision, why) = Precision::resolve(spec.train.precision, device);
        if dp_rank == 0 && tp_rank == 0 {
            tracing::info!(
                precision = precision.name(),
                reason = why,
                "training precision"
            );
        }
        let sampler = data.sampler(seq, spec.job.seed)?;
        let shard = Shard { rank: tp_rank, tp };
        let mut model = if init {
            Llama::init_shard(&cfg, device, spec.job.seed, shard)
        } else {
            Llama::placeholder_shard(&cfg, device, shard)
        };
        model.precision = precision;
        let optim = if init {
            AdamW::new(
                AdamWConfig::from_train(&spec.train),
                model.named_parameters(),
            )
        } else {
            // A restore or reshard brings the moments.
            AdamW::fresh(AdamWConfig::from_train(&spec.train))
        };
        let schedule = ScheduleState {
            start_step: 0,
            end_step: spec.train.max_steps,
            peak_lr: spec.train.lr,
            min_lr: spec.train.min_lr,
            warmup_steps: spec.train.warmup_steps,
        };
        Ok(Trainer {
            eval_windows: trellis_data::validation_windows(
                &data.valid,
                seq,
                match spec.train.eval_sequences {
                    0 => usize::MAX,
                    n => n,
                },
            ),
            spec: spec.clone(),
            out_dir: out_dir.to_path_buf(),
            dp_rank,
            dp,
            comm,
            tp_rank,
            tp,
            tp_comm,
            device,
            data,
            sampler,
            model,
            optim,
            schedule,
            step: 0,
            tokens: 0,
            cursor: 0,
            generation: 0,
            next_growth_stage: 0,
            growth_history: Vec::new(),
            mask: None,
            skip: Vec::new(),
        })
    }

    /// Set the data windows to skip (see the field).
    pub fn set_skip_windows(&mut self, skip: Vec<(u64, u64)>) {
        self.skip = skip;
    }
    /// The training source (index into `[[data.sources]]`; 0 without a mixture) of each of the
    /// global samples `samples`: the source holding the window the sampler gives each.
    pub fn sample_sources(&self, samples: Range<u64>) -> Vec<usize> {
        let seq = self.spec.data.seq_len;
        samples
            .map(|i| {
                let w = self.sampler.window(i);
                self.data.train.locate(w, seq).map_or(0, |(s, _)| s)
            })
            .collect()
    }

    /// The global sample index of the next training sample.
    pub fn data_cursor(&self) -> u64 {
        self.cursor
    }
    pub fn dp_rank(&self) -> usize {
        self.dp_rank
    }
    pub fn dp(&self) -> usize {
        self.dp
    }
    pub fn tp_rank(&self) -> usize {
        self.tp_rank
    }
    pub fn tp(&self) -> usize {
        self.tp
    }
    /// The tensor-parallel group.
    pub fn tp_comm_mut(&mut self) -> &mut dyn Collective {
        self.tp_comm.as_mut()
    }
    /// The data-parallel group (also used by the agent to agree on commands).
    pub fn comm_mut(&mut self) -> &mut dyn Collective {
        self.comm.as_mut()
    }
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }
    pub fn model(&self) -> &Llama {
        &self.model
    }
    pub fn optimizer(&self) -> &AdamW {
        &self.optim
    }
    pub fn schedule(&self) -> &ScheduleState {
        &self.schedule
    }
    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
    pub fn step_count(&self) -> u64 {
        self.step
    }
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn next_growth_stage(&self) -> usize {
        self.next_growth_stage
    }
    pub fn growth_history(&self) -> &[GrowthRecord] {
        &self.growth_history
    }
    pub fn tokenizer_path(&self) -> &Path {
        &self.data.tokenizer_path
    }
    pub fn device(&self) -> Device {
        self.device
    }
    /// The arithmetic this trainer runs (`[train] precision` resolved for the device).
    pub fn precision(&self) -> Precision {
        self.model.precision
    }

    /// The growth stage of the spec that is due now (its step has been reached), if any.
    pub fn pending_growth_stage(&self) -> Option<usize> {
        let i = self.next_growth_stage;
        (i < self.spec.growth.len() && self.spec.growth_step(i) <= self.step).then_some(i)
    }

    /// `trainer_state.json` of the current state.
    pub fn state(&self) -> TrainerState {
        TrainerState {
            job: self.spec.job.name.clone(),
            step: self.step,
            tokens: self.tokens,
            generation: self.generation,
            model: self.model.cfg.clone(),
            layout: Layout {
                dp: self.dp,
                tp: self.tp,
            },
            data_cursor: self.cursor,
            seed: self.spec.job.seed,
            schedule: self.schedule.clone(),
            optimizer_step: self.optim.step,
            next_growth_stage: self.next_growth_stage,
            growth_history: self.growth_history.clone(),
            mask: self.mask.clone(),
        }
    }

    /// Mask values for the optimizer step with index `step` (m = (k+1)/ramp, capped at 1).
    fn apply_mask(&mut self, step: u64, for_training: bool) {
        let mut done = false;
        match &self.mask {
            None => {
                for m in self.model.masks.iter_mut() {
                    *m = None;
                }
            }
            Some(ms) => {
                let k = step.saturating_sub(ms.start_step) + u64::from(for_training);
                let v = (k as f64 / ms.ramp_steps.max(1) as f64).min(1.0);
                for &l in &ms.layers {
                    if l < self.model.masks.len() {
                        self.model.masks[l] = if v >= 1.0 { None } else { Some(v) };
                    }
                }
                done = v >= 1.0;
            }
        }
        if done && for_training {
            self.mask = None;
        }
    }

    /// Build the `[n, seq]` inputs and targets of windows `ids` of `file`.
    fn batch(&self, file: &trellis_data::Dataset, ids: &[u64]) -> (Tensor, Tensor) {
        let seq = self.spec.data.seq_len;
        let mut flat = Vec::with_capacity(ids.len() * (seq + 1));
        for &w in ids {
            let win = file.window(w, seq);
            debug_assert_eq!(win.len(), seq + 1);
            flat.extend_from_slice(&win);
        }
        let t = Tensor::from_slice(&flat)
            .view([ids.len() as i64, seq as i64 + 1])
            .to_device(self.device);
        (t.narrow(1, 0, seq as i64), t.narrow(1, 1, seq as i64))
    }

    /// Where the data cursor lands from `cursor` after the skip windows (chained windows
    /// followed): the one place the skip list is read.
    fn skip_from(&self, mut cursor: u64) -> u64 {
        while let Some(&(_, to)) = self.skip.iter().find(|(from, _)| *from == cursor) {
            cursor = to;
        }
        cursor
    }

    fn micro_batch(&self) -> usize {
        let per_rank = self.spec.train.global_batch / self.dp;
        self.spec
            .train
            .micro_batch
            .unwrap_or(per_rank)
            .min(per_rank)
    }

    /// One optimizer step over this rank's share of the global batch.
    pub fn step(&mut self) -> Result<StepReport> {
        let t_start = Instant::now();
        let s = self.step;
        let lr = lr_at(&self.schedule, s);
        self.apply_mask(s, true);
        let gb = self.spec.train.global_batch;
        let seq = self.spec.data.seq_len;
        let to = self.skip_from(self.cursor);
        if to != self.cursor {
            tracing::warn!(
                from = self.cursor,
                to,
                "skipping data window (coordinator's order)"
            );
            self.cursor = to;
        }
        let step_samples = self.cursor..self.cursor + gb as u64;
        let samples = trellis_data::rank_samples(self.cursor, gb, self.dp_rank, self.dp);

        let (loss, data_seconds, mut compute_seconds, comm_seconds) =
            self.accumulate_gradients(&samples)?;

        let t_opt = Instant::now();
        let grad_norm = if self.tp > 1 {
            let norm = parallel::grad_norm(self.model.named_parameters(), self.tp_comm.as_mut())?;
            self.optim
                .step_with_norm(self.model.named_parameters(), lr, norm)
        } else {
            self.optim.step(self.model.named_parameters(), lr)
        };
        self.model.zero_grad();
        compute_seconds += t_opt.elapsed().as_secs_f64();

        self.step += 1;
        self.cursor += gb as u64;
        let step_tokens = (gb * seq) as u64;
        self.tokens += step_tokens;
        let step_seconds = t_start.elapsed().as_secs_f64();
        let report = StepReport {
            step: self.step,
            tokens: self.tokens,
            loss,
            lr,
            grad_norm,
            step_seconds,
            compute_seconds,
            comm_seconds,
            data_seconds,
            samples,
            step_samples,
            tokens_per_second: step_tokens as f64 / step_seconds.max(1e-9),
        };
        if !loss.is_finite() {
            // The state has advanced past the batch: the caller decides (standalone: stop with
            // this error; managed: report it, the coordinator rolls back and skips the batch).
            return Err(Error::NonFiniteLoss(Box::new(report)));
        }
        Ok(report)
    }

    /// The gradients the next [`Trainer::step`] would apply (after the DP average; this rank's
    /// slices at TP > 1) and its loss, without changing any state: for parity tests and
    /// debugging. The model's gradient buffers are zero again afterwards.
    pub fn next_gradients(&mut self) -> Result<(f64, Vec<(String, Tensor)>)> {
        let saved_mask = self.mask.clone();
        self.apply_mask(self.step, true);
        let cursor = self.skip_from(self.cursor);
        let gb = self.spec.train.global_batch;
        let samples = trellis_data::rank_samples(cursor, gb, self.dp_rank, self.dp);
        let result = self.accumulate_gradients(&samples).map(|(loss, ..)| {
            let grads = self
                .model
                .named_parameters()
                .iter()
                .map(|(n, p)| {
                    let g = p.grad();
                    let g = if g.defined() {
                        g.copy()
                    } else {
                        p.zeros_like()
                    };
                    (n.clone(), g)
                })
                .collect();
            (loss, grads)
        });
        self.model.zero_grad();
        self.mask = saved_mask;
        self.apply_mask(self.step, false);
        result
    }

    /// Forward/backward of this rank's `samples` with gradient accumulation over micro-batches,
    /// then the DP average. Returns (mean loss of the global batch, data, compute and comm
    /// seconds).
    fn accumulate_gradients(&mut self, samples: &Range<u64>) -> Result<(f64, f64, f64, f64)> {
        // Data: global sample ids → window ids → micro-batches.
        let t_data = Instant::now();
        let windows: Vec<u64> = samples.clone().map(|i| self.sampler.window(i)).collect();
        let mb = self.micro_batch();
        let batches: Vec<(Tensor, Tensor)> = windows
            .chunks(mb)
            .map(|c| self.batch(&self.data.train, c))
            .collect();
        let data_seconds = t_data.elapsed().as_secs_f64();

        // Forward/backward with gradient accumulation: each micro-batch's mean loss is scaled
        // by its share, so the gradient is that of the mean over the rank's batch. bf16: the
        // working copies are made once here and their gradients collected (in fp32) after every
        // micro-batch.
        let t_compute = Instant::now();
        self.model.refresh_working_copies();
        let per_rank = windows.len() as f64;
        let checkpointing = self.spec.train.activation_checkpointing;
        let mut loss_sum = 0.0;
        for (inp, tgt) in &batches {
            let share = inp.size()[0] as f64 / per_rank;
            let l = if self.tp > 1 {
                parallel::tp::forward_backward(&self.model, self.tp_comm.as_mut(), inp, tgt, share)?
            } else {
                self.model.forward_backward(inp, tgt, share, checkpointing)
            };
            self.model.collect_working_grads();
            loss_sum += l * share;
        }
        let compute_seconds = t_compute.elapsed().as_secs_f64();

        // DP: average gradients (and the loss) over the group.
        let t_comm = Instant::now();
        let loss = if self.dp > 1 {
            self.all_reduce_grads()?;
            let mut l = [loss_sum as f32];
            self.comm.all_reduce_sum(&mut l)?;
            l[0] as f64 / self.dp as f64
        } else {
            loss_sum
        };
        let comm_seconds = t_comm.elapsed().as_secs_f64();
        Ok((loss, data_seconds, compute_seconds, comm_seconds))
    }

    /// Sum the gradients over the DP group in flat fp32 buckets on the training device and
    /// divide by `dp` ([`parallel::all_reduce_sum_`]: NCCL in device memory on CUDA ranks, the
    /// host ring in the bucket's own memory on CPU ranks).
    fn all_reduce_grads(&mut self) -> Result<()> {
        let params = self.model.named_parameters();
        let mut grads: Vec<Tensor> = Vec::with_capacity(params.len());
        for (_, p) in params {
            let g = p.grad();
            grads.push(if g.defined() { g } else { p.zeros_like() });
        }
        let scale = 1.0 / self.dp as f64;
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut total = 0usize;
            while end < grads.len() && (total == 0 || total + grads[end].numel() <= BUCKET_ELEMENTS)
            {
                total += grads[end].numel();
                end += 1;
            }
            tch::no_grad(|| -> Result<()> {
                let flat: Vec<Tensor> = grads[start..end]
                    .iter()
                    .map(|g| g.detach().to_kind(Kind::Float).reshape([-1]))
                    .collect();
                // A fresh contiguous buffer on the device (`cat` always allocates).
                let mut bucket = Tensor::cat(&flat, 0);
                parallel::all_reduce_sum_(self.comm.as_mut(), &mut bucket)?;
                bucket *= scale;
                let mut off = 0i64;
                for g in &mut grads[start..end] {
                    let n = g.numel() as i64;
                    g.copy_(&bucket.narrow(0, off, n).view(g.size().as_slice()));
                    off += n;
                }
                Ok(())
            })?;
            start = end;
        }
        Ok(())
    }

    /// Mean validation loss over the fixed validation windows (every rank computes the same).
    pub fn evaluate(&mut self) -> Result<f64> {
        self.apply_mask(self.step, false);
        self.model.refresh_working_copies();
        let mb = self.micro_batch().max(1);
        let windows = self.eval_windows.clone();
        let mut total = 0.0;
        for chunk in windows.chunks(mb) {
            let (inp, tgt) = self.batch(&self.data.valid, chunk);
            let l = if self.tp > 1 {
                parallel::tp::loss(&self.model, self.tp_comm.as_mut(), &inp, &tgt)?
            } else {
                tch::no_grad(|| self.model.loss(&inp, &tgt).double_value(&[]))
            };
            total += l * chunk.len() as f64;
        }
        Ok(total / windows.len() as f64)
    }

    /// Write this rank's shards of the current state into `checkpoint::tmp_dir(job_root, step)`
    /// (only DP rank 0 writes; other ranks return `None`). Also copies `tokenizer.json` there
    /// (the manifest lists it, so its hash is verified on load).
    ///
    /// With TP > 1 every rank of DP rank 0's TP group writes its slice
    /// (`model-tp<r>-of-<n>.safetensors`, replicated tensors by TP rank 0 only); they call this
    /// together (TP rank 0 prepares the temp dir, then a TP barrier), and the caller merges the
    /// reports of all of them.
    pub fn write_checkpoint_shards(&mut self, job_root: &Path) -> Result<Option<ShardReport>> {
        match self.snapshot_checkpoint_shards(job_root)? {
            Some(w) => Ok(Some(w.write()?)),
            None => Ok(None),
        }
    }

    /// The first half of [`Trainer::write_checkpoint_shards`]: prepare the temp dir (TP rank 0,
    /// then a TP barrier) and copy this rank's tensors to the host. The returned
    /// [`ShardWrite`] writes and hashes the files and can run on another thread while training
    /// goes on: it owns its copy of the state.
    pub fn snapshot_checkpoint_shards(&mut self, job_root: &Path) -> Result<Option<ShardWrite>> {
        self.snapshot(job_root, false)
    }

    /// [`Trainer::snapshot_checkpoint_shards`] without the host copy: the snapshot shares the
    /// model's and the optimizer's tensors and copies them when written. Only for a growth's
    /// checkpoint: the caller takes no step (nothing changes them in place) before
    /// [`Trainer::grow`] has replaced every one of them with new tensors; the old ones then
    /// live on in the snapshot until it is written.
    pub fn snapshot_growth_checkpoint_shards(
        &mut self,
        job_root: &Path,
    ) -> Result<Option<ShardWrite>> {
        self.snapshot(job_root, true)
    }

    fn snapshot(&mut self, job_root: &Path, shared: bool) -> Result<Option<ShardWrite>> {
        if self.dp_rank != 0 {
            return Ok(None);
        }
        let tmp = checkpoint::tmp_dir(job_root, self.step);
        if self.tp_rank == 0 {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)
                    .map_err(|e| Error::io(format!("cannot remove stale {}", tmp.display()), e))?;
            }
            std::fs::create_dir_all(&tmp)
                .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
            // `finalize` lists (and hashes) every file in the temp dir, this one included.
            let tok = tmp.join(checkpoint::TOKENIZER);
            std::fs::copy(&self.data.tokenizer_path, &tok).map_err(|e| {
                Error::io(format!("cannot copy the tokenizer to {}", tok.display()), e)
            })?;
            // The Hugging Face files beside the job's `data.tokenizer` (an imported
            // checkpoint's), for the export.
            if let Some(dir) = self.spec.data.tokenizer.as_deref().and_then(Path::parent) {
                for name in checkpoint::HF_SIDECARS {
                    let (from, to) = (dir.join(name), tmp.join(name));
                    if from.is_file() {
                        std::fs::copy(&from, &to).map_err(|e| {
                            Error::io(
                                format!("cannot copy {} to {}", from.display(), to.display()),
                                e,
                            )
                        })?;
                    }
                }
            }
        }
        self.tp_comm.barrier()?;
        let snap = |t: &Tensor| {
            if shared {
                Snap::Shared(t.detach())
            } else {
                Snap::Host(to_host(t))
            }
        };
        let mut model = Vec::new();
        let mut optim = Vec::new();
        for (name, p) in self.model.named_parameters() {
            model.push((name.clone(), snap(p)));
            let m = self.optim.moments_of(name, p);
            optim.push((format!("{name}.exp_avg"), snap(&m.exp_avg)));
            optim.push((format!("{name}.exp_avg_sq"), snap(&m.exp_avg_sq)));
        }
        Ok(Some(ShardWrite {
            tmp,
            tp_rank: self.tp_rank,
            tp: self.tp,
            model,
            optim,
        }))
    }

    /// Merge the shard reports, write the manifest and `trainer_state.json`, fsync and rename to
    /// `step-<N>`. Does not move `latest` (the caller does once the checkpoint is committed).
    pub fn finalize_checkpoint(&self, job_root: &Path, reports: &[ShardReport]) -> Result<PathBuf> {
        let tmp = checkpoint::tmp_dir(job_root, self.step);
        Ok(checkpoint::finalize(&tmp, &self.state(), reports)?)
    }

    /// Write a complete checkpoint, point `latest` at it and GC old ones (standalone mode, and
    /// tests of parallel layouts: every rank calls it; the TP group of DP rank 0 writes, its
    /// TP rank 0 gathers the shard reports over the TP group and finalises, and a DP barrier
    /// makes the checkpoint visible to every rank before it returns). Returns its directory.
    pub fn save_checkpoint(&mut self, job_root: &Path, keep: usize) -> Result<PathBuf> {
        let mut dir = checkpoint::step_dir(job_root, self.step);
        if self.dp_rank == 0 {
            let report = self.write_checkpoint_shards(job_root)?;
            let reports: Vec<ShardReport> = if self.tp > 1 {
                parallel::all_gather_json(self.tp_comm.as_mut(), &report)?
                    .into_iter()
                    .flatten()
                    .collect()
            } else {
                report.into_iter().collect()
            };
            if self.tp_rank == 0 {
                dir = self.finalize_checkpoint(job_root, &reports)?;
                checkpoint::set_latest(job_root, &dir)?;
                checkpoint::gc(job_root, keep.max(1))?;
            }
            self.tp_comm.barrier()?;
        }
        if self.dp > 1 {
            self.comm.barrier()?;
        }
        Ok(dir)
    }

    /// Load the checkpoint in `ckpt_dir` (every file's hash verified). Refuses, with a one-line
    /// error and the trainer unchanged, a checkpoint of another job, whose config does not fit
    /// this job's model (other than depth, which growth changes), whose vocabulary differs from
    /// the tokenizer, or whose tensors do not have their config's shapes.
    pub fn restore(&mut self, ckpt_dir: &Path) -> Result<()> {
        let init = self.spec.checkpoint.init_from.as_deref() == Some(ckpt_dir);
        self.restore_checked(ckpt_dir, init)
    }

    /// [`Trainer::restore`]; `init`: `ckpt_dir` is the spec's `checkpoint.init_from`, which may
    /// belong to another job (its growth stages are not this job's: counting restarts at 0).
    fn restore_checked(&mut self, ckpt_dir: &Path, init: bool) -> Result<()> {
        let mut ck = Checkpoint::open(ckpt_dir)?;
        if init {
            ck.state.next_growth_stage = 0;
            if ck.state.step == 0 {
                // A step-0 checkpoint (an import) brings weights only: the job trains with its
                // own [train] schedule.
                ck.state.schedule = self.schedule.clone();
            }
        }
        let st = &ck.state;
        let dir = ckpt_dir.display();
        if st.job != self.spec.job.name && !init {
            return Err(Error::Invalid(format!(
                "checkpoint {dir} belongs to job '{}', not '{}'; point at this job's checkpoints",
                st.job, self.spec.job.name
            )));
        }
        let tok_vocab = self.data.tokenizer.vocab_size();
        if st.model.vocab_size != tok_vocab {
            return Err(Error::Invalid(format!(
                "checkpoint {dir} has a vocabulary of {} but the job's tokenizer has {tok_vocab}; use the tokenizer the checkpoint was trained with",
                st.model.vocab_size
            )));
        }
        let ck_tok = ckpt_dir.join("tokenizer.json");
        if ck_tok.exists() {
            let t = trellis_data::Tokenizer::load(&ck_tok)?;
            if t.vocab_size() != st.model.vocab_size {
                return Err(Error::Invalid(format!(
                    "checkpoint {dir}: its tokenizer.json has {} tokens but the model's vocab_size is {}; the checkpoint is inconsistent",
                    t.vocab_size(),
                    st.model.vocab_size
                )));
            }
        }
        let initial = self.spec.model_config(tok_vocab)?;
        let as_job = st.model.with_layers(initial.num_hidden_layers);
        if as_job != initial {
            return Err(Error::Invalid(format!(
                "checkpoint {dir} has a different model config than the job ({}); use a checkpoint of this job or fix the [model] section",
                st.model.diff(&initial)
            )));
        }
        if st.next_growth_stage > self.spec.growth.len() {
            return Err(Error::Invalid(format!(
                "checkpoint {dir} has passed growth stage {} but the job has only {} stages",
                st.next_growth_stage,
                self.spec.growth.len()
            )));
        }
        let shard = Shard {
            rank: self.tp_rank,
            tp: self.tp,
        };
        let (model, moments) = load_model_shard(&ck, self.device, shard)?;
        self.install(ck.state.clone(), model, moments);
        Ok(())
    }

    /// Replace the whole training state with `st`, `model` (this rank's slice of `st.model`) and
    /// the optimizer moments (`None`: fresh ones). The checkpoint and the peers reshard paths
    /// both end here.
    pub(crate) fn install(
        &mut self,
        st: TrainerState,
        mut model: Llama,
        moments: Option<HashMap<String, Moments>>,
    ) {
        let st = &st;
        let dir = format!("step {}", st.step);
        model.precision = self.model.precision;
        let optim = match moments {
            // The moments as given (a parameter without an entry has unallocated zero ones).
            Some(m) => AdamW {
                cfg: self.optim.cfg,
                step: st.optimizer_step,
                moments: m,
            },
            None => {
                tracing::warn!(checkpoint = %dir, "checkpoint has no optimizer state; starting with fresh AdamW moments");
                AdamW::new(self.optim.cfg, model.named_parameters())
            }
        };
        // Commit.
        self.model = model;
        self.optim = optim;
        self.schedule = st.schedule.clone();
        self.step = st.step;
        self.tokens = st.tokens;
        self.cursor = st.data_cursor;
        self.generation = st.generation;
        self.next_growth_stage = st.next_growth_stage;
        self.growth_history = st.growth_history.clone();
        self.mask = st.mask.clone();
        self.apply_mask(self.step, false);
    }

    /// Grow the model now (online): validates via the plan first and leaves the trainer
    /// unchanged on any failure. `reset`: fresh moments, optimizer step 0 and the schedule
    /// restarted at this step until `max_steps` with `sched`'s LR; `carry`: moments grown by the
    /// plan, step and schedule continue.
    pub fn grow(&mut self, spec: &GrowthSpec, sched: &PostGrowthSchedule) -> Result<GrowthTimings> {
        let t0 = Instant::now();
        if let Some(m) = &self.mask {
            return Err(Error::Invalid(format!(
                "a mask ramp from the previous growth is still running until step {}; grow after it",
                m.start_step + m.ramp_steps
            )));
        }
        let plan = trellis_core::growth::plan(&self.model.cfg, spec)?;
        plan.new.validate()?;
        let plan_seconds = t0.elapsed().as_secs_f64();
        let (model, optim, mut timings) = crate::grow::apply(
            &self.model,
            &self.optim,
            &plan,
            spec.optimizer,
            self.spec.job.seed,
            self.generation + 1,
        )?;
        // Commit.
        let from_layers = self.model.cfg.num_hidden_layers;
        self.model = model;
        self.optim = optim;
        if spec.optimizer == OptimizerPolicy::Reset {
            self.schedule = ScheduleState {
                start_step: self.step,
                end_step: self.spec.train.max_steps.max(self.step + 1),
                peak_lr: sched.lr,
                min_lr: sched.min_lr,
                warmup_steps: sched.warmup_steps,
            };
        }
        self.generation += 1;
        self.growth_history.push(GrowthRecord {
            generation: self.generation,
            at_step: self.step,
            tokens: self.tokens,
            operator: spec.operator.name().to_string(),
            factor: spec.factor,
            optimizer: spec.optimizer,
            from_layers,
            to_layers: plan.new.num_hidden_layers,
        });
        self.mask =
            (plan.mask_ramp_steps > 0 && !plan.added_layers.is_empty()).then(|| MaskState {
                layers: plan.added_layers.clone(),
                start_step: self.step,
                ramp_steps: plan.mask_ramp_steps,
            });
        self.apply_mask(self.step, false);
        timings.plan_seconds = plan_seconds;
        timings.total_seconds = t0.elapsed().as_secs_f64();
        Ok(timings)
    }

    /// Fire growth stage `i` of the job spec (and mark it done).
    pub fn grow_stage(&mut self, i: usize) -> Result<GrowthTimings> {
        let stage = self
            .spec
            .growth
            .get(i)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("the job has no growth stage {i}")))?;
        let spec = stage.spec()?;
        let t = self.grow(&spec, &PostGrowthSchedule::from(&stage))?;
        self.next_growth_stage = i + 1;
        Ok(t)
    }
}
