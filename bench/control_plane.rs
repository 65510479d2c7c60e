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
//! ROUNDS runs it that many times in a row (`make bench-storm`: 500 workers, 5 rounds). The
//! storm itself is `bench/storm.rs`, shared with its cut-down test (`coordinator/tests/storm.rs`).
//!
//! `cargo build --release -p trellis-coordinator --bins && cargo run --release -p trellis-coordinator --example control_plane -- storm [WORKERS] [ROUNDS]`
use std::time::{Duration, Instant};
use trellis_proto::v1 as pb;

#[path = "storm.rs"]
mod storm;

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
        let mut ok = true;
        for round in 1..=rounds {
            let r = storm::storm(&bin, n, round).await;
            println!("{}", r.summary);
            ok &= r.ok();
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
