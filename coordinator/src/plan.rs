//! Admission checks and layout planning: whether a submitted job's layout holds its model, the
//! layout a grown model trains at, and the checkpoint a job starts from (`init_from`). Pure
//! functions of the spec, the model and the per-rank budget (except `init_checkpoint`, which
//! reads the checkpoint).
use crate::error::{Error, Result};
use crate::state::{now_unix, CheckpointRecord, LayoutInfo};
use crate::txn::checkpoint::Reason;
use std::path::Path;
use trellis_core::config::ModelConfig;
use trellis_core::ids::{Generation, Step};
use trellis_core::job::JobSpec;
use trellis_core::layout::{memory_per_rank, plan_layout, valid_tps};

pub fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// The initial model config. The coordinator has no tokenizer: the vocabulary is the spec's
/// `model.vocab_size`, else `init_vocab` (a job from `checkpoint.init_from`: the checkpoint's,
/// [`init_checkpoint`]), else `data.vocab_size`.
pub fn model_config(spec: &JobSpec, init_vocab: Option<usize>) -> Result<ModelConfig> {
    let vocab = spec
        .model
        .vocab_size
        .or(init_vocab)
        .unwrap_or(spec.data.vocab_size);
    Ok(spec.model_config(vocab)?)
}

/// The spec's layout for `cfg` on `world` ranks, checked against the per-rank `budget`
/// (`None` = unlimited), with the planner's explanation.
pub fn submitted_layout(
    spec: &JobSpec,
    cfg: &ModelConfig,
    world: usize,
    budget: Option<u64>,
) -> Result<LayoutInfo> {
    let limit = budget.unwrap_or(u64::MAX);
    let per_rank = spec.train.global_batch / spec.parallel.dp.max(1);
    let mb = spec.train.micro_batch.unwrap_or(per_rank);
    let tp = spec.parallel.tp;
    for (what, n) in [
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("intermediate_size", cfg.intermediate_size),
    ] {
        if n % tp != 0 {
            return Err(Error::InvalidArgument(format!(
                "{what} {n} is not divisible by parallel.tp {tp}; choose a tp that divides it"
            )));
        }
    }
    let est = memory_per_rank(cfg, tp, mb, spec.data.seq_len);
    if est.total > limit {
        return Err(Error::FailedPrecondition(format!(
            "a {}-layer model needs {:.2} GiB per rank at tp={tp} but the device budget is {:.2} GiB \
             (--device-memory-bytes); raise parallel.tp, lower train.micro_batch, or use a smaller model",
            cfg.num_hidden_layers,
            gib(est.total),
            gib(limit)
        )));
    }
    let explanation = match plan_layout(cfg, world, limit, mb, spec.data.seq_len) {
        Ok(p) if p.tp == tp => p.explanation,
        Ok(p) => format!(
            "spec layout dp={} tp={tp} ({:.2} GiB per rank); the planner would choose dp={} tp={}: {}",
            spec.parallel.dp,
            gib(est.total),
            p.dp,
            p.tp,
            p.explanation
        ),
        Err(e) => format!(
            "spec layout dp={} tp={tp} ({:.2} GiB per rank); planner: {e}",
            spec.parallel.dp,
            gib(est.total)
        ),
    };
    Ok(LayoutInfo {
        dp: spec.parallel.dp,
        tp,
        explanation,
        memory_per_rank_bytes: est.total,
        budget_bytes: budget.unwrap_or(0),
    })
}

/// The layout a grown model (`cfg`) trains at: the current one while it fits the per-rank
/// budget (no reshard), else the smallest TP of the same world that fits (DP = world / TP,
/// dividing the global batch). Refuses with the numbers when no layout holds it.
pub fn growth_layout(
    spec: &JobSpec,
    cfg: &ModelConfig,
    world: usize,
    cur: &LayoutInfo,
    budget: Option<u64>,
) -> Result<LayoutInfo> {
    let limit = budget.unwrap_or(u64::MAX);
    let seq = spec.data.seq_len;
    let need = |tp: usize| {
        let dp = world / tp;
        let mb = spec
            .train
            .micro_batch
            .unwrap_or(spec.train.global_batch / dp.max(1));
        memory_per_rank(cfg, tp, mb.max(1), seq).total
    };
    // The TP degrees the model allows on this world whose DP divides the global batch.
    let candidates: Vec<usize> = valid_tps(cfg, world)
        .into_iter()
        .filter(|&t| spec.train.global_batch % (world / t) == 0)
        .collect();
    let budget_text = if budget.is_some() {
        format!("the {:.2} GiB per-rank budget", gib(limit))
    } else {
        "the unlimited budget (no --device-memory-bytes)".to_string()
    };
    let layers = cfg.num_hidden_layers;
    if candidates.contains(&cur.tp) && need(cur.tp) <= limit {
        return Ok(LayoutInfo {
            dp: cur.dp,
            tp: cur.tp,
            explanation: format!(
                "TP={} × DP={} kept at growth: the {layers}-layer model needs {:.2} GiB per rank, within {budget_text}",
                cur.tp,
                cur.dp,
                gib(need(cur.tp))
            ),
            memory_per_rank_bytes: need(cur.tp),
            budget_bytes: budget.unwrap_or(0),
        });
    }
    if let Some(&tp) = candidates.iter().find(|&&t| need(t) <= limit) {
        return Ok(LayoutInfo {
            dp: world / tp,
            tp,
            explanation: format!(
                "re-planned at growth to TP={tp} × DP={}: the {layers}-layer model needs {:.2} GiB per rank at TP={}, over {budget_text}; at TP={tp} it needs {:.2} GiB",
                world / tp,
                gib(need(cur.tp)),
                cur.tp,
                gib(need(tp))
            ),
            memory_per_rank_bytes: need(tp),
            budget_bytes: budget.unwrap_or(0),
        });
    }
    let options: Vec<String> = candidates
        .iter()
        .map(|&t| format!("TP={t}: {:.2} GiB", gib(need(t))))
        .collect();
    Err(Error::FailedPrecondition(format!(
        "no layout of the {world} rank(s) holds the grown {layers}-layer model ({:.2}B parameters) within {budget_text}: {}; \
         add workers (TP up to the heads' divisors), use devices with more memory, set train.micro_batch, or grow by a smaller factor",
        cfg.num_parameters() as f64 / 1e9,
        if options.is_empty() {
            "no TP degree divides the heads, KV heads, FFN width and global batch".to_string()
        } else {
            options.join(", ")
        }
    )))
}

/// The committed checkpoint a job starts from (`checkpoint.init_from`), verified (manifest and
/// every file's hash, off the async threads) and checked against the spec: its vocabulary
/// ([`JobSpec::init_vocab_size`]: `[model] vocab_size` may be left out), same sizes (the depth
/// may differ), a step before `max_steps`. Returns its record, its model config and the job's
/// initial model config.
pub async fn init_checkpoint(
    dir: &Path,
    spec: &JobSpec,
) -> Result<(CheckpointRecord, ModelConfig, ModelConfig)> {
    let path = dir.to_path_buf();
    let ck = tokio::task::spawn_blocking(move || trellis_core::checkpoint::Checkpoint::open(&path))
        .await
        .map_err(|e| Error::Internal(format!("checkpoint verification panicked: {e}")))?
        .map_err(|e| {
            Error::InvalidArgument(format!("checkpoint.init_from {}: {e}", dir.display()))
        })?;
    let st = ck.state;
    let vocab = spec
        .init_vocab_size(st.model.vocab_size)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let model0 = &model_config(spec, Some(vocab))?;
    if st.model.with_layers(model0.num_hidden_layers) != *model0 {
        return Err(Error::InvalidArgument(format!(
            "checkpoint.init_from {}: its model differs from the [model] section ({}); make [model] describe the checkpoint's model",
            dir.display(),
            st.model.with_layers(model0.num_hidden_layers).diff(model0),
        )));
    }
    if st.step >= spec.train.max_steps {
        return Err(Error::InvalidArgument(format!(
            "checkpoint.init_from {} is at step {} but train.max_steps is {}; raise max_steps",
            dir.display(),
            st.step,
            spec.train.max_steps
        )));
    }
    Ok((
        CheckpointRecord {
            step: Step(st.step),
            tokens: st.tokens,
            generation: Generation(st.generation),
            layers: st.model.num_hidden_layers,
            data_cursor: st.data_cursor,
            dir: dir.display().to_string(),
            reason: Reason::InitFrom,
            committed_at: now_unix(),
            next_growth_stage: 0,
            layout: None,
            unusable: None,
        },
        st.model,
        model0.clone(),
    ))
}
