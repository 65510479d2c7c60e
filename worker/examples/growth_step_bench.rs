//! The first grown steps of `make bench-growth`'s model (hidden 1024, FFN 2816, 16 heads / 8 KV
//! heads, vocab 512, batch 2 × seq 64, 2 threads) with the growth checkpoint of the small model
//! written beside them in different ways (issue 14): one process per mode, so each first grown
//! step meets fresh memory as it does in a worker.
//!
//! ```text
//! source scripts/env.sh
//! cargo run --release -p trellis-worker --example growth_step_bench -- MODE [STEPS] [LAYERS FACTOR]
//! ```
//!
//! MODE: `none` (the snapshot is held but never written: the grown steps alone), `concurrent`
//! (the writer thread starts with the first grown step), `after1` / `after2` (it starts once the
//! first / second grown step is done), `write` (no steps: the growth snapshot's write as the
//! worker does it, timed on this thread), `phases` (no steps: a write with a host copy, its
//! parts timed one by one). The small model trains 3 steps first; the snapshot shares its tensors (a
//! growth checkpoint's), then `stack` ×FACTOR with the optimizer `reset`. Prints one JSON line:
//! each grown step's wall seconds, when the write started and ended relative to the first grown
//! step's start, and this process's CPU seconds over the grown steps. Run it with
//! `OMP_WAIT_POLICY=PASSIVE` for CPU seconds that do not count idle OpenMP threads spinning.
use std::path::Path;
use std::time::Instant;
use trellis_core::checkpoint;
use trellis_core::growth::{GrowthSpec, Operator, OptimizerPolicy};
use trellis_core::job::JobSpec;
use trellis_worker::{PostGrowthSchedule, Trainer};

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn spec(dir: &Path, layers: usize) -> JobSpec {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let toml = format!(
        r#"
[job]
name = "growth-step-bench"
seed = 7
[model]
preset = "small"
hidden_size = 1024
intermediate_size = 2816
num_hidden_layers = {layers}
num_attention_heads = 16
num_key_value_heads = 8
max_position_embeddings = 64
[data]
train = "{train}"
valid = "{valid}"
vocab_size = 512
seq_len = 64
cache_dir = "{cache}"
[train]
global_batch = 2
max_steps = 1000
lr = 1e-3
min_lr = 1e-3
warmup_steps = 2
eval_interval = 0
threads = 2
device = "cpu"
[checkpoint]
interval = 0
"#,
        train = repo.join("corpus/tiny/train.txt").display(),
        valid = repo.join("corpus/tiny/valid.txt").display(),
        cache = dir.join("data").display(),
    );
    JobSpec::from_toml(&toml, Path::new("."), "growth step bench").unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "concurrent".into());
    let steps: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(3);
    let layers: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(3);
    let factor: usize = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(4);
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_TMP").unwrap_or_else(|_| ".".into())).unwrap();
    let spec = spec(dir.path(), layers);
    let mut t = Trainer::new(&spec, dir.path(), 0, 1, Box::new(trellis_comm::Solo)).unwrap();
    for _ in 0..3 {
        t.step().unwrap();
    }
    let root = dir.path().join("ckpt");
    if mode == "phases" {
        phases(&mut t, &root);
        return;
    }
    if mode == "write" {
        // The growth snapshot's write as the worker does it, alone on this thread.
        let w = t.snapshot_growth_checkpoint_shards(&root).unwrap().unwrap();
        let (t0, c0) = (Instant::now(), cpu_seconds());
        w.write().unwrap();
        let wall_cpu = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        println!(
            "{}",
            serde_json::json!({"mode": "write", "wall_cpu": wall_cpu})
        );
        return;
    }
    let snap = t.snapshot_growth_checkpoint_shards(&root).unwrap().unwrap();
    let gs = GrowthSpec {
        factor,
        operator: Operator::Stack,
        optimizer: OptimizerPolicy::Reset,
    };
    let sched = PostGrowthSchedule {
        lr: 1e-3,
        min_lr: 1e-3,
        warmup_steps: 2,
    };
    let g = t.grow(&gs, &sched).unwrap();
    let start_after: Option<usize> = match mode.as_str() {
        "none" => None,
        "concurrent" => Some(0),
        "after1" => Some(1),
        "after2" => Some(2),
        m => panic!("unknown mode {m}"),
    };
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let mut snap = Some(snap);
    let mut writer = None;
    let mut step_s = vec![];
    for i in 0..steps {
        if start_after == Some(i) {
            let w = snap.take().unwrap();
            let at = t0.elapsed().as_secs_f64();
            writer = Some(std::thread::spawn(move || {
                w.write().unwrap();
                at
            }));
        }
        let s = Instant::now();
        t.step().unwrap();
        step_s.push(s.elapsed().as_secs_f64());
    }
    let cpu = cpu_seconds() - cpu0;
    let write_end_unfinished = writer.as_ref().map(|w| !w.is_finished());
    let write = writer.map(|w| {
        let at = w.join().unwrap();
        (at, t0.elapsed().as_secs_f64())
    });
    println!(
        "{}",
        serde_json::json!({
            "mode": mode,
            "stack_seconds": g.total_seconds,
            "grown_step_seconds": step_s,
            "cpu_seconds_over_grown_steps": cpu,
            "write_started_at": write.map(|w| w.0),
            "write_ended_at_or_after": write.map(|w| w.1),
            "write_still_running_after_steps": write_end_unfinished,
        })
    );
}

/// The parts of a write with a host copy, one after the other on this thread: the copy,
/// safetensors write + fsync + hash (`checkpoint::write_shard`), and the hash alone (re-read).
fn phases(t: &mut Trainer, root: &Path) {
    let c0 = (Instant::now(), cpu_seconds());
    let lap = |c: &mut (Instant, f64)| {
        let r = (c.0.elapsed().as_secs_f64(), cpu_seconds() - c.1);
        *c = (Instant::now(), cpu_seconds());
        r
    };
    let mut c = c0;
    let mut model = vec![];
    let mut optim = vec![];
    for (name, p) in t.model().named_parameters() {
        model.push((name.clone(), trellis_worker::to_host(p)));
        let m = t.optimizer().moments_of(name, p);
        optim.push((
            format!("{name}.exp_avg"),
            trellis_worker::to_host(&m.exp_avg),
        ));
        optim.push((
            format!("{name}.exp_avg_sq"),
            trellis_worker::to_host(&m.exp_avg_sq),
        ));
    }
    let host = lap(&mut c);
    let tmp = checkpoint::tmp_dir(root, 3);
    let report = checkpoint::write_shard(&tmp, 0, 1, &model, &optim).unwrap();
    let write = lap(&mut c);
    let mut bytes = 0;
    for f in std::fs::read_dir(&tmp).unwrap() {
        let p = f.unwrap().path();
        bytes += checkpoint::file_digest(&p).unwrap().0;
    }
    let digest = lap(&mut c);
    println!(
        "{}",
        serde_json::json!({
            "mode": "phases",
            "bytes": bytes,
            "files": report.files.len(),
            "host_copy_wall_cpu": host,
            "write_shard_wall_cpu (serialize + fsync + re-read hash)": write,
            "re_read_hash_alone_wall_cpu": digest,
        })
    );
}
