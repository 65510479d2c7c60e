//! The growth transaction, top to bottom.
//!
//! ```text
//!                 grow (operator, or a spec stage)
//!                              │
//!                              ▼
//!    ┌──────────────────── Checkpoint ────────────────────┐  growth checkpoint, written holding:
//!    │                         │ committed                │  every rank writes, rank 0 commits
//!    │          layout changes?│                          │
//!    │            ┌──── yes ───┴──── no ────┐             │
//!    │            ▼                         │             │
//!    │        Relayout                      │             │  a new epoch at the new layout: every
//!    │            │ every rank ready        │             │  rank restores its slices, holding
//!    │            ▼                         ▼             │
//!    │          Stack ──▶ Reshard ──▶ Resume              │  one Grow command; each rank acks
//!    │                                  │                 │  every phase, in order
//!    │                                  ▼                 │
//!    │                               Resumed              │  generation, depth and layout change
//!    │                                                    │  together, in one state write
//!    └── a failed ack, a lost rank, a deadline ──▶ rolled back: the job restarts from the last
//!                                                  committed checkpoint (the growth checkpoint
//!                                                  once it is committed)
//! ```
//!
//! After `Resumed` the driver requests the post-growth checkpoint; its commit marks the growth's
//! record `done`. The machine is pure: it never reads a clock, sends or persists; the driver
//! ([`crate::domain`]) carries out the [`Effect`]s in order.
use super::checkpoint::{self, CheckpointTxn, Committed};
use super::CommandIds;
use crate::state::LayoutInfo;
use std::collections::{BTreeMap, BTreeSet};
use trellis_core::checkpoint::ShardReport;
use trellis_core::ids::{CommandId, Generation, Rank, Step};

/// The phases every rank acks for the Grow command, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WorkerPhase {
    Stack,
    Reshard,
    Resume,
}

impl WorkerPhase {
    fn next(self) -> Option<WorkerPhase> {
        match self {
            WorkerPhase::Stack => Some(WorkerPhase::Reshard),
            WorkerPhase::Reshard => Some(WorkerPhase::Resume),
            WorkerPhase::Resume => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    Checkpoint(CheckpointTxn),
    /// Re-forming the groups at the new layout; the ranks whose runner is ready.
    Relayout {
        ready: BTreeSet<Rank>,
    },
    /// The Grow command is out; the phase not yet acked by every rank, and every ack so far.
    Worker {
        cmd: CommandId,
        phase: WorkerPhase,
        acks: BTreeMap<WorkerPhase, BTreeSet<Rank>>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrowthTxn {
    /// The generation this growth produces.
    pub generation: Generation,
    /// Ranks in the group (the same before and after a re-layout).
    pub world: usize,
    /// The layout the grown model trains at, when it differs from the current one.
    pub relayout: Option<LayoutInfo>,
    pub stage: Stage,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An event of the growth checkpoint.
    Checkpoint(checkpoint::Event),
    /// A rank's runner is ready in a new epoch (its `assign` ack).
    RankReady(Rank),
    /// A rank finished a phase of the Grow command `cmd`.
    Phase {
        cmd: CommandId,
        phase: WorkerPhase,
        rank: Rank,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The growth checkpoint: send its commit to rank 0.
    SendCommit {
        commit: CommandId,
        step: Step,
        reports: Vec<ShardReport>,
    },
    /// The growth checkpoint is committed: record it (the rollback point of this growth).
    CheckpointCommitted(Committed),
    /// Re-form the groups at this layout: a new epoch whose ranks restore the growth
    /// checkpoint and hold.
    StartRelayout(LayoutInfo),
    /// Every rank holds its slices at the new layout.
    RelayoutDone,
    /// Send the Grow command (stack, reshard, resume) as `cmd`.
    SendGrow { cmd: CommandId },
    /// Every rank finished this phase.
    PhaseDone(WorkerPhase),
    /// Every rank resumed with the grown model: commit generation, depth and layout together.
    Resumed,
    /// The transaction cannot go on; the driver rolls the job back.
    Abort(String),
}

impl GrowthTxn {
    /// A growth to `generation`; its checkpoint is command `ckpt_cmd` at `at_step`.
    pub fn new(
        generation: Generation,
        world: usize,
        relayout: Option<LayoutInfo>,
        ckpt_cmd: CommandId,
        at_step: Step,
    ) -> GrowthTxn {
        GrowthTxn {
            generation,
            world,
            relayout,
            stage: Stage::Checkpoint(CheckpointTxn::new(
                ckpt_cmd,
                checkpoint::Reason::Growth,
                at_step,
                world,
            )),
        }
    }

    /// The growth checkpoint, while it is not committed.
    pub fn checkpoint(&self) -> Option<&CheckpointTxn> {
        match &self.stage {
            Stage::Checkpoint(c) => Some(c),
            _ => None,
        }
    }

    /// Re-forming the groups at the new layout (the driver assigns ranks at that layout).
    pub fn relayout_in_progress(&self) -> Option<&LayoutInfo> {
        match &self.stage {
            Stage::Relayout { .. } => self.relayout.as_ref(),
            _ => None,
        }
    }

    /// Feed one event; the effects are in the order the driver must carry them out.
    pub fn on(&mut self, ev: Event, ids: &mut CommandIds) -> Vec<Effect> {
        match (ev, &mut self.stage) {
            (Event::Checkpoint(e), Stage::Checkpoint(c)) => match c.on(e, ids) {
                checkpoint::Effect::Wait | checkpoint::Effect::Stale => vec![],
                checkpoint::Effect::Abort(why) => vec![Effect::Abort(why)],
                checkpoint::Effect::SendCommit {
                    commit,
                    step,
                    reports,
                } => vec![Effect::SendCommit {
                    commit,
                    step,
                    reports,
                }],
                checkpoint::Effect::Record(committed) => {
                    let mut out = vec![Effect::CheckpointCommitted(committed)];
                    match self.relayout.clone() {
                        Some(layout) => {
                            self.stage = Stage::Relayout {
                                ready: BTreeSet::new(),
                            };
                            out.push(Effect::StartRelayout(layout));
                        }
                        None => out.push(self.send_grow(ids)),
                    }
                    out
                }
            },
            (Event::RankReady(rank), Stage::Relayout { ready }) => {
                if rank.0 as usize >= self.world {
                    return vec![];
                }
                ready.insert(rank);
                if ready.len() < self.world {
                    return vec![];
                }
                vec![Effect::RelayoutDone, self.send_grow(ids)]
            }
            (
                Event::Phase {
                    cmd: c,
                    phase: p,
                    rank,
                },
                Stage::Worker { cmd, phase, acks },
            ) => {
                if c != *cmd || rank.0 as usize >= self.world || p < *phase {
                    return vec![];
                }
                acks.entry(p).or_default().insert(rank);
                // Acks of one rank come in order but ranks interleave: one ack may complete
                // several phases.
                let mut out = vec![];
                while acks.get(phase).map_or(0, |s| s.len()) >= self.world {
                    out.push(Effect::PhaseDone(*phase));
                    match phase.next() {
                        Some(n) => *phase = n,
                        None => {
                            out.push(Effect::Resumed);
                            break;
                        }
                    }
                }
                out
            }
            _ => vec![],
        }
    }

    fn send_grow(&mut self, ids: &mut CommandIds) -> Effect {
        let cmd = ids.next();
        self.stage = Stage::Worker {
            cmd,
            phase: WorkerPhase::Stack,
            acks: BTreeMap::new(),
        };
        Effect::SendGrow { cmd }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use checkpoint::ShardAck;

    fn written(cmd: CommandId, rank: u32) -> Event {
        Event::Checkpoint(checkpoint::Event::Written {
            cmd,
            rank: Rank(rank),
            ack: ShardAck {
                step: Step(20),
                tokens: 200,
                data_cursor: 40,
                report: None,
            },
        })
    }

    fn commit_and_grow(t: &mut GrowthTxn, ids: &mut CommandIds, ckpt: CommandId) -> Vec<Effect> {
        assert!(t.on(written(ckpt, 0), ids).is_empty());
        let Effect::SendCommit { commit, .. } = t.on(written(ckpt, 1), ids).remove(0) else {
            panic!("expected the commit")
        };
        t.on(
            Event::Checkpoint(checkpoint::Event::Finalized {
                cmd: commit,
                dir: "/ck/j/step-20".into(),
            }),
            ids,
        )
    }

    #[test]
    fn same_layout_goes_checkpoint_stack_reshard_resume() {
        let mut ids = CommandIds::default();
        let ckpt = ids.next();
        let mut t = GrowthTxn::new(Generation(1), 2, None, ckpt, Step(20));
        let eff = commit_and_grow(&mut t, &mut ids, ckpt);
        assert!(matches!(eff[0], Effect::CheckpointCommitted(_)));
        let Effect::SendGrow { cmd } = eff[1] else {
            panic!("expected the grow command")
        };
        let ph = |phase, rank| Event::Phase {
            cmd,
            phase,
            rank: Rank(rank),
        };
        // Rank 0 runs ahead through all three phases; rank 1's acks then complete each.
        for p in [
            WorkerPhase::Stack,
            WorkerPhase::Reshard,
            WorkerPhase::Resume,
        ] {
            assert!(t.on(ph(p, 0), &mut ids).is_empty());
        }
        assert_eq!(
            t.on(ph(WorkerPhase::Stack, 1), &mut ids),
            vec![Effect::PhaseDone(WorkerPhase::Stack)]
        );
        // A duplicate changes nothing; an ack of another command is ignored.
        assert!(t.on(ph(WorkerPhase::Stack, 1), &mut ids).is_empty());
        assert!(t
            .on(
                Event::Phase {
                    cmd: CommandId(999),
                    phase: WorkerPhase::Reshard,
                    rank: Rank(1)
                },
                &mut ids
            )
            .is_empty());
        assert_eq!(
            t.on(ph(WorkerPhase::Reshard, 1), &mut ids),
            vec![Effect::PhaseDone(WorkerPhase::Reshard)]
        );
        assert_eq!(
            t.on(ph(WorkerPhase::Resume, 1), &mut ids),
            vec![Effect::PhaseDone(WorkerPhase::Resume), Effect::Resumed]
        );
    }

    #[test]
    fn a_new_layout_relayouts_before_the_stack() {
        let mut ids = CommandIds::default();
        let ckpt = ids.next();
        let layout = LayoutInfo {
            dp: 1,
            tp: 2,
            ..Default::default()
        };
        let mut t = GrowthTxn::new(Generation(1), 2, Some(layout.clone()), ckpt, Step(20));
        let eff = commit_and_grow(&mut t, &mut ids, ckpt);
        assert_eq!(eff[1], Effect::StartRelayout(layout.clone()));
        assert_eq!(t.relayout_in_progress(), Some(&layout));
        assert!(t.on(Event::RankReady(Rank(1)), &mut ids).is_empty());
        let eff = t.on(Event::RankReady(Rank(0)), &mut ids);
        assert_eq!(eff[0], Effect::RelayoutDone);
        assert!(matches!(eff[1], Effect::SendGrow { .. }));
    }
}
