//! The Trellis training worker: LLaMA in tch ([`model`]), AdamW with growable moments
//! ([`optim`]), the LR schedule ([`schedule`]), the online growth executor ([`grow`]), one
//! rank's training loop ([`trainer`]), checkpoint evaluation ([`eval`]), text generation ([`generate`]) and the standalone
//! one-process job runner ([`standalone`]); tensor/data parallelism and resharding around the
//! single-device model ([`parallel`]).
pub mod error;
pub mod eval;
pub mod generate;
pub mod grow;
pub mod host;
pub mod init;
pub mod managed;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod report;
pub mod schedule;
pub mod standalone;
pub mod trainer;

pub use error::{Error, Result};
pub use grow::GrowthTimings;
pub use host::{from_host, to_host};
pub use trainer::{PostGrowthSchedule, StepReport, Trainer};
