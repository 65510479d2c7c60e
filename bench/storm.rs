//! The connection storm of `control_plane storm` (`make bench-storm`), shared with its
//! cut-down test (`coordinator/tests/storm.rs`, in `make test`): the `trellis-coordinator`
//! binary as a real process and N simulated workers (raw gRPC sessions, no training) that all
//! open their sessions at once, then reconnect (with the agent's jittered backoff) after the
//! coordinator is `kill -9`ed and restarted on the same store and port.
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_proto::v1 as pb;

/// What one round saw: its invariants (every worker assigned, every one re-assigned after the
/// restart, no failed open during the storm) and its figures.
#[derive(Debug, Clone)]
pub struct Round {
    /// Workers never assigned before the kill / not re-assigned after the restart (within 2
    /// min each).
    pub missing: usize,
    pub missing_after_restart: usize,
    /// Failed session opens while the coordinator was up, by kind (those while it was down are
    /// expected, each retried: the summary counts them).
    pub errors: BTreeMap<String, u64>,
    /// The epoch the workers held before the kill, and after the restart.
    pub epoch_before: u64,
    pub epoch_after: u64,
    /// One line of figures.
    pub summary: String,
}

impl Round {
    /// Every session came back, to the restarted coordinator's new epoch, and none failed in
    /// the storm.
    pub fn ok(&self) -> bool {
        self.missing == 0
            && self.missing_after_restart == 0
            && self.errors.is_empty()
            && self.epoch_after > self.epoch_before
    }
}

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
fn start_coordinator(bin: &Path, port: u16, dir: &Path) -> std::process::Child {
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

/// Round `round` of the storm with `n` workers against the coordinator binary `bin`.
pub async fn storm(bin: &Path, n: usize, round: usize) -> Round {
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
    let mut child = start_coordinator(bin, port, dir.path());
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
    let mut child = start_coordinator(bin, port, dir.path());
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
    let epoch1 = epochs
        .iter()
        .map(|e| e.load(Ordering::SeqCst))
        .min()
        .unwrap_or(0);
    let summary = format!(
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
    Round {
        missing: missing0,
        missing_after_restart: missing,
        errors,
        epoch_before: epoch0,
        epoch_after: epoch1,
        summary,
    }
}
