//! Trellis domain logic that needs no libtorch.
//!
//! Everything here is plain Rust so that `coordctl` (which never links libtorch), the
//! coordinator and the worker share one definition of the model config, the job spec, the
//! growth plan and the checkpoint format.

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod growth;
pub mod guideline;
pub mod hf;
pub mod ids;
pub mod import;
pub mod job;
pub mod layout;
pub mod offline;
pub mod paths;
pub mod plot;

pub use error::{Error, Result};
