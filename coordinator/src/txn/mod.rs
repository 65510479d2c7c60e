//! The coordinator's transactions as pure state machines: events in, effects out; no I/O, no
//! locks, no clocks, no wire types. [`crate::domain`] is the one driver that feeds them events
//! (acks, lost ranks, operator commands) and carries out their effects (send a command, persist
//! a record, start an epoch, roll back) — in that order, persisting before it acts.
//!
//! - [`checkpoint`]: the two-phase checkpoint commit.
//! - [`growth`]: the growth transaction (checkpoint → [relayout] → stack → reshard → resume).
//! - [`job`]: the job lifecycle: the one phase [`job::transition`], epochs, rollback and its
//!   verdict, the restore point, scheduled work.
//!
//! `tests/simulation.rs` drives the driver with simulated workers through random interleavings
//! of acks, faults, restarts and operator commands, checking the invariants after every event.
pub mod checkpoint;
pub mod growth;
pub mod job;

use trellis_core::ids::CommandId;

/// Command ids of one epoch: 1, 2, 3, … (0 is "none").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommandIds {
    last: u64,
}

impl CommandIds {
    pub fn next(&mut self) -> CommandId {
        self.last += 1;
        CommandId(self.last)
    }
    /// A new epoch numbers its commands from 1 again.
    pub fn reset(&mut self) {
        self.last = 0;
    }
}

/// The transaction in flight, at most one per job.
#[derive(Debug, Clone, PartialEq)]
pub enum Txn {
    Checkpoint(checkpoint::CheckpointTxn),
    Growth(growth::GrowthTxn),
}
