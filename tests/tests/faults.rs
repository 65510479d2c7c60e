//! Faults end to end over real processes on loopback (`trellis-coordinator`, `trellis-worker
//! --coordinator` on libtorch CPU, `coordctl`): issue #10's checkpoint volume that fills up, a
//! rank whose training thread hangs while its heartbeats go on (in a step, or in a growth
//! phase), a growth stage on a full volume (retried with backoff), and the transaction deadlines
//! (a checkpoint write held past `checkpoint_deadline_secs`, a growth phase held past
//! `growth_phase_deadline_secs`). Each test prints its measured figures (`cargo test --
//! --nocapture`).
//!
//! Started with the shared harness (`trellis_tests::cluster`): mTLS on, as in production, so
//! workers present their own certificates and `coordctl` the operator's. The spec's paths
//! (corpus, data cache, checkpoint root) are inside the harness's allowed roots: the checkpoint
//! root is `ckpt/` in the test's directory, and the full-volume test mounts its tmpfs there.
//!
//! Worker test hooks used here (off by default, documented in `worker/src/managed.rs`):
//! `TRELLIS_FAULT_HANG_AT_STEP` (the training thread hangs for good at that step),
//! `TRELLIS_FAULT_CKPT_DELAY_MS` (the first checkpoint's write is held),
//! `TRELLIS_FAULT_GROW_DELAY_MS` (every growth's stack phase is held).
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use trellis_tests::cluster::{coordctl, phase, u, wait_status, Cluster, Endpoint, TinyJob};
use trellis_tests::json;

const LONG: Duration = Duration::from_secs(180);

/// A tiny DP job spec (absolute paths).
fn spec(name: &str, dp: usize, max_steps: u64, interval: u64, keep: usize, ckpt: &Path) -> String {
    TinyJob {
        dp,
        max_steps,
        interval,
        keep,
        ..TinyJob::new(name, ckpt)
    }
    .toml()
}

/// Start the cluster's coordinator (mTLS, the harness's allowed roots) with `config` (TOML)
/// and the job `spec`, its run directory `run/` in the test's directory (not on the
/// checkpoint volume); `extra` flags last. Returns how `coordctl` reaches it.
fn coordinator(cl: &mut Cluster, config: &str, spec: &str, extra: &[&str]) -> Endpoint {
    let config = cl
        .write_job("coordinator.toml", config)
        .display()
        .to_string();
    let run_dir = cl.path("run").display().to_string();
    let mut args = vec!["--config", config.as_str(), "--run-dir", run_dir.as_str()];
    args.extend_from_slice(extra);
    let (_, c) = cl.start_job(spec, &args);
    c.endpoint
}

/// Names in `dir` ending in `.tmp` (interrupted or aborted writes, `latest.tmp`).
fn tmp_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

// ------------------------------------------------------------------------------------------
// The checkpoint volume fills up: training goes on, the failures are reported, and the job
// checkpoints again and finishes once space returns
// ------------------------------------------------------------------------------------------

/// A tmpfs mounted for the test, unmounted on drop (even when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t tmpfs {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Fill the file system of `dir` with `dir/filler`, then give back `leave` bytes.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = f.flush();
    f.set_len(written.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
    p
}

#[test]
fn a_full_checkpoint_volume_keeps_training_and_finishes_once_space_returns() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a tmpfs for the checkpoint volume needs root");
        return;
    }
    let mut cl = Cluster::new("enospc");
    let root = cl.path("ckpt");
    let _vol = Tmpfs::mount(&root, "16m");
    // A tiny checkpoint is ~2 MB; leave room for the temp dir and the tokenizer, not the shards.
    let filler = fill(&root, 256 * 1024);
    let max_steps = 300;
    let ep = coordinator(
        &mut cl,
        "checkpoint_retry_max_secs = 2.0\n",
        &spec("enospc", 2, max_steps, 20, 1, &root),
        &[],
    );
    cl.worker(&ep, &[]);
    cl.worker(&ep, &[]);
    let t0 = Instant::now();
    let failing = wait_status(
        &ep,
        "failed checkpoints while training goes on",
        LONG,
        |s| u(&s["checkpoint_failures"]) >= 2 && u(&s["step"]) >= 40,
    );
    assert_eq!(u(&failing["rollbacks"]), 0, "{failing}");
    assert_eq!(u(&failing["epoch"]), 1, "no new epoch: {failing}");
    assert!(
        failing["checkpoints"].as_array().unwrap().is_empty(),
        "{failing}"
    );
    let why = failing["checkpoint_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(why.contains("No space left on device"), "{why}");
    // Training goes on while the volume is full.
    let later = wait_status(&ep, "training on", LONG, |s| {
        u(&s["step"]) > u(&failing["step"]) + 10 || phase(s) == "done"
    });
    assert_eq!(u(&later["rollbacks"]), 0, "{later}");
    // Space returns: the job checkpoints again and finishes.
    std::fs::remove_file(&filler).unwrap();
    let freed_at = t0.elapsed();
    // The status lists a checkpoint once its record is durable, which can come a moment after
    // the phase reads done.
    let done = wait_status(&ep, "the job to finish", LONG, |s| {
        phase(s) == "done" && !s["checkpoints"].as_array().unwrap().is_empty()
    });
    assert_eq!(u(&done["step"]), max_steps, "{done}");
    assert_eq!(u(&done["rollbacks"]), 0, "{done}");
    assert_eq!(u(&done["epoch"]), 1, "{done}");
    assert!(
        done["checkpoint_error"].as_str().unwrap_or("x").is_empty(),
        "{done}"
    );
    let cks = done["checkpoints"].as_array().unwrap();
    let newest = cks.last().expect("a committed checkpoint");
    assert_eq!(u(&newest["step"]), max_steps, "{done}");
    let job_root = root.join("enospc");
    assert!(
        PathBuf::from(newest["dir"].as_str().unwrap())
            .join("manifest.json")
            .is_file(),
        "{newest}"
    );
    let left = tmp_entries(&job_root);
    assert!(left.is_empty(), "no temp dirs left: {left:?}");
    eprintln!(
        "full checkpoint volume: {} checkpoints failed (last: {why}); training went on to step {} \
         without a rollback; space freed at {:.1}s, done at step {} after {:.1}s",
        u(&done["checkpoint_failures"]),
        u(&later["step"]),
        freed_at.as_secs_f64(),
        u(&done["step"]),
        t0.elapsed().as_secs_f64()
    );
}

/// A growth stage of the spec whose checkpoint cannot be written (the volume is full) rolls
/// back and is retried, never counted as a failed growth and never at once: the status names the
/// growth's retry while its backoff runs. Once space returns, the stage grows.
#[test]
fn a_growth_stage_on_a_full_checkpoint_volume_is_retried_with_backoff_until_space_returns() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a tmpfs for the checkpoint volume needs root");
        return;
    }
    let mut cl = Cluster::new("growfull");
    let root = cl.path("ckpt");
    let _vol = Tmpfs::mount(&root, "16m");
    let filler = fill(&root, 256 * 1024);
    let job = TinyJob {
        dp: 2,
        max_steps: 100000,
        interval: 0,
        extra: "[[growth]]\nat_step = 30\nfactor = 2\noperator = \"stack\"\n",
        ..TinyJob::new("growfull", &root)
    }
    .toml();
    let ep = coordinator(&mut cl, "checkpoint_retry_max_secs = 4.0\n", &job, &[]);
    cl.worker(&ep, &[]);
    cl.worker(&ep, &[]);
    let waiting = wait_status(&ep, "the growth stage waiting out its backoff", LONG, |s| {
        s["retry"]["what"] == "growth"
    });
    assert_eq!(u(&waiting["generation"]), 0, "{waiting}");
    assert!(u(&waiting["rollbacks"]) >= 1, "{waiting}");
    let why = waiting["checkpoint_error"].as_str().unwrap_or("");
    assert!(
        why.contains("the growth checkpoint failed")
            && why.contains("No space left on device")
            && why.contains("growth retrying in"),
        "{waiting}"
    );
    // Failure after failure: a full disk is never a failed growth, the job trains on.
    let again = wait_status(&ep, "more failed attempts", LONG, |s| {
        u(&s["rollbacks"]) >= 3
    });
    assert_ne!(phase(&again), "failed", "{again}");
    assert_eq!(u(&again["generation"]), 0, "{again}");
    // Space returns: the stage's next retry grows and nothing waits any more.
    std::fs::remove_file(&filler).unwrap();
    let grown = wait_status(&ep, "the growth stage done", LONG, |s| {
        u(&s["generation"]) == 1 && s["growth"].is_null()
    });
    assert!(grown["retry"].is_null(), "{grown}");
    assert!(
        grown["checkpoint_error"].as_str().unwrap_or("x").is_empty(),
        "{grown}"
    );
    eprintln!(
        "growth stage on a full volume: {} rollbacks before space returned (first: {why}); grown \
         to generation 1 after {} rollbacks",
        u(&again["rollbacks"]),
        u(&grown["rollbacks"])
    );
}

// ------------------------------------------------------------------------------------------
// A rank whose training thread hangs (heartbeats going on) is evicted within the progress
// timeout; the job continues with the idle worker and finishes
// ------------------------------------------------------------------------------------------

#[test]
fn a_rank_whose_training_thread_hangs_is_evicted_and_an_idle_worker_replaces_it() {
    let mut cl = Cluster::new("hang");
    let progress_timeout = 8.0;
    let max_steps = 200;
    let hang_at = 40;
    let job = spec("hang", 2, max_steps, 20, 2, &cl.path("ckpt"));
    // Heartbeats every 0.5 s under the harness's 3 s TTL: the hung rank's session stays alive,
    // so only the progress timeout can evict it.
    let ep = coordinator(
        &mut cl,
        "heartbeat_interval_secs = 0.5\n",
        &job,
        &["--progress-timeout", &progress_timeout.to_string()],
    );
    cl.worker(&ep, &[]);
    let hung_idx = cl.worker(&ep, &[("TRELLIS_FAULT_HANG_AT_STEP", hang_at.to_string())]);
    let before = wait_status(&ep, "training", LONG, |s| {
        phase(s) == "training" && u(&s["step"]) >= 5
    });
    // The spare: idle while both ranks are taken.
    cl.worker(&ep, &[]);
    // The group stops at the hang: rank 0 reports step hang_at - 1 last.
    let stalled = wait_status(&ep, "the group to stall at the hang", LONG, |s| {
        u(&s["step"]) >= hang_at - 1
    });
    let t_stall = Instant::now();
    let evicted = wait_status(&ep, "the hung rank evicted", LONG, |s| {
        u(&s["evictions"]) >= 1
    });
    let detect = t_stall.elapsed();
    assert_eq!(u(&evicted["evictions"]), 1, "{evicted}");
    assert!(
        detect.as_secs_f64() < progress_timeout + 10.0,
        "evicted {:.1}s after the stall; progress timeout {progress_timeout}s",
        detect.as_secs_f64()
    );
    let done = wait_status(&ep, "the job to finish with the spare", LONG, |s| {
        phase(s) == "done"
    });
    assert_eq!(u(&done["step"]), max_steps, "{done}");
    assert_eq!(u(&done["evictions"]), 1, "{done}");
    assert!(u(&done["epoch"]) > u(&before["epoch"]), "{done}");
    // The hung process is still alive (its heartbeats kept its session) and holds no rank.
    let out = coordctl(&ep, &["--output", "json", "workers"]);
    let workers = json(&out);
    let hung_pid = cl.procs[hung_idx].child.id();
    let hung = workers
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| u(&w["pid"]) == hung_pid as u64)
        .next_back()
        .cloned()
        .unwrap_or(Value::Null);
    assert!(
        hung["rank"].is_null(),
        "the hung worker holds no rank: {hung}"
    );
    eprintln!(
        "hung training thread at step {hang_at}: the group stalled at step {}; evicted {:.1}s \
         later (progress timeout {progress_timeout}s); {} rollback(s); finished at step {} with \
         the spare; the hung worker now: {hung}",
        u(&stalled["step"]),
        detect.as_secs_f64(),
        u(&done["rollbacks"]),
        u(&done["step"]),
    );
}

// ------------------------------------------------------------------------------------------
// Transaction deadlines: a checkpoint whose write hangs past `checkpoint_deadline_secs` is
// aborted and training goes on; a growth phase past `growth_phase_deadline_secs` is rolled back
// and the old generation trains on
// ------------------------------------------------------------------------------------------

#[test]
fn a_checkpoint_past_its_deadline_is_aborted_training_goes_on_and_the_retry_commits() {
    let mut cl = Cluster::new("ckdeadline");
    let job = spec("ckdeadline", 2, 100000, 20, 2, &cl.path("ckpt"));
    let ep = coordinator(
        &mut cl,
        "heartbeat_interval_secs = 0.5\ncheckpoint_retry_max_secs = 2.0\n",
        &job,
        &["--checkpoint-deadline", "2"],
    );
    cl.worker(&ep, &[]);
    // Rank 1's first checkpoint write is held well past the deadline (once per process: the
    // retry writes at once). The hold stays under the ring timeout (half the 60 s progress
    // timeout), so rank 0 waiting on it at the abort is not a collective failure.
    cl.worker(&ep, &[("TRELLIS_FAULT_CKPT_DELAY_MS", "8000".into())]);
    let failed = wait_status(&ep, "the first checkpoint aborted", LONG, |s| {
        u(&s["checkpoint_failures"]) >= 1
    });
    let why = failed["checkpoint_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        why.contains("checkpoint step 20 failed")
            && why.contains("not committed within the checkpoint deadline (2 s"),
        "{failed}"
    );
    assert_eq!(
        (phase(&failed), u(&failed["rollbacks"]), u(&failed["epoch"])),
        ("training", 0, 1),
        "aborted, not rolled back: {failed}"
    );
    assert!(
        failed["checkpoints"].as_array().unwrap().is_empty(),
        "{failed}"
    );
    // Training goes on, the retried checkpoint commits, and the error clears; still no
    // rollback and the same epoch.
    let ok = wait_status(&ep, "the retried checkpoint committed", LONG, |s| {
        !s["checkpoints"].as_array().unwrap().is_empty()
    });
    let newest = u(&ok["checkpoints"].as_array().unwrap().last().unwrap()["step"]);
    assert!(newest >= 20, "{ok}");
    assert_eq!(
        (u(&ok["rollbacks"]), u(&ok["epoch"])),
        (0, 1),
        "no rollback: {ok}"
    );
    assert!(
        ok["checkpoint_error"].as_str().unwrap_or("x").is_empty(),
        "a commit clears the error: {ok}"
    );
    let left = tmp_entries(&cl.path("ckpt").join("ckdeadline"));
    assert!(
        !left.iter().any(|n| n == "step-20.tmp"),
        "the aborted checkpoint's temp dir is removed: {left:?}"
    );
    eprintln!(
        "checkpoint deadline 2 s, rank 1's write held 8 s: aborted ({why}); committed step {newest} \
         on the retry; {} failure(s), 0 rollbacks",
        u(&ok["checkpoint_failures"])
    );
}

#[test]
fn a_growth_phase_past_its_deadline_rolls_back_and_the_old_generation_trains_on() {
    let mut cl = Cluster::new("growdeadline");
    let job = spec("growdeadline", 2, 100000, 0, 2, &cl.path("ckpt"));
    let ep = coordinator(
        &mut cl,
        "heartbeat_interval_secs = 0.5\n",
        &job,
        &["--growth-phase-deadline", "2"],
    );
    // Both ranks hold the stack phase of every growth well past the deadline.
    let hold = [("TRELLIS_FAULT_GROW_DELAY_MS", "8000".to_string())];
    cl.worker(&ep, &hold);
    cl.worker(&ep, &hold);
    let before = wait_status(&ep, "training", LONG, |s| {
        phase(s) == "training" && u(&s["step"]) >= 10
    });
    let layers = u(&before["layers"]);
    let out = coordctl(&ep, &["grow", "--factor", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rolled = wait_status(&ep, "the growth rolled back", LONG, |s| {
        s["growth_history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|g| g["phase"] == "rolled_back"))
    });
    let g = rolled["growth_history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["phase"] == "rolled_back")
        .unwrap();
    let why = g["error"].as_str().unwrap_or("");
    assert!(
        why.contains("the growth phase (stack) ran past its deadline (2 s)"),
        "{rolled}"
    );
    assert_eq!(u(&g["generation"]), 1, "{g}");
    // The old generation trains on in a new epoch, never half-grown.
    let back = wait_status(&ep, "training again after the rollback", LONG, |s| {
        phase(s) == "training"
            && u(&s["epoch"]) > u(&before["epoch"])
            && u(&s["step"]) > u(&rolled["step"]) + 5
    });
    assert_eq!(
        (
            u(&back["generation"]),
            u(&back["layers"]),
            u(&back["rollbacks"])
        ),
        (0, layers, 1),
        "{back}"
    );
    assert!(back["growth"].is_null(), "no growth in flight: {back}");
    eprintln!(
        "growth phase deadline 2 s, stack held 8 s: rolled back ({why}); generation 0 trains on \
         at step {} in epoch {}",
        u(&back["step"]),
        u(&back["epoch"])
    );
}

#[test]
fn a_rank_stuck_in_a_growth_phase_is_evicted_and_a_spare_takes_its_rank() {
    let mut cl = Cluster::new("growhang");
    let job = spec("growhang", 2, 100000, 0, 2, &cl.path("ckpt"));
    // The growth phase deadline stays at its default (30 min): only the progress timeout can
    // catch the stuck rank.
    let ep = coordinator(
        &mut cl,
        "heartbeat_interval_secs = 0.5\n",
        &job,
        &["--progress-timeout", "8"],
    );
    cl.worker(&ep, &[]);
    // Its stack phase sleeps for 10 minutes: the training thread is stuck in `grow`.
    let stuck = cl.worker(&ep, &[("TRELLIS_FAULT_GROW_DELAY_MS", "600000".into())]);
    let before = wait_status(&ep, "training", LONG, |s| {
        phase(s) == "training" && u(&s["step"]) >= 10
    });
    // The spare: idle while both ranks are taken.
    cl.worker(&ep, &[]);
    let out = coordctl(&ep, &["grow", "--factor", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let evicted = wait_status(&ep, "the rank stuck in the growth evicted", LONG, |s| {
        u(&s["evictions"]) >= 1
    });
    assert_eq!(u(&evicted["evictions"]), 1, "{evicted}");
    // The growth rolled back; the job trains on at the old generation in a new epoch, with the
    // spare in the stuck worker's place.
    let back = wait_status(&ep, "training again with the spare", LONG, |s| {
        phase(s) == "training"
            && u(&s["epoch"]) > u(&before["epoch"])
            && u(&s["step"]) > u(&evicted["step"]) + 5
    });
    assert_eq!(
        (u(&back["generation"]), u(&back["layers"])),
        (0, u(&before["layers"])),
        "{back}"
    );
    assert_eq!(back["growth_history"][0]["phase"], "rolled_back", "{back}");
    let workers = json(&coordctl(&ep, &["--output", "json", "workers"]));
    let pid = cl.procs[stuck].child.id() as u64;
    let ranked: Vec<&Value> = workers
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| !w["rank"].is_null())
        .collect();
    assert_eq!(ranked.len(), 2, "{workers}");
    assert!(
        ranked.iter().all(|w| u(&w["pid"]) != pid),
        "the stuck worker holds no rank: {workers}"
    );
    // The same growth, retried by the operator, succeeds on the healthy ranks.
    let out = coordctl(&ep, &["grow", "--factor", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grown = wait_status(&ep, "the retried growth", LONG, |s| {
        u(&s["generation"]) == 1 && s["growth"].is_null()
    });
    assert_eq!(u(&grown["layers"]), 2 * u(&before["layers"]), "{grown}");
    eprintln!(
        "a rank stuck in the stack phase (progress timeout 8 s): evicted at step {}, {} \
         rollback(s); the spare trained on from epoch {}; the retried growth reached generation 1",
        u(&evicted["step"]),
        u(&back["rollbacks"]),
        u(&back["epoch"])
    );
}
