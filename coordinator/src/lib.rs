//! The Trellis coordinator (DESIGN §2–§3, §7–§8): the single source of truth for a job.
//!
//! - [`domain`]: the job state machine, membership, lockstep commands, checkpoint commits, the
//!   growth transaction, fencing — plain Rust over a `StateStore`, unit-testable.
//! - [`loss`]: the loss watcher (history, EMA, NaN / spike / plateau).
//! - [`service`]: thin tonic handlers; [`server`]: wiring (gRPC + health + reflection +
//!   `/metrics`).
//! - [`error`]: the crate's one error enum and its one conversion to `tonic::Status`.

pub mod config;
pub mod domain;
pub mod error;
pub mod loss;
pub mod metrics;
pub mod server;
pub mod service;
pub mod state;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
