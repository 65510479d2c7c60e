//! Managed mode: the worker's [`Trainer`] driven by the coordinator through the agent
//! (`trellis_agent`). The agent owns the session, the lockstep command queue and the ring
//! collective; this module only adapts the trainer to its [`Runner`] trait.
//!
//! A non-finite loss is not an error here: the step is reported with its loss and sample window,
//! and the coordinator rolls every rank back to the last committed checkpoint, skipping it.
//!
//! Test hooks (environment variables, all off by default; the e2e tests in `tests/` use them):
//! - `TRELLIS_SAMPLE_LOG=FILE`: append one JSON line per step with the global sample ids this
//!   rank read: `{"epoch","generation","step","rank","start","end","sources"}` (ids
//!   `start..end`; `sources[i]` is the `[[data.sources]]` index sample `start + i` came from).
//! - `TRELLIS_FAULT_NAN_AT_STEP=N`: report the loss of step N as NaN, once per process.
//! - `TRELLIS_FAULT_GROW_DELAY_MS=MS`: sleep MS milliseconds at the start of the stack phase of
//!   every growth (holds a growth in flight).
//! - `TRELLIS_FAULT_GROWTH_CKPT_DELAY_MS=MS`: the background writer of every growth checkpoint
//!   sleeps MS milliseconds before writing its files (holds the growth uncommitted, the
//!   checkpoint not durable, while the grown model trains).
//! - `TRELLIS_FAULT_CKPT_DELAY_MS=MS`: the background writer of the first plain (not growth)
//!   checkpoint of the process sleeps MS milliseconds before writing its files (once per
//!   process: holds that checkpoint past the coordinator's `checkpoint_deadline_secs`).
//! - `TRELLIS_FAULT_HANG_AT_STEP=N`: the training thread hangs for good when it starts step N
//!   (once per process), before any collective of that step; the session and its heartbeats go
//!   on, reporting the thread stuck in `step` (the coordinator's progress timeout evicts it).
use crate::parallel::Groups;
use crate::trainer::{PostGrowthSchedule, Trainer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use trellis_agent::{
    Assignment, BoxError, CheckpointIo, Collectives, GrowOrder, Runner, RunnerState, ShardWriteJob,
    StepOutcome,
};
use trellis_core::checkpoint::{self, ShardReport, TrainerState};

/// One rank's trainer as the agent drives it.
pub struct ManagedRunner {
    trainer: Trainer,
    /// The trainer state of the checkpoint whose shards were written last (training may go on
    /// before the coordinator orders the commit).
    pending: Option<TrainerState>,
    epoch: u64,
    rank: u32,
    hooks: Hooks,
}

/// The test hooks of the module docs, read once per runner.
#[derive(Debug, Clone, Default)]
struct Hooks {
    sample_log: Option<PathBuf>,
    nan_at_step: Option<u64>,
    grow_delay_ms: u64,
    growth_ckpt_delay_ms: u64,
    ckpt_delay_ms: u64,
    hang_at_step: Option<u64>,
}

/// `TRELLIS_FAULT_NAN_AT_STEP` fires once per process (not again after the rollback it causes).
static NAN_FIRED: AtomicBool = AtomicBool::new(false);
/// `TRELLIS_FAULT_CKPT_DELAY_MS` fires once per process.
static CKPT_DELAY_FIRED: AtomicBool = AtomicBool::new(false);
/// `TRELLIS_FAULT_HANG_AT_STEP` fires once per process.
static HANG_FIRED: AtomicBool = AtomicBool::new(false);

impl Hooks {
    fn from_env() -> Hooks {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Hooks {
            sample_log: var("TRELLIS_SAMPLE_LOG").map(PathBuf::from),
            nan_at_step: var("TRELLIS_FAULT_NAN_AT_STEP").and_then(|v| v.parse().ok()),
            grow_delay_ms: var("TRELLIS_FAULT_GROW_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            growth_ckpt_delay_ms: var("TRELLIS_FAULT_GROWTH_CKPT_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            ckpt_delay_ms: var("TRELLIS_FAULT_CKPT_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            hang_at_step: var("TRELLIS_FAULT_HANG_AT_STEP").and_then(|v| v.parse().ok()),
        }
    }
}

impl ManagedRunner {
    /// Build the rank of `a`: a fresh trainer from the job seed, restored from the assignment's
    /// committed checkpoint when it names one, with the data windows the coordinator skipped
    /// (after a NaN) applied to the cursor.
    pub fn build(a: &Assignment, groups: Collectives) -> Result<ManagedRunner, BoxError> {
        std::fs::create_dir_all(&a.job_root)
            .map_err(|e| format!("cannot create the job root {}: {e}", a.job_root.display()))?;
        let (dp_rank, tp_rank) = a.coords();
        if groups.tp.world() != a.tp || groups.tp.rank() != tp_rank || groups.dp.world() != a.dp {
            return Err(format!(
                "the groups formed ({} TP, {} DP ranks) do not match the assignment (dp = {}, tp = {})",
                groups.tp.world(),
                groups.dp.world(),
                a.dp,
                a.tp
            )
            .into());
        }
        let groups = Groups {
            dp: groups.dp,
            tp: groups.tp,
        };
        // Any layout restores any checkpoint: each rank reads only its own slices (the
        // checkpoint reshard path, docs/design.md §Checkpoint format).
        let mut trainer = match &a.restore_from {
            Some(dir) => Trainer::restored(&a.spec, &a.job_root, dp_rank, a.dp, groups, dir)?,
            None => Trainer::with_groups(&a.spec, &a.job_root, dp_rank, a.dp, groups)?,
        };
        trainer.set_skip_windows(a.skip.clone());
        let mut runner = ManagedRunner {
            trainer,
            pending: None,
            epoch: a.epoch,
            rank: a.rank.0,
            hooks: Hooks::from_env(),
        };
        // A restore point of checkpoint + plan: the growth applied as online (docs/design.md §3).
        if let Some(order) = &a.restore_grow {
            runner.apply_growth(order)?;
            tracing::info!(
                generation = order.generation,
                layers = runner.trainer.config().num_hidden_layers,
                step = runner.trainer.step_count(),
                "restored checkpoint + growth plan"
            );
        }
        Ok(runner)
    }

    /// Apply a growth order to the trainer (the online stack and the restore of checkpoint +
    /// plan share it).
    fn apply_growth(&mut self, order: &GrowOrder) -> Result<(), BoxError> {
        let sched = PostGrowthSchedule {
            lr: order.lr,
            min_lr: order.min_lr,
            warmup_steps: order.warmup_steps,
        };
        self.trainer.grow(&order.spec, &sched)?;
        if self.trainer.generation() != order.generation {
            return Err(format!(
                "after growth this rank is at generation {} but the coordinator expects {}",
                self.trainer.generation(),
                order.generation
            )
            .into());
        }
        Ok(())
    }
}

impl Runner for ManagedRunner {
    fn step(&mut self) -> Result<StepOutcome, BoxError> {
        if self.hooks.hang_at_step == Some(self.trainer.step_count() + 1)
            && !HANG_FIRED.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(
                step = self.trainer.step_count() + 1,
                "TRELLIS_FAULT_HANG_AT_STEP: the training thread hangs"
            );
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        let mut r = match self.trainer.step() {
            Ok(r) => r,
            Err(crate::Error::NonFiniteLoss(r)) => *r,
            Err(e) => return Err(e.into()),
        };
        if self.hooks.nan_at_step == Some(r.step) && !NAN_FIRED.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                step = r.step,
                "TRELLIS_FAULT_NAN_AT_STEP: reporting a NaN loss"
            );
            r.loss = f64::NAN;
        }
        if let Some(path) = &self.hooks.sample_log {
            let line = serde_json::json!({
                "epoch": self.epoch,
                "generation": self.trainer.generation(),
                "step": r.step,
                "rank": self.rank,
                "start": r.samples.start,
                "end": r.samples.end,
                "sources": self.trainer.sample_sources(r.samples.clone()),
            });
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{line}"))
                .map_err(|e| format!("TRELLIS_SAMPLE_LOG {}: {e}", path.display()))?;
        }
        Ok(StepOutcome {
            step: r.step,
            tokens: r.tokens,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            step_seconds: r.step_seconds,
            compute_seconds: r.compute_seconds,
            comm_seconds: r.comm_seconds,
            data_seconds: r.data_seconds,
            sample_start: r.step_samples.start,
            sample_end: r.step_samples.end,
        })
    }

    fn evaluate(&mut self) -> Result<f64, BoxError> {
        Ok(self.trainer.evaluate()?)
    }

    fn write_checkpoint_shards(
        &mut self,
        job_root: &Path,
    ) -> Result<Option<ShardReport>, BoxError> {
        let report = self.trainer.write_checkpoint_shards(job_root)?;
        self.pending = Some(self.trainer.state());
        Ok(report)
    }

    fn begin_checkpoint_shards(&mut self, job_root: &Path) -> Result<ShardWriteJob, BoxError> {
        // Preparing the temp dir can fail on a full disk: a checkpoint failure. A failed
        // collective (the TP barrier) is not: the group is broken.
        let w = self
            .trainer
            .snapshot_checkpoint_shards(job_root)
            .map_err(|e| -> BoxError {
                match e {
                    crate::Error::Comm(_) | crate::Error::Torch(_) => Box::new(e),
                    e => Box::new(CheckpointIo(e.to_string())),
                }
            })?;
        self.pending = Some(self.trainer.state());
        let delay = match self.hooks.ckpt_delay_ms {
            0 => 0,
            ms if !CKPT_DELAY_FIRED.swap(true, Ordering::SeqCst) => ms,
            _ => 0,
        };
        Ok(Box::new(move || {
            if delay > 0 {
                tracing::warn!(
                    ms = delay,
                    "TRELLIS_FAULT_CKPT_DELAY_MS: holding this checkpoint's write"
                );
                std::thread::sleep(std::time::Duration::from_millis(delay));
            }
            match w {
                Some(w) => Ok(Some(w.write()?)),
                None => Ok(None),
            }
        }))
    }

    fn begin_growth_checkpoint_shards(
        &mut self,
        job_root: &Path,
    ) -> Result<ShardWriteJob, BoxError> {
        let w = self.trainer.snapshot_growth_checkpoint_shards(job_root)?;
        self.pending = Some(self.trainer.state());
        let delay = self.hooks.growth_ckpt_delay_ms;
        Ok(Box::new(move || {
            if delay > 0 {
                tracing::warn!(
                    ms = delay,
                    "TRELLIS_FAULT_GROWTH_CKPT_DELAY_MS: holding the growth checkpoint's write"
                );
                std::thread::sleep(std::time::Duration::from_millis(delay));
            }
            match w {
                Some(w) => Ok(Some(w.write()?)),
                None => Ok(None),
            }
        }))
    }

    fn finalize_checkpoint(
        &mut self,
        job_root: &Path,
        step: u64,
        reports: &[ShardReport],
    ) -> Result<PathBuf, BoxError> {
        let state = match self.pending.take() {
            Some(s) if s.step == step => s,
            other => {
                return Err(format!(
                    "asked to commit the checkpoint of step {step} but this rank's last written checkpoint is {}",
                    other.map_or("none".to_string(), |s| format!("step {}", s.step))
                )
                .into())
            }
        };
        let dir = checkpoint::finalize(&checkpoint::tmp_dir(job_root, step), &state, reports)?;
        checkpoint::set_latest(job_root, &dir)?;
        // No garbage collection here: the agent collects after this commit, keeping what the
        // coordinator's recorded catalogue lists (`CommitCheckpoint.keep_steps`).
        Ok(dir)
    }

    fn grow(&mut self, order: &GrowOrder) -> Result<(), BoxError> {
        if self.hooks.grow_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.hooks.grow_delay_ms));
        }
        self.apply_growth(order)
    }

    fn state(&self) -> RunnerState {
        RunnerState {
            step: self.trainer.step_count(),
            tokens: self.trainer.tokens(),
            generation: self.trainer.generation(),
            layers: self.trainer.config().num_hidden_layers,
            data_cursor: self.trainer.data_cursor(),
        }
    }

    fn agree_min(&mut self, v: u64) -> Result<u64, BoxError> {
        // The minimum over the world: over this rank's TP group, then over its DP group.
        let v = self.trainer.tp_comm_mut().all_reduce_min_u64(v)?;
        Ok(self.trainer.comm_mut().all_reduce_min_u64(v)?)
    }
}
