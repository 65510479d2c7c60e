//! Where a training step goes (issue 12): times the phases of one step of a LLaMA on random
//! tokens — bf16 working-copy refresh, forward, backward, gradient collection, AdamW — median
//! over the timed steps.
//!
//! ```text
//! cargo run --release -p trellis-worker --example step_profile -- [fp32|bf16] [LAYERS] [STEPS]
//! ```
//! Model: hidden 256, FFN 688, 8 heads / 4 KV heads, vocab 4096, batch 8 × seq 256, 2 threads
//! (the 8-layer model of `bench/job-8l.toml` at LAYERS = 8).
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use trellis_core::config::ModelConfig;
use trellis_worker::model::{Llama, Precision};
use trellis_worker::optim::{AdamW, AdamWConfig};

/// This process's CPU time (user + system, all threads) in seconds: less sensitive than wall
/// time to other processes on a shared machine (run with OMP_WAIT_POLICY=PASSIVE so idle
/// OpenMP threads do not spin).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let prec = match args.get(1).map(String::as_str) {
        Some("fp32") => Precision::F32,
        _ => Precision::Bf16,
    };
    let layers: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    tch::set_num_threads(2);
    let cfg = ModelConfig {
        vocab_size: 4096,
        hidden_size: 256,
        intermediate_size: 688,
        num_hidden_layers: layers,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        max_position_embeddings: 512,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        head_dim: None,
        rope_scaling: None,
    };
    let mut m = Llama::init(&cfg, Device::Cpu, 1);
    m.precision = prec;
    let mut opt = AdamW::new(AdamWConfig::default(), m.named_parameters());
    let ids = Tensor::randint(4096, [8, 257], (Kind::Int64, Device::Cpu));
    let (inp, tgt) = (ids.narrow(1, 0, 256), ids.narrow(1, 1, 256));
    let names = [
        "refresh",
        "forward",
        "backward",
        "collect",
        "optimizer",
        "total",
    ];
    let mut cpu = Vec::new();
    let mut t: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for i in 0..steps + 2 {
        let c0 = cpu_seconds();
        let t0 = Instant::now();
        m.refresh_working_copies();
        let t1 = Instant::now();
        let loss = m.loss(&inp, &tgt);
        let _ = loss.double_value(&[]);
        let t2 = Instant::now();
        loss.backward();
        let t3 = Instant::now();
        m.collect_working_grads();
        let t4 = Instant::now();
        opt.step(m.named_parameters(), 1e-3);
        m.zero_grad();
        let t5 = Instant::now();
        if i >= 2 {
            cpu.push(cpu_seconds() - c0);
            for (k, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0]
                .iter()
                .enumerate()
            {
                t[k].push(d.as_secs_f64() * 1e3);
            }
        }
    }
    let meds: Vec<f64> = t.into_iter().map(median).collect();
    let total = meds[5];
    print!("{} {layers} layers, ms (share):", prec.name());
    for (n, v) in names.iter().zip(&meds) {
        print!(" {n} {v:.1} ({:.0}%)", 100.0 * v / total);
    }
    println!(
        "; {:.0} tokens/s; CPU seconds per step {:.2}",
        2048.0 / (total / 1e3),
        median(cpu)
    );
}
