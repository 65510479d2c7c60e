//! The Trellis coordinator (docs/design.md): the single source of truth for a job.
//!
//! - [`txn`]: the transactions as pure state machines — checkpoint commit, growth, the job
//!   lifecycle (epochs, rollback) — events in, effects out, no I/O.
//! - [`domain`]: the one driver: membership, lockstep commands, fencing; feeds the transactions
//!   events and carries out their effects over a `StateStore` (persist before acting).
//! - [`plan`]: admission checks and layout planning; [`views`]: status encoding;
//!   [`wire`]: worker and operator messages decoded at the edge.
//! - [`persist`]: the one writer of state to the store (queued, in order, retried), so that
//!   no store I/O happens under the domain lock.
//! - [`loss`]: the loss watcher (history, EMA, NaN / spike / plateau).
//! - [`service`]: thin tonic handlers; [`server`]: wiring (gRPC + health + reflection +
//!   `/metrics`).
//! - [`error`]: the crate's one error enum and its one conversion to `tonic::Status`.
//! - [`security`]: mTLS, the plaintext rule, allowed roots; [`limits`]: message size, worker
//!   and `Watch` stream bounds.

pub mod config;
pub mod domain;
pub mod error;
pub mod limits;
pub mod loss;
pub mod metrics;
pub mod persist;
pub mod plan;
pub mod security;
pub mod server;
pub mod service;
pub mod state;
pub mod tracking;
pub mod txn;
pub mod views;
pub mod wire;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
