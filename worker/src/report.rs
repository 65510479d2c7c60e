//! What one optimizer step reports ([`StepReport`]): a plain record shared by the trainer, the
//! error type (a non-finite loss carries its report) and the drivers.
use std::ops::Range;

/// One optimizer step's report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepReport {
    /// Optimizer steps completed (after this one).
    pub step: u64,
    /// Training tokens consumed by the whole job (all ranks) after this step.
    pub tokens: u64,
    /// Mean training loss of this step's global batch.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub step_seconds: f64,
    pub compute_seconds: f64,
    pub comm_seconds: f64,
    pub data_seconds: f64,
    /// Global sample ids this rank read (block `dp_rank` of `step_samples`).
    pub samples: Range<u64>,
    /// Global sample ids the whole step read, over every DP rank (`global_batch` ids, after
    /// any skipped window).
    pub step_samples: Range<u64>,
    /// Global tokens per second of this step.
    pub tokens_per_second: f64,
}
