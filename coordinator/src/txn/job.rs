//! The job lifecycle: phases, epochs, rollback and its verdict, the restore point, and the
//! scheduled work that is due. Pure functions over [`JobState`]; the driver persists the state
//! after calling them and before acting on it.
//!
//! ```text
//!   Pending ─▶ WaitingForWorkers ─▶ Training ◀──▶ Paused
//!                 ▲        │            │  ▲
//!                 │        │            ▼  │ resumed
//!                 │        │         Growing(phase)
//!                 │        ▼            │
//!                 └── RollingBack ◀─────┘  a lost rank, a failed ack, a non-finite loss
//!                          │
//!                          ▼
//!                 Failed (3 stalled rollbacks or 3 failed growths)      Done (final checkpoint)
//! ```
use crate::state::{CheckpointRecord, GrowthRecordState, JobState, Phase};
use crate::txn::checkpoint::Reason;
use std::collections::BTreeMap;
use std::time::Duration;
use trellis_core::config::ModelConfig;
use trellis_core::ids::{Generation, Step};
use trellis_core::job::JobSpec;

/// Steps ahead of a scheduled barrier (growth stage, periodic checkpoint) at which its command is
/// sent, so that it reaches every rank before the ranks get there.
pub const LOOKAHEAD_STEPS: u64 = 3;
/// A job fails after this many consecutive failed growths.
pub const MAX_GROWTH_FAILURES: u32 = 3;
/// A job fails after this many consecutive rollbacks to the same checkpoint without progress
/// (a deterministic failure would otherwise roll it back forever).
pub const MAX_STALLED_ROLLBACKS: u32 = 3;
/// How many steps further than the previous rollback a job must get before a new rollback
/// counts as progress rather than the same failure again.
pub const STALL_SLACK_STEPS: u64 = 2 * LOOKAHEAD_STEPS;

/// The first retry of scheduled work whose checkpoint failed.
pub const RETRY_MIN: Duration = Duration::from_secs(1);

/// The wait before retrying scheduled work whose checkpoint failed (a periodic or final
/// checkpoint, a growth stage, whether its checkpoint failed to write, to commit or in time):
/// [`RETRY_MIN`] after the first failure, doubling up to the cap (`checkpoint_retry_max_secs`);
/// a recorded checkpoint resets it. A pure count: the driver turns the wait into a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: RETRY_MIN.min(max),
            max,
        }
    }

    /// The work that failed is retried only if the schedule re-derives it: a periodic or final
    /// checkpoint, a growth stage of the spec. An operator's checkpoint or growth
    /// (`spec_stage = false`) is not retried (`None`, the backoff unchanged); otherwise the
    /// wait before the retry, and the next failure waits twice as long (up to the cap).
    pub fn failed(&mut self, reason: Reason, spec_stage: bool) -> Option<Duration> {
        let scheduled = match reason {
            Reason::Manual | Reason::InitFrom => false,
            Reason::Growth => spec_stage,
            Reason::Periodic | Reason::Final | Reason::PostGrowth => true,
        };
        if !scheduled {
            return None;
        }
        let wait = self.next;
        self.next = (wait * 2).min(self.max);
        Some(wait)
    }

    /// A checkpoint was recorded: the next failure waits [`RETRY_MIN`] again.
    pub fn reset(&mut self) {
        self.next = RETRY_MIN.min(self.max);
    }
}

/// The one place a job's phase changes.
pub fn transition(state: &mut JobState, to: Phase, message: impl Into<String>) {
    state.phase = to;
    state.message = message.into();
}

/// What a rollback leads to.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Restart from the restore point in a new epoch.
    Restart,
    /// The failure repeats: the job fails with this message.
    Fail(String),
}

/// Count a rollback and decide whether the job restarts or fails. Progress since the last
/// rollback is a commit (which clears the count) or getting clearly further than the last
/// rollback did: ranks run a few steps past a failing barrier before the failure reaches them,
/// so "clearly" allows [`STALL_SLACK_STEPS`] of jitter; otherwise a deterministic failure seen
/// at steps 11, 12, 11, 12… would never count.
pub fn count_rollback(
    state: &mut JobState,
    why: &str,
    skip: Option<(u64, u64)>,
    failed_growth: bool,
) -> Verdict {
    state.rollbacks += 1;
    if let Some(w) = skip {
        state.skip.push(w);
    }
    if failed_growth {
        state.growth_failures += 1;
    }
    let at = state.step;
    let target = state.last_checkpoint.as_ref().map_or(Step(0), |c| c.step);
    let stalled = match state.last_rollback {
        Some((prev_at, prev_target))
            if state.stalled_rollbacks > 0
                && at.0 <= prev_at.0 + STALL_SLACK_STEPS
                && target == prev_target =>
        {
            state.stalled_rollbacks + 1
        }
        _ => 1,
    };
    state.stalled_rollbacks = stalled;
    // Within a stalled series the reference is the furthest step any of its rollbacks saw.
    let reference = match state.last_rollback {
        Some((prev_at, _)) if stalled > 1 => prev_at.max(at),
        _ => at,
    };
    state.last_rollback = Some((reference, target));
    let failures = state.growth_failures;
    if failures >= MAX_GROWTH_FAILURES {
        Verdict::Fail(format!(
            "failed: {failures} growths in a row failed; last: {why}"
        ))
    } else if stalled >= MAX_STALLED_ROLLBACKS {
        Verdict::Fail(format!(
            "failed: rolled back {stalled} times in a row to checkpoint step {target} without progress \
             (the failure is deterministic); last: {why}; fix the cause and resubmit, or restart \
             from an earlier checkpoint"
        ))
    } else {
        Verdict::Restart
    }
}

/// Count a rollback forced by an I/O failure (a growth checkpoint that could not be written
/// while the grown model trained): the job restarts from its restore point. It is not a failed
/// growth nor part of a stalled series: a full disk is not a deterministic training failure
/// (the checkpoint is retried when the growth is, like any failed checkpoint).
pub fn count_io_rollback(state: &mut JobState, why: &str) -> Verdict {
    state.rollbacks += 1;
    state.checkpoint_failures += 1;
    state.checkpoint_error = why.to_string();
    Verdict::Restart
}

/// Reset the job's progress to its restore point: the last recorded checkpoint, or that
/// checkpoint + the plan of a done growth (`restore_growth`: the grown generation at the
/// checkpoint's step), or the start. Generation, step, tokens, data cursor, depth, layout and
/// growth stage all come from the same records. Returns the restored generation.
pub fn restore_point(
    state: &mut JobState,
    model0: &ModelConfig,
    growths: &BTreeMap<Generation, GrowthRecordState>,
    why: &str,
) -> Generation {
    let lc = state.last_checkpoint.clone();
    match &lc {
        Some(c) => {
            state.generation = c.generation;
            state.step = c.step;
            state.tokens = c.tokens;
            state.data_cursor = c.data_cursor;
            state.layers = c.layers;
            state.next_growth_stage = c.next_growth_stage;
            if let Some(l) = &c.layout {
                state.layout = l.clone();
            }
            let plan = state
                .restore_growth
                .and_then(|g| growths.get(&g))
                .filter(|g| g.based_on.as_deref() == Some(c.dir.as_str()));
            match plan {
                Some(g) => {
                    state.generation = g.generation;
                    state.layers = g.to_layers;
                    if let Some(l) = &g.layout_after {
                        state.layout = l.clone();
                    }
                    if let Some(i) = g.stage {
                        state.next_growth_stage = state.next_growth_stage.max(i + 1);
                    }
                    state.message = format!(
                        "{why}; restarting from checkpoint step {} (generation {}) grown to generation {} ({} layers)",
                        c.step, c.generation, g.generation, g.to_layers
                    );
                }
                None => {
                    state.restore_growth = None;
                    state.message = format!(
                        "{why}; restarting from checkpoint step {} (generation {})",
                        c.step, c.generation
                    );
                }
            }
        }
        None => {
            state.generation = Generation(0);
            state.step = Step(0);
            state.tokens = 0;
            state.data_cursor = 0;
            state.layers = model0.num_hidden_layers;
            state.next_growth_stage = 0;
            state.restore_growth = None;
            state.message = format!("{why}; no committed checkpoint yet, restarting from step 0");
        }
    }
    state.parameters = model0.with_layers(state.layers).num_parameters();
    state.generation
}

/// A committed checkpoint becomes the restore point; a commit is progress.
pub fn committed(state: &mut JobState, rec: &CheckpointRecord) {
    state.last_checkpoint = Some(rec.clone());
    state.restore_growth = None;
    state.stalled_rollbacks = 0;
    state.checkpoint_error.clear();
}

/// A checkpoint was aborted (its files could not be written or committed, or it ran past its
/// deadline). Not a training failure: no rollback, no epoch, and it never counts toward the
/// stalled-rollback or failed-growth limits. Returns the status message.
/// `retry`: the wait before it is retried ([`Backoff::failed`]; `None`: not retried).
pub fn checkpoint_failed(
    state: &mut JobState,
    step: Step,
    why: &str,
    retry: Option<Duration>,
) -> String {
    state.checkpoint_failures += 1;
    state.checkpoint_error = format!("checkpoint step {step} failed: {why}");
    let restore = state
        .last_checkpoint
        .as_ref()
        .map_or("none yet".to_string(), |c| format!("step {}", c.step));
    format!(
        "{}; training goes on (restore point: {restore}), {}",
        state.checkpoint_error,
        retrying(retry)
    )
}

/// How a status message says when failed work is retried.
pub fn retrying(retry: Option<Duration>) -> String {
    match retry {
        Some(w) => {
            let s = w.as_secs_f64();
            if s.fract() == 0.0 {
                format!("retrying in {s:.0} s")
            } else {
                format!("retrying in {s:.1} s")
            }
        }
        None => "not retried automatically (the operator's request; ask again)".into(),
    }
}

/// A growth is done (its checkpoint recorded, every rank resumed): the restore point becomes
/// that checkpoint + the growth's plan.
pub fn growth_committed(state: &mut JobState, rec: &GrowthRecordState) {
    state.restore_growth = Some(rec.generation);
    state.stalled_rollbacks = 0;
    let msg = format!(
        "training generation {} ({} layers)",
        rec.generation, rec.to_layers
    );
    let phase = state.phase;
    transition(state, phase, msg);
}

/// A new epoch begins: ranks are assigned. During a growth's re-layout the phase stays.
pub fn start_epoch(state: &mut JobState, relayout: bool) {
    state.epoch.0 += 1;
    if relayout {
        let msg = format!(
            "growing to generation {}: re-forming the groups at the new layout",
            state.generation.0 + 1
        );
        let phase = state.phase;
        transition(state, phase, msg);
    } else if state.paused {
        transition(
            state,
            Phase::Paused,
            "paused by the operator; `coordctl resume` continues",
        );
    } else {
        let msg = format!(
            "training (epoch {}, generation {}, {} layers)",
            state.epoch, state.generation, state.layers
        );
        transition(state, Phase::Training, msg);
    }
}

/// Every rank resumed with the grown model: generation, depth, size and layout change together.
pub fn grown(state: &mut JobState, rec: &GrowthRecordState, model0: &ModelConfig) {
    state.generation = rec.generation;
    state.layers = rec.to_layers;
    state.parameters = model0.with_layers(rec.to_layers).num_parameters();
    if let Some(l) = &rec.layout_after {
        state.layout = l.clone();
    }
    state.growth_failures = 0;
    if let Some(i) = rec.stage {
        state.next_growth_stage = state.next_growth_stage.max(i + 1);
    }
    let msg = format!(
        "training generation {} ({} layers); recording the growth checkpoint",
        rec.generation, rec.to_layers
    );
    transition(state, Phase::Training, msg);
}

/// Scheduled work that is due now.
#[derive(Debug, Clone, PartialEq)]
pub enum Due {
    /// `max_steps` reached: the final checkpoint, then done.
    FinalCheckpoint { at: Step },
    /// Growth stage `stage` of the spec, at the barrier `at`.
    Growth { stage: usize, at: Step },
    /// The next periodic checkpoint, at the barrier `at`.
    Periodic { at: Step },
}

/// What scheduled work is due at the job's current step (only while training with no
/// transaction in flight; the caller checks that). `plateau_seen`: the loss watcher saw a
/// plateau since the last check.
pub fn due(state: &JobState, spec: &JobSpec, plateau_seen: bool) -> Option<Due> {
    let step = state.step.0;
    let max = spec.train.max_steps;
    if step >= max {
        return Some(Due::FinalCheckpoint { at: Step(max) });
    }
    let i = state.next_growth_stage;
    if i < spec.growth.len() {
        let s = if spec.is_plateau_stage(i) {
            plateau_seen.then_some(step)
        } else {
            Some(spec.growth_step(i))
        };
        if let Some(s) = s {
            if step + LOOKAHEAD_STEPS >= s {
                return Some(Due::Growth {
                    stage: i,
                    at: Step(s.max(step)),
                });
            }
        }
    }
    let interval = spec.checkpoint.interval;
    if interval > 0 {
        let last = state.last_checkpoint.as_ref().map_or(0, |c| c.step.0);
        let next = (last / interval + 1) * interval;
        if next < max && step + LOOKAHEAD_STEPS >= next {
            return Some(Due::Periodic {
                at: Step(next.max(step)),
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::LayoutInfo;

    fn state() -> JobState {
        JobState {
            phase: Phase::Training,
            epoch: Default::default(),
            generation: Generation(0),
            step: Step(12),
            tokens: 0,
            data_cursor: 0,
            layers: 2,
            parameters: 0,
            layout: LayoutInfo::default(),
            last_checkpoint: None,
            restore_growth: None,
            skip: vec![],
            next_growth_stage: 0,
            rollbacks: 0,
            anomalies: 0,
            paused: false,
            growth_failures: 0,
            stalled_rollbacks: 0,
            last_rollback: None,
            failed_growths: vec![],
            checkpoint_failures: 0,
            checkpoint_error: String::new(),
            evictions: 0,
            message: String::new(),
        }
    }

    #[test]
    fn steps_jittering_around_one_barrier_fail_on_the_third_rollback() {
        let mut s = state();
        for (i, at) in [11, 12, 11].into_iter().enumerate() {
            s.step = Step(at);
            let v = count_rollback(&mut s, "boom", None, false);
            assert_eq!(
                v == Verdict::Restart,
                i < 2,
                "rollback {i} at step {at}: {v:?}"
            );
        }
    }

    #[test]
    fn a_growth_checkpoint_io_rollback_restarts_without_counting_a_failure() {
        let mut s = state();
        s.stalled_rollbacks = 2;
        s.growth_failures = 2;
        s.last_rollback = Some((Step(12), Step(10)));
        // Any number of them: a full disk never fails the job as a deterministic failure.
        for _ in 0..5 {
            let v = count_io_rollback(&mut s, "the growth checkpoint failed: disk full");
            assert_eq!(v, Verdict::Restart);
        }
        assert_eq!(
            (
                s.rollbacks,
                s.stalled_rollbacks,
                s.growth_failures,
                s.checkpoint_failures,
                s.last_rollback
            ),
            (5, 2, 2, 5, Some((Step(12), Step(10))))
        );
        assert!(s.checkpoint_error.contains("disk full"));
    }

    #[test]
    fn a_failed_checkpoint_counts_nothing_toward_failing_the_job() {
        let mut s = state();
        s.stalled_rollbacks = 2;
        s.growth_failures = 2;
        let msg = checkpoint_failed(
            &mut s,
            Step(20),
            "rank 1 could not write it: disk full",
            Some(Duration::from_secs(4)),
        );
        assert_eq!(
            (
                s.rollbacks,
                s.stalled_rollbacks,
                s.growth_failures,
                s.checkpoint_failures
            ),
            (0, 2, 2, 1)
        );
        assert!(
            msg.contains("checkpoint step 20 failed") && msg.contains("retrying in 4 s"),
            "{msg}"
        );
        assert!(s.checkpoint_error.contains("disk full"));
        let rec = CheckpointRecord {
            step: Step(30),
            tokens: 0,
            generation: Generation(0),
            layers: 2,
            data_cursor: 0,
            dir: "/ck/j/step-30".into(),
            reason: crate::txn::checkpoint::Reason::Periodic,
            committed_at: 0.0,
            next_growth_stage: 0,
            layout: None,
            unusable: None,
        };
        committed(&mut s, &rec);
        assert!(s.checkpoint_error.is_empty(), "a commit clears the error");
    }

    #[test]
    fn failed_scheduled_work_is_retried_after_one_second_doubling_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(5));
        let secs = |w: Option<Duration>| w.map(|w| w.as_secs_f64());
        // A growth stage whose checkpoint failed (disk full), again and again: 1, 2, 4, then
        // the cap; a periodic checkpoint's failure shares the same backoff.
        let waits: Vec<_> = (0..5)
            .map(|_| secs(b.failed(Reason::Growth, true)))
            .collect();
        assert_eq!(
            waits,
            [Some(1.0), Some(2.0), Some(4.0), Some(5.0), Some(5.0)]
        );
        assert_eq!(secs(b.failed(Reason::Periodic, false)), Some(5.0));
        // An operator's growth or checkpoint is not retried, and leaves the backoff as it was.
        let before = b;
        assert_eq!(b.failed(Reason::Growth, false), None);
        assert_eq!(b.failed(Reason::Manual, false), None);
        assert_eq!(b, before);
        // A recorded checkpoint resets it.
        b.reset();
        assert_eq!(secs(b.failed(Reason::Final, false)), Some(1.0));
        assert_eq!(secs(b.failed(Reason::Growth, true)), Some(2.0));
        // A cap under the first wait is the wait.
        let mut small = Backoff::new(Duration::from_millis(200));
        assert_eq!(secs(small.failed(Reason::Growth, true)), Some(0.2));
        assert_eq!(secs(small.failed(Reason::Growth, true)), Some(0.2));
        assert_eq!(
            retrying(Some(Duration::from_millis(200))),
            "retrying in 0.2 s"
        );
        assert!(retrying(None).contains("not retried"));
    }

    #[test]
    fn clear_progress_resets_the_stall_count() {
        let mut s = state();
        s.step = Step(11);
        count_rollback(&mut s, "boom", None, false);
        s.step = Step(11 + STALL_SLACK_STEPS + 1);
        count_rollback(&mut s, "boom", None, false);
        assert_eq!(s.stalled_rollbacks, 1);
    }
}
