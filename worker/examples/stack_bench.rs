//! The in-memory growth operator against a plain memcpy of the same bytes, in one run: the
//! `make bench-growth` model (hidden 1024, FFN 2816, 16 heads / 8 KV heads, vocab 512, 3 layers,
//! 36M parameters) grown ×4 with `stack` to 12 layers (143M), with the optimizer `reset` (the
//! benchmark's protocol: fresh zero moments) and `carry` (moments grown by the plan).
//!
//! ```text
//! source scripts/env.sh
//! cargo run --release -p trellis-worker --example stack_bench -- [repeats layers factor]
//! ```
//!
//! For each repeat it times `trellis_worker::grow::apply` (`reset` writes the grown weights;
//! its zero moments are left to the first update, `carry` also writes both grown moments) and,
//! on the same bytes: a memcpy of the grown weights into a fresh allocation (what the stack must
//! at least do: read the sources, write the copies, touch new pages) and into a reused one, and
//! the zero fill of two moments' worth (what `reset` used to write up front). It also times the
//! reshard of the grown model's state (weights and both moments) TP 1 → 2 over the peers path
//! (`parallel::reshard::from_peers`, two threads over an authenticated `TcpRing` on 127.0.0.1:
//! rank 0 copies its half locally and scatters the other half to rank 1) against a memcpy of
//! the bytes each new rank ends up holding. Prints one JSON line per repeat
//! and one with the medians; GB/s are bytes of grown state produced per second.
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use trellis_comm::{Solo, TcpRing};
use trellis_core::config::ModelConfig;
use trellis_core::growth::{GrowthSpec, Operator, OptimizerPolicy};
use trellis_core::job::JobSpec;
use trellis_worker::model::Llama;
use trellis_worker::optim::{AdamW, AdamWConfig};
use trellis_worker::parallel::{reshard, Groups};
use trellis_worker::Trainer;

fn config(layers: usize) -> ModelConfig {
    let mut c: ModelConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 512,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    }))
    .expect("a model config");
    c.num_hidden_layers = layers;
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Seconds to copy `src` into a fresh buffer (`fresh`) or into `dst`.
fn memcpy(src: &[f32], dst: Option<&mut Vec<f32>>) -> f64 {
    let t = Instant::now();
    match dst {
        Some(d) => d.copy_from_slice(src),
        None => {
            let v = src.to_vec();
            std::hint::black_box(&v);
        }
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let repeats: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(5);
    let layers: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(3);
    let factor: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(4);
    let cfg = config(layers);
    let model = Llama::init(&cfg, Device::Cpu, 1);
    let mut optim = AdamW::new(AdamWConfig::default(), model.named_parameters());
    // Moments with values (as after training), so `carry` copies real data.
    tch::no_grad(|| {
        for m in optim.moments.values_mut() {
            let _ = m.exp_avg.fill_(0.01);
            let _ = m.exp_avg_sq.fill_(0.0001);
        }
    });
    let spec = |optimizer| GrowthSpec {
        factor,
        operator: Operator::Stack,
        optimizer,
    };
    let plan = trellis_core::growth::plan(&cfg, &spec(OptimizerPolicy::Reset)).unwrap();
    let grown_params: usize = plan
        .new
        .tensor_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let weight_bytes = grown_params as f64 * 4.0;
    // A source buffer of the grown weights' size (the memcpy's input).
    let src = vec![1.0f32; grown_params];
    let mut reused = vec![0f32; grown_params];
    let gbps = |bytes: f64, s: f64| bytes / s / 1e9;
    let (mut reset_s, mut carry_s, mut stack_s, mut fresh_s, mut reused_s, mut zero_s) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for r in 0..repeats {
        let t = Instant::now();
        let (g, o, timings) =
            trellis_worker::grow::apply(&model, &optim, &plan, OptimizerPolicy::Reset, 1, 1)
                .unwrap();
        let reset = t.elapsed().as_secs_f64();
        drop((g, o));
        let t = Instant::now();
        let plan_c = trellis_core::growth::plan(&cfg, &spec(OptimizerPolicy::Carry)).unwrap();
        let (g, o, _) =
            trellis_worker::grow::apply(&model, &optim, &plan_c, OptimizerPolicy::Carry, 1, 1)
                .unwrap();
        let carry = t.elapsed().as_secs_f64();
        drop((g, o));
        let fresh = memcpy(&src, None);
        let reuse = memcpy(&src, Some(&mut reused));
        let t = Instant::now();
        let z = Tensor::zeros([2 * grown_params as i64], (Kind::Float, Device::Cpu));
        let zero = t.elapsed().as_secs_f64();
        drop(z);
        println!(
            "{}",
            serde_json::json!({
                "repeat": r,
                "grown_parameters": grown_params,
                "reset_seconds": reset,
                "stack_seconds": timings.stack_seconds,
                "optimizer_seconds": timings.optimizer_seconds,
                "carry_seconds": carry,
                "memcpy_fresh_seconds": fresh,
                "memcpy_reused_seconds": reuse,
                "zero_moments_seconds": zero,
            })
        );
        reset_s.push(reset);
        carry_s.push(carry);
        stack_s.push(timings.stack_seconds);
        fresh_s.push(fresh);
        reused_s.push(reuse);
        zero_s.push(zero);
    }
    let (reset, carry, stack) = (median(reset_s), median(carry_s), median(stack_s));
    let (fresh, reuse, zero) = (median(fresh_s), median(reused_s), median(zero_s));
    let rs = reshard_peers(plan.new.num_hidden_layers, repeats.min(3));
    println!(
        "{}",
        serde_json::json!({
            "median_of": repeats,
            "from_layers": layers,
            "to_layers": plan.new.num_hidden_layers,
            "grown_parameters": grown_params,
            "weights_bytes": weight_bytes,
            "stack_weights_seconds": stack,
            "stack_weights_gbps": gbps(weight_bytes, stack),
            "reset_total_seconds": reset,
            // reset writes the weights only: its zero moments are written by the first update.
            "reset_total_gbps": gbps(weight_bytes, reset),
            "carry_total_seconds": carry,
            "carry_total_gbps": gbps(3.0 * weight_bytes, carry),
            "memcpy_fresh_seconds": fresh,
            "memcpy_fresh_gbps": gbps(weight_bytes, fresh),
            "memcpy_reused_seconds": reuse,
            "memcpy_reused_gbps": gbps(weight_bytes, reuse),
            "zero_moments_seconds": zero,
            "zero_moments_gbps": gbps(2.0 * weight_bytes, zero),
            "reshard_peers_tp1_to_tp2_seconds": rs.median,
            "reshard_first_seconds": rs.first,
            "reshard_bytes_per_rank": rs.bytes,
            "reshard_gbps_per_rank": gbps(rs.bytes, rs.median),
            "reshard_first_gbps_per_rank": gbps(rs.bytes, rs.first),
            "reshard_memcpy_seconds": rs.fresh,
            "reshard_memcpy_gbps": gbps(rs.bytes, rs.fresh),
            "reshard_memcpy_reused_seconds": rs.reused,
            "reshard_memcpy_reused_gbps": gbps(rs.bytes, rs.reused),
        })
    );
}

/// The grown model's job spec (the reshard needs trainers, which need data).
fn spec(dir: &Path, layers: usize) -> JobSpec {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let toml = format!(
        r#"
[job]
name = "stack-bench"
seed = 1
[model]
preset = "tiny"
hidden_size = 1024
intermediate_size = 2816
num_hidden_layers = {layers}
num_attention_heads = 16
num_key_value_heads = 8
[data]
train = "{train}"
valid = "{valid}"
vocab_size = 512
seq_len = 64
cache_dir = "{cache}"
[train]
global_batch = 2
micro_batch = 2
max_steps = 10
eval_sequences = 2
[checkpoint]
interval = 0
"#,
        train = repo.join("corpus/tiny/train.txt").display(),
        valid = repo.join("corpus/tiny/valid.txt").display(),
        cache = dir.join("data").display(),
    );
    JobSpec::from_toml(&toml, Path::new("."), "stack bench").unwrap()
}

/// The peers reshard of a `layers`-layer model's state (weights + two moments) TP 1 → 2.
struct Reshard {
    /// Seconds of the slower rank: median over the repeats, and the first (the one-shot case:
    /// every new tensor lands in memory the process never touched).
    median: f64,
    first: f64,
    /// Bytes each new rank holds after it.
    bytes: f64,
    /// A memcpy of those bytes into a fresh allocation and into a reused buffer (medians of 3).
    fresh: f64,
    reused: f64,
}

fn reshard_peers(layers: usize, repeats: usize) -> Reshard {
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().to_path_buf();
    let spec = spec(&out, layers);
    let old = Arc::new(Mutex::new(Some(
        Trainer::new(&spec, &out, 0, 1, Box::new(Solo)).unwrap(),
    )));
    let ls: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    let hs: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let (spec, out, old, addrs) = (spec.clone(), out.clone(), old.clone(), addrs.clone());
            std::thread::spawn(move || {
                let key = trellis_comm::ring::derive_key("stack_bench");
                let ring = TcpRing::new(r, 2, l, addrs, &key, Duration::from_secs(600)).unwrap();
                let groups = Groups {
                    dp: Box::new(Solo),
                    tp: Box::new(ring),
                };
                let mut new = Trainer::for_reshard(&spec, &out, 0, 1, groups).unwrap();
                let mine = if r == 0 {
                    old.lock().unwrap().take()
                } else {
                    None
                };
                let mut runs = vec![];
                for _ in 0..repeats.max(1) {
                    new.tp_comm_mut().barrier().unwrap();
                    let rep = reshard::from_peers(&mut new, mine.as_ref(), 1, &[0]).unwrap();
                    runs.push((rep.seconds, rep.bytes as f64));
                }
                runs
            })
        })
        .collect();
    let res: Vec<Vec<(f64, f64)>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let secs: Vec<f64> = (0..res[0].len())
        .map(|i| res.iter().map(|r| r[i].0).fold(0.0, f64::max))
        .collect();
    let bytes = res[0][0].1;
    let src = vec![1.0f32; (bytes / 4.0) as usize];
    let fresh = median((0..3).map(|_| memcpy(&src, None)).collect());
    let mut dst = vec![0f32; src.len()];
    let reused = median((0..3).map(|_| memcpy(&src, Some(&mut dst))).collect());
    Reshard {
        median: median(secs.clone()),
        first: secs[0],
        bytes,
        fresh,
        reused,
    }
}
