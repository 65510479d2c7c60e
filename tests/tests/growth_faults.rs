//! Issue 14: a worker or the coordinator killed (SIGKILL) at the points of the growth flow in
//! which the growth checkpoint is written in the background while the grown model trains, over
//! real processes on loopback with mTLS (the shared harness, `trellis_tests::Cluster`:
//! `trellis-coordinator` on the embedded store, two `trellis-worker` ranks, DP = 2, CPU,
//! `coordctl`).
//!
//! - before the growth checkpoint is durable (the grown model already trains): the growth is
//!   rolled back and the job restarts from the checkpoint before it, generation 0;
//! - after the growth committed (checkpoint recorded, every rank resumed) and the grown model
//!   trained on, before any checkpoint of it: the job restarts from "growth checkpoint + plan",
//!   generation 1 at the growth step, and the grown model's losses are the ones it had.
//!
//! A kill in the stack phase (the shards written, not committed) is in `coordinator.rs`
//! (`a_worker_killed_mid_growth_…`, `a_coordinator_killed_mid_growth_…`).
//!
//! Worker hooks (documented in `worker/src/managed.rs`): `TRELLIS_SAMPLE_LOG`,
//! `TRELLIS_FAULT_GROWTH_CKPT_DELAY_MS` (hold the growth checkpoint's write).
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use trellis_tests::{
    coordctl, free_port, json, phase, u, wait_status, Cluster, Coord, Endpoint, TinyJob, LONG,
};

/// `interval`: periodic checkpoints (0: none, so the growth's restore point stays in force).
fn spec(name: &str, ckpt: &Path, interval: u64) -> String {
    TinyJob {
        dp: 2,
        max_steps: 100000,
        interval,
        keep: 3,
        ..TinyJob::new(name, ckpt)
    }
    .toml()
}

/// A coordinator on the test's embedded store `store/` (with the job when `job` is set).
fn coordinator(cl: &mut Cluster, name: &str, port: u16, job: Option<&Path>) -> Coord {
    let store = format!("file:{}", cl.path("store").display());
    cl.coordinator(name, port, &store, job, &[])
}

/// The steps (with their generation) worker `w` trained in epochs after `epoch`.
fn steps_after_epoch(cl: &Cluster, w: usize, epoch: u64) -> Vec<(u64, u64)> {
    cl.sample_log(w)
        .into_iter()
        .filter(|r| u(&r["epoch"]) > epoch)
        .map(|r| (u(&r["step"]), u(&r["generation"])))
        .collect()
}

/// The growth step S: worker 0's first step of generation 1 is S + 1.
fn growth_step(cl: &Cluster) -> u64 {
    let first = steps_after_epoch(cl, 0, 0)
        .into_iter()
        .find(|s| s.1 == 1)
        .expect("worker 0 trained the grown model");
    first.0 - 1
}

fn wait(ep: &Endpoint, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_status(ep, what, LONG, pred)
}

/// Train losses by step; a step trained again after a rollback keeps its newest loss, and
/// `count` says how often each step was reported.
fn train_losses(endpoint: &Endpoint) -> (BTreeMap<u64, f64>, BTreeMap<u64, usize>) {
    let loss = json(&coordctl(endpoint, &["--output", "json", "loss"]));
    let (mut last, mut count) = (BTreeMap::new(), BTreeMap::new());
    for p in loss["points"].as_array().unwrap() {
        if let Some(l) = p["train_loss"].as_f64() {
            last.insert(u(&p["step"]), l);
            *count.entry(u(&p["step"])).or_default() += 1;
        }
    }
    (last, count)
}

/// Start the job with two workers (`env` for both), train past step 30 (with `interval` 20,
/// a checkpoint before the growth) and grow ×2 at the next step boundary. Returns (cluster,
/// coordinator index, port, endpoint).
fn grown(name: &str, interval: u64, env: &[(&str, String)]) -> (Cluster, usize, u16, Endpoint) {
    let mut cl = Cluster::new(name);
    let job = cl.path("job.toml");
    std::fs::write(&job, spec(name, &cl.path("ckpt"), interval)).unwrap();
    let port = free_port();
    let c = coordinator(&mut cl, "coordinator-1", port, Some(&job));
    let (ci, ep) = (c.idx, c.endpoint);
    cl.worker(&ep, env);
    cl.worker(&ep, env);
    wait(&ep, "training past step 30", |s| {
        phase(s) == "training" && u(&s["step"]) >= 30
    });
    let out = coordctl(&ep, &["grow", "--factor", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cl, ci, port, ep)
}

/// The grown model trains while its growth checkpoint is not yet durable (its write held).
/// Returns the status and the growth step.
fn training_uncommitted(cl: &Cluster, ep: &Endpoint) -> (Value, u64) {
    wait(ep, "the grown model training", |s| {
        u(&s["generation"]) == 1 && !s["growth"].is_null()
    });
    let at = growth_step(cl);
    let s = wait(
        ep,
        "the grown model training, its checkpoint unwritten",
        |s| u(&s["generation"]) == 1 && !s["growth"].is_null() && u(&s["step"]) >= at + 3,
    );
    assert!(
        !s["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| u(&c["step"]) == at),
        "the growth checkpoint is not recorded while its write is held: {s}"
    );
    (s, at)
}

/// After a kill before the growth checkpoint was durable: generation 0 again, the growth rolled
/// back, every rank restarted from the checkpoint before the growth.
fn assert_rolled_back_to_the_old_generation(cl: &Cluster, ep: &Endpoint, mid: &Value, at: u64) {
    let back = wait(ep, "training again after the rollback", |s| {
        phase(s) == "training" && u(&s["epoch"]) > u(&mid["epoch"]) && u(&s["step"]) >= at + 2
    });
    assert_eq!(u(&back["generation"]), 0, "{back}");
    assert_eq!(u(&back["layers"]), 2, "{back}");
    assert_eq!(back["growth_history"][0]["phase"], "rolled_back", "{back}");
    assert!(
        back["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| u(&c["generation"]) == 0 && u(&c["layers"]) == 2),
        "{back}"
    );
    // Restarted from the newest checkpoint before the growth (interval 20, the growth past 30;
    // the job, training on, may have committed later ones since).
    let restore = back["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| u(&c["step"]))
        .filter(|&s| s <= at)
        .max()
        .expect("a periodic checkpoint before the growth");
    assert!(restore >= 20, "restore point {restore}, growth at {at}");
    let steps = steps_after_epoch(cl, 0, u(&mid["epoch"]));
    let first = steps
        .iter()
        .map(|s| s.0)
        .min()
        .expect("steps after the kill");
    assert_eq!(first, restore + 1, "restarted from checkpoint {restore}");
    assert!(steps.iter().all(|s| s.1 == 0), "{steps:?}");
}

/// After a kill once the growth committed: generation 1 at the growth step (checkpoint +
/// plan), no checkpoint of the grown model needed, and the grown model's losses unchanged.
fn assert_restored_checkpoint_plus_plan(
    cl: &Cluster,
    ep: &Endpoint,
    before: &BTreeMap<u64, f64>,
    epoch: u64,
    at: u64,
) {
    let back = wait(ep, "the grown model training again", |s| {
        phase(s) == "training" && u(&s["epoch"]) > epoch && u(&s["step"]) >= at + 6
    });
    assert_eq!(u(&back["generation"]), 1, "{back}");
    assert_eq!(u(&back["layers"]), 4, "{back}");
    assert_eq!(back["growth_history"][0]["phase"], "done", "{back}");
    let steps = steps_after_epoch(cl, 0, epoch);
    let first = steps
        .iter()
        .map(|s| s.0)
        .min()
        .expect("steps after the kill");
    assert_eq!(
        first,
        at + 1,
        "restarted at the growth step as generation 1 (checkpoint {at} + plan): {steps:?}"
    );
    assert!(steps.iter().all(|s| s.1 == 1), "{steps:?}");
    // The grown model's steps trained again give the losses they gave the first time.
    let (after, count) = train_losses(ep);
    let again: Vec<u64> = (at + 1..=at + 5)
        .filter(|s| count.get(s).copied().unwrap_or(0) >= 2)
        .collect();
    assert!(
        !again.is_empty(),
        "no grown step was trained twice: {count:?}"
    );
    for s in again {
        assert_eq!(
            before.get(&s).map(|x| x.to_bits()),
            after.get(&s).map(|x| x.to_bits()),
            "train loss of grown step {s} before and after the restore"
        );
    }
}

/// The growth committed and the grown model trained a few steps: the status and the growth step.
fn committed_and_trained(cl: &Cluster, ep: &Endpoint) -> (Value, u64) {
    wait(ep, "the growth committed", |s| {
        s["growth_history"][0]["phase"] == "done"
    });
    let at = growth_step(cl);
    let s = wait(ep, "the grown model trained", |s| u(&s["step"]) >= at + 6);
    (s, at)
}

/// The only checkpoint is the growth's (generation 0 at the growth step): no checkpoint of the
/// grown model was taken.
fn assert_only_the_growth_checkpoint(s: &Value, at: u64) {
    let c = s["checkpoints"].as_array().unwrap();
    assert_eq!(c.len(), 1, "{s}");
    assert_eq!(
        (
            u(&c[0]["step"]),
            u(&c[0]["generation"]),
            c[0]["reason"].as_str()
        ),
        (at, 0, Some("growth")),
        "{s}"
    );
}

#[test]
fn a_worker_killed_before_the_growth_checkpoint_is_durable_rolls_back_to_the_old_generation() {
    let hold = [("TRELLIS_FAULT_GROWTH_CKPT_DELAY_MS", "6000".to_string())];
    let (mut cl, _, _, ep) = grown("gf-worker-writing", 20, &hold);
    let (mid, at) = training_uncommitted(&cl, &ep);
    // Worker 1 is rank 1 or rank 0; either way a rank of the group dies.
    cl.procs[2].kill9();
    cl.worker(&ep, &[]);
    assert_rolled_back_to_the_old_generation(&cl, &ep, &mid, at);
}

#[test]
fn a_coordinator_killed_before_the_growth_checkpoint_is_durable_recovers_the_old_generation() {
    let hold = [("TRELLIS_FAULT_GROWTH_CKPT_DELAY_MS", "6000".to_string())];
    let (mut cl, ci, port, ep) = grown("gf-coord-writing", 20, &hold);
    let (mid, at) = training_uncommitted(&cl, &ep);
    cl.procs[ci].kill9();
    let ep2 = coordinator(&mut cl, "coordinator-2", port, None).endpoint;
    assert_rolled_back_to_the_old_generation(&cl, &ep2, &mid, at);
}

/// The committed growth's restore point is its checkpoint + plan: after the grown model trained
/// a few steps (no checkpoint of it yet), a killed worker brings every rank back to generation 1
/// at the growth step.
#[test]
fn a_worker_killed_after_the_growth_committed_restores_checkpoint_plus_plan() {
    // No periodic checkpoints: the growth's restore point stays in force.
    let (mut cl, _, _, ep) = grown("gf-worker-committed", 0, &[]);
    let (s, at) = committed_and_trained(&cl, &ep);
    assert_only_the_growth_checkpoint(&s, at);
    let (before, _) = train_losses(&ep);
    cl.procs[2].kill9();
    cl.worker(&ep, &[]);
    assert_restored_checkpoint_plus_plan(&cl, &ep, &before, u(&s["epoch"]), at);
}

#[test]
fn a_coordinator_killed_after_the_growth_committed_recovers_checkpoint_plus_plan() {
    let (mut cl, ci, port, ep) = grown("gf-coord-committed", 0, &[]);
    let (s, at) = committed_and_trained(&cl, &ep);
    assert_only_the_growth_checkpoint(&s, at);
    let (before, _) = train_losses(&ep);
    cl.procs[ci].kill9();
    let ep2 = coordinator(&mut cl, "coordinator-2", port, None).endpoint;
    assert_restored_checkpoint_plus_plan(&cl, &ep2, &before, u(&s["epoch"]), at);
}
