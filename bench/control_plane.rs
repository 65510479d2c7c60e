//! Control-plane benchmark: a real coordinator (in-process, gRPC on loopback, embedded store)
//! and N simulated workers (raw gRPC sessions, no training) that each send a StepReport per step
//! at `--hz`. Reports the p50/p99 latency of control RPCs (GetStatus) under that load, the
//! per-step report ingest rate, and the process CPU% (coordinator + simulated workers).
//!
//! `cargo run --release -p trellis-coordinator --example control_plane -- [WORKERS] [HZ] [SECONDS]`
//!
//! Connection storm (`storm`): the `trellis-coordinator` binary as a real process and WORKERS
//! simulated workers that all open their sessions at once, then reconnect (with the agent's
//! jittered backoff) after the coordinator is `kill -9`ed and restarted on the same store.
//! Reports the p50/p99 session-open latency, connection errors by kind, and the time until every
//! worker is re-assigned by the restarted coordinator; exits non-zero if any worker is not back
//! within two minutes (a session lost for good) or any session open failed during the storm.
//! ROUNDS runs it that many times in a row (`make bench-storm`: 500 workers, 5 rounds).
//!
//! `cargo build --release -p trellis-coordinator --bins && cargo run --release -p trellis-coordinator --example control_plane -- storm [WORKERS] [ROUNDS]`
use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_proto::v1 as pb;

fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let tick = 100.0;
    let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (ut + st) / tick
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("storm") {
        let n: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(500);
        let rounds: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(1);
        let mut ok = true;
        for round in 1..=rounds {
            ok &= storm(n, round).await;
        }
        println!(
            "storm: {rounds} round(s) of {n} workers: {}",
            if ok {
                "every session came back"
            } else {
                "FAILED"
            }
        );
        std::process::exit(if ok { 0 } else { 1 });
    }
    let n: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(500);
    let hz: f64 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(10.0);
    let secs: u64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let store = trellis_store::StoreSpec::File(dir.path().join("state"))
        .open()
        .await
        .unwrap();
    let cfg = trellis_coordinator::CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        metrics_listen: String::new(),
        heartbeat_ttl_secs: 30.0,
        checkpoint_root: Some(dir.path().join("ckpt")),
        ..Default::default()
    };
    let co = trellis_coordinator::server::start(&cfg, store)
        .await
        .unwrap();
    let ep = format!("http://{}", co.grpc_addr);
    let spec = format!(
        "[job]\nname = \"bench\"\n[model]\npreset = \"tiny\"\nvocab_size = 256\n[data]\ntrain = \"t\"\nvalid = \"v\"\nseq_len = 16\n\
         [train]\nglobal_batch = {n}\nmax_steps = 100000000\n[checkpoint]\ninterval = 0\n[parallel]\ndp = {n}\n"
    );
    let mut c = pb::control_service_client::ControlServiceClient::connect(ep.clone())
        .await
        .unwrap();
    c.submit_job(pb::SubmitJobRequest {
        spec_toml: spec,
        base_dir: "/tmp".into(),
    })
    .await
    .unwrap();
    for i in 0..n {
        let ep = ep.clone();
        tokio::spawn(async move {
            let ch = tonic::transport::Endpoint::from_shared(ep)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut w = pb::worker_service_client::WorkerServiceClient::new(ch);
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let m = |k| pb::WorkerMessage { kind: Some(k) };
            tx.send(m(pb::worker_message::Kind::Hello(pb::Hello {
                worker_id: format!("sim-{i}"),
                ring_address: format!("127.0.0.1:{}", 20000 + i),
                ..Default::default()
            })))
            .unwrap();
            let mut inbound = w
                .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let epoch = loop {
                match inbound.message().await {
                    Ok(Some(pb::CoordinatorMessage {
                        kind: Some(pb::coordinator_message::Kind::Assignment(a)),
                    })) => break a.epoch,
                    Ok(Some(_)) => continue,
                    _ => return,
                }
            };
            tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
            let mut iv = tokio::time::interval(Duration::from_secs_f64(1.0 / hz));
            let mut step = 0u64;
            loop {
                iv.tick().await;
                step += 1;
                let r = pb::StepReport {
                    epoch,
                    step,
                    tokens: step * 16 * 500,
                    loss: 3.0 + 1.0 / step as f64,
                    sample_start: (step - 1) * 500,
                    sample_end: step * 500,
                    rank: i as u32,
                    step_seconds: 0.1,
                    ..Default::default()
                };
                if tx.send(m(pb::worker_message::Kind::Step(r))).is_err() {
                    return;
                }
            }
        });
    }
    let t0 = Instant::now();
    loop {
        let s = c
            .get_status(pb::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        if s.phase == pb::JobPhase::Training as i32 && s.step > 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "workers did not all register: {:?}",
            s.workers
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{n} workers registered and assigned in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let (cpu0, w0, step0) = (
        cpu_seconds(),
        Instant::now(),
        c.get_status(pb::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner()
            .step,
    );
    let mut lat = Vec::new();
    while w0.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        c.get_status(pb::GetStatusRequest::default()).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = w0.elapsed().as_secs_f64();
    let cpu = (cpu_seconds() - cpu0) / wall * 100.0;
    let step1 = c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .step;
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "workers={n} hz={hz} reports/s={:.0} GetStatus n={} p50={:.2}ms p99={:.2}ms max={:.2}ms process_cpu={:.0}% (coordinator + simulated workers) rank0_steps_seen={}",
        n as f64 * hz,
        lat.len(),
        p(0.5),
        p(0.99),
        lat.last().unwrap(),
        cpu,
        step1 - step0
    );
    std::process::exit(0);
}

// ------------------------------------------------------------------------------------------
// Connection storm
// ------------------------------------------------------------------------------------------

#[derive(Default)]
struct StormStats {
    /// Session-open latencies (connect + Session call answered), ms: before and after the kill.
    open: Mutex<Vec<f64>>,
    reopen: Mutex<Vec<f64>>,
    /// Failed session opens by kind: before and after the kill.
    errors: Mutex<BTreeMap<String, u64>>,
    errors_after: Mutex<BTreeMap<String, u64>>,
    killed: AtomicBool,
}

/// The kind of a failed session open: the innermost I/O error's kind, else the gRPC code.
fn error_kind(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut io = None;
    while let Some(x) = cur {
        if let Some(i) = x.downcast_ref::<std::io::Error>() {
            io = Some(format!("{:?}", i.kind()));
        }
        cur = x.source();
    }
    io.unwrap_or_else(|| {
        let s = e.to_string();
        s.split(':').next().unwrap_or("other").trim().to_string()
    })
}

fn jittered(d: Duration, i: usize) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos() as u64)
        .unwrap_or(0);
    let x = (nanos ^ ((i as u64) << 20)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    d.mul_f64(0.5 + 0.5 * ((x >> 11) as f64 / (1u64 << 53) as f64))
}

/// One simulated worker: open a session, wait for assignments, reopen whenever it ends.
async fn storm_worker(
    ep: String,
    i: usize,
    epoch: Arc<AtomicU64>,
    stats: Arc<StormStats>,
    start: Arc<tokio::sync::Barrier>,
) {
    start.wait().await;
    let mut backoff = Duration::from_millis(100);
    loop {
        let after = stats.killed.load(Ordering::SeqCst);
        let t = Instant::now();
        let opened = async {
            let ch = tonic::transport::Endpoint::from_shared(ep.clone())
                .unwrap()
                .connect_timeout(Duration::from_secs(10))
                .connect()
                .await
                .map_err(|e| error_kind(&e))?;
            let mut w = pb::worker_service_client::WorkerServiceClient::new(ch);
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tx.send(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
                    worker_id: format!("storm-{i}"),
                    ring_address: format!("127.0.0.1:{}", 20000 + i),
                    ..Default::default()
                })),
            })
            .unwrap();
            let inbound = w
                .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                .await
                .map_err(|s| match std::error::Error::source(&s) {
                    Some(src) => error_kind(src),
                    None => format!("{:?}", s.code()),
                })?
                .into_inner();
            Ok::<_, String>((tx, inbound))
        }
        .await;
        match opened {
            Err(kind) => {
                let m = if after {
                    &stats.errors_after
                } else {
                    &stats.errors
                };
                *m.lock().unwrap().entry(kind).or_default() += 1;
                tokio::time::sleep(jittered(backoff, i)).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Ok((_tx, mut inbound)) => {
                let ms = t.elapsed().as_secs_f64() * 1e3;
                if after {
                    stats.reopen.lock().unwrap().push(ms);
                } else {
                    stats.open.lock().unwrap().push(ms);
                }
                backoff = Duration::from_millis(100);
                while let Ok(Some(m)) = inbound.message().await {
                    if let Some(pb::coordinator_message::Kind::Assignment(a)) = m.kind {
                        epoch.store(a.epoch, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(jittered(backoff, i)).await;
            }
        }
    }
}

/// Start the coordinator binary; returns it once it serves.
fn start_coordinator(
    bin: &std::path::Path,
    port: u16,
    dir: &std::path::Path,
) -> std::process::Child {
    let mut child = std::process::Command::new(bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "",
        ])
        .arg("--store")
        .arg(format!("file:{}", dir.join("state").display()))
        .arg("--job")
        .arg(dir.join("job.toml"))
        .args(["--heartbeat-ttl-secs", "120"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("trellis-coordinator listening") => break,
            Some(_) => continue,
            None => panic!("the coordinator exited before serving"),
        }
    }
    // Keep draining stdout so the coordinator never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    child
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

async fn wait_all(epochs: &[Arc<AtomicU64>], above: u64, limit: Duration) -> (Duration, usize) {
    let t0 = Instant::now();
    loop {
        let missing = epochs
            .iter()
            .filter(|e| e.load(Ordering::SeqCst) <= above)
            .count();
        if missing == 0 || t0.elapsed() > limit {
            return (t0.elapsed(), missing);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn storm(n: usize, round: usize) -> bool {
    // `TRELLIS_COORDINATOR=PATH` runs another build (e.g. to compare before and after a fix).
    let bin = std::env::var_os("TRELLIS_COORDINATOR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| Some(p.parent()?.parent()?.join("trellis-coordinator")))
        })
        .filter(|p| p.is_file())
        .expect("trellis-coordinator is not built next to this example: run `cargo build --release -p trellis-coordinator --bins` first (or set TRELLIS_COORDINATOR)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("job.toml"),
        format!(
            "[job]\nname = \"storm\"\n[model]\npreset = \"tiny\"\nvocab_size = 256\n[data]\ntrain = \"t\"\nvalid = \"v\"\nseq_len = 16\n\
             [train]\nglobal_batch = {n}\nmax_steps = 100000000\n[checkpoint]\ninterval = 0\ndir = \"{}\"\n[parallel]\ndp = {n}\n",
            dir.path().join("ckpt").display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = start_coordinator(&bin, port, dir.path());
    let ep = format!("http://127.0.0.1:{port}");
    let stats = Arc::new(StormStats::default());
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let epochs: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(storm_worker(
                ep.clone(),
                i,
                epochs[i].clone(),
                stats.clone(),
                start.clone(),
            ))
        })
        .collect();
    let limit = Duration::from_secs(120);
    let (assigned, missing0) = wait_all(&epochs, 0, limit).await;
    let epoch0 = epochs
        .iter()
        .map(|e| e.load(Ordering::SeqCst))
        .max()
        .unwrap_or(0);
    // kill -9 and restart on the same store and port.
    stats.killed.store(true, Ordering::SeqCst);
    let t_kill = Instant::now();
    let _ = child.kill();
    let _ = child.wait();
    let mut child = start_coordinator(&bin, port, dir.path());
    let serving = t_kill.elapsed();
    let (_, missing) = wait_all(&epochs, epoch0, limit).await;
    let reconnect = t_kill.elapsed();
    for t in tasks {
        t.abort();
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut open = stats.open.lock().unwrap().clone();
    let mut reopen = stats.reopen.lock().unwrap().clone();
    let errors = stats.errors.lock().unwrap().clone();
    let errors_after = stats.errors_after.lock().unwrap().clone();
    let storm_failures: u64 = errors.values().sum();
    println!(
        "round {round}: {n} workers at once: all assigned in {:.2}s (missing {missing0}); session open \
         p50={:.1}ms p99={:.1}ms max={:.1}ms, failed opens {errors:?}; kill -9 + restart: serving again \
         in {:.2}s, all {n} re-assigned {:.2}s after the kill (missing {missing}); reopen p50={:.1}ms \
         p99={:.1}ms, failed reopens while it was down {errors_after:?}",
        assigned.as_secs_f64(),
        pct(&mut open, 0.5),
        pct(&mut open, 0.99),
        pct(&mut open, 1.0),
        serving.as_secs_f64(),
        reconnect.as_secs_f64(),
        pct(&mut reopen, 0.5),
        pct(&mut reopen, 0.99),
    );
    missing0 == 0 && missing == 0 && storm_failures == 0
}
