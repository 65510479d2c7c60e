//! End to end over real processes on loopback: `trellis-coordinator`, `trellis-worker
//! --coordinator` (libtorch, CPU, DP over the TCP ring), `coordctl`, and a real etcd. One test
//! per acceptance point of issue #3; each prints its measured figures (`cargo test -- --nocapture`).
//!
//! Every process runs with mTLS on (issue #11): the shared harness (`trellis_tests::Cluster`,
//! tests/src/cluster.rs) makes one CA per test and gives the coordinator, each worker and
//! `coordctl` their certificates.
//!
//! Jobs are tiny (the `tiny` preset, seq_len 32, global batch 4: a step takes a few ms) and share
//! one data cache (`$TMPDIR/trellis-e2e-data-cache`) so the tokenizer is trained once. Every wait
//! is bounded; on failure the tail of every process log is printed.
//!
//! Worker test hooks used here (off by default, documented in `worker/src/managed.rs`):
//! `TRELLIS_SAMPLE_LOG` (per-step global sample ids per rank), `TRELLIS_FAULT_NAN_AT_STEP`
//! (report one NaN loss), `TRELLIS_FAULT_GROW_DELAY_MS` (hold a growth in its stack phase).
//! The kills of issue 14's growth flow (the growth checkpoint written in the background) are
//! in `growth_faults.rs`.
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use trellis_proto::v1 as pb;
use trellis_tests::{
    bin, coordctl, free_port, json, phase, refused, run, status, stderr_line, u, wait_for,
    wait_status, Cluster, Endpoint, TinyJob, LONG,
};

const GB: u64 = 4;

// ------------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------------

/// A tiny job spec (absolute paths).
fn spec(
    name: &str,
    dp: usize,
    max_steps: u64,
    interval: u64,
    keep: usize,
    ckpt: &Path,
    extra: &str,
) -> String {
    // fp32 (TinyJob's): these tests compare losses across layouts and paths to 1e-4 and exactly.
    TinyJob {
        dp,
        max_steps,
        global_batch: GB,
        eval_interval: 50,
        eval_sequences: Some(8),
        interval,
        keep,
        extra,
        ..TinyJob::new(name, ckpt)
    }
    .toml()
}

/// `coordctl checkpoint grow --factor 4 SRC DST` (offline), which must succeed.
fn grow_offline(endpoint: &Endpoint, src: &Path, dst: &Path) {
    let out = coordctl(
        endpoint,
        &[
            "checkpoint",
            "grow",
            "--factor",
            "4",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr_line(&out));
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

/// Global sample ids per step from the workers' sample logs: for each step, the ranges of the
/// latest epoch that ran it (a rollback re-runs steps in a new epoch).
fn consumed_ids(records: &[Value]) -> (Vec<u64>, BTreeMap<u64, u64>) {
    let mut by_step: BTreeMap<u64, (u64, Vec<(u64, u64)>)> = BTreeMap::new();
    for r in records {
        let (epoch, step) = (u(&r["epoch"]), u(&r["step"]));
        let e = by_step.entry(step).or_insert((epoch, Vec::new()));
        if epoch > e.0 {
            *e = (epoch, Vec::new());
        }
        if epoch == e.0 {
            e.1.push((u(&r["start"]), u(&r["end"])));
        }
    }
    let mut ids = Vec::new();
    let mut ranks = BTreeMap::new();
    for (step, (_, ranges)) in &by_step {
        ranks.insert(*step, ranges.len() as u64);
        for &(a, b) in ranges {
            ids.extend(a..b);
        }
    }
    ids.sort_unstable();
    (ids, ranks)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

async fn control(
    endpoint: &Endpoint,
) -> pb::control_service_client::ControlServiceClient<tonic::transport::Channel> {
    pb::control_service_client::ControlServiceClient::new(endpoint.channel().await)
}

// ------------------------------------------------------------------------------------------
// 1 + 2. Online growth over DP=2; DP=2 matches one worker; every sample read exactly once
// ------------------------------------------------------------------------------------------

#[test]
fn grow_dp2_online_traced_and_every_sample_read_once() {
    let mut cl = Cluster::new("grow");
    let rt = rt();
    let otlp = rt.block_on(trellis_telemetry::testing::OtlpReceiver::start());
    let max_steps = 300;
    let job = cl.write_job(
        "job.toml",
        &spec("grow", 2, max_steps, 100, 2, &cl.path("ckpt"), ""),
    );
    let otel = ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint());
    std::env::set_var(otel.0, &otel.1);
    let c = cl.coordinator(
        "coordinator",
        0,
        &format!("file:{}", cl.path("store").display()),
        Some(&job),
        &[],
    );
    std::env::remove_var(otel.0);
    for _ in 0..2 {
        cl.worker(&c.endpoint, &[(otel.0, otel.1.clone())]);
    }
    // The same job on one process (dp = 1, same global batch), for the loss comparison.
    let solo_job = cl.write_job(
        "solo.toml",
        &spec("grow", 1, max_steps, 0, 1, &cl.path("solo-ckpt"), ""),
    );
    let solo = run(
        Command::new(bin("trellis-worker"))
            .args(["train", "--stop-at", "5", "--job"])
            .arg(&solo_job)
            .arg("--out")
            .arg(cl.path("solo")),
        LONG,
    );
    assert!(solo.status.success(), "{}", stderr_line(&solo));

    wait_status(&c.endpoint, "DP=2 training past step 20", LONG, |s| {
        phase(s) == "training" && u(&s["step"]) >= 20
    });
    let t_grow = Instant::now();
    // coordctl exports its own span too: it roots the growth's trace.
    let out = run(
        c.endpoint
            .coordctl()
            .args(["--output", "json", "grow", "--factor", "4"])
            .env(otel.0, &otel.1),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "coordctl grow: {}", stderr_line(&out));
    let g = json(&out);
    assert_eq!(
        (
            u(&g["generation"]),
            u(&g["from_layers"]),
            u(&g["to_layers"])
        ),
        (1, 2, 8),
        "{g}"
    );
    let grown = wait_status(&c.endpoint, "generation 1 training", LONG, |s| {
        u(&s["generation"]) == 1 && phase(s) == "training"
    });
    let grow_wall = t_grow.elapsed();
    assert_eq!(u(&grown["layers"]), 8);
    let done = wait_status(&c.endpoint, "the job to finish", LONG, |s| {
        phase(s) == "done"
    });

    // Status: generation 1, 4x the layers, the growth done with its phase times.
    assert_eq!(u(&done["generation"]), 1, "{done}");
    assert_eq!(u(&done["layers"]), 8);
    assert_eq!(u(&done["rollbacks"]), 0, "{done}");
    let h = &done["growth_history"][0];
    assert_eq!(h["phase"], "done", "{h}");
    let at = u(&h["at_step"]);
    let t = &done["last_growth_timings"];
    for k in [
        "checkpoint_seconds",
        "stack_seconds",
        "resume_seconds",
        "total_seconds",
    ] {
        assert!(t[k].as_f64().unwrap() > 0.0, "{k}: {t}");
    }
    eprintln!(
        "growth x4 at step {at}: coordctl grow -> generation 1 training in {:.2}s; phases {t}",
        grow_wall.as_secs_f64()
    );

    // Both ranks stopped at the same step: each ran steps 1..=max once, generation 0 up to the
    // barrier and generation 1 after it.
    let mut all = Vec::new();
    for w in 0..2 {
        let recs = cl.sample_log(w);
        let steps: Vec<u64> = recs.iter().map(|r| u(&r["step"])).collect();
        assert_eq!(
            steps,
            (1..=max_steps).collect::<Vec<_>>(),
            "worker {w} ran every step once"
        );
        let first_grown = recs
            .iter()
            .find(|r| u(&r["generation"]) == 1)
            .map(|r| u(&r["step"]));
        assert_eq!(
            first_grown,
            Some(at + 1),
            "worker {w} grew at the barrier step {at}"
        );
        all.extend(recs);
    }
    // No sample read twice or skipped across the growth.
    let (ids, ranks) = consumed_ids(&all);
    assert!(ranks.values().all(|&n| n == 2), "two ranks per step");
    assert_eq!(
        ids,
        (0..max_steps * GB).collect::<Vec<_>>(),
        "every sample id exactly once"
    );

    // The loss jumps at growth (G_stack is not function preserving) and recovers.
    let loss = json(&coordctl(&c.endpoint, &["--output", "json", "loss"]));
    let pts: Vec<(u64, f64)> = loss["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((u(&p["step"]), p["train_loss"].as_f64()?)))
        .collect();
    let mean = |r: std::ops::RangeInclusive<u64>| {
        let v: Vec<f64> = pts
            .iter()
            .filter(|(s, _)| r.contains(s))
            .map(|p| p.1)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let before = mean(at - 4..=at);
    let after = mean(at + 1..=at + 3);
    let end = mean(max_steps - 9..=max_steps);
    eprintln!("loss: before growth {before:.4}, just after {after:.4}, at the end {end:.4}");
    assert!(
        end < before && end < after,
        "the loss recovers: {before} {after} {end}"
    );

    // DP=2 on the global batch matches one process for the first steps.
    let solo_losses: Vec<f64> = std::fs::read_to_string(cl.path("solo/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(solo_losses.len(), 5);
    let mut worst = 0f64;
    for (i, l1) in solo_losses.iter().enumerate() {
        let l2 = pts.iter().find(|p| p.0 == i as u64 + 1).unwrap().1;
        let rel = (l1 - l2).abs() / l1.abs();
        worst = worst.max(rel);
        assert!(
            rel < 1e-4,
            "step {}: dp=1 {l1} vs dp=2 {l2} (rel {rel:e})",
            i + 1
        );
    }
    eprintln!(
        "DP=2 vs one worker, steps 1-5: max relative loss difference {worst:.2e} (tolerance 1e-4)"
    );

    // The coordinator tracked the managed run in the job's directory: metrics.jsonl and
    // TensorBoard event files, read back by TensorBoard's own reader, the growth included.
    let run_dir = cl.path("ckpt").join("grow");
    let lines: Vec<Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .expect("the coordinator writes metrics.jsonl for a managed job")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect();
    let train_steps: Vec<u64> = lines
        .iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| u(&v["step"]))
        .collect();
    assert_eq!(train_steps, (1..=max_steps).collect::<Vec<_>>());
    let growth: Vec<&Value> = lines.iter().filter(|v| v["kind"] == "growth").collect();
    assert_eq!(growth.len(), 1, "{growth:?}");
    assert_eq!((u(&growth[0]["step"]), u(&growth[0]["to_layers"])), (at, 8));
    let python = std::env::var("TRELLIS_PYTHON").expect("TRELLIS_PYTHON (scripts/env.sh)");
    let tb = trellis_telemetry::tracker::read_with_tensorboard(Path::new(&python), &run_dir)
        .unwrap()["scalars"]
        .take();
    assert_eq!(
        tb["train/loss"].as_array().unwrap().len() as u64,
        max_steps,
        "{tb}"
    );
    assert_eq!(
        tb["growth/to_layers"][0],
        serde_json::json!([at, 8.0]),
        "{tb}"
    );

    // The growth is one trace: coordinator `grow` and its phases, and every rank's spans.
    let spans = wait_for(
        "the growth's spans over OTLP",
        Duration::from_secs(30),
        || {
            let spans = otlp.spans();
            let grow = spans
                .iter()
                .find(|s| s.name == "grow" && s.service_name == "trellis-coordinator")?
                .clone();
            let in_trace: Vec<_> = spans
                .iter()
                .filter(|s| s.trace_id == grow.trace_id)
                .cloned()
                .collect();
            let has = |n: &str, svc: &str| {
                in_trace
                    .iter()
                    .filter(|s| s.name == n && s.service_name == svc)
                    .count()
            };
            let ok = has("coordctl grow", "coordctl") == 1
                && [
                    "grow.checkpoint",
                    "grow.stack",
                    "grow.reshard",
                    "grow.resume",
                ]
                .iter()
                .all(|n| has(n, "trellis-coordinator") == 1)
                && has("worker.grow.stack", "trellis-worker") == 2
                && has("worker.grow.checkpoint", "trellis-worker") == 2;
            ok.then_some((grow, in_trace))
        },
    );
    let (grow, in_trace) = spans;
    for s in in_trace.iter().filter(|s| s.name.starts_with("grow.")) {
        assert_eq!(
            s.parent_span_id, grow.span_id,
            "{} is a child of grow",
            s.name
        );
    }
    assert_eq!(grow.attr("generation"), Some("1"));
    let root = in_trace
        .iter()
        .find(|s| s.service_name == "coordctl")
        .unwrap();
    assert!(
        in_trace
            .iter()
            .any(|s| s.parent_span_id == root.span_id && s.service_name == "trellis-coordinator"),
        "the coordinator's request span is a child of coordctl's: {in_trace:#?}"
    );

    // Workers that exited on Stop are not lost; the catalogue lists only what exists (keep 2).
    for i in 1..=2 {
        let idx = cl.procs.len() - i;
        wait_for("the workers to exit on Stop", LONG, || {
            (!cl.procs[idx].is_running()).then_some(())
        });
        assert!(
            cl.procs[idx].child.wait().unwrap().success(),
            "worker exit status"
        );
    }
    let s = wait_status(&c.endpoint, "workers counted as exited", LONG, |s| {
        u(&s["workers"]["exited"]) == 2
    });
    assert_eq!(u(&s["workers"]["lost"]), 0, "{s}");
    let ws = json(&coordctl(&c.endpoint, &["--output", "json", "workers"]));
    assert!(
        ws.as_array()
            .unwrap()
            .iter()
            .all(|w| w["state"] == "exited"),
        "{ws}"
    );
    let cks = s["checkpoints"].as_array().unwrap();
    assert!(!cks.is_empty() && cks.len() <= 2, "{cks:?}");
    for ck in cks {
        let d = ck["dir"].as_str().unwrap();
        assert!(Path::new(d).is_dir(), "listed checkpoint {d} exists");
    }
    let _ = c.idx;
}

// ------------------------------------------------------------------------------------------
// 3. Faults: a worker killed mid-step; the coordinator killed (embedded store, mid-growth);
//    a leader killed with a standby waiting (etcd), then a restart on the same port (etcd)
// ------------------------------------------------------------------------------------------

#[test]
fn a_killed_worker_rolls_the_job_back_until_a_worker_rejoins() {
    let mut cl = Cluster::new("kill-worker");
    let (_, c) = cl.start_job(&spec("killw", 2, 100_000, 20, 2, &cl.path("ckpt"), ""), &[]);
    cl.worker(&c.endpoint, &[]);
    let victim = cl.worker(&c.endpoint, &[]);
    let before = wait_status(
        &c.endpoint,
        "a committed checkpoint and training past it",
        LONG,
        |s| {
            let ck = s["checkpoints"].as_array().map(|v| v.len()).unwrap_or(0);
            phase(s) == "training" && ck > 0 && u(&s["step"]) % 20 > 5
        },
    );
    let t0 = Instant::now();
    cl.procs[victim].kill9(); // SIGKILL, mid-step
    let rolled = wait_status(
        &c.endpoint,
        "the coordinator to notice",
        Duration::from_secs(30),
        |s| u(&s["rollbacks"]) >= 1,
    );
    let detect = t0.elapsed();
    assert_eq!(u(&rolled["rollbacks"]), 1, "{rolled}");
    let waiting = wait_status(&c.endpoint, "waiting for a worker", LONG, |s| {
        phase(s) == "waiting_for_workers"
    });
    let restored = waiting["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| u(&c["step"]))
        .max()
        .unwrap();
    assert!(
        waiting["message"]
            .as_str()
            .unwrap()
            .contains(&format!("checkpoint step {restored}")),
        "{waiting}"
    );
    let t1 = Instant::now();
    cl.worker(&c.endpoint, &[]);
    let back = wait_status(&c.endpoint, "training again in a new epoch", LONG, |s| {
        phase(s) == "training"
            && u(&s["epoch"]) > u(&before["epoch"])
            && u(&s["step"]) > restored + 5
    });
    let rejoin = t1.elapsed();
    // The new rank started from the committed checkpoint.
    let fresh_recs = cl.sample_log(2); // the third worker process
    assert_eq!(
        fresh_recs.first().map(|r| u(&r["step"])),
        Some(restored + 1),
        "restored from step {restored}"
    );
    assert!(u(&back["generation"]) == 0 && u(&back["rollbacks"]) == 1);
    eprintln!(
        "SIGKILL of a worker: noticed in {:.2}s (heartbeat TTL 3s; the session stream ends at once); \
         rejoin -> training again from checkpoint step {restored} in {:.2}s",
        detect.as_secs_f64(),
        rejoin.as_secs_f64()
    );
    assert!(
        detect < Duration::from_secs(3 + 2),
        "noticed within the liveness timeout: {detect:?}"
    );
}

#[test]
fn a_coordinator_killed_mid_growth_recovers_from_the_embedded_store() {
    let mut cl = Cluster::new("kill-coord");
    let job = cl.write_job(
        "job.toml",
        &spec("killc", 2, 100_000, 20, 3, &cl.path("ckpt"), ""),
    );
    let port = free_port();
    let store = format!("file:{}", cl.path("store").display());
    let c = cl.coordinator("coordinator-1", port, &store, Some(&job), &[]);
    let hold = [("TRELLIS_FAULT_GROW_DELAY_MS", "3000".to_string())];
    cl.worker(&c.endpoint, &hold);
    cl.worker(&c.endpoint, &hold);
    wait_status(&c.endpoint, "training past step 30", LONG, |s| {
        phase(s) == "training" && u(&s["step"]) >= 30
    });
    let out = coordctl(&c.endpoint, &["grow", "--factor", "2"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    let mid = wait_status(&c.endpoint, "the growth in its stack phase", LONG, |s| {
        s["growth"]["phase"] == "stack"
    });
    let history = train_losses(&c.endpoint);
    cl.procs[c.idx].kill9();
    let t0 = Instant::now();
    let c2 = cl.coordinator("coordinator-2", port, &store, None, &[]);
    // The loss history survived the restart (it is written to the store with the state).
    let recovered: BTreeMap<u64, f64> = train_losses(&c2.endpoint).into_iter().collect();
    for (step, l) in history.iter().filter(|(s, _)| *s <= 20) {
        assert_eq!(
            recovered.get(step),
            Some(l),
            "train loss of step {step} after the restart"
        );
    }
    let s = wait_status(&c2.endpoint, "the job recovered and training", LONG, |s| {
        phase(s) == "training" && u(&s["epoch"]) > u(&mid["epoch"])
    });
    let recovered = t0.elapsed();
    let s2 = wait_status(&c2.endpoint, "progress after recovery", LONG, |x| {
        u(&x["step"]) > u(&s["step"]) + 10
    });
    // Old or new generation, never half grown.
    let gen = u(&s2["generation"]);
    assert!(gen <= 1);
    assert_eq!(u(&s2["layers"]), 2 << gen, "{s2}");
    assert!(
        s2["growth"].is_null(),
        "no growth in flight after recovery: {s2}"
    );
    let h = &s2["growth_history"][0];
    assert_eq!(
        h["phase"],
        if gen == 0 { "rolled_back" } else { "done" },
        "{h}"
    );
    assert!(
        s2["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| u(&c["layers"]) == 2 << u(&c["generation"])),
        "{s2}"
    );
    eprintln!(
        "coordinator SIGKILL in the stack phase of a growth: restarted, recovered (generation {gen}) and training in {:.2}s",
        recovered.as_secs_f64()
    );
}

/// Issue 10: the newest committed checkpoint is corrupted (one flipped byte) while the
/// coordinator is down. The restarted coordinator finds it unusable, reports it and sets it
/// aside (never deletes it), and the job resumes from the next older good checkpoint and
/// finishes.
#[test]
fn a_corrupt_newest_checkpoint_falls_back_to_the_next_older_one_after_a_restart() {
    let mut cl = Cluster::new("corrupt");
    let max_steps = 60;
    // keep = 3: rank 0 collects only what the coordinator's recorded catalogue no longer lists,
    // so the older checkpoint this test falls back to is still on disk after the kill.
    let job = cl.write_job(
        "job.toml",
        &spec("corrupt", 2, max_steps, 10, 3, &cl.path("ckpt"), ""),
    );
    let port = free_port();
    let store = format!("file:{}", cl.path("store").display());
    let c = cl.coordinator("coordinator-1", port, &store, Some(&job), &[]);
    let workers = [cl.worker(&c.endpoint, &[]), cl.worker(&c.endpoint, &[])];
    let s = wait_status(&c.endpoint, "three committed checkpoints", LONG, |s| {
        s["checkpoints"].as_array().map_or(0, |a| a.len()) >= 3
    });
    cl.procs[c.idx].kill9();
    // The workers go too: the restarted coordinator then waits for new ones on its restore
    // point, and the checks below cannot race a fast job that re-commits the same steps (and
    // replaces the unusable entry) within a second of the restart.
    for w in workers {
        cl.procs[w].kill9();
    }
    let cks = s["checkpoints"].as_array().unwrap().clone();
    let (older, newest) = (&cks[cks.len() - 2], &cks[cks.len() - 1]);
    let bad_dir = std::path::PathBuf::from(newest["dir"].as_str().unwrap());
    // Corrupt the newest listed checkpoint and any the ranks committed after the snapshot (the
    // job trained on until the kill): whichever is the restore point, it is corrupt.
    let root = bad_dir.parent().unwrap().to_path_buf();
    let mut corrupted = vec![];
    for e in std::fs::read_dir(&root).unwrap() {
        let dir = e.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if step <= u(&older["step"]) || !dir.join("manifest.json").is_file() {
            continue;
        }
        let victim = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .expect("a shard file");
        let mut bytes = std::fs::read(&victim).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&victim, bytes).unwrap();
        corrupted.push(step);
    }
    assert!(corrupted.contains(&u(&newest["step"])), "{corrupted:?}");

    let c2 = cl.coordinator("coordinator-2", port, &store, None, &[]);
    let s2 = wait_status(
        &c2.endpoint,
        "recovered onto the older checkpoint",
        LONG,
        |x| {
            x["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("checkpoint step {}", u(&older["step"]))))
        },
    );
    let listed = s2["checkpoints"].as_array().unwrap();
    let bad = listed
        .iter()
        .find(|c| c["step"] == newest["step"])
        .expect("the unusable checkpoint stays listed");
    let why = bad["unusable"].as_str().unwrap_or_default();
    assert!(
        why.contains("sha256") || why.contains("hash") || why.contains("mismatch"),
        "reported with its reason: {bad}"
    );
    let aside = bad_dir.with_extension("unusable");
    assert!(
        aside.is_dir(),
        "set aside for inspection at {}",
        aside.display()
    );
    cl.worker(&c2.endpoint, &[]);
    cl.worker(&c2.endpoint, &[]);
    let done = wait_status(&c2.endpoint, "the job to finish", LONG, |x| {
        phase(x) == "done"
    });
    assert_eq!(u(&done["step"]), max_steps, "{done}");
    assert!(
        aside.is_dir(),
        "garbage collection kept the unusable checkpoint"
    );
    eprintln!(
        "newest checkpoint step {} corrupted: restart fell back to step {} and finished; reported: {why}",
        u(&newest["step"]),
        u(&older["step"])
    );
}

#[test]
fn a_standby_coordinator_takes_over_from_etcd_and_a_restart_recovers() {
    let etcd = match trellis_store::testing::EtcdServer::start() {
        Ok(e) => e,
        Err(e) => panic!("{e}"),
    };
    let mut cl = Cluster::new("standby");
    let job = cl.write_job(
        "job.toml",
        &spec("standby", 2, 100_000, 20, 2, &cl.path("ckpt"), ""),
    );
    let (pa, pb_) = (free_port(), free_port());
    let ttl = ["--leader-ttl-secs", "2"];
    let a = cl.coordinator("coordinator-a", pa, &etcd.spec(), Some(&job), &ttl);
    let (b_idx, b_rx) = cl.spawn_coordinator("coordinator-b", pb_, &etcd.spec(), None, &ttl);
    let b_log = cl.procs[b_idx].log.clone();
    wait_for("B to wait as a standby", LONG, || {
        std::fs::read_to_string(&b_log)
            .ok()?
            .contains("standby: waiting for leadership")
            .then_some(())
    });
    let endpoints = a
        .endpoint
        .with_addrs(&[&format!("127.0.0.1:{pa}"), &format!("127.0.0.1:{pb_}")]);
    cl.worker(&endpoints, &[]);
    cl.worker(&endpoints, &[]);
    let s = wait_status(&a.endpoint, "training with a checkpoint", LONG, |s| {
        phase(s) == "training" && !s["checkpoints"].as_array().unwrap().is_empty()
    });
    cl.procs[a.idx].kill9();
    let t0 = Instant::now();
    let b = cl.serving(b_idx, &b_rx);
    let takeover = t0.elapsed();
    let sb = wait_status(&b.endpoint, "the standby leading and training", LONG, |x| {
        phase(x) == "training" && u(&x["epoch"]) > u(&s["epoch"])
    });
    let resumed = t0.elapsed();
    wait_status(&b.endpoint, "progress under the new leader", LONG, |x| {
        u(&x["step"]) > u(&sb["step"]) + 10
    });
    eprintln!(
        "leader SIGKILL: standby elected and serving in {:.2}s (lease TTL 2s), job training again in {:.2}s",
        takeover.as_secs_f64(),
        resumed.as_secs_f64()
    );
    // Kill the new leader too and restart a coordinator on the first port: it recovers the job
    // from etcd once the dead leader's lease expires.
    cl.procs[b.idx].kill9();
    let t1 = Instant::now();
    let a2 = cl.coordinator("coordinator-a2", pa, &etcd.spec(), None, &ttl);
    let sa = wait_status(
        &a2.endpoint,
        "the restarted coordinator training",
        LONG,
        |x| phase(x) == "training" && u(&x["epoch"]) > u(&sb["epoch"]),
    );
    wait_status(&a2.endpoint, "progress after the restart", LONG, |x| {
        u(&x["step"]) > u(&sa["step"]) + 10
    });
    assert_eq!(sa["job_id"], "standby");
    eprintln!(
        "coordinator restart on etcd: training again in {:.2}s",
        t1.elapsed().as_secs_f64()
    );
    drop(cl);
    drop(etcd);
}

// ------------------------------------------------------------------------------------------
// 4. Bad requests: a gRPC code, an actionable one-line message, no change
// ------------------------------------------------------------------------------------------

#[test]
fn bad_requests_are_refused_with_a_code_and_change_nothing() {
    let mut cl = Cluster::new("bad");
    let text = spec("bad", 2, 100_000, 50, 2, &cl.path("ckpt"), "");
    let job = cl.write_job("job.toml", &text);
    // A budget that holds the 8-layer model (x4) exactly but not 16 layers (x8).
    let parsed = trellis_core::job::JobSpec::from_toml(&text, cl.dir.path(), "job").unwrap();
    let cfg8 = parsed.model_config(512).unwrap().with_layers(8);
    let budget = trellis_core::layout::memory_per_rank(&cfg8, 1, 2, 32).total;
    let budget_arg = budget.to_string();
    let c = cl.coordinator(
        "coordinator",
        0,
        &format!("file:{}", cl.path("store").display()),
        Some(&job),
        &["--device-memory-bytes", &budget_arg],
    );
    let hold = [("TRELLIS_FAULT_GROW_DELAY_MS", "4000".to_string())];
    cl.worker(&c.endpoint, &hold);
    cl.worker(&c.endpoint, &hold);
    let s0 = wait_status(&c.endpoint, "training", LONG, |s| {
        phase(s) == "training" && u(&s["step"]) > 5
    });
    let ep = &c.endpoint;

    // coordctl checks what it can locally: exit 2, one line.
    for f in ["0", "1", "-2", "2.5", "x"] {
        refused(&coordctl(ep, &["grow", "--factor", f]), 2, "factor");
    }
    refused(
        &coordctl(ep, &["grow", "--factor", "4", "--operator", "bogus"]),
        2,
        "stack",
    );
    // The server refuses the same with INVALID_ARGUMENT, and says what to do.
    let rt = rt();
    rt.block_on(async {
        let mut ctl = control(ep).await;
        let grow = |factor: u32, operator: i32, job: &str| pb::GrowRequest {
            job_id: job.into(),
            factor,
            operator,
            ..Default::default()
        };
        for f in [0, 1] {
            let e = ctl.grow(grow(f, 0, "")).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            assert!(
                e.message().contains("factor must be an integer ≥ 2"),
                "{}",
                e.message()
            );
        }
        // An operator value this coordinator does not know.
        let e = ctl.grow(grow(4, 99, "")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains("unknown growth operator 99"),
            "{}",
            e.message()
        );
        let e = ctl.grow(grow(4, 0, "nope")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert!(
            e.message().contains("'nope'") && e.message().contains("'bad'"),
            "{}",
            e.message()
        );
        let e = ctl
            .get_status(pb::GetStatusRequest {
                job_id: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = ctl.grow(grow(8, 0, "")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        eprintln!("x8 over the memory budget: {:?} {}", e.code(), e.message());
    });
    // Exceeding memory: refused by the coordinator (exit 1) with what to do.
    let err = refused(&coordctl(ep, &["grow", "--factor", "8"]), 1, "GiB");
    // No layout of the job's ranks holds it: the need at every valid TP, and what to do.
    assert!(
        err.contains("budget")
            && err.contains("no layout of the 2 rank(s)")
            && err.contains("TP=1: ")
            && err.contains("TP=2: ")
            && err.contains("add workers"),
        "{err}"
    );

    // Paused: FAILED_PRECONDITION (exit 1).
    assert!(coordctl(ep, &["pause"]).status.success());
    wait_status(ep, "paused", LONG, |s| phase(s) == "paused");
    refused(&coordctl(ep, &["grow", "--factor", "2"]), 1, "resume");
    assert!(coordctl(ep, &["resume"]).status.success());
    wait_status(ep, "training", LONG, |s| phase(s) == "training");

    // A stale acknowledgement (not a rank of this epoch / an older generation) is fenced and
    // changes nothing: this one reports a failure, which from a rank would roll the job back.
    let before = status(ep).unwrap();
    rt.block_on(async {
        // With mTLS the session must claim the id its certificate names.
        let certs = cl.certs.as_ref().expect("a TLS cluster");
        certs.worker("intruder");
        let as_worker = ep.as_client(certs.client("worker-intruder"));
        let mut w = pb::worker_service_client::WorkerServiceClient::new(as_worker.channel().await);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let msg = |k| pb::WorkerMessage { kind: Some(k) };
        tx.send(msg(pb::worker_message::Kind::Hello(pb::Hello {
            worker_id: "intruder".into(),
            host: "test".into(),
            pid: 1,
            device: "cpu".into(),
            ring_address: "127.0.0.1:9".into(),
            tp_ring_address: "127.0.0.1:9".into(),
            ..Default::default()
        })))
        .unwrap();
        tx.send(msg(pb::worker_message::Kind::Ack(pb::Ack {
            epoch: u(&before["epoch"]),
            generation: 0,
            command_id: 1,
            phase: pb::AckPhase::Checkpoint as i32,
            ok: false,
            error: "stale".into(),
            ..Default::default()
        })))
        .unwrap();
        let _inbound = w
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ctl = control(ep).await;
            let s = ctl
                .get_status(pb::GetStatusRequest::default())
                .await
                .unwrap()
                .into_inner();
            if s.fenced_messages > u(&before["fenced_messages"]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the stale ack was not counted as fenced"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(tx);
    });
    let after = status(ep).unwrap();
    assert_eq!(after["rollbacks"], before["rollbacks"], "{after}");
    assert_eq!(after["epoch"], before["epoch"]);

    // Nothing changed by the refusals.
    assert_eq!(u(&after["generation"]), 0);
    assert_eq!(u(&after["layers"]), 2);
    assert!(
        after["growth_history"].as_array().unwrap().is_empty(),
        "{after}"
    );
    assert_eq!(after["epoch"], s0["epoch"]);

    // Growth while growing: the second is FAILED_PRECONDITION (exit 1).
    let ok = coordctl(ep, &["grow", "--factor", "4"]);
    assert!(
        ok.status.success(),
        "x4 fits the budget: {}",
        stderr_line(&ok)
    );
    refused(
        &coordctl(ep, &["grow", "--factor", "2"]),
        1,
        "already in flight",
    );
    // Unreachable: exit 3.
    refused(
        &coordctl(
            &cl.endpoint(&format!("127.0.0.1:{}", free_port())),
            &["status"],
        ),
        3,
        "127.0.0.1",
    );

    // A job whose heads do not divide over tp is refused at submit (INVALID_ARGUMENT, exit 1);
    // a coordinator without a job answers NOT_FOUND (exit 1).
    let empty = cl.coordinator(
        "coordinator-empty",
        0,
        &format!("file:{}", cl.path("store2").display()),
        None,
        &[],
    );
    let tp3 = cl.write_job(
        "tp3.toml",
        &text
            .replace("dp = 2\ntp = 1", "dp = 1\ntp = 3")
            .replace("global_batch = 4", "global_batch = 3"),
    );
    refused(
        &coordctl(&empty.endpoint, &["job", "submit", tp3.to_str().unwrap()]),
        1,
        "not divisible by parallel.tp 3",
    );
    refused(&coordctl(&empty.endpoint, &["status"]), 1, "submit");
}

// ------------------------------------------------------------------------------------------
// 5. A NaN loss: rollback to the last committed checkpoint, the batch skipped, counted
// ------------------------------------------------------------------------------------------

#[test]
fn a_nan_loss_rolls_back_and_skips_its_data_window() {
    let mut cl = Cluster::new("nan");
    let max_steps = 60;
    let nan_step = 25;
    let (_, c) = cl.start_job(&spec("nan", 2, max_steps, 10, 3, &cl.path("ckpt"), ""), &[]);
    let nan = [("TRELLIS_FAULT_NAN_AT_STEP", nan_step.to_string())];
    cl.worker(&c.endpoint, &nan);
    cl.worker(&c.endpoint, &nan);
    let done = wait_status(&c.endpoint, "the job to finish", LONG, |s| {
        phase(s) == "done" || phase(s) == "failed"
    });
    assert_eq!(phase(&done), "done", "{done}");
    assert_eq!(u(&done["rollbacks"]), 1, "{done}");
    assert!(u(&done["loss_anomalies"]) >= 1, "{done}");
    let loss = json(&coordctl(&c.endpoint, &["--output", "json", "loss"]));
    assert!(
        loss["anomalies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "nan" && u(&a["step"]) == nan_step),
        "{}",
        loss["anomalies"]
    );
    let m = http_get(&c.metrics, "/metrics");
    assert_eq!(
        metric(&m, "trellis_loss_anomalies_total{kind=\"nan\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "trellis_rollbacks_total"), Some(1.0));

    // The run restarted from the checkpoint before the NaN (step 20) and skipped exactly the
    // offending window: every other sample id is consumed exactly once.
    let mut all = cl.sample_log(0);
    all.extend(cl.sample_log(1));
    let epochs: std::collections::BTreeSet<u64> = all.iter().map(|r| u(&r["epoch"])).collect();
    assert_eq!(epochs.len(), 2, "one rollback: {epochs:?}");
    let second = *epochs.iter().last().unwrap();
    let first_after = all
        .iter()
        .filter(|r| u(&r["epoch"]) == second)
        .map(|r| u(&r["step"]))
        .min();
    // From the last committed checkpoint: step 20, or step 10 when the NaN (step 25) came
    // before step 20's background write was committed.
    let restart = first_after.unwrap() - 1;
    assert!(
        restart == 20 || restart == 10,
        "restarted from checkpoint step {restart}"
    );
    let (ids, _) = consumed_ids(&all);
    let window = (nan_step - 1) * GB..nan_step * GB;
    let expected: Vec<u64> = (0..(max_steps + 1) * GB)
        .filter(|i| !window.contains(i))
        .collect();
    assert_eq!(ids, expected, "skipped exactly {window:?}");
    eprintln!("NaN at step {nan_step}: rolled back to step {restart}, skipped samples {window:?}, anomaly counted");
}

// ------------------------------------------------------------------------------------------
// The offline path: stop, `coordctl checkpoint grow`, a new job from the grown checkpoint
// ------------------------------------------------------------------------------------------

#[test]
fn a_new_job_starts_from_an_offline_grown_checkpoint() {
    let mut cl = Cluster::new("offline");
    let ckpt = cl.path("ckpt");
    let a = cl.write_job("a.toml", &spec("small", 1, 30, 10, 3, &ckpt, ""));
    let c = cl.coordinator(
        "coordinator-a",
        0,
        &format!("file:{}", cl.path("store-a").display()),
        Some(&a),
        &[],
    );
    cl.worker(&c.endpoint, &[]);
    let done = wait_status(&c.endpoint, "job a to finish", LONG, |s| {
        phase(s) == "done" || phase(s) == "failed"
    });
    assert_eq!(phase(&done), "done", "{done}");
    let src = ckpt.join("small/step-30");
    let grown = cl.path("grown");
    grow_offline(&c.endpoint, &src, &grown);

    // A second coordinator, fresh store, no job yet.
    let b = cl.coordinator(
        "coordinator-b",
        0,
        &format!("file:{}", cl.path("store-b").display()),
        None,
        &[],
    );
    let with_init = |name: &str, dir: &Path, max_steps: u64| {
        spec(name, 1, max_steps, 10, 3, &ckpt, "").replace(
            "[parallel]",
            &format!("init_from = \"{}\"\n\n[parallel]", dir.display()),
        )
    };
    // Refused, nothing submitted: a missing checkpoint, a run already past max_steps.
    for (file, text, needle) in [
        (
            "missing.toml",
            with_init("big", &cl.path("nope"), 60),
            "no manifest.json",
        ),
        (
            "short.toml",
            with_init("big", &grown, 20),
            "raise max_steps",
        ),
    ] {
        let p = cl.write_job(file, &text);
        let err = refused(
            &coordctl(&b.endpoint, &["job", "submit", p.to_str().unwrap()]),
            1,
            needle,
        );
        assert!(err.contains("checkpoint.init_from"), "{err}");
    }
    refused(&coordctl(&b.endpoint, &["status"]), 1, "submit");

    let p = cl.write_job("b.toml", &with_init("big", &grown, 50));
    let out = coordctl(&b.endpoint, &["job", "submit", p.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    cl.worker(&b.endpoint, &[]); // worker 1
    let s = wait_status(&b.endpoint, "job b to finish", LONG, |s| {
        phase(s) == "done" || phase(s) == "failed"
    });
    assert_eq!(phase(&s), "done", "{s}");
    assert_eq!(u(&s["layers"]), 8, "{s}");
    assert_eq!(u(&s["generation"]), 1, "{s}");
    assert_eq!(u(&s["step"]), 50, "{s}");
    // Job b continued job a's data stream: its first step read the samples after a's last.
    let first = cl
        .sample_log(1)
        .into_iter()
        .min_by_key(|r| u(&r["step"]))
        .unwrap();
    assert_eq!(u(&first["step"]), 31, "{first}");
    assert_eq!(u(&first["start"]), 30 * GB, "{first}");
    assert!(ckpt.join("big/step-50/manifest.json").exists());
}

// ------------------------------------------------------------------------------------------
// A job from an imported checkpoint takes `[model] vocab_size` from it
// ------------------------------------------------------------------------------------------

#[test]
fn a_job_from_an_imported_checkpoint_takes_its_vocab_size_also_after_a_restart() {
    let mut cl = Cluster::new("importvocab");
    // A Hugging Face model with a 320-token vocabulary: a two-step standalone run (its
    // byte-level BPE has 320 tokens), exported with `coordctl checkpoint export --hf` and
    // imported back with `coordctl checkpoint import --hf`: a step-0 checkpoint with the
    // tokenizer, as from any HF directory.
    let src_ckpt = cl.path("src-ckpt");
    let cache = cl.path("data-cache");
    let src = TinyJob {
        max_steps: 2,
        interval: 2,
        ..TinyJob::new("src", &src_ckpt)
    }
    .toml()
    .replace("vocab_size = 512", "vocab_size = 320")
    .replace(
        &trellis_tests::cache_dir().display().to_string(),
        &cache.display().to_string(),
    );
    let src_job = cl.write_job("src.toml", &src);
    let out = run(
        Command::new(bin("trellis-worker"))
            .args(["train", "--job", src_job.to_str().unwrap(), "--out"])
            .arg(cl.path("src-out")),
        LONG,
    );
    assert!(out.status.success(), "{}", stderr_line(&out));
    let port = free_port();
    let store = format!("file:{}", cl.path("store").display());
    let c = cl.coordinator("coordinator-1", port, &store, None, &[]);
    let (hf, imported) = (cl.path("hf"), cl.path("imported/step-0"));
    for args in [
        vec![
            "checkpoint",
            "export",
            "--hf",
            hf.to_str().unwrap(),
            src_ckpt.join("src/step-2").to_str().unwrap(),
        ],
        vec![
            "checkpoint",
            "import",
            "--hf",
            hf.to_str().unwrap(),
            imported.to_str().unwrap(),
        ],
    ] {
        let out = coordctl(&c.endpoint, &args);
        assert!(out.status.success(), "{args:?}: {}", stderr_line(&out));
    }
    let ckpt = cl.path("ckpt");
    // The job names the import's tokenizer and no [model] vocab_size; data.vocab_size (512)
    // would be the wrong guess. It grows ×2 at step 3.
    let job = |model_extra: &str| {
        TinyJob {
            name: "fromimport",
            max_steps: 6,
            interval: 3,
            extra: "\n[[growth]]\nat_step = 3\nfactor = 2\noperator = \"stack\"\n",
            ..TinyJob::new("fromimport", &ckpt)
        }
        .toml()
        .replace(
            "vocab_size = 512",
            &format!(
                "vocab_size = 512\ntokenizer = \"{}\"",
                imported.join("tokenizer.json").display()
            ),
        )
        .replace(
            "preset = \"tiny\"",
            &format!("preset = \"tiny\"\n{model_extra}"),
        )
        .replace(
            "[parallel]",
            &format!("init_from = \"{}\"\n\n[parallel]", imported.display()),
        )
    };
    // A different vocab_size is refused in one line naming both numbers; nothing is submitted.
    let p = cl.write_job("wrong.toml", &job("vocab_size = 512"));
    let err = refused(
        &coordctl(&c.endpoint, &["job", "submit", p.to_str().unwrap()]),
        1,
        "vocab_size is 512",
    );
    assert!(err.contains("has a vocabulary of 320"), "{err}");
    refused(&coordctl(&c.endpoint, &["status"]), 1, "submit");
    // Without it the checkpoint's 320 is taken, and the job trains to the end.
    let p = cl.write_job("job.toml", &job(""));
    let out = coordctl(&c.endpoint, &["job", "submit", p.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    // A coordinator that recovers the job from its store builds the same model (the value is
    // kept with the job record; the growth is planned from it): SIGKILL before any worker
    // joins, restart on the same store.
    cl.procs[c.idx].kill9();
    let c = cl.coordinator("coordinator-2", port, &store, None, &[]);
    cl.worker(&c.endpoint, &[]);
    let s = wait_status(&c.endpoint, "the job to finish", LONG, |s| {
        phase(s) == "done" || phase(s) == "failed"
    });
    assert_eq!(phase(&s), "done", "{s}");
    assert_eq!(u(&s["step"]), 6, "{s}");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("fromimport/step-6/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(u(&state["model"]["vocab_size"]), 320, "{state}");
    assert_eq!(u(&state["model"]["num_hidden_layers"]), 4, "{state}");
    // The coordinator's own count (from its model config after the growth) agrees.
    let grown: trellis_core::config::ModelConfig =
        serde_json::from_value(state["model"].clone()).unwrap();
    assert_eq!(u(&s["parameters"]), grown.num_parameters(), "{s}");
}

// ------------------------------------------------------------------------------------------
// Issue 4, acceptance 2: a growth that no longer fits one rank is re-planned to TP = 2
// ------------------------------------------------------------------------------------------

#[test]
fn a_growth_that_does_not_fit_one_rank_reshards_to_tp2_and_resumes() {
    let mut cl = Cluster::new("relayout");
    let (max_steps, grow_at) = (40u64, 20u64);
    let text = spec(
        "relayout",
        2,
        max_steps,
        10,
        5,
        &cl.path("ckpt"),
        &format!("\n[[growth]]\nat_step = {grow_at}\nfactor = 4\noperator = \"stack\"\n"),
    )
    .replace("eval_interval = 50", "eval_interval = 10");
    let job = cl.write_job("job.toml", &text);
    // A per-rank budget between what the grown model needs at TP = 1 (DP = 2, 2 sequences per
    // rank) and at TP = 2 (DP = 1, 4 sequences per rank); the small model fits TP = 1.
    let parsed = trellis_core::job::JobSpec::from_toml(&text, cl.dir.path(), "test").unwrap();
    let small = parsed.model_config(512).unwrap();
    let grown = small.with_layers(4 * small.num_hidden_layers);
    let need = |c, tp, mb| trellis_core::layout::memory_per_rank(c, tp, mb, 32).total;
    let budget = (need(&grown, 1, 2) + need(&grown, 2, 4)) / 2;
    assert!(need(&small, 1, 2) <= budget && need(&grown, 2, 4) <= budget);
    assert!(need(&grown, 1, 2) > budget);
    let budget_arg = budget.to_string();
    let c = cl.coordinator(
        "coordinator",
        0,
        &format!("file:{}", cl.path("store").display()),
        Some(&job),
        &["--device-memory-bytes", &budget_arg],
    );
    cl.worker(&c.endpoint, &[]);
    cl.worker(&c.endpoint, &[]);
    let before = wait_status(&c.endpoint, "training at TP=1", LONG, |s| {
        u(&s["step"]) >= 1
    });
    assert_eq!(u(&before["layout"]["tp"]), 1, "{before}");
    assert_eq!(u(&before["layout"]["dp"]), 2, "{before}");
    let s = wait_status(&c.endpoint, "the job to finish", LONG, |s| {
        phase(s) == "done" || phase(s) == "failed"
    });
    assert_eq!(phase(&s), "done", "{s}");
    assert_eq!(u(&s["layers"]), 8, "{s}");
    assert_eq!(u(&s["layout"]["tp"]), 2, "{s}");
    assert_eq!(u(&s["layout"]["dp"]), 1, "{s}");
    let expl = s["layout"]["explanation"].as_str().unwrap();
    assert!(expl.contains("re-planned at growth to TP=2"), "{expl}");
    let g = &s["growth_history"][0];
    assert_eq!(u(&g["tp_after"]), 2, "{g}");
    assert_eq!(u(&g["at_step"]), grow_at, "{g}");
    assert!(
        g["timings"]["reshard_seconds"].as_f64().unwrap() > 0.0,
        "{g}"
    );
    let after = g["val_loss_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("no val_loss_after: {g}"));
    let eval_tp1 = |ck: &Path| -> Value {
        let out = run(
            Command::new(bin("trellis-worker"))
                .args(["eval", "--output", "json", "--checkpoint"])
                .arg(ck)
                .arg("--job")
                .arg(&job),
            LONG,
        );
        assert!(out.status.success(), "{}", stderr_line(&out));
        json(&out)
    };
    // The loss right after the reshard (TP = 2) equals the loss the same checkpoint gives at
    // TP = 1: the growth checkpoint (TP = 1, generation 0), grown x4 offline, evaluated at
    // TP = 1 as the job's trainer evaluates. fp32; the TP reductions reorder sums: 1e-4.
    let pre = cl.path(&format!("ckpt/relayout/step-{grow_at}"));
    let grown_dir = cl.path("grown-tp1");
    grow_offline(&c.endpoint, &pre, &grown_dir);
    let e = eval_tp1(&grown_dir);
    let tp1 = e["loss"].as_f64().unwrap();
    assert!(
        (tp1 - after).abs() < 1e-4,
        "TP=1 {tp1} vs TP=2 right after the reshard {after}"
    );
    // And the TP = 2 training state: the final checkpoint (step 40; periodic ones may land a few
    // steps late when the ranks run ahead of the request), written by the two TP ranks (one
    // slice each), evaluated at TP = 1, gives the validation loss the TP = 2 job reported there.
    let ck_end = cl.path(&format!("ckpt/relayout/step-{max_steps}"));
    assert!(
        ck_end.join("model-tp1-of-2.safetensors").exists(),
        "{}",
        ck_end.display()
    );
    let e_end = eval_tp1(&ck_end);
    assert_eq!(u(&e_end["generation"]), 1, "{e_end}");
    let loss = json(&coordctl(&c.endpoint, &["--output", "json", "loss"]));
    let job_end = loss["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| u(&p["step"]) == max_steps && p["val_loss"].is_f64())
        .unwrap_or_else(|| panic!("no val loss at step {max_steps}: {loss}"))["val_loss"]
        .as_f64()
        .unwrap();
    let l_end = e_end["loss"].as_f64().unwrap();
    assert!(
        (l_end - job_end).abs() < 1e-4,
        "step {max_steps}: TP=1 {l_end} vs the TP=2 job {job_end}"
    );

    // DP 2 -> 1 neither skipped nor repeated a sample (both TP ranks read the same ones).
    let mut all = cl.sample_log(0);
    all.extend(cl.sample_log(1));
    let mut by_step: BTreeMap<u64, (u64, std::collections::BTreeSet<(u64, u64)>)> = BTreeMap::new();
    for r in &all {
        let (epoch, step) = (u(&r["epoch"]), u(&r["step"]));
        let e = by_step.entry(step).or_insert((epoch, Default::default()));
        if epoch > e.0 {
            *e = (epoch, Default::default());
        }
        if epoch == e.0 {
            e.1.insert((u(&r["start"]), u(&r["end"])));
        }
    }
    let mut ids: Vec<u64> = by_step
        .values()
        .flat_map(|(_, rs)| rs.iter().flat_map(|&(a, b)| a..b))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..max_steps * GB).collect::<Vec<_>>());
    eprintln!("grown at step {grow_at} and resharded to TP=2: val loss {after:.6} (TP=1 from the same checkpoint: {tp1:.6}); step {max_steps}: {job_end:.6} vs {l_end:.6}");
}

// ------------------------------------------------------------------------------------------
// Issue 4, acceptance 1: DP = 2 × TP = 2 over four worker processes matches one rank
// ------------------------------------------------------------------------------------------

/// Train losses by step of a finished job.
fn train_losses(endpoint: &Endpoint) -> Vec<(u64, f64)> {
    let loss = json(&coordctl(endpoint, &["--output", "json", "loss"]));
    loss["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((u(&p["step"]), p["train_loss"].as_f64()?)))
        .collect()
}

#[test]
fn dp2_tp2_over_four_processes_matches_one_rank() {
    let mut cl = Cluster::new("dp2tp2");
    let steps = 8u64;
    let run_job = |cl: &mut Cluster, name: &str, dp: usize, tp: usize| -> Vec<(u64, f64)> {
        let text = spec(name, dp, steps, 0, 1, &cl.path("ckpt"), "")
            .replace("tp = 1", &format!("tp = {tp}"))
            .replace(&format!("name = \"{name}\""), "name = \"same\"");
        let job = cl.write_job(&format!("{name}.toml"), &text);
        let c = cl.coordinator(
            &format!("coordinator-{name}"),
            0,
            &format!("file:{}", cl.path(&format!("store-{name}")).display()),
            Some(&job),
            &[],
        );
        for _ in 0..dp * tp {
            cl.worker(&c.endpoint, &[]);
        }
        let s = wait_status(&c.endpoint, "the job to finish", LONG, |s| {
            phase(s) == "done" || phase(s) == "failed"
        });
        assert_eq!(phase(&s), "done", "{s}");
        assert_eq!(u(&s["layout"]["tp"]), tp as u64, "{s}");
        assert_eq!(u(&s["layout"]["dp"]), dp as u64, "{s}");
        // CPU workers: TCP rings for groups of several, solo for groups of one.
        let want = |n: usize| if n > 1 { "ring" } else { "solo" };
        assert_eq!(s["backend"]["dp"], want(dp), "{s}");
        assert_eq!(s["backend"]["tp"], want(tp), "{s}");
        let l = train_losses(&c.endpoint);
        assert_eq!(l.len() as u64, steps, "{l:?}");
        l
    };
    let one = run_job(&mut cl, "one", 1, 1);
    std::fs::remove_dir_all(cl.path("ckpt")).unwrap();
    let four = run_job(&mut cl, "four", 2, 2);
    // Same seed, same global batch, same samples: the losses agree to fp32 reduction order
    // (TP all-reduces and DP gradient averaging reorder sums): 1e-4 absolute.
    for ((s1, a), (s4, b)) in one.iter().zip(&four) {
        assert_eq!(s1, s4);
        assert!(
            (a - b).abs() < 1e-4,
            "step {s1}: one rank {a} vs DP2xTP2 {b}"
        );
    }
    eprintln!(
        "DP2xTP2 over 4 processes vs one rank, {steps} steps: max |Δloss| = {:.2e}",
        one.iter()
            .zip(&four)
            .map(|((_, a), (_, b))| (a - b).abs())
            .fold(0.0, f64::max)
    );
}

// ------------------------------------------------------------------------------------------
// A frozen worker (SIGSTOP: its session stays open) expires by heartbeat; after SIGCONT its
// late messages are fenced
// ------------------------------------------------------------------------------------------

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

#[test]
fn a_frozen_worker_expires_by_heartbeat_and_its_late_messages_are_fenced() {
    let mut cl = Cluster::new("sigstop");
    let (_, c) = cl.start_job(
        &spec("frozen", 2, 100_000, 20, 2, &cl.path("ckpt"), ""),
        &[],
    );
    cl.worker(&c.endpoint, &[]);
    let victim = cl.worker(&c.endpoint, &[]);
    let before = wait_status(&c.endpoint, "training past a checkpoint", LONG, |s| {
        let ck = s["checkpoints"].as_array().map(|v| v.len()).unwrap_or(0);
        phase(s) == "training" && ck > 0
    });
    let pid = cl.procs[victim].child.id();
    let t0 = Instant::now();
    signal(pid, "-STOP");
    // Its TCP session stays open: only the missed heartbeats (TTL 3 s) can tell.
    let rolled = wait_status(&c.endpoint, "the heartbeat to expire", LONG, |s| {
        u(&s["rollbacks"]) >= 1
    });
    let detect = t0.elapsed();
    assert_eq!(u(&rolled["rollbacks"]), 1, "{rolled}");
    assert!(u(&rolled["workers"]["lost"]) >= 1, "{rolled}");
    let waiting = wait_status(&c.endpoint, "waiting for a worker", LONG, |s| {
        phase(s) == "waiting_for_workers"
    });
    assert!(u(&waiting["workers"]["lost"]) == 1, "{waiting}");
    cl.worker(&c.endpoint, &[]);
    let back = wait_status(&c.endpoint, "training again in a new epoch", LONG, |s| {
        phase(s) == "training" && u(&s["epoch"]) > u(&before["epoch"])
    });
    let fenced0 = u(&back["fenced_messages"]);
    // Thawed, the old rank still believes it is in the old epoch: whatever it sends for it is
    // fenced, and the job goes on without it.
    signal(pid, "-CONT");
    let after = wait_status(
        &c.endpoint,
        "the thawed worker's messages fenced",
        LONG,
        |s| u(&s["fenced_messages"]) > fenced0,
    );
    let later = wait_status(&c.endpoint, "training on", LONG, |s| {
        u(&s["step"]) > u(&after["step"]) + 20
    });
    assert_eq!(phase(&later), "training", "{later}");
    assert_eq!(
        u(&later["rollbacks"]),
        1,
        "the thawed worker caused no rollback: {later}"
    );
    assert_eq!(u(&later["epoch"]), u(&back["epoch"]), "{later}");
    eprintln!(
        "SIGSTOP of a worker: expired by heartbeat after {:.2}s (TTL 3s); after SIGCONT {} late message(s) fenced",
        detect.as_secs_f64(),
        u(&after["fenced_messages"]) - fenced0
    );
}

// ------------------------------------------------------------------------------------------
// A worker killed in the middle of a growth: the job rolls back to the previous generation's
// checkpoint (nothing half grown), and the growth succeeds when asked again
// ------------------------------------------------------------------------------------------

#[test]
fn a_worker_killed_mid_growth_rolls_back_to_the_old_generation_and_a_retry_grows() {
    let mut cl = Cluster::new("kill-grow");
    let (_, c) = cl.start_job(&spec("killg", 2, 100_000, 20, 3, &cl.path("ckpt"), ""), &[]);
    let hold = [("TRELLIS_FAULT_GROW_DELAY_MS", "3000".to_string())];
    cl.worker(&c.endpoint, &hold);
    let victim = cl.worker(&c.endpoint, &hold);
    wait_status(&c.endpoint, "training past step 10", LONG, |s| {
        phase(s) == "training" && u(&s["step"]) >= 10
    });
    let out = coordctl(&c.endpoint, &["grow", "--factor", "2"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    let mid = wait_status(&c.endpoint, "the growth in its stack phase", LONG, |s| {
        s["growth"]["phase"] == "stack"
    });
    let grow_ckpt = u(&mid["growth"]["at_step"]);
    cl.procs[victim].kill9();
    let rolled = wait_status(&c.endpoint, "the rollback", LONG, |s| {
        u(&s["rollbacks"]) >= 1 && s["growth"].is_null()
    });
    assert_eq!(u(&rolled["generation"]), 0, "{rolled}");
    assert_eq!(u(&rolled["layers"]), 2, "{rolled}");
    let h = &rolled["growth_history"][0];
    assert_eq!(h["phase"], "rolled_back", "{h}");
    assert!(!h["error"].as_str().unwrap().is_empty(), "{h}");
    // Training restarts from the newest recorded checkpoint of generation 0: the growth's own
    // if rank 0 committed it before the kill (its shards are written in the background while
    // the ranks stack; the commit waits for rank 0's stack), else the one before it.
    cl.worker(&c.endpoint, &[]);
    let back = wait_status(&c.endpoint, "training again", LONG, |s| {
        phase(s) == "training" && u(&s["epoch"]) > u(&mid["epoch"]) && u(&s["step"]) > grow_ckpt + 2
    });
    assert_eq!(u(&back["generation"]), 0, "{back}");
    let restore = back["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| u(&c["generation"]) == 0 && u(&c["step"]) <= grow_ckpt)
        .map(|c| u(&c["step"]))
        .max()
        .unwrap_or(0);
    let restart = cl
        .sample_log(2)
        .into_iter()
        .map(|r| u(&r["step"]))
        .min()
        .unwrap();
    assert_eq!(
        restart,
        restore + 1,
        "restarted from the newest recorded checkpoint"
    );
    // Asked again, the growth completes: generation 1, 4 layers.
    let out = coordctl(&c.endpoint, &["grow", "--factor", "2"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    let grown = wait_status(&c.endpoint, "the retried growth", LONG, |s| {
        u(&s["generation"]) == 1 && s["growth_history"][1]["phase"] == "done"
    });
    assert_eq!(u(&grown["layers"]), 4, "{grown}");
    // The history keeps both attempts of generation 1.
    let h = grown["growth_history"].as_array().unwrap();
    assert_eq!(h.len(), 2, "{grown}");
    assert_eq!(h[0]["phase"], "rolled_back", "{grown}");
    assert_eq!(u(&h[0]["at_step"]), grow_ckpt, "{grown}");
    assert!(u(&h[1]["at_step"]) > grow_ckpt, "{grown}");
    eprintln!("worker SIGKILL in the stack phase: rolled back to generation 0 at step {grow_ckpt}; the retry grew to 4 layers");
}
