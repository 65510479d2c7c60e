//! Store faults over real processes (issue 10, acceptance 3 and 5): the embedded store's volume
//! fills mid-job, and a real etcd stops for 15 s mid-job. `trellis-coordinator`, one
//! `trellis-worker` (libtorch, CPU), `coordctl`, gRPC health, and a real etcd / tmpfs, started
//! with the shared harness (`trellis_tests::cluster`): mTLS on, as in production, so `coordctl`
//! and the health checks here present the operator's certificate on the gRPC port. The spec's
//! paths (corpus, data cache, checkpoint directory in the test's directory) are inside the
//! harness's allowed roots; the store's tmpfs needs none (`--store` is the operator's flag, not
//! a spec path).
//!
//! What both show: the job keeps training while its state cannot be written; a checkpoint is
//! listed as committed (`coordctl checkpoint list`) only once its record is in the store, so
//! nothing listed is lost by a `kill -9`; health is NOT_SERVING while writes fail and SERVING
//! after; the state catches up when the store returns; the job finishes.
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use trellis_tests::cluster::{
    coordctl, phase, status, u, wait_status, Cluster, Coord, Endpoint, TinyJob,
};
use trellis_tests::{free_port, json};

const LONG: Duration = Duration::from_secs(180);

/// A tiny one-rank job: checkpoints every `interval` steps, none collected (keep 1000), so
/// every checkpoint ever listed must still be listed after a restart.
fn spec(name: &str, max_steps: u64, interval: u64, ckpt: &Path) -> String {
    TinyJob {
        max_steps,
        eval_interval: 1000,
        eval_sequences: Some(8),
        interval,
        keep: 1000,
        ..TinyJob::new(name, ckpt)
    }
    .toml()
}

/// A coordinator of `cl` (mTLS, the harness's allowed roots) on `store` whose health turns
/// NOT_SERVING after 2 s of failed writes.
fn coordinator(
    cl: &mut Cluster,
    name: &str,
    port: u16,
    store: &str,
    job: Option<&Path>,
    extra: &[&str],
) -> Coord {
    let config = cl.write_job("coordinator.toml", "store_down_secs = 2\n");
    let config = config.display().to_string();
    let mut args = vec!["--config", config.as_str()];
    args.extend_from_slice(extra);
    cl.coordinator(name, port, store, job, &args)
}

/// The steps `coordctl checkpoint list` shows as committed.
fn listed(endpoint: &Endpoint) -> Vec<u64> {
    let out = coordctl(endpoint, &["--output", "json", "checkpoint", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    let arr = v
        .as_array()
        .or_else(|| v["checkpoints"].as_array())
        .cloned()
        .unwrap_or_default();
    arr.iter().map(|c| u(&c["step"])).collect()
}

/// gRPC health of the whole server: `Some(true)` SERVING, `Some(false)` anything else, `None`
/// no answer.
fn serving(endpoint: &Endpoint) -> Option<bool> {
    health(endpoint, "")
}

/// gRPC health of one service name ("" the whole server, "liveness" the liveness probe's),
/// asked on the gRPC port: over mTLS with the endpoint's certificate when it has one (the
/// health service shares the TLS listener; any verified identity may call it).
fn health(endpoint: &Endpoint, service: &str) -> Option<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut ep = tonic::transport::Endpoint::from_shared(endpoint.url.clone())
            .ok()?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(3));
        if let Some(t) = &endpoint.tls {
            ep = ep.tls_config(t.tonic()).ok()?;
        }
        let ch = ep.connect().await.ok()?;
        let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
        let r = c
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .ok()?;
        Some(
            r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        )
    })
}

fn wait_health(endpoint: &Endpoint, want: bool, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if serving(endpoint) == Some(want) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "health not {} within {timeout:?}",
            if want { "SERVING" } else { "NOT_SERVING" }
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// A tmpfs of `bytes` on a fresh directory, unmounted on drop; `None` with the reason printed
/// when this process may not mount one.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(bytes: u64) -> Option<Tmpfs> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !root {
            eprintln!(
                "SKIPPED: filling a store volume needs a small tmpfs, and mounting one needs root"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: `mount -t tmpfs` failed (no CAP_SYS_ADMIN here?)");
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Fill the volume of `path` (one file) until the disk is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    let small = vec![0x5au8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
}

// ------------------------------------------------------------------------------------------
// Acceptance 3: the embedded store's volume fills mid-job, then has room again; kill -9
// ------------------------------------------------------------------------------------------

#[test]
fn a_full_store_volume_mid_job_then_kill9_loses_no_listed_checkpoint_and_the_job_finishes() {
    let Some(fs) = Tmpfs::mount(64 << 20) else {
        return;
    };
    let mut cl = Cluster::new("store-full");
    let max_steps = 1500;
    let job = cl.write_job(
        "job.toml",
        &spec("storefull", max_steps, 25, &cl.path("ckpt")),
    );
    let store = format!("file:{}", fs.0.path().join("state").display());
    let port = free_port();
    let c = coordinator(&mut cl, "coordinator-1", port, &store, Some(&job), &[]);
    cl.worker(&c.endpoint, &[]);
    wait_status(&c.endpoint, "training with two checkpoints", LONG, |s| {
        phase(s) == "training" && s["checkpoints"].as_array().map_or(0, |a| a.len()) >= 2
    });

    // The volume is full: training goes on, no new checkpoint is listed (its record cannot be
    // written), health says NOT_SERVING.
    let filler = fs.0.path().join("filler");
    fill(&filler);
    let down = wait_health(&c.endpoint, false, Duration::from_secs(30));
    // Writes have failed for seconds now: what is listed is what was durable before.
    let before = listed(&c.endpoint);
    let full_at = status(&c.endpoint).unwrap();
    let during = wait_status(
        &c.endpoint,
        "training on, 3 checkpoint intervals",
        LONG,
        |s| u(&s["step"]) >= u(&full_at["step"]) + 75,
    );
    assert_eq!(phase(&during), "training", "{during}");
    let listed_full = listed(&c.endpoint);
    assert_eq!(
        listed_full, before,
        "a checkpoint was listed as committed while its record could not be written"
    );
    let log = std::fs::read_to_string(&cl.procs[c.idx].log).unwrap_or_default();
    assert!(
        log.contains("state write failed") && log.contains("disk is not full"),
        "the coordinator says why writes fail"
    );

    // Room again: health comes back and the checkpoints committed meanwhile are listed.
    std::fs::remove_file(&filler).unwrap();
    let up = wait_health(&c.endpoint, true, Duration::from_secs(30));
    let caught_up = wait_status(&c.endpoint, "the catalogue catching up", LONG, |s| {
        s["checkpoints"].as_array().map_or(0, |a| a.len()) > listed_full.len()
    });
    let last = listed(&c.endpoint);
    assert!(
        before.iter().all(|s| last.contains(s)),
        "{before:?} {last:?}"
    );

    // kill -9 and restart: every checkpoint listed before the kill is still there.
    cl.procs[c.idx].kill9();
    let c2 = coordinator(&mut cl, "coordinator-2", port, &store, None, &[]);
    let after = listed(&c2.endpoint);
    for s in &last {
        assert!(
            after.contains(s),
            "checkpoint step {s} was listed as committed before the kill and is gone: before \
             {last:?}, after {after:?}"
        );
    }
    let done = wait_status(&c2.endpoint, "the job to finish", LONG, |s| {
        phase(s) == "done"
    });
    assert_eq!(u(&done["step"]), max_steps, "{done}");
    eprintln!(
        "store volume full at step {}: trained on to step {} with {} checkpoint(s) listed, \
         health NOT_SERVING after {:.1}s, SERVING {:.1}s after room returned, catalogue caught \
         up to {} entries; after kill -9 all {} listed checkpoints recovered; done at {}",
        u(&full_at["step"]),
        u(&during["step"]),
        listed_full.len(),
        down.as_secs_f64(),
        up.as_secs_f64(),
        caught_up["checkpoints"].as_array().unwrap().len(),
        last.len(),
        u(&done["step"])
    );
    drop(cl);
    drop(fs);
}

// ------------------------------------------------------------------------------------------
// Acceptance 5: etcd stopped for 15 s mid-job
// ------------------------------------------------------------------------------------------

#[test]
fn an_etcd_outage_of_15s_mid_job_keeps_training_and_the_state_catches_up() {
    let etcd = match trellis_store::testing::EtcdServer::start() {
        Ok(e) => e,
        Err(e) => panic!("{e}"),
    };
    let mut cl = Cluster::new("etcd-outage");
    let max_steps = 2500;
    let job = cl.write_job("job.toml", &spec("outage", max_steps, 25, &cl.path("ckpt")));
    // The leader rides through an outage shorter than 5/12 of its lease TTL: it gives up after
    // 2/3 of the TTL without a keep-alive, and keep-alives go every TTL/4 (docs/operations.md).
    let c = coordinator(
        &mut cl,
        "coordinator",
        free_port(),
        &etcd.spec(),
        Some(&job),
        &["--leader-ttl-secs", "60"],
    );
    cl.worker(&c.endpoint, &[]);
    let s0 = wait_status(&c.endpoint, "training with a checkpoint", LONG, |s| {
        phase(s) == "training" && !s["checkpoints"].as_array().unwrap().is_empty()
    });

    signal(etcd.pid(), "STOP");
    let t0 = Instant::now();
    let stopped_at = status(&c.endpoint).expect("status answers without etcd");
    let down = wait_health(&c.endpoint, false, Duration::from_secs(15));
    // Unready, but alive: a liveness probe does not get it restarted (its queue would be lost).
    assert_eq!(health(&c.endpoint, "liveness"), Some(true));
    // etcd has been stopped for seconds: what is listed is what was durable before.
    let before = listed(&c.endpoint);
    assert!(!before.is_empty());
    let mut during = stopped_at.clone();
    while t0.elapsed() < Duration::from_secs(15) {
        // The coordinator answers from memory (no store I/O under its lock) and training goes on.
        during = status(&c.endpoint).expect("status answers during the outage");
        std::thread::sleep(Duration::from_millis(500));
    }
    let listed_during = listed(&c.endpoint);
    signal(etcd.pid(), "CONT");
    let outage = t0.elapsed();
    assert!(
        u(&during["step"]) >= u(&stopped_at["step"]) + 50,
        "training stalled during the outage: step {} -> {}",
        u(&stopped_at["step"]),
        u(&during["step"])
    );
    assert_eq!(
        listed_during, before,
        "a checkpoint was listed as committed while etcd was down"
    );

    let up = wait_health(&c.endpoint, true, Duration::from_secs(60));
    wait_status(&c.endpoint, "the catalogue catching up", LONG, |s| {
        s["checkpoints"].as_array().map_or(0, |a| a.len()) > listed_during.len()
    });
    // What the coordinator lists is in etcd (listed only once durable).
    let shown = listed(&c.endpoint);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (in_store, state_step) = rt.block_on(async {
        let store = trellis_store::StoreSpec::parse(&etcd.spec())
            .unwrap()
            .open()
            .await
            .unwrap();
        let id = trellis_core::ids::JobId("outage".into());
        let steps: Vec<u64> = store
            .list(&trellis_store::keys::checkpoints_prefix(&id))
            .await
            .unwrap()
            .iter()
            .filter_map(|(k, _)| trellis_store::keys::parse_checkpoint(&id, k).map(|s| s.0))
            .collect();
        let state = store
            .get(&trellis_store::keys::job_state(&id))
            .await
            .unwrap()
            .expect("the job state is in etcd");
        let state: Value = serde_json::from_slice(&state.value).unwrap();
        (steps, u(&state["step"]))
    });
    for s in &shown {
        assert!(
            in_store.contains(s),
            "checkpoint step {s} listed but not in etcd ({in_store:?})"
        );
    }
    for s in &before {
        assert!(
            in_store.contains(s),
            "step {s} lost from etcd: {in_store:?}"
        );
    }
    // On a quiet machine the job may reach max_steps during the outage; its done state then
    // waits for etcd, so "caught up" is at least the step trained to during the outage.
    assert!(
        state_step >= u(&during["step"]),
        "the job state in etcd did not catch up: step {state_step}, trained to {} during the outage",
        u(&during["step"])
    );
    let done = wait_status(&c.endpoint, "the job to finish", LONG, |s| {
        phase(s) == "done"
    });
    assert_eq!(u(&done["step"]), max_steps, "{done}");
    eprintln!(
        "etcd SIGSTOPped {:.1}s at step {} (job at step {} then): trained to step {} meanwhile; \
         health NOT_SERVING after {:.1}s, SERVING {:.1}s after SIGCONT; etcd holds {} \
         checkpoints and state step {state_step}; done at {}",
        outage.as_secs_f64(),
        u(&stopped_at["step"]),
        u(&s0["step"]),
        u(&during["step"]),
        down.as_secs_f64(),
        up.as_secs_f64(),
        in_store.len(),
        u(&done["step"])
    );
    drop(cl);
    drop(etcd);
}
