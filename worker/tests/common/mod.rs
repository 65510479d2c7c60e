//! Shared helpers of the worker's integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;
use trellis_core::config::ModelConfig;

pub mod local;

/// The venv python with torch 2.11.0 and transformers (scripts/setup.sh makes it).
pub fn python() -> PathBuf {
    let p = std::env::var("TRELLIS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/root/.cache/trellis/venv-torch2.11.0/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run scripts/setup.sh (it creates the torch 2.11.0 + transformers venv) or set TRELLIS_PYTHON to a python with torch and transformers",
        p.display()
    );
    p
}

/// Run `script` with the venv python and `args`; panics with its stderr on failure.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An HF `config.json` for `cfg` (the export's).
pub fn hf_config(cfg: &ModelConfig) -> serde_json::Value {
    trellis_core::offline::hf_config(cfg)
}

/// `tiny_cfg` with everything issue #13 added: tied embeddings, `head_dim` 12 ≠ 32 / 4,
/// rope_theta 500000 and llama3 scaling whose three frequency bands all occur at head_dim 12.
pub fn tied_llama3_cfg(layers: usize, kv_heads: usize) -> ModelConfig {
    ModelConfig {
        tie_word_embeddings: true,
        head_dim: Some(12),
        rope_theta: 500000.0,
        rope_scaling: Some(trellis_core::config::RopeScaling {
            rope_type: trellis_core::config::RopeType::Llama3,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }),
        ..tiny_cfg(layers, kv_heads)
    }
}

/// Write `model.safetensors` + `config.json` of `named` into `dir`.
pub fn write_hf(dir: &Path, cfg: &ModelConfig, named: &[(String, Tensor)]) {
    std::fs::create_dir_all(dir).unwrap();
    let tensors: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().contiguous()))
        .collect();
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&hf_config(cfg)).unwrap(),
    )
    .unwrap();
}

/// Python: the mean next-token loss of the Hugging Face directory `argv[1]` on the text file
/// `argv[2]` in windows of `argv[3]` tokens, as `trellis-worker eval` computes it, with the
/// model and tokenizer loaded the way any `transformers` user loads them
/// (`AutoModelForCausalLM`, `AutoTokenizer`; fp32). Prints `{"loss", "tokens"}`.
pub const HF_EVAL_LOSS: &str = r#"
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, text, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(d)
ids = tok(open(text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
total, count, start = 0.0, 0, 0
with torch.no_grad():
    while start + 1 < len(ids):
        w = torch.tensor(ids[start:start + seq + 1])[None]
        logits = m(input_ids=w[:, :-1]).logits
        l = torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="sum")
        total += l.item(); count += w.shape[1] - 1; start += seq
print(json.dumps({"loss": total / count, "tokens": count}))
"#;

/// [`HF_EVAL_LOSS`] on `dir`: (loss, tokens).
pub fn hf_eval_loss(dir: &Path, text: &Path, seq: usize) -> (f64, u64) {
    let v: serde_json::Value = serde_json::from_str(
        run_python(
            HF_EVAL_LOSS,
            &[
                dir.to_str().unwrap(),
                text.to_str().unwrap(),
                &seq.to_string(),
            ],
        )
        .trim(),
    )
    .unwrap();
    (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap())
}

/// `trellis-worker eval` of checkpoint `dir` on `text` in windows of `seq`: (loss, tokens,
/// layers).
pub fn worker_eval_loss(dir: &Path, text: &Path, seq: usize) -> (f64, u64, u64) {
    let o = Command::new(worker_bin())
        .args([
            "eval",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--seq-len",
            &seq.to_string(),
            "--output",
            "json",
        ])
        .output()
        .expect("trellis-worker runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (
        v["loss"].as_f64().unwrap(),
        v["tokens"].as_u64().unwrap(),
        v["num_hidden_layers"].as_u64().unwrap(),
    )
}

/// A small config for tests.
pub fn tiny_cfg(layers: usize, kv_heads: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 88,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: kv_heads,
        max_position_embeddings: 64,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        head_dim: None,
        rope_scaling: None,
    }
}

/// Maximum absolute difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Bitwise equality of two fp32 tensors.
pub fn bit_equal(a: &Tensor, b: &Tensor) -> bool {
    if a.size() != b.size() {
        return false;
    }
    let va: Vec<f32> = Vec::try_from(&a.detach().flatten(0, -1)).unwrap();
    let vb: Vec<f32> = Vec::try_from(&b.detach().flatten(0, -1)).unwrap();
    va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A small corpus (the head of tinyshakespeare) shared by the tests, outside the repo.
pub fn small_corpus() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("trellis-worker-corpus");
    std::fs::create_dir_all(&dir).unwrap();
    let train = dir.join("train.txt");
    let valid = dir.join("valid.txt");
    let cut = |src: &str, n: usize, dst: &Path| {
        let text = std::fs::read_to_string(repo().join(src)).unwrap();
        let mut end = n.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        // Unique per process *and* call: tests run on several threads of one process.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dst.with_extension(format!("tmp{}-{n}", std::process::id()));
        std::fs::write(&tmp, &text[..end]).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    };
    if !train.exists() {
        cut("corpus/tiny/train.txt", 120_000, &train);
    }
    if !valid.exists() {
        cut("corpus/tiny/valid.txt", 20_000, &valid);
    }
    (train, valid)
}

/// A job spec TOML for a tiny, fast test job; `extra` is appended (growth stages…). fp32: the
/// parity tests compare against fp32 references at tight tolerances.
pub fn test_job_toml(name: &str, max_steps: u64, extra: &str) -> String {
    test_job_toml_with(name, max_steps, "precision = \"fp32\"", extra)
}

/// [`test_job_toml`] with `train` appended to the `[train]` section (e.g. `precision = "bf16"`).
pub fn test_job_toml_with(name: &str, max_steps: u64, train_extra: &str, extra: &str) -> String {
    let (train, valid) = small_corpus();
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("trellis-worker-data-cache");
    format!(
        r#"
[job]
name = "{name}"
seed = 42

[model]
preset = "tiny"
hidden_size = 32
intermediate_size = 88

[data]
train = "{}"
valid = "{}"
vocab_size = 384
seq_len = 32
cache_dir = "{}"

[train]
global_batch = 4
micro_batch = 2
max_steps = {max_steps}
lr = 3e-3
min_lr = 3e-4
warmup_steps = 3
eval_interval = 0
eval_sequences = 8
threads = 1
{train_extra}

[checkpoint]
interval = 0
keep = 10
{extra}
"#,
        train.display(),
        valid.display(),
        cache.display()
    )
}

pub fn test_spec(name: &str, max_steps: u64, extra: &str) -> trellis_core::job::JobSpec {
    test_spec_with(name, max_steps, "precision = \"fp32\"", extra)
}

/// [`test_spec`] with `train` appended to the `[train]` section.
pub fn test_spec_with(
    name: &str,
    max_steps: u64,
    train: &str,
    extra: &str,
) -> trellis_core::job::JobSpec {
    trellis_core::job::JobSpec::from_toml(
        &test_job_toml_with(name, max_steps, train, extra),
        Path::new("."),
        "test",
    )
    .unwrap()
}

pub fn worker_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trellis-worker"))
}
