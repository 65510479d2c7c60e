//! Coordinator restart: kill -9 the binary, start it again on the same `--store`; the job is
//! recovered from the store and the (reconnecting) workers restart from the last committed
//! checkpoint.
mod common;
use common::*;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use trellis_proto::v1 as pb;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_bin(store: &str, port: u16, job: &std::path::Path) -> (Child, String) {
    // The fake agents write stand-in checkpoints, not the Trellis format: no verification.
    let config = job.with_file_name("coordinator.toml");
    std::fs::write(&config, "verify_checkpoints = false\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-coordinator"))
        .arg("--config")
        .arg(&config)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--store",
            store,
            "--metrics-listen",
            "127.0.0.1:0",
            "--heartbeat-ttl-secs",
            "5",
        ])
        .arg("--job")
        .arg(job)
        .env("TRELLIS_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("trellis-coordinator listening grpc=127.0.0.1:"),
        "{line}"
    );
    assert!(line.contains(" metrics=127.0.0.1:"), "{line}");
    (child, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_recovers_from_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    let ckpt = dir.path().join("ckpt");
    let text = spec("restart", 2, 100000, 5, "");
    let text = text.replace(
        "[checkpoint]\n",
        &format!("[checkpoint]\ndir = \"{}\"\n", ckpt.display()),
    );
    std::fs::write(&job, text).unwrap();
    let store = format!("file:{}", dir.path().join("state").display());
    let port = free_port();
    let (mut child, _) = start_bin(&store, port, &job);
    let ep = format!("http://127.0.0.1:{port}");
    let mut c = Control::connect(ep.clone()).await.unwrap();
    let f = fake(10);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    let s = wait_status(&mut c, "two committed checkpoints", 60, |s| {
        s.checkpoints.len() >= 2
    })
    .await;
    let epoch = s.epoch;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (mut child, _) = start_bin(&store, port, &job);
    let mut c = Control::connect(ep.clone()).await.unwrap();
    let s = wait_status(&mut c, "recovered and training", 60, |s| {
        s.phase == pb::JobPhase::Training as i32 && s.epoch > epoch
    })
    .await;
    assert!(s.checkpoints.len() >= 2, "the catalogue survives: {s:#?}");
    let restored = s.checkpoints.iter().map(|c| c.step).max().unwrap();
    assert!(s.step >= restored, "{s:#?}");
    let s2 = wait_status(&mut c, "progress after recovery", 60, |x| {
        x.step >= s.step + 10
    })
    .await;
    assert_eq!(s2.job_id, "restart");
    // The restored runners started from the committed checkpoint of the new epoch.
    let ev = f.events.lock().unwrap().clone();
    // The catalogue right after recovery (older entries are pruned later: `checkpoint.keep`).
    let steps: Vec<u64> = s.checkpoints.iter().map(|c| c.step).collect();
    let builds: Vec<_> = ev
        .iter()
        .filter(|e| e.what == "build" && e.epoch == s.epoch)
        .collect();
    assert_eq!(builds.len(), 2, "{ev:?}");
    assert!(
        builds
            .iter()
            .all(|e| e.step > 0 && steps.contains(&e.step) && e.step <= restored),
        "{builds:?} {steps:?}"
    );
    a0.abort();
    a1.abort();
    child.kill().unwrap();
    child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
}
