//! What operators read: the domain's state encoded as `trellis.v1` status messages. Read-only;
//! the only place the coordinator builds status protos.
use crate::domain::{Domain, Job};
use crate::error::Result;
use crate::state::{CheckpointRecord, GrowPhase, GrowthRecordState, LayoutInfo, Phase, PhaseTimes};
use std::time::Instant;
use trellis_proto::v1 as pb;

/// A rank whose last step took over this many times the group's median is slow.
pub const SLOW: f64 = 1.5;

impl Domain {
    pub fn status(&self, job_id: Option<&str>) -> Result<pb::JobStatus> {
        let job = self.job_for(job_id)?;
        let s = &job.state;
        let growth = job
            .growing()
            .and_then(|g| job.growths.get(&g.generation))
            .map(|g| {
                let mut e = growth_event(g);
                if g.phase == GrowPhase::Checkpoint && s.step < g.at_step {
                    e.phase = pb::GrowthPhase::Pending as i32;
                }
                e
            });
        let retry = job.retry_in(Instant::now());
        let last = job
            .growths
            .values()
            .rev()
            .find(|g| g.phase == GrowPhase::Done || g.phase == GrowPhase::Committing)
            .map(|g| timings(&g.times));
        Ok(pb::JobStatus {
            job_id: job.id.0.clone(),
            phase: phase_pb(s.phase) as i32,
            generation: s.generation.0,
            epoch: s.epoch.0,
            step: s.step.0,
            max_steps: job.spec.train.max_steps,
            tokens: s.tokens,
            data_cursor: s.data_cursor,
            layers: s.layers as u32,
            parameters: s.parameters,
            layout: Some(layout(&s.layout)),
            train_loss: job.loss.last_train(),
            val_loss: job.loss.last_val(),
            tokens_per_second: job.tokens_per_second,
            mfu: job.mfu,
            growth,
            last_growth_timings: last,
            growth_history: {
                let mut all: Vec<&GrowthRecordState> = job
                    .state
                    .failed_growths
                    .iter()
                    .chain(job.growths.values())
                    .collect();
                all.sort_by_key(|g| (g.generation, g.at_step));
                all.into_iter().map(growth_event).collect()
            },
            checkpoints: job
                .checkpoints
                .iter()
                .filter(|c| self.checkpoint_durable(job, c.step))
                .map(ckpt_info)
                .collect(),
            workers: Some(self.workers_summary(job.world())),
            message: s.message.clone(),
            loss_anomalies: s.anomalies,
            rollbacks: s.rollbacks,
            next_growth_stage: s.next_growth_stage as u32,
            fenced_messages: self.fenced,
            checkpoint_failures: s.checkpoint_failures,
            checkpoint_error: s.checkpoint_error.clone(),
            evictions: s.evictions,
            slow_ranks: self
                .slowness()
                .into_iter()
                .filter(|(_, x)| *x > SLOW)
                .map(|(r, _)| r)
                .collect(),
            dp_backend: job
                .backends
                .map(|b| b.0.name().to_string())
                .unwrap_or_default(),
            tp_backend: job
                .backends
                .map(|b| b.1.name().to_string())
                .unwrap_or_default(),
            retry: retry.map(|r| r.0.to_string()).unwrap_or_default(),
            retry_in_seconds: retry.map_or(0.0, |r| r.1),
        })
    }

    /// Each ranked worker's last step time over the group's median, by rank (ranks that have
    /// not reported a step time yet are left out).
    pub(crate) fn slowness(&self) -> Vec<(u32, f64)> {
        let mut times: Vec<(u32, f64)> = self
            .workers
            .values()
            .filter(|e| !e.lost && e.step_seconds > 0.0)
            .filter_map(|e| e.rank.map(|r| (r.0, e.step_seconds)))
            .collect();
        if times.len() < 2 {
            return vec![];
        }
        let mut sorted: Vec<f64> = times.iter().map(|t| t.1).collect();
        sorted.sort_by(f64::total_cmp);
        // The lower median: with two ranks, the faster one is the reference.
        let median = sorted[(sorted.len() - 1) / 2];
        if median <= 0.0 {
            return vec![];
        }
        times.sort_by_key(|t| t.0);
        times.into_iter().map(|(r, t)| (r, t / median)).collect()
    }

    fn workers_summary(&self, expected: usize) -> pb::WorkersSummary {
        let mut w = pb::WorkersSummary {
            expected: expected as u32,
            ..Default::default()
        };
        for e in self.workers.values() {
            if e.exited {
                w.exited += 1;
            } else if e.lost {
                w.lost += 1;
            } else if e.rank.is_some() {
                w.active += 1;
            } else {
                w.idle += 1;
            }
        }
        w
    }

    pub fn list_workers(&self) -> Vec<pb::WorkerInfo> {
        let now = Instant::now();
        let epoch = self.job.as_ref().map(|j| j.state.epoch.0).unwrap_or(0);
        let slow = self.slowness();
        let mut v: Vec<(u64, pb::WorkerInfo)> = self
            .workers
            .iter()
            .map(|(id, e)| {
                (
                    e.seq,
                    pb::WorkerInfo {
                        worker_id: id.0.clone(),
                        host: e.host.clone(),
                        pid: e.pid,
                        device: e.device.clone(),
                        state: if e.exited {
                            pb::WorkerState::Exited
                        } else if e.lost {
                            pb::WorkerState::Lost
                        } else if e.rank.is_some() {
                            pb::WorkerState::Active
                        } else {
                            pb::WorkerState::Idle
                        } as i32,
                        rank: e.rank.map(|r| r.0 as i32).unwrap_or(-1),
                        epoch: if e.rank.is_some() { epoch } else { 0 },
                        last_step: e.last_step,
                        last_seen_seconds_ago: now.duration_since(e.last_seen).as_secs_f64(),
                        ring_address: e.ring_address.clone(),
                        progress_phase: e.activity.clone(),
                        progress_seconds: now.duration_since(e.activity_since).as_secs_f64(),
                        slowness: e
                            .rank
                            .and_then(|r| slow.iter().find(|s| s.0 == r.0))
                            .map_or(0.0, |s| s.1),
                    },
                )
            })
            .collect();
        v.sort_by_key(|(s, _)| *s);
        v.into_iter().map(|(_, w)| w).collect()
    }

    pub fn checkpoints(&self, job_id: Option<&str>) -> Result<Vec<pb::CheckpointInfo>> {
        let job = self.job_for(job_id)?;
        Ok(job
            .checkpoints
            .iter()
            .filter(|c| self.checkpoint_durable(job, c.step))
            .map(ckpt_info)
            .collect())
    }

    pub fn loss(&self, job_id: Option<&str>, max_points: usize) -> Result<pb::GetLossResponse> {
        let job: &Job = self.job_for(job_id)?;
        Ok(pb::GetLossResponse {
            points: job
                .loss
                .thinned(max_points)
                .into_iter()
                .map(|p| pb::LossPoint {
                    step: p.step,
                    tokens: p.tokens,
                    train_loss: p.train,
                    val_loss: p.val,
                    generation: p.generation,
                })
                .collect(),
            growth_events: job.growths.values().map(growth_event).collect(),
            anomalies: job
                .loss
                .anomalies
                .iter()
                .map(|a| pb::LossAnomaly {
                    step: a.step,
                    kind: a.kind.label().into(),
                    loss: a.loss,
                    ema: a.ema,
                })
                .collect(),
            ema: job.loss.ema(),
        })
    }
}

pub fn layout(l: &LayoutInfo) -> pb::Layout {
    pb::Layout {
        dp: l.dp as u32,
        tp: l.tp as u32,
        explanation: l.explanation.clone(),
        memory_per_rank_bytes: l.memory_per_rank_bytes,
        budget_bytes: l.budget_bytes,
    }
}

pub fn phase_label(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "pending",
        Phase::WaitingForWorkers => "waiting_for_workers",
        Phase::Training => "training",
        Phase::Paused => "paused",
        Phase::Growing(_) => "growing",
        Phase::RollingBack => "rolling_back",
        Phase::Done => "done",
        Phase::Failed => "failed",
    }
}

fn phase_pb(p: Phase) -> pb::JobPhase {
    match p {
        Phase::Pending => pb::JobPhase::Pending,
        Phase::WaitingForWorkers => pb::JobPhase::WaitingForWorkers,
        Phase::Training => pb::JobPhase::Training,
        Phase::Paused => pb::JobPhase::Paused,
        Phase::Growing(_) => pb::JobPhase::Growing,
        Phase::RollingBack => pb::JobPhase::RollingBack,
        Phase::Done => pb::JobPhase::Done,
        Phase::Failed => pb::JobPhase::Failed,
    }
}

fn grow_phase_pb(p: GrowPhase) -> pb::GrowthPhase {
    match p {
        GrowPhase::Pending => pb::GrowthPhase::Pending,
        GrowPhase::Checkpoint => pb::GrowthPhase::Checkpoint,
        GrowPhase::Stack => pb::GrowthPhase::Stack,
        GrowPhase::Reshard => pb::GrowthPhase::Reshard,
        GrowPhase::Resume | GrowPhase::Committing => pb::GrowthPhase::Resume,
        GrowPhase::Done => pb::GrowthPhase::Done,
        GrowPhase::RolledBack => pb::GrowthPhase::RolledBack,
    }
}

fn timings(t: &PhaseTimes) -> pb::GrowthTimings {
    pb::GrowthTimings {
        checkpoint_seconds: t.checkpoint,
        stack_seconds: t.stack,
        reshard_seconds: t.reshard,
        resume_seconds: t.resume,
        total_seconds: t.total,
    }
}

pub fn growth_event(g: &GrowthRecordState) -> pb::GrowthEvent {
    pb::GrowthEvent {
        generation: g.generation.0,
        at_step: g.at_step.0,
        tokens: g.tokens,
        operator: g.operator.name().to_string(),
        factor: g.factor as u32,
        optimizer: pb::OptimizerPolicy::from(g.optimizer) as i32,
        from_layers: g.from_layers as u32,
        to_layers: g.to_layers as u32,
        phase: grow_phase_pb(g.phase) as i32,
        timings: Some(timings(&g.times)),
        error: g.error.clone(),
        val_loss_after: g.val_loss_after,
        dp_after: g.layout_after.as_ref().map_or(0, |l| l.dp as u32),
        tp_after: g.layout_after.as_ref().map_or(0, |l| l.tp as u32),
    }
}

fn ckpt_info(c: &CheckpointRecord) -> pb::CheckpointInfo {
    pb::CheckpointInfo {
        step: c.step.0,
        tokens: c.tokens,
        generation: c.generation.0,
        dir: c.dir.clone(),
        committed_at: c.committed_at,
        reason: c.reason.label().into(),
        layers: c.layers as u32,
        unusable: c.unusable.clone().unwrap_or_default(),
    }
}
