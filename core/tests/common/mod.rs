//! Shared helpers for the trellis-core integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use trellis_core::checkpoint::{
    self, HostTensor, Layout, ScheduleState, ShardReport, TrainerState,
};
use trellis_core::config::ModelConfig;
use trellis_core::offline::normal_tensor;

/// The venv python with torch, transformers and safetensors (scripts/setup.sh makes it;
/// scripts/env.sh exports TRELLIS_PYTHON).
pub fn python() -> String {
    std::env::var("TRELLIS_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        format!("{home}/.cache/trellis/venv-torch2.11.0/bin/python")
    })
}

/// A tiny LLaMA: 4 heads, 2 KV heads, every TP-split dim divisible by 4.
pub fn tiny(layers: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        max_position_embeddings: 64,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        head_dim: None,
        rope_scaling: None,
    }
}

/// Distinct values for every tensor (so a wrong copy is caught).
pub fn model_tensors(cfg: &ModelConfig, seed: u64) -> Vec<(String, HostTensor)> {
    cfg.tensor_shapes()
        .into_iter()
        .map(|(n, s)| {
            let t = normal_tensor(&s, 1.0, seed, &n);
            (n, t)
        })
        .collect()
}

pub fn optim_tensors(cfg: &ModelConfig, seed: u64) -> Vec<(String, HostTensor)> {
    let mut out = Vec::new();
    for (n, s) in cfg.tensor_shapes() {
        for m in checkpoint::moment_names(&n) {
            let t = normal_tensor(&s, 0.1, seed + 1, &m);
            out.push((m, t));
        }
    }
    out
}

pub fn state(cfg: &ModelConfig, step: u64, tp: usize) -> TrainerState {
    TrainerState {
        job: "test".into(),
        step,
        tokens: step * 1024,
        generation: 0,
        model: cfg.clone(),
        layout: Layout { dp: 1, tp },
        data_cursor: step * 8,
        seed: 7,
        schedule: ScheduleState {
            start_step: 0,
            end_step: 1000,
            peak_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 20,
        },
        optimizer_step: step,
        next_growth_stage: 0,
        growth_history: vec![],
        mask: None,
    }
}

/// Write a full checkpoint of `cfg` at `<root>/step-<step>` with `tp` shard files.
pub fn write_ckpt(
    root: &Path,
    step: u64,
    tp: usize,
    model: &[(String, HostTensor)],
    optim: &[(String, HostTensor)],
    st: &TrainerState,
) -> PathBuf {
    let tmp = checkpoint::tmp_dir(root, step);
    let report: ShardReport = checkpoint::write_full(&tmp, tp, model, optim).unwrap();
    checkpoint::finalize(&tmp, st, &[report]).unwrap()
}
