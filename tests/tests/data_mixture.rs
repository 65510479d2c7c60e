//! Issue #13, acceptance 2, over real processes on loopback (the shared harness,
//! `trellis_tests::Cluster`, with mTLS): a managed job (coordinator on the embedded store, two
//! `trellis-worker --coordinator` processes, DP = 2) trains from a weighted
//! mixture of a `jsonl.zst` shard set (made with `zstandard`) and a parquet file (made with
//! `pyarrow`); one worker is killed with SIGKILL mid-run and a replacement joins (the job rolls
//! back to its last committed checkpoint and resumes); a growth that no longer fits one rank's
//! budget is re-planned from DP = 2 × TP = 1 to DP = 1 × TP = 2 (the coordinator's DP change:
//! it keeps the world size and changes DP only when it re-plans). The workers' sample logs
//! (`TRELLIS_SAMPLE_LOG`: ids and the source of each) show that no sample id is skipped or read
//! twice relative to the committed restore points, and the observed mixture proportions match
//! the weights within a bound computed from the sampler's design (printed). Last, `trellis-worker
//! generate` reads the TP = 2 checkpoint the job ended with.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use trellis_tests::{bin, json, phase, repo, run, u, wait_status, Cluster, LONG};

const GB: u64 = 32;
const MICRO_BATCH: usize = 8;
const SEQ: usize = 32;
/// The mixture's weights: the jsonl.zst shards, then the parquet file.
const WEIGHTS: [f64; 2] = [0.7, 0.3];
/// Samples per mixture block (`trellis_data::MIX_BLOCK`).
const MIX_BLOCK: u64 = 4096;

/// The jsonl.zst shards (first half of the corpus's paragraphs, three files) and the parquet
/// file (second half, column `content`), written by the venv's python.
fn make_data(dir: &Path) {
    let python = std::env::var("TRELLIS_PYTHON").expect("TRELLIS_PYTHON (scripts/env.sh)");
    let script = r#"
import json, os, sys
import pyarrow as pa, pyarrow.parquet as pq, zstandard
text, out = open(sys.argv[1], encoding="utf-8").read(), sys.argv[2]
paras = [p + "\n" for p in text.split("\n\n") if p.strip()]
half = len(paras) // 2
os.makedirs(os.path.join(out, "shards"), exist_ok=True)
for i in range(3):
    lines = "".join(json.dumps({"text": p}) + "\n" for p in paras[:half][i::3])
    with open(os.path.join(out, "shards", f"s{i}.jsonl.zst"), "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
pq.write_table(pa.table({"content": paras[half:]}), os.path.join(out, "books.parquet"))
"#;
    let out = run(
        Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(repo().join("corpus/tiny/train.txt"))
            .arg(dir),
        LONG,
    );
    assert!(
        out.status.success(),
        "python (pyarrow, zstandard): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spec(name: &str, dir: &Path, max_steps: u64, interval: u64, grow_at: u64) -> String {
    format!(
        r#"[job]
name = "{name}"
seed = 11

[model]
preset = "tiny"

[data]
valid = "{valid}"
vocab_size = 512
seq_len = {SEQ}
cache_dir = "{cache}"

[[data.sources]]
path = "{shards}"
weight = {w0}

[[data.sources]]
path = "{parquet}"
weight = {w1}
text_field = "content"

[train]
precision = "fp32"
global_batch = {GB}
micro_batch = {MICRO_BATCH}
max_steps = {max_steps}
lr = 2e-3
min_lr = 2e-4
warmup_steps = 5
eval_interval = 0
eval_sequences = 8
threads = 1

[checkpoint]
dir = "{ckpt}"
interval = {interval}
keep = 3

[parallel]
dp = 2
tp = 1

[[growth]]
at_step = {grow_at}
factor = 4
operator = "stack"
"#,
        valid = repo().join("corpus/tiny/valid.txt").display(),
        cache = dir.join("cache").display(),
        shards = dir.join("shards/*.jsonl.zst").display(),
        parquet = dir.join("books.parquet").display(),
        ckpt = dir.join("ckpt").display(),
        w0 = WEIGHTS[0],
        w1 = WEIGHTS[1],
    )
}

/// How far the observed share of a source may be from its weight after `n` samples of the
/// stream from 0: the sampler gives each source exactly its largest-remainder share of every
/// aligned block of 4096 samples (off from `w·4096` by less than one slot per block), at
/// uniformly shuffled positions, so a partial block of `r` samples holds a hypergeometric count
/// (σ = sqrt(r·p·(1−p)·(4096−r)/4095)). Bound: one slot per whole block + 4σ of the partial
/// block + one slot, over n.
fn share_tolerance(n: u64, w: f64) -> f64 {
    let (blocks, r) = (n / MIX_BLOCK, (n % MIX_BLOCK) as f64);
    let big_n = MIX_BLOCK as f64;
    let sigma = (r * w * (1.0 - w) * (big_n - r) / (big_n - 1.0)).sqrt();
    (blocks as f64 + 4.0 * sigma + 1.0) / n as f64
}

#[test]
fn a_mixture_resumes_after_kill_9_and_a_dp_change_reading_every_sample_once() {
    let t_start = Instant::now();
    let mut cl = Cluster::new("mixture");
    make_data(cl.dir.path());
    let (max_steps, interval, grow_at) = (256u64, 20u64, 140u64);
    let text = spec("mix", cl.dir.path(), max_steps, interval, grow_at);

    // A per-rank budget the small model fits at TP = 1 and the grown one only at TP = 2: the
    // growth re-plans DP = 2 × TP = 1 to DP = 1 × TP = 2.
    let parsed = trellis_core::job::JobSpec::from_toml(&text, cl.dir.path(), "test").unwrap();
    let small = parsed.model_config(512).unwrap();
    let grown = small.with_layers(4 * small.num_hidden_layers);
    let need = |c, tp| trellis_core::layout::memory_per_rank(c, tp, MICRO_BATCH, SEQ).total;
    let budget = (need(&grown, 1) + need(&grown, 2)) / 2;
    assert!(need(&small, 1) <= budget && need(&grown, 2) <= budget && need(&grown, 1) > budget);

    let budget_arg = budget.to_string();
    let (_, c) = cl.start_job(&text, &["--device-memory-bytes", &budget_arg]);
    let ep = &c.endpoint;
    // Workers are numbered 0, 1, 2 in the order they start (their sample logs).
    cl.worker(ep, &[]);
    let victim = cl.worker(ep, &[]);

    // 1. SIGKILL one worker mid-run, after a committed checkpoint; a replacement joins and the
    //    job resumes from that checkpoint.
    let before = wait_status(
        ep,
        "a committed checkpoint and training past it",
        LONG,
        |s| {
            let cks = s["checkpoints"].as_array().map_or(0, Vec::len);
            phase(s) == "training" && cks > 0 && u(&s["step"]) % interval > 5
        },
    );
    assert!(
        u(&before["step"]) < grow_at,
        "the kill must come before the growth: {before}"
    );
    cl.procs[victim].kill9();
    let waiting = wait_status(ep, "the rollback, waiting for a worker", LONG, |s| {
        phase(s) == "waiting_for_workers" && u(&s["rollbacks"]) >= 1
    });
    let restored = waiting["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| u(&c["step"]))
        .max()
        .unwrap();
    cl.worker(ep, &[]);
    let replacement = 2;

    // 2. The growth re-plans to DP = 1 × TP = 2; the job finishes.
    let done = wait_status(ep, "the job to finish", LONG, |s| {
        phase(s) == "done" || phase(s) == "failed"
    });
    assert_eq!(phase(&done), "done", "{done}");
    assert_eq!(u(&done["step"]), max_steps);
    assert_eq!(u(&done["rollbacks"]), 1, "{done}");
    assert_eq!(
        (u(&done["layout"]["dp"]), u(&done["layout"]["tp"])),
        (1, 2),
        "{done}"
    );
    let g = &done["growth_history"][0];
    assert_eq!((u(&g["at_step"]), u(&g["tp_after"])), (grow_at, 2), "{g}");

    // 3. Sample ids. Per step, the records of the latest epoch that ran it (a rollback re-runs
    //    steps in a new epoch; the two TP ranks of DP = 1 read the same ids).
    let mut all = Vec::new();
    for w in 0..3 {
        all.extend(cl.sample_log(w));
    }
    type Ranges = BTreeSet<(u64, u64, Vec<u64>)>;
    let mut by_step: BTreeMap<u64, (u64, Ranges)> = BTreeMap::new();
    let mut source_of: BTreeMap<u64, u64> = BTreeMap::new();
    for r in &all {
        let (epoch, step) = (u(&r["epoch"]), u(&r["step"]));
        let (a, b) = (u(&r["start"]), u(&r["end"]));
        let sources: Vec<u64> = r["sources"].as_array().unwrap().iter().map(u).collect();
        assert_eq!(sources.len() as u64, b - a, "{r}");
        // Whoever reads a sample id, in whatever epoch or layout, reads it from the same source.
        for (id, &s) in (a..b).zip(&sources) {
            let prev = *source_of.entry(id).or_insert(s);
            assert_eq!(prev, s, "sample {id} read from source {prev} and from {s}");
        }
        let e = by_step.entry(step).or_insert((epoch, Default::default()));
        if epoch > e.0 {
            *e = (epoch, Default::default());
        }
        if epoch == e.0 {
            e.1.insert((a, b, sources));
        }
    }
    assert_eq!(
        by_step.keys().copied().collect::<Vec<_>>(),
        (1..=max_steps).collect::<Vec<_>>(),
        "every step ran"
    );
    let mut ids = Vec::new();
    for (step, (_, ranges)) in &by_step {
        let want_ranks = if *step <= grow_at { 2 } else { 1 };
        assert_eq!(
            ranges.len(),
            want_ranks,
            "step {step}: one id range per DP rank: {ranges:?}"
        );
        for (a, b, _) in ranges {
            ids.extend(*a..*b);
        }
    }
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..max_steps * GB).collect::<Vec<_>>(),
        "every sample id exactly once across the kill -9 and the DP change"
    );
    // The replacement restored the committed checkpoint: its first step is the one after it.
    let first = cl
        .sample_log(replacement)
        .iter()
        .map(|r| u(&r["step"]))
        .min();
    assert_eq!(first, Some(restored + 1), "resumed from step {restored}");

    // 4. The mixture: observed shares of the samples trained on against the weights, over the
    //    whole run (two whole blocks) and over the samples before the DP change (a block and a
    //    part, where the bound is wider).
    let mut report = Vec::new();
    for n in [grow_at * GB, max_steps * GB] {
        let mut counts = [0u64; 2];
        for (_, (_, ranges)) in by_step.iter() {
            for (a, _, sources) in ranges {
                for (id, &s) in (*a..).zip(sources) {
                    if id < n {
                        counts[s as usize] += 1;
                    }
                }
            }
        }
        assert_eq!(counts.iter().sum::<u64>(), n);
        for (i, &w) in WEIGHTS.iter().enumerate() {
            let share = counts[i] as f64 / n as f64;
            let tol = share_tolerance(n, w);
            report.push(format!(
                "first {n} samples, source {i}: {} = {share:.4} (weight {w}, tolerance ±{tol:.4})",
                counts[i]
            ));
            assert!(
                (share - w).abs() <= tol,
                "first {n} samples, source {i}: observed share {share:.4} vs weight {w} (tolerance {tol:.4})"
            );
        }
    }
    // 5. `generate` reads the checkpoint the job ended with, written by two TP ranks.
    let last = cl.path(&format!("ckpt/mix/step-{max_steps}"));
    assert!(
        last.join("model-tp1-of-2.safetensors").exists(),
        "a TP = 2 checkpoint"
    );
    let out = run(
        Command::new(bin("trellis-worker"))
            .args(["generate", "--output", "json", "--max-tokens", "16"])
            .args(["--prompt", "First Citizen:", "--checkpoint"])
            .arg(&last),
        LONG,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g = json(&out);
    assert_eq!(
        (u(&g["step"]), u(&g["num_hidden_layers"])),
        (max_steps, 8),
        "{g}"
    );
    assert!(!g["ids"].as_array().unwrap().is_empty(), "{g}");

    let n = max_steps * GB;
    eprintln!(
        "mixture over real processes: killed at step {} (restored from {restored}), DP 2 -> 1 at growth step {grow_at}, \
         {n} samples each read once; {}; {:.1}s in all",
        u(&before["step"]),
        report.join("; "),
        t_start.elapsed().as_secs_f64()
    );
}
