//! What the coordinator persists (docs/design.md §State), as serde structs stored as JSON under
//! the keys of `trellis_store::keys`. Every change is written before it is acted on.
use crate::txn::checkpoint::Reason;
use serde::{Deserialize, Serialize};
use trellis_core::growth::{Operator, OptimizerPolicy};
use trellis_core::ids::{Epoch, Generation, Step};

/// `/…/jobs/<job>/spec`: the spec as submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub spec_toml: String,
    pub base_dir: String,
    pub submitted_at: f64,
    /// The vocabulary taken from `checkpoint.init_from` at submission (`[model] vocab_size`
    /// may leave it out), so that a recovering coordinator builds the same model config without
    /// reading the checkpoint again. Absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_vocab_size: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrowPhase {
    Pending,
    Checkpoint,
    Stack,
    Reshard,
    Resume,
    /// Every rank resumed with the grown model; the growth checkpoint (written in the
    /// background) is not recorded yet.
    Committing,
    Done,
    RolledBack,
}

impl GrowPhase {
    pub fn label(self) -> &'static str {
        match self {
            GrowPhase::Pending => "pending",
            GrowPhase::Checkpoint => "checkpoint",
            GrowPhase::Stack => "stack",
            GrowPhase::Reshard => "reshard",
            GrowPhase::Resume => "resume",
            GrowPhase::Committing => "resume",
            GrowPhase::Done => "done",
            GrowPhase::RolledBack => "rolled_back",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase", content = "growth")]
pub enum Phase {
    Pending,
    WaitingForWorkers,
    Training,
    Paused,
    Growing(GrowPhase),
    RollingBack,
    Done,
    Failed,
}

impl Phase {
    /// Phases in which ranks are assigned and expected to be alive.
    pub fn is_running(self) -> bool {
        matches!(self, Phase::Training | Phase::Paused | Phase::Growing(_))
    }
}

/// The parallel layout with the planner's words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LayoutInfo {
    pub dp: usize,
    pub tp: usize,
    pub explanation: String,
    pub memory_per_rank_bytes: u64,
    pub budget_bytes: u64,
}

/// `/…/jobs/<job>/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    /// Changed only by [`crate::txn::job::transition`].
    pub phase: Phase,
    /// Training-group incarnation: +1 at every (re)assignment of ranks.
    pub epoch: Epoch,
    pub generation: Generation,
    pub step: Step,
    pub tokens: u64,
    pub data_cursor: u64,
    pub layers: usize,
    pub parameters: u64,
    pub layout: LayoutInfo,
    /// The rollback point.
    pub last_checkpoint: Option<CheckpointRecord>,
    /// When set, the restore point is `last_checkpoint` + this growth's plan (its growth
    /// record, `based_on` that checkpoint): restoring loads the checkpoint and applies the plan,
    /// as the online growth did. Cleared by the next recorded checkpoint.
    #[serde(default)]
    pub restore_growth: Option<Generation>,
    /// Data-cursor windows to skip (batches that produced a non-finite loss).
    pub skip: Vec<(u64, u64)>,
    /// Index of the next growth stage of the spec still to fire.
    pub next_growth_stage: usize,
    pub rollbacks: u64,
    pub anomalies: u64,
    /// The operator asked for a pause (kept across rollbacks and restarts).
    pub paused: bool,
    /// Consecutive failed growths (the job fails after 3).
    pub growth_failures: u32,
    /// Consecutive rollbacks to the same checkpoint without progress (no commit in between and
    /// no step beyond the previous rollback's); the job fails at 3.
    #[serde(default)]
    pub stalled_rollbacks: u32,
    /// (step the job had reached, checkpoint step it restarted from) at the last rollback.
    #[serde(default)]
    pub last_rollback: Option<(Step, Step)>,
    /// Growths that were rolled back and later retried under the same generation number (the
    /// newest `MAX_FAILED_GROWTHS`), so the history keeps every attempt.
    #[serde(default)]
    pub failed_growths: Vec<GrowthRecordState>,
    /// Checkpoints aborted without a rollback (a write or commit failed, a deadline passed)
    /// since the job started; training went on.
    #[serde(default)]
    pub checkpoint_failures: u64,
    /// The last such failure, a sentence; cleared by the next commit.
    #[serde(default)]
    pub checkpoint_error: String,
    /// Workers evicted because their training thread made no progress.
    #[serde(default)]
    pub evictions: u64,
    pub message: String,
}

/// Rolled-back growth attempts kept in the job state.
pub const MAX_FAILED_GROWTHS: usize = 16;

/// `/…/jobs/<job>/checkpoints/<step>`: a committed checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: Step,
    pub tokens: u64,
    pub generation: Generation,
    pub layers: usize,
    pub data_cursor: u64,
    pub dir: String,
    pub reason: Reason,
    pub committed_at: f64,
    /// Next growth stage at the time of the checkpoint (restored with it).
    pub next_growth_stage: usize,
    /// The layout the job trained at when it was written (restored with it; absent in records
    /// of older coordinators, which keep the current layout).
    #[serde(default)]
    pub layout: Option<LayoutInfo>,
    /// Why it cannot be restored (files missing, a hash mismatch), when a restart found it so;
    /// its directory was set aside as `step-N.unusable` for inspection.
    #[serde(default)]
    pub unusable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PhaseTimes {
    pub checkpoint: f64,
    pub stack: f64,
    pub reshard: f64,
    pub resume: f64,
    pub total: f64,
}

/// `/…/jobs/<job>/growth/<generation>`: one growth, done only once its growth checkpoint is
/// recorded; a done growth is a deterministic plan applied to that checkpoint (`based_on`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrowthRecordState {
    pub generation: Generation,
    pub at_step: Step,
    pub tokens: u64,
    pub operator: Operator,
    pub factor: usize,
    pub optimizer: OptimizerPolicy,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub from_layers: usize,
    pub to_layers: usize,
    pub phase: GrowPhase,
    pub times: PhaseTimes,
    pub error: String,
    /// The spec stage that fired it, if any.
    pub stage: Option<usize>,
    /// The layout the grown model trains at (planned when the growth starts).
    #[serde(default)]
    pub layout_after: Option<LayoutInfo>,
    /// Validation loss of the grown model before it trains.
    #[serde(default)]
    pub val_loss_after: Option<f64>,
    /// The recorded checkpoint this growth applies its plan to (the growth checkpoint's
    /// directory), once recorded: generation `generation` at `at_step` is restorable as this
    /// checkpoint + the plan of the fields above.
    #[serde(default)]
    pub based_on: Option<String>,
}

pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
