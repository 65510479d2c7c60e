//! The layout planner: choose TP × DP from model config, world size and per-rank memory
//! (docs/design.md §4), and explain the choice.
use crate::config::ModelConfig;
use crate::{Error, Result};
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

/// Bytes per fp32 value.
const F32: u64 = 4;
/// Activation bytes per token per layer, in units of `hidden_size`, for fp32: twice the 34
/// bytes/(token·h) of 16-bit training in Korthikanti et al., "Reducing Activation Recomputation in
/// Large Transformer Models" (2022), of which 20 (fp16: 10) are replicated across TP ranks
/// (norm inputs and outputs, residuals) and 48 (fp16: 24) are split (q, k, v, attention output,
/// MLP intermediates). Their count includes dropout masks, which Trellis does not use: a little
/// headroom.
pub const ACT_REPLICATED_PER_H: u64 = 20;
pub const ACT_SPLIT_PER_H: u64 = 48;
/// Attention-score bytes per token per layer, in units of `heads · seq_len`, for fp32 without a
/// fused attention kernel (scores and softmax output kept for backward; Korthikanti's `5·a·s`
/// at 16 bit, doubled). Split across TP ranks with the heads.
pub const ACT_SCORES_PER_HS: u64 = 10;
/// Logit bytes per token in units of `vocab_size`: fp32 logits and their gradient (the
/// `lm_head` is replicated, so the logits are not split across TP ranks).
pub const ACT_LOGITS_PER_V: u64 = 8;

const GIB: f64 = (1u64 << 30) as f64;

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / GIB)
}

/// Bytes per rank for `cfg` at tensor-parallel degree `tp` (fp32 weights, grads and two Adam
/// moments; activations at `micro_batch × seq_len`).
///
/// The Megatron-split projections (`q,k,v,o,gate,up,down`) are divided by `tp`; embeddings,
/// norms and `lm_head` are replicated on every rank. Activations per rank, in bytes:
/// `mb·s·[L·(20·h + 48·h/tp + 10·a·s/tp) + 8·V]` (see the constants above; an upper bound for a
/// non-fused attention kernel). `tp = 0` is treated as 1.
pub fn memory_per_rank(
    cfg: &ModelConfig,
    tp: usize,
    micro_batch: usize,
    seq_len: usize,
) -> MemoryEstimate {
    let tp = tp.max(1) as u64;
    let h = cfg.hidden_size as u64;
    let q = cfg.q_dim() as u64;
    let kv = cfg.kv_dim() as u64;
    let f = cfg.intermediate_size as u64;
    let v = cfg.vocab_size as u64;
    let l = cfg.num_hidden_layers as u64;
    let heads = cfg.num_attention_heads as u64;
    let split_per_layer = 2 * h * q + 2 * h * kv + 3 * h * f;
    // The embedding (and the head, unless tied to it) and every norm.
    let replicated = cfg.embedding_matrices() * v * h + h + l * 2 * h;
    let params = (l * split_per_layer).div_ceil(tp) + replicated;
    let weights = F32 * params;
    let grads = F32 * params;
    let adam = 2 * F32 * params;
    let tokens = (micro_batch as u64).saturating_mul(seq_len as u64);
    let s = seq_len as u64;
    let per_token_layer = ACT_REPLICATED_PER_H * h
        + (ACT_SPLIT_PER_H * h + ACT_SCORES_PER_HS * heads * s).div_ceil(tp);
    let per_token = l * per_token_layer + ACT_LOGITS_PER_V * v;
    let activations = tokens.saturating_mul(per_token);
    let total = weights
        .saturating_add(grads)
        .saturating_add(adam)
        .saturating_add(activations);
    MemoryEstimate {
        weights,
        grads,
        adam,
        activations,
        total,
    }
}

/// The TP degrees `cfg` allows on `world` ranks: divisors of `world` that divide the attention
/// heads, the KV heads and the FFN width, ascending.
pub fn valid_tps(cfg: &ModelConfig, world: usize) -> Vec<usize> {
    (1..=world)
        .filter(|&t| {
            world % t == 0
                && cfg.num_attention_heads % t == 0
                && cfg.num_key_value_heads % t == 0
                && cfg.intermediate_size % t == 0
        })
        .collect()
}

fn describe(m: &MemoryEstimate) -> String {
    format!(
        "{} per rank (weights {}, grads {}, Adam {}, activations {})",
        gib(m.total),
        gib(m.weights),
        gib(m.grads),
        gib(m.adam),
        gib(m.activations)
    )
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
    if world == 0 {
        return Err(Error::Layout(
            "world size must be at least 1; start at least one worker".into(),
        ));
    }
    if micro_batch == 0 || seq_len == 0 {
        return Err(Error::Layout(format!(
            "micro_batch ({micro_batch}) and seq_len ({seq_len}) must be at least 1"
        )));
    }
    cfg.validate()
        .map_err(|e| Error::Layout(format!("cannot plan a layout for an invalid model: {e}")))?;
    let tps = valid_tps(cfg, world);
    let estimates: Vec<(usize, MemoryEstimate)> = tps
        .iter()
        .map(|&t| (t, memory_per_rank(cfg, t, micro_batch, seq_len)))
        .collect();
    // u64::MAX (or anything past an exabyte) means "no budget configured".
    let budget = if budget_bytes >= 1 << 60 {
        "unlimited (no per-rank memory budget configured)".to_string()
    } else {
        format!("{} budget", gib(budget_bytes))
    };
    if let Some((tp, m)) = estimates.iter().find(|(_, m)| m.total <= budget_bytes) {
        let dp = world / tp;
        let mut explanation = format!(
            "TP={tp} × DP={dp} on {world} rank(s): {} fits the {budget}",
            describe(m)
        );
        if let Some((smaller, sm)) = estimates.iter().rfind(|(t, _)| t < tp) {
            explanation.push_str(&format!("; TP={smaller} would need {}", gib(sm.total)));
        }
        return Ok(LayoutPlan {
            dp,
            tp: *tp,
            per_rank: m.clone(),
            budget_bytes,
            explanation,
        });
    }
    // Nothing fits: report the best (smallest memory) valid TP.
    let (best_tp, best) = estimates
        .iter()
        .min_by_key(|(_, m)| m.total)
        .cloned()
        .unwrap_or_else(|| (1, memory_per_rank(cfg, 1, micro_batch, seq_len)));
    Err(Error::Layout(format!(
        "the model ({} layers, {:.2}B parameters) does not fit: at the best TP={best_tp} of {world} rank(s) it needs {}, over the {budget}; valid TP degrees here are {:?}; add ranks (TP up to {}), use devices with more memory, or lower micro_batch / seq_len",
        cfg.num_hidden_layers,
        cfg.num_parameters() as f64 / 1e9,
        describe(&best),
        tps,
        largest_tp_hint(cfg),
    )))
}

/// The largest TP the model's shape allows at all (heads, KV heads and FFN divisible).
fn largest_tp_hint(cfg: &ModelConfig) -> usize {
    let g = gcd(
        gcd(cfg.num_attention_heads, cfg.num_key_value_heads),
        cfg.intermediate_size,
    );
    g.max(1)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    #[test]
    fn weights_grads_adam_are_16_bytes_per_param_at_tp1() {
        let cfg = ModelConfig::preset("small", 4096).unwrap();
        let m = memory_per_rank(&cfg, 1, 4, 128);
        let p = cfg.num_parameters();
        assert_eq!(m.weights, 4 * p);
        assert_eq!(m.grads, 4 * p);
        assert_eq!(m.adam, 8 * p);
        assert_eq!(m.total, m.weights + m.grads + m.adam + m.activations);
        // TP splits only the projections.
        let m2 = memory_per_rank(&cfg, 2, 4, 128);
        let split =
            cfg.num_hidden_layers as u64 * (cfg.layer_parameters() - 2 * cfg.hidden_size as u64);
        assert_eq!(m.weights - m2.weights, 4 * split / 2);
        assert!(m2.activations < m.activations);
        // Activations scale with the micro-batch.
        assert_eq!(
            memory_per_rank(&cfg, 1, 8, 128).activations,
            2 * m.activations
        );
    }

    #[test]
    fn small_model_gets_pure_dp() {
        let cfg = ModelConfig::preset("tiny", 512).unwrap();
        let p = plan_layout(&cfg, 4, 8 * G, 8, 256).unwrap();
        assert_eq!((p.tp, p.dp), (1, 4));
        assert!(p.explanation.contains("TP=1 × DP=4"), "{}", p.explanation);
    }

    #[test]
    fn seven_b_needs_tensor_parallelism() {
        let cfg = ModelConfig::preset("7b", 32000).unwrap();
        let p = plan_layout(&cfg, 8, 80 * G, 1, 2048).unwrap();
        assert!(p.tp > 1 && p.tp * p.dp == 8, "{p:?}");
        assert!(p.per_rank.total <= 80 * G);
        let smaller = memory_per_rank(&cfg, p.tp / 2, 1, 2048);
        assert!(smaller.total > 80 * G);
        assert!(
            p.explanation
                .contains(&format!("TP={} would need", p.tp / 2)),
            "{}",
            p.explanation
        );
    }

    #[test]
    fn refusal_gives_gib_numbers() {
        let cfg = ModelConfig::preset("7b", 32000).unwrap();
        let e = plan_layout(&cfg, 2, 16 * G, 1, 2048).unwrap_err();
        assert!(matches!(e, Error::Layout(_)));
        let m = e.to_string();
        let need = memory_per_rank(&cfg, 2, 1, 2048).total as f64 / G as f64;
        assert!(
            m.contains("best TP=2")
                && m.contains(&format!("{need:.2} GiB"))
                && m.contains("16.00 GiB"),
            "{m}"
        );
    }

    #[test]
    fn tp_must_divide_heads_kv_heads_and_ffn() {
        let cfg = ModelConfig::preset("1b", 32000).unwrap(); // 32 heads, 4 KV heads
        assert_eq!(valid_tps(&cfg, 8), vec![1, 2, 4]);
        assert_eq!(valid_tps(&cfg, 6), vec![1, 2]);
        // With a budget only TP=8 would meet, the planner refuses rather than break GQA.
        let need4 = memory_per_rank(&cfg, 4, 1, 1024).total;
        let e = plan_layout(&cfg, 8, need4 - 1, 1, 1024)
            .unwrap_err()
            .to_string();
        assert!(e.contains("best TP=4"), "{e}");
        assert!(plan_layout(&cfg, 8, need4, 1, 1024).unwrap().tp == 4);
    }

    #[test]
    fn bad_input_is_refused() {
        let cfg = ModelConfig::preset("tiny", 512).unwrap();
        assert!(plan_layout(&cfg, 0, G, 1, 16).is_err());
        assert!(plan_layout(&cfg, 1, G, 0, 16).is_err());
        assert!(plan_layout(&cfg, 1, 0, 1, 16).is_err());
        let _ = memory_per_rank(&cfg, 0, 1, 16);
    }
}
