//! The layout planner: choose TP × DP from model config, world size and per-rank memory
//! (DESIGN §4), and explain the choice.
use crate::config::ModelConfig;
use crate::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub grads: u64,
    pub adam: u64,
    pub activations: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayoutPlan {
    pub dp: usize,
    pub tp: usize,
    pub per_rank: MemoryEstimate,
    pub budget_bytes: u64,
    /// A sentence a person reads in `coordctl status`.
    pub explanation: String,
}

/// Bytes per rank for `cfg` at tensor-parallel degree `tp` (fp32 weights, grads and two Adam
/// moments; activations at `micro_batch × seq_len`).
pub fn memory_per_rank(cfg: &ModelConfig, tp: usize, micro_batch: usize, seq_len: usize) -> MemoryEstimate {
    todo!("H1 {} {tp} {micro_batch} {seq_len}", cfg.hidden_size)
}

/// The smallest TP (a divisor of `world` that divides heads, KV heads and FFN) whose per-rank
/// memory fits `budget_bytes`; DP = world / TP. Refuses with the numbers when nothing fits.
pub fn plan_layout(
    cfg: &ModelConfig,
    world: usize,
    budget_bytes: u64,
    micro_batch: usize,
    seq_len: usize,
) -> Result<LayoutPlan> {
    todo!("H1 {} {world} {budget_bytes} {micro_batch} {seq_len}", cfg.hidden_size)
}
