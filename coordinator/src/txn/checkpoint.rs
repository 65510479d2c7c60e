//! The checkpoint commit transaction: a two-phase commit over the ranks of one epoch.
//!
//! ```text
//!   Writing ──(a CheckpointAck from every rank)──▶ Committing ──(rank 0's CommitAck)──▶ Record
//!      │  each rank writes its shards to the           │  rank 0 writes the manifest, renames
//!      │  temp dir and reports files + hashes          │  the temp dir to step-N, moves `latest`
//!      ▼                                               ▼
//!   a failed ack, a lost rank or a deadline: the driver aborts the transaction
//! ```
//!
//! Only a recorded checkpoint is a rollback point. The machine is pure: events in, one
//! [`Effect`] out; command ids come from the job's [`CommandIds`](super::CommandIds).
use super::CommandIds;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use trellis_core::checkpoint::ShardReport;
use trellis_core::ids::{CommandId, Rank, Step};

/// Why a checkpoint is taken (the wire and the store use [`Reason::label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    #[serde(rename = "periodic")]
    Periodic,
    /// The rollback point of a growth, written holding (no step after it).
    #[serde(rename = "growth")]
    Growth,
    #[serde(rename = "manual")]
    Manual,
    #[serde(rename = "final")]
    Final,
    /// The grown model's first checkpoint, which used to make a growth final (records of older
    /// coordinators; a growth now commits with its growth checkpoint, docs/design.md §3).
    #[serde(rename = "post-growth")]
    PostGrowth,
    /// A job's starting point taken from another checkpoint (`checkpoint.init_from`).
    #[serde(rename = "init_from")]
    InitFrom,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Periodic => "periodic",
            Reason::Growth => "growth",
            Reason::Manual => "manual",
            Reason::Final => "final",
            Reason::PostGrowth => "post-growth",
            Reason::InitFrom => "init_from",
        }
    }
}

/// What one rank reports once its shards are written.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardAck {
    /// The step, tokens and global data cursor the shards hold.
    pub step: Step,
    pub tokens: u64,
    pub data_cursor: u64,
    /// Its files and tensor slices; `None` for a rank that writes nothing (a DP replica).
    pub report: Option<ShardReport>,
}

/// A checkpoint rank 0 has finalized: what the driver records.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub reason: Reason,
    pub step: Step,
    pub tokens: u64,
    pub data_cursor: u64,
    pub dir: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    Writing { shards: BTreeMap<Rank, ShardAck> },
    Committing { commit: CommandId, at: ShardAck },
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointTxn {
    /// The `Checkpoint` command every rank executes.
    pub cmd: CommandId,
    pub reason: Reason,
    /// The barrier: ranks write after this many steps.
    pub at_step: Step,
    world: usize,
    stage: Stage,
}

/// An event of the transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A rank's `CheckpointAck` for command `cmd`.
    Written {
        cmd: CommandId,
        rank: Rank,
        ack: ShardAck,
    },
    /// Rank 0's `CommitAck` for the commit command `cmd`.
    Finalized { cmd: CommandId, dir: String },
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// More acks are expected.
    Wait,
    /// Not this transaction's message (another command, a duplicate, a rank out of range):
    /// ignored.
    Stale,
    /// Every rank wrote: send `CommitCheckpoint { step, reports }` to rank 0 as `commit`.
    SendCommit {
        commit: CommandId,
        step: Step,
        reports: Vec<ShardReport>,
    },
    /// Rank 0 finalized: record the checkpoint; the transaction is over.
    Record(Committed),
    /// The ranks disagree about what they wrote: the transaction cannot commit.
    Abort(String),
}

impl CheckpointTxn {
    pub fn new(cmd: CommandId, reason: Reason, at_step: Step, world: usize) -> CheckpointTxn {
        CheckpointTxn {
            cmd,
            reason,
            at_step,
            world,
            stage: Stage::Writing {
                shards: BTreeMap::new(),
            },
        }
    }

    /// The commit command, once every rank has written.
    pub fn commit_cmd(&self) -> Option<CommandId> {
        match &self.stage {
            Stage::Committing { commit, .. } => Some(*commit),
            Stage::Writing { .. } => None,
        }
    }

    pub fn on(&mut self, ev: Event, ids: &mut CommandIds) -> Effect {
        match (ev, &mut self.stage) {
            (Event::Written { cmd, rank, ack }, Stage::Writing { shards }) => {
                if cmd != self.cmd || rank.0 as usize >= self.world {
                    return Effect::Stale;
                }
                if let Some(other) = shards.values().find(|o| o.step != ack.step) {
                    return Effect::Abort(format!(
                        "ranks wrote checkpoint {} at different steps ({} and {}); the group is out of lockstep",
                        cmd, other.step, ack.step
                    ));
                }
                shards.insert(rank, ack);
                if shards.len() < self.world {
                    return Effect::Wait;
                }
                let at = shards[&Rank(0)].clone();
                let reports = shards.values().filter_map(|s| s.report.clone()).collect();
                let commit = ids.next();
                let step = at.step;
                self.stage = Stage::Committing { commit, at };
                Effect::SendCommit {
                    commit,
                    step,
                    reports,
                }
            }
            (Event::Finalized { cmd, dir }, Stage::Committing { commit, at }) => {
                if cmd != *commit {
                    return Effect::Stale;
                }
                if dir.is_empty() {
                    return Effect::Abort(format!(
                        "rank 0 finalized checkpoint step {} without naming its directory",
                        at.step
                    ));
                }
                Effect::Record(Committed {
                    reason: self.reason,
                    step: at.step,
                    tokens: at.tokens,
                    data_cursor: at.data_cursor,
                    dir,
                })
            }
            _ => Effect::Stale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(step: u64) -> ShardAck {
        ShardAck {
            step: Step(step),
            tokens: step * 10,
            data_cursor: step * 2,
            report: Some(ShardReport {
                files: vec![],
                tensors: Default::default(),
            }),
        }
    }

    #[test]
    fn commits_after_every_rank_then_records_rank_zeros_state() {
        let mut ids = CommandIds::default();
        let cmd = ids.next();
        let mut t = CheckpointTxn::new(cmd, Reason::Periodic, Step(10), 2);
        let w = |rank| Event::Written {
            cmd,
            rank: Rank(rank),
            ack: ack(10),
        };
        assert_eq!(t.on(w(1), &mut ids), Effect::Wait);
        // A duplicate of rank 1 changes nothing.
        assert_eq!(t.on(w(1), &mut ids), Effect::Wait);
        let Effect::SendCommit {
            commit,
            step,
            reports,
        } = t.on(w(0), &mut ids)
        else {
            panic!("expected a commit")
        };
        assert_eq!((step, reports.len()), (Step(10), 2));
        // Late shard acks after the commit was sent are stale.
        assert_eq!(t.on(w(0), &mut ids), Effect::Stale);
        assert_eq!(
            t.on(
                Event::Finalized {
                    cmd: CommandId(99),
                    dir: "x".into()
                },
                &mut ids
            ),
            Effect::Stale
        );
        let Effect::Record(c) = t.on(
            Event::Finalized {
                cmd: commit,
                dir: "/ck/job/step-10".into(),
            },
            &mut ids,
        ) else {
            panic!("expected a record")
        };
        assert_eq!((c.step, c.tokens, c.data_cursor), (Step(10), 100, 20));
    }

    #[test]
    fn ranks_at_different_steps_abort() {
        let mut ids = CommandIds::default();
        let cmd = ids.next();
        let mut t = CheckpointTxn::new(cmd, Reason::Manual, Step(0), 2);
        t.on(
            Event::Written {
                cmd,
                rank: Rank(0),
                ack: ack(5),
            },
            &mut ids,
        );
        assert!(matches!(
            t.on(
                Event::Written {
                    cmd,
                    rank: Rank(1),
                    ack: ack(6)
                },
                &mut ids
            ),
            Effect::Abort(_)
        ));
    }
}
