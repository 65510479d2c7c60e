//! The growth transaction, top to bottom.
//!
//! ```text
//!                 grow (operator, or a spec stage)
//!                              │
//!            layout unchanged  │  layout changes
//!         ┌────────────────────┴─────────────────────┐
//!         ▼                                          ▼
//!   Checkpoint + Grow sent together          Checkpoint (holding) ──▶ recorded
//!   each rank: snapshot, stack, reshard,             │
//!   resume, train the grown model; the               ▼
//!   snapshot's files are written behind       Relayout: a new epoch restores the
//!         │                         │         growth checkpoint at the new layout
//!         ▼                         ▼                │ every rank ready
//!   Stack ─▶ Reshard ─▶ Resume   shards durable      ▼
//!         │ (every rank)            │ ─▶ commit   Stack ─▶ Reshard ─▶ Resume
//!         ▼                         ▼   recorded     │
//!      Resumed: generation,    CheckpointCommitted   ▼
//!      depth, layout change         │            Resumed + Committed
//!         └──────────┬──────────────┘
//!                    ▼  (both, in either order)
//!                Committed: the growth is done; the restore point is the growth checkpoint
//!                + this growth's plan
//!
//!   a failed ack (a write too), a lost rank, a deadline ──▶ rolled back: the job restarts from
//!   its previous restore point; never half-grown
//! ```
//!
//! The machine is pure: it never reads a clock, sends or persists; the driver
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
    /// Re-layout only: the growth checkpoint must be recorded before the groups are re-formed
    /// from it.
    AwaitCheckpoint,
    /// Re-forming the groups at the new layout; the ranks whose runner is ready.
    Relayout { ready: BTreeSet<Rank> },
    /// The Grow command is out; the phase not yet acked by every rank, and every ack so far.
    Worker {
        cmd: CommandId,
        phase: WorkerPhase,
        acks: BTreeMap<WorkerPhase, BTreeSet<Rank>>,
    },
    /// Every rank resumed with the grown model; the growth checkpoint is not recorded yet.
    Resumed,
}

/// What the growth checkpoint holds: the job as it stood when the growth began (recorded with
/// the checkpoint, which may be recorded after the job moved to the grown generation).
#[derive(Debug, Clone, PartialEq)]
pub struct Before {
    pub generation: Generation,
    pub layers: usize,
    pub layout: LayoutInfo,
    pub next_growth_stage: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrowthTxn {
    /// The generation this growth produces.
    pub generation: Generation,
    /// Ranks in the group (the same before and after a re-layout).
    pub world: usize,
    /// The layout the grown model trains at, when it differs from the current one.
    pub relayout: Option<LayoutInfo>,
    pub before: Before,
    /// The growth checkpoint, until it is recorded.
    pub checkpoint: Option<CheckpointTxn>,
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
    /// The growth checkpoint is committed: record it (as [`Before`] describes it).
    CheckpointCommitted(Committed),
    /// Re-form the groups at this layout: a new epoch whose ranks restore the growth
    /// checkpoint and hold.
    StartRelayout(LayoutInfo),
    /// Every rank holds its slices at the new layout.
    RelayoutDone,
    /// Send the Grow command (stack, reshard, resume) as `cmd` (after a re-layout; at an
    /// unchanged layout it goes out with the checkpoint).
    SendGrow { cmd: CommandId },
    /// Every rank finished this phase.
    PhaseDone(WorkerPhase),
    /// Every rank resumed with the grown model: generation, depth and layout change together.
    Resumed,
    /// The growth checkpoint is recorded and every rank resumed: the growth is done, and the
    /// restore point is that checkpoint + this growth's plan.
    Committed,
    /// The transaction cannot go on; the driver rolls the job back.
    Abort(String),
}

impl GrowthTxn {
    /// A growth to `generation` whose checkpoint is taken at `at_step`. At an unchanged layout
    /// the Grow command's id is taken too: the driver sends both commands at once
    /// ([`GrowthTxn::checkpoint_cmd`], [`GrowthTxn::grow_cmd`]).
    pub fn new(
        generation: Generation,
        world: usize,
        relayout: Option<LayoutInfo>,
        before: Before,
        at_step: Step,
        ids: &mut CommandIds,
    ) -> GrowthTxn {
        let ckpt = CheckpointTxn::new(ids.next(), checkpoint::Reason::Growth, at_step, world);
        let stage = match relayout {
            Some(_) => Stage::AwaitCheckpoint,
            None => Stage::Worker {
                cmd: ids.next(),
                phase: WorkerPhase::Stack,
                acks: BTreeMap::new(),
            },
        };
        GrowthTxn {
            generation,
            world,
            relayout,
            before,
            checkpoint: Some(ckpt),
            stage,
        }
    }

    /// The growth checkpoint's command.
    pub fn checkpoint_cmd(&self) -> Option<CommandId> {
        self.checkpoint.as_ref().map(|c| c.cmd)
    }

    /// The Grow command, once it is issued.
    pub fn grow_cmd(&self) -> Option<CommandId> {
        match &self.stage {
            Stage::Worker { cmd, .. } => Some(*cmd),
            _ => None,
        }
    }

    /// The Grow command went out: the ranks stack, then train the grown model.
    pub fn grow_sent(&self) -> bool {
        matches!(self.stage, Stage::Worker { .. } | Stage::Resumed)
    }

    /// The growth checkpoint, while it is not recorded.
    pub fn checkpoint(&self) -> Option<&CheckpointTxn> {
        self.checkpoint.as_ref()
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
            (Event::Checkpoint(e), _) => {
                let Some(c) = self.checkpoint.as_mut() else {
                    return vec![];
                };
                match c.on(e, ids) {
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
                        self.checkpoint = None;
                        let mut out = vec![Effect::CheckpointCommitted(committed)];
                        match &self.stage {
                            Stage::AwaitCheckpoint => {
                                let layout = self.relayout.clone().expect("a re-layout growth");
                                self.stage = Stage::Relayout {
                                    ready: BTreeSet::new(),
                                };
                                out.push(Effect::StartRelayout(layout));
                            }
                            Stage::Resumed => out.push(Effect::Committed),
                            _ => {}
                        }
                        out
                    }
                }
            }
            (Event::RankReady(rank), Stage::Relayout { ready }) => {
                if rank.0 as usize >= self.world {
                    return vec![];
                }
                ready.insert(rank);
                if ready.len() < self.world {
                    return vec![];
                }
                let cmd = ids.next();
                self.stage = Stage::Worker {
                    cmd,
                    phase: WorkerPhase::Stack,
                    acks: BTreeMap::new(),
                };
                vec![Effect::RelayoutDone, Effect::SendGrow { cmd }]
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
                            self.stage = Stage::Resumed;
                            if self.checkpoint.is_none() {
                                out.push(Effect::Committed);
                            }
                            break;
                        }
                    }
                }
                out
            }
            _ => vec![],
        }
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

    fn before() -> Before {
        Before {
            generation: Generation(0),
            layers: 2,
            layout: LayoutInfo::default(),
            next_growth_stage: 0,
        }
    }

    /// Both ranks' shards, then rank 0's commit: the effects of the last event.
    fn write_and_commit(t: &mut GrowthTxn, ids: &mut CommandIds) -> Vec<Effect> {
        let ckpt = t.checkpoint_cmd().expect("a checkpoint in flight");
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

    fn ph(cmd: CommandId, phase: WorkerPhase, rank: u32) -> Event {
        Event::Phase {
            cmd,
            phase,
            rank: Rank(rank),
        }
    }

    #[test]
    fn same_layout_stacks_while_the_checkpoint_is_written_and_commits_after_both() {
        let mut ids = CommandIds::default();
        let mut t = GrowthTxn::new(Generation(1), 2, None, before(), Step(20), &mut ids);
        // Both commands are issued at once: the checkpoint's, then the Grow.
        let (ckpt, cmd) = (t.checkpoint_cmd().unwrap(), t.grow_cmd().unwrap());
        assert!(ckpt < cmd);
        // Rank 0 runs ahead through all three phases; rank 1's acks then complete each.
        for p in [
            WorkerPhase::Stack,
            WorkerPhase::Reshard,
            WorkerPhase::Resume,
        ] {
            assert!(t.on(ph(cmd, p, 0), &mut ids).is_empty());
        }
        assert_eq!(
            t.on(ph(cmd, WorkerPhase::Stack, 1), &mut ids),
            vec![Effect::PhaseDone(WorkerPhase::Stack)]
        );
        // A duplicate changes nothing; an ack of another command is ignored.
        assert!(t.on(ph(cmd, WorkerPhase::Stack, 1), &mut ids).is_empty());
        assert!(t
            .on(ph(CommandId(999), WorkerPhase::Reshard, 1), &mut ids)
            .is_empty());
        assert_eq!(
            t.on(ph(cmd, WorkerPhase::Reshard, 1), &mut ids),
            vec![Effect::PhaseDone(WorkerPhase::Reshard)]
        );
        // Every rank resumed before the checkpoint is durable: the grown model trains, the
        // growth is not committed.
        assert_eq!(
            t.on(ph(cmd, WorkerPhase::Resume, 1), &mut ids),
            vec![Effect::PhaseDone(WorkerPhase::Resume), Effect::Resumed]
        );
        assert_eq!(t.stage, Stage::Resumed);
        let eff = write_and_commit(&mut t, &mut ids);
        assert!(matches!(eff[0], Effect::CheckpointCommitted(_)));
        assert_eq!(eff[1..], [Effect::Committed]);
    }

    #[test]
    fn a_checkpoint_recorded_before_the_resume_commits_at_the_resume() {
        let mut ids = CommandIds::default();
        let mut t = GrowthTxn::new(Generation(1), 2, None, before(), Step(20), &mut ids);
        let cmd = t.grow_cmd().unwrap();
        let eff = write_and_commit(&mut t, &mut ids);
        assert_eq!(eff.len(), 1, "{eff:?}");
        assert!(matches!(eff[0], Effect::CheckpointCommitted(_)));
        for p in [WorkerPhase::Stack, WorkerPhase::Reshard] {
            t.on(ph(cmd, p, 0), &mut ids);
            t.on(ph(cmd, p, 1), &mut ids);
        }
        t.on(ph(cmd, WorkerPhase::Resume, 0), &mut ids);
        assert_eq!(
            t.on(ph(cmd, WorkerPhase::Resume, 1), &mut ids),
            vec![
                Effect::PhaseDone(WorkerPhase::Resume),
                Effect::Resumed,
                Effect::Committed
            ]
        );
    }

    #[test]
    fn a_new_layout_records_the_checkpoint_then_relayouts_before_the_stack() {
        let mut ids = CommandIds::default();
        let layout = LayoutInfo {
            dp: 1,
            tp: 2,
            ..Default::default()
        };
        let mut t = GrowthTxn::new(
            Generation(1),
            2,
            Some(layout.clone()),
            before(),
            Step(20),
            &mut ids,
        );
        assert_eq!(t.grow_cmd(), None, "no Grow before the re-layout");
        let eff = write_and_commit(&mut t, &mut ids);
        assert_eq!(eff[1], Effect::StartRelayout(layout.clone()));
        assert_eq!(t.relayout_in_progress(), Some(&layout));
        assert!(t.on(Event::RankReady(Rank(1)), &mut ids).is_empty());
        let eff = t.on(Event::RankReady(Rank(0)), &mut ids);
        assert_eq!(eff[0], Effect::RelayoutDone);
        let Effect::SendGrow { cmd } = eff[1] else {
            panic!("expected the Grow")
        };
        for p in [WorkerPhase::Stack, WorkerPhase::Reshard] {
            t.on(ph(cmd, p, 0), &mut ids);
            t.on(ph(cmd, p, 1), &mut ids);
        }
        t.on(ph(cmd, WorkerPhase::Resume, 0), &mut ids);
        let eff = t.on(ph(cmd, WorkerPhase::Resume, 1), &mut ids);
        assert_eq!(eff[1..], [Effect::Resumed, Effect::Committed]);
    }
}
