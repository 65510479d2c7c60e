//! Service tests: a real coordinator (in-process, 127.0.0.1:0, embedded store) and fake agents
//! over gRPC — the whole protocol without libtorch.
mod common;
use common::*;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;
use trellis_agent::fake::FakeConfig;
use trellis_proto::v1 as pb;

fn grow_req(factor: u32, op: &str) -> pb::GrowRequest {
    // An unknown name becomes an operator value no coordinator knows.
    let operator = trellis_proto::convert::operator_by_name(op).map_or(99, |o| o as i32);
    pb::GrowRequest {
        factor,
        operator,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_in_lockstep_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    // Unknown job before any submit.
    assert_eq!(
        c.get_status(pb::GetStatusRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    submit(&mut c, &spec("lock", 2, 400, 0, "")).await;
    let second = c
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec("other", 1, 10, 0, ""),
            base_dir: "/tmp".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(second.code(), Code::AlreadyExists, "{second:?}");
    let fake = fake(15);
    let ep = format!("http://{}", co.grpc_addr);
    let a0 = spawn_agent(ep.clone(), fake.clone());
    let a1 = spawn_agent(ep.clone(), fake.clone());
    let s = wait_status(&mut c, "training", 60, |s| {
        s.phase == pb::JobPhase::Training as i32 && s.step >= 3
    })
    .await;
    assert_eq!(s.layers, 2);

    // Bad requests.
    for f in [0, 1] {
        let e = c.grow(grow_req(f, "stack")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "factor {f}: {e:?}");
        assert!(e.message().contains("≥ 2"), "{}", e.message());
    }
    let e = c.grow(grow_req(4, "sideways")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("unknown growth operator"),
        "{}",
        e.message()
    );
    let e = c
        .get_status(pb::GetStatusRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    c.pause(pb::PauseRequest::default()).await.unwrap();
    let e = c.grow(grow_req(4, "stack")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("resume"), "{}", e.message());
    assert_eq!(
        c.pause(pb::PauseRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    c.resume(pb::ResumeRequest::default()).await.unwrap();

    // Grow at a future step; a second grow meanwhile is refused.
    let s = c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let at = s.step + 15;
    let r = c
        .grow(pb::GrowRequest {
            at_step: Some(at),
            ..grow_req(4, "stack")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.generation, r.from_layers, r.to_layers), (1, 2, 8));
    let e = c.grow(grow_req(2, "stack")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = c.pause(pb::PauseRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Done, and its checkpoint listed (the catalogue lists a checkpoint once its record is
    // durable in the store, which may be just after the growth commits).
    let s = wait_status(&mut c, "growth done", 90, |s| {
        s.growth_history
            .first()
            .is_some_and(|g| g.phase == pb::GrowthPhase::Done as i32)
            && s.checkpoints.iter().any(|c| c.reason == "growth")
    })
    .await;
    assert_eq!(s.generation, 1);
    assert_eq!(s.layers, 8);
    assert_eq!(s.phase, pb::JobPhase::Training as i32);
    let g = &s.growth_history[0];
    assert_eq!(g.at_step, at);
    let t = g.timings.unwrap();
    assert!(
        t.checkpoint_seconds > 0.0 && t.stack_seconds >= 0.0 && t.total_seconds > 0.0,
        "{t:?}"
    );
    // The growth checkpoint (generation 0, at the growth step) is recorded and the growth is
    // done without a checkpoint of the grown model: its restore point is that checkpoint + the
    // growth's plan.
    assert!(
        s.checkpoints
            .iter()
            .any(|c| c.generation == 0 && c.step == at && c.reason == "growth"),
        "{:?}",
        s.checkpoints
    );
    assert!(
        !s.checkpoints.iter().any(|c| c.reason == "post-growth"),
        "{:?}",
        s.checkpoints
    );
    // Every rank grew at the same step: the barrier.
    let ev = fake.events.lock().unwrap().clone();
    let grows: Vec<_> = ev.iter().filter(|e| e.what == "grow").collect();
    assert_eq!(grows.len(), 2, "{grows:?}");
    assert!(
        grows
            .iter()
            .all(|e| e.step == at && e.layers == 8 && e.generation == 1),
        "{grows:?}"
    );
    // The growth checkpoint (of the small model) was written once the grown model's first
    // step was done, not beside it (docs/design.md §3).
    let writes: Vec<_> = ev.iter().filter(|e| e.what == "growth-write").collect();
    assert_eq!(writes.len(), 2, "{writes:?}");
    assert!(
        writes
            .iter()
            .all(|e| e.step > at && e.layers == 2 && e.generation == 0),
        "the growth checkpoint's write must wait for the first grown step (growth at step {at}): {writes:?}"
    );
    let m = scrape(co.metrics_addr.unwrap()).await;
    assert!(m.contains("trellis_model_layers 8"), "{m}");
    assert!(m.contains("trellis_generation 1"), "{m}");
    assert!(
        m.contains("trellis_growth_phase_seconds_count{phase=\"stack\"} 1"),
        "{m}"
    );
    a0.abort();
    a1.abort();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_rolls_back_and_skips_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("nan", 1, 40, 5, "")).await;
    let mut f = fake(5);
    // Step 13 (1-based) consumes samples [48, 52).
    f.nan_at_sample = Some(49);
    let a = spawn_agent(format!("http://{}", co.grpc_addr), f.clone());
    let s = wait_status(&mut c, "done after a rollback", 90, |s| {
        s.phase == pb::JobPhase::Done as i32
    })
    .await;
    assert_eq!(s.rollbacks, 1, "{s:#?}");
    assert_eq!(s.loss_anomalies, 1);
    assert_eq!(s.step, 40);
    // The resumed run skipped the batch: the cursor is one batch ahead of step × batch.
    assert_eq!(s.data_cursor, 40 * 4 + 4, "{s:#?}");
    let m = scrape(co.metrics_addr.unwrap()).await;
    assert!(
        m.contains("trellis_loss_anomalies_total{kind=\"nan\"} 1"),
        "{m}"
    );
    assert!(m.contains("trellis_rollbacks_total 1"), "{m}");
    // Stop ends the agent cleanly.
    tokio::time::timeout(Duration::from_secs(30), a)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_loss_rolls_back_and_continues_when_a_worker_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("loss", 2, 100000, 5, "")).await;
    let ep = format!("http://{}", co.grpc_addr);
    let f = fake(10);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    let s = wait_status(&mut c, "a committed checkpoint", 60, |s| {
        !s.checkpoints.is_empty() && s.step >= 8
    })
    .await;
    let epoch = s.epoch;
    a1.abort();
    let s = wait_status(&mut c, "rollback", 60, |s| s.rollbacks >= 1).await;
    // Rolling back until the next membership tick re-forms the group, then waiting for a worker.
    assert!(
        s.phase == pb::JobPhase::WaitingForWorkers as i32
            || s.phase == pb::JobPhase::RollingBack as i32
            || s.epoch > epoch,
        "{s:#?}"
    );
    let a2 = spawn_agent(ep.clone(), f.clone());
    let s = wait_status(&mut c, "training again", 60, |s| {
        s.phase == pb::JobPhase::Training as i32 && s.epoch > epoch
    })
    .await;
    let restart_step = s.step;
    let s = wait_status(&mut c, "progress", 60, |s| s.step >= restart_step + 10).await;
    assert_eq!(s.workers.unwrap().active, 2);
    a0.abort();
    a2.abort();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_messages_are_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("fence", 1, 1000, 0, "")).await;
    let mut w =
        pb::worker_service_client::WorkerServiceClient::connect(format!("http://{}", co.grpc_addr))
            .await
            .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let msg = |k| pb::WorkerMessage { kind: Some(k) };
    tx.send(msg(pb::worker_message::Kind::Hello(pb::Hello {
        worker_id: "raw".into(),
        ring_address: "127.0.0.1:1".into(),
        ..Default::default()
    })))
    .unwrap();
    let mut inbound = w
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(pb::coordinator_message::Kind::Assignment(a)) = first.kind else {
        panic!("{first:?}")
    };
    assert_eq!(a.epoch, 1);
    // A step report and an ack from epoch 0 (stale), then a good step report.
    tx.send(msg(pb::worker_message::Kind::Step(pb::StepReport {
        epoch: 0,
        step: 99,
        loss: 1.0,
        ..Default::default()
    })))
    .unwrap();
    tx.send(msg(pb::worker_message::Kind::Ack(pb::Ack {
        epoch: 0,
        command_id: 1,
        phase: pb::AckPhase::Checkpoint as i32,
        ok: false,
        ..Default::default()
    })))
    .unwrap();
    tx.send(msg(pb::worker_message::Kind::Step(pb::StepReport {
        epoch: 1,
        step: 1,
        tokens: 64,
        loss: 5.0,
        sample_end: 4,
        ..Default::default()
    })))
    .unwrap();
    let s = wait_status(&mut c, "fenced", 30, |s| {
        s.fenced_messages >= 2 && s.step == 1
    })
    .await;
    assert_eq!(
        s.rollbacks, 0,
        "a stale failing ack must not roll back: {s:#?}"
    );
    assert_eq!(s.fenced_messages, 2);
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_checkpoints_commit_and_the_job_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("periodic", 2, 60, 5, "")).await;
    let ep = format!("http://{}", co.grpc_addr);
    // Steps slow enough that a periodic barrier (sent LOOKAHEAD_STEPS ahead) is not passed
    // before its command arrives on a loaded machine.
    let f = fake(15);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    // The catalogue lists durable records only: the final one may land just after "done".
    let s = wait_status(&mut c, "done with the final checkpoint listed", 90, |s| {
        s.phase == pb::JobPhase::Done as i32 && s.checkpoints.last().is_some_and(|c| c.step == 60)
    })
    .await;
    let steps: Vec<u64> = s.checkpoints.iter().map(|c| c.step).collect();
    // Twelve commits; the catalogue mirrors `checkpoint.keep` (default 3), newest kept.
    assert_eq!(steps.len(), 3, "{s:#?}");
    assert_eq!(steps.last(), Some(&60), "{s:#?}");
    assert!(steps.iter().all(|st| st % 5 == 0), "{s:#?}");
    assert_eq!(s.checkpoints.last().unwrap().reason, "final");
    assert!(dir
        .path()
        .join("ckpt/periodic/step-60/trainer_state.json")
        .exists());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ckpt/periodic/latest")).unwrap(),
        "step-60"
    );
    for a in [a0, a1] {
        tokio::time::timeout(Duration::from_secs(30), a)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_outside_the_job_root_is_never_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("elsewhere", 2, 100000, 5, "")).await;
    let ep = format!("http://{}", co.grpc_addr);
    let f = FakeConfig {
        commit_elsewhere: Some(dir.path().join("elsewhere")),
        ..fake(5)
    };
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    // Rank 0 commits step 5, 10, ... elsewhere: training goes on, nothing is recorded.
    let s = wait_status(&mut c, "training past several checkpoint steps", 60, |s| {
        s.phase == pb::JobPhase::Training as i32 && s.step >= 25
    })
    .await;
    assert!(
        dir.path().join("elsewhere/step-5").is_dir(),
        "the fake committed elsewhere"
    );
    assert!(s.checkpoints.is_empty(), "recorded: {:?}", s.checkpoints);
    a0.abort();
    a1.abort();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deterministic_failure_fails_the_job_after_three_stalled_rollbacks() {
    let dir = tempfile::tempdir().unwrap();
    let running = coordinator(dir.path()).await;
    let mut c = control(running.grpc_addr).await;
    submit(&mut c, &spec("stuck", 2, 100000, 10, "")).await;
    let f = FakeConfig {
        fail_at_step: Some(7),
        ..fake(2)
    };
    let ep = format!("http://{}", running.grpc_addr);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    let s = wait_status(&mut c, "the job to fail", 60, |s| {
        s.phase == pb::JobPhase::Failed as i32
    })
    .await;
    assert_eq!(s.rollbacks, 3, "{s:#?}");
    assert!(
        s.message
            .contains("rolled back 3 times in a row to checkpoint step 0")
            && s.message.contains("fails every time"),
        "{}",
        s.message
    );
    a0.abort();
    a1.abort();
    running.stop().await;
}

/// Entries of the job's checkpoint directory: committed steps and leftover temp dirs.
fn on_disk(root: &std::path::Path) -> (Vec<u64>, Vec<String>) {
    let mut steps = vec![];
    let mut tmp = vec![];
    for e in std::fs::read_dir(root).into_iter().flatten() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            tmp.push(name.clone());
        }
        if let Some(n) = name.strip_prefix("step-").and_then(|n| n.parse().ok()) {
            steps.push(n);
        }
    }
    steps.sort();
    (steps, tmp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_checkpoint_volume_is_not_a_training_failure() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator_with(dir.path(), |c| c.checkpoint_retry_max_secs = 0.3).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("full", 2, 1500, 10, "")).await;
    let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = FakeConfig {
        fail_write: Some(full.clone()),
        ..fake(3)
    };
    let ep = format!("http://{}", co.grpc_addr);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    let s = wait_status(
        &mut c,
        "failed checkpoints while training goes on",
        60,
        |s| s.checkpoint_failures >= 3 && s.step >= 40,
    )
    .await;
    // No rollback, no new epoch, nothing recorded; the failure is reported with its cause.
    assert_eq!(
        (s.phase, s.rollbacks, s.epoch),
        (pb::JobPhase::Training as i32, 0, 1),
        "{s:#?}"
    );
    assert!(s.checkpoints.is_empty(), "{:?}", s.checkpoints);
    assert!(
        s.checkpoint_error.contains("No space left on device"),
        "{}",
        s.checkpoint_error
    );
    let text = scrape(co.metrics_addr.unwrap()).await;
    let failures = text
        .lines()
        .find(|l| l.starts_with("trellis_checkpoint_failures_total{reason=\"no_space\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(failures >= 3.0, "{text}");
    // Space comes back: the job checkpoints again and finishes, without a rollback.
    full.store(false, std::sync::atomic::Ordering::SeqCst);
    let done = wait_status(&mut c, "the job to finish", 60, |s| {
        s.phase == pb::JobPhase::Done as i32
    })
    .await;
    assert_eq!((done.rollbacks, done.epoch), (0, 1), "{done:#?}");
    assert!(!done.checkpoints.is_empty());
    assert!(
        done.checkpoint_error.is_empty(),
        "{}",
        done.checkpoint_error
    );
    assert!(done.checkpoint_failures >= s.checkpoint_failures);
    let (_, tmp) = on_disk(&dir.path().join("ckpt/full"));
    assert!(tmp.is_empty(), "aborted checkpoints left {tmp:?}");
    eprintln!(
        "full volume: {} failed checkpoints, 0 rollbacks; done at step {}",
        done.checkpoint_failures, done.step
    );
    a0.abort();
    a1.abort();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_commit_is_retried_without_a_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator_with(dir.path(), |c| c.checkpoint_retry_max_secs = 0.2).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("nocommit", 2, 100000, 5, "")).await;
    let f = FakeConfig {
        fail_commit: true,
        ..fake(3)
    };
    let ep = format!("http://{}", co.grpc_addr);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    let s = wait_status(&mut c, "commits failing while training goes on", 60, |s| {
        s.checkpoint_failures >= 3 && s.step >= 30
    })
    .await;
    assert_eq!((s.rollbacks, s.epoch), (0, 1), "{s:#?}");
    assert!(
        s.checkpoint_error.contains("rank 0 could not commit it"),
        "{}",
        s.checkpoint_error
    );
    assert_eq!(s.phase, pb::JobPhase::Training as i32, "{s:#?}");
    a0.abort();
    a1.abort();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_growth_whose_checkpoint_cannot_be_written_rolls_back_and_is_not_a_failed_growth() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator_with(dir.path(), |c| c.checkpoint_retry_max_secs = 0.2).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("nogrow", 2, 100000, 0, "")).await;
    let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = FakeConfig {
        fail_write: Some(full.clone()),
        ..fake(3)
    };
    let ep = format!("http://{}", co.grpc_addr);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    wait_status(&mut c, "training", 30, |s| {
        s.phase == pb::JobPhase::Training as i32 && s.step >= 5
    })
    .await;
    // The growth checkpoint is written while the grown model trains: when it fails, the job
    // goes back to the restore point before the growth (never half-grown). More failures in a
    // row than fail a job for failed growths (3): a full disk is not one, the job trains on.
    let mut before = 0;
    for n in 1..=4u64 {
        c.grow(grow_req(2, "stack")).await.unwrap();
        let s = wait_status(&mut c, "the growth rolled back", 30, |s| {
            s.rollbacks == n && s.phase == pb::JobPhase::Training as i32
        })
        .await;
        assert_eq!((s.generation, s.layers), (0, 2), "{s:#?}");
        assert!(s.checkpoint_failures >= n, "{s:#?}");
        let g = s.growth_history.iter().find(|g| g.generation == 1).unwrap();
        assert!(
            g.phase == pb::GrowthPhase::RolledBack as i32
                && g.error.contains("the growth checkpoint failed")
                && g.error.contains("No space left on device"),
            "{g:#?}"
        );
        before = s.step;
    }
    let s = wait_status(&mut c, "training on at generation 0", 30, |s| {
        s.step > before + 20
    })
    .await;
    assert_eq!(
        (s.phase, s.generation, s.layers, s.rollbacks),
        (pb::JobPhase::Training as i32, 0, 2, 4),
        "{s:#?}"
    );
    // With space back, the same growth succeeds.
    full.store(false, std::sync::atomic::Ordering::SeqCst);
    c.grow(grow_req(2, "stack")).await.unwrap();
    let s = wait_status(&mut c, "the retried growth", 30, |s| {
        s.generation == 1 && s.layers == 4
    })
    .await;
    assert_eq!(s.rollbacks, 4, "{s:#?}");
    a0.abort();
    a1.abort();
    co.stop().await;
}

/// A growth stage of the spec whose checkpoint cannot be written (a full disk) rolls back and
/// is retried, without limit but never at once: after 1 s, then 2 s, then the cap
/// (`checkpoint_retry_max_secs`), the wait shown by the status; a success clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_growth_stage_whose_checkpoint_cannot_be_written_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator_with(dir.path(), |c| c.checkpoint_retry_max_secs = 2.0).await;
    let mut c = control(co.grpc_addr).await;
    let stage = "[[growth]]\nat_step = 10\nfactor = 2\noperator = \"stack\"\n";
    submit(&mut c, &spec("stageio", 2, 100000, 0, stage)).await;
    let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = FakeConfig {
        fail_write: Some(full.clone()),
        ..fake(3)
    };
    let ep = format!("http://{}", co.grpc_addr);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    for (n, wait) in [(1, "1"), (2, "2"), (3, "2")] {
        let s = wait_status(&mut c, "the growth stage rolled back", 60, |s| {
            s.rollbacks == n && s.retry == "growth"
        })
        .await;
        assert!(
            s.retry_in_seconds > 0.0 && s.retry_in_seconds <= 2.0,
            "{s:#?}"
        );
        assert_eq!((s.generation, s.layers), (0, 2), "{s:#?}");
        let g = s
            .growth_history
            .iter()
            .rev()
            .find(|g| g.generation == 1)
            .unwrap();
        assert!(
            g.phase == pb::GrowthPhase::RolledBack as i32
                && g.error.contains("No space left on device")
                && g.error.contains(&format!("growth retrying in {wait} s")),
            "failure {n}: {g:#?}"
        );
        assert!(
            s.checkpoint_error
                .contains(&format!("retrying in {wait} s")),
            "{}",
            s.checkpoint_error
        );
    }
    // Space comes back: the stage's next retry grows, and nothing waits any more.
    full.store(false, std::sync::atomic::Ordering::SeqCst);
    let s = wait_status(&mut c, "the retried growth stage", 60, |s| {
        s.generation == 1 && s.layers == 4 && s.growth.is_none()
    })
    .await;
    assert_eq!((s.retry.as_str(), s.next_growth_stage), ("", 1), "{s:#?}");
    assert!(s.rollbacks >= 3, "{s:#?}");
    a0.abort();
    a1.abort();
    co.stop().await;
}

/// gRPC health of `service` ("" the whole server, "liveness" the liveness probe's): SERVING?
async fn serving(addr: std::net::SocketAddr, service: &str) -> bool {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    let mut h = HealthClient::new(ch);
    h.check(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .is_ok_and(|r| r.into_inner().status == 1)
}

/// Poll both health services until they say `want` (bounded).
async fn wait_health(addr: std::net::SocketAddr, want: bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if serving(addr, "").await == want && serving(addr, "liveness").await == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A driver stuck holding the coordinator's state lock (a handler that never returns): gRPC
/// health turns NOT_SERVING on "" and on "liveness" (Kubernetes restarts a process that no longer
/// answers) once the lock is not free within its bound, and SERVING again once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_state_lock_turns_readiness_and_liveness_not_serving_until_it_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("stuck", 2, 1000, 0, "")).await;
    wait_health(co.grpc_addr, true, "SERVING at start").await;
    let stuck = co.domain.lock().await;
    wait_health(co.grpc_addr, false, "NOT_SERVING while the lock is held").await;
    drop(stuck);
    wait_health(co.grpc_addr, true, "SERVING once the lock is free").await;
    // And the coordinator answers again.
    let s = c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.job_id, "stuck");
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_with_slow_steps_is_reported_slow() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("slow", 2, 100000, 0, "")).await;
    let ep = format!("http://{}", co.grpc_addr);
    let a0 = spawn_agent(ep.clone(), fake(2));
    // Its own steps take 10x longer (the group waits for it in the lockstep agreement).
    let a1 = spawn_agent(ep.clone(), fake(20));
    let s = wait_status(&mut c, "one slow rank reported", 30, |s| {
        s.phase == pb::JobPhase::Training as i32 && s.slow_ranks.len() == 1
    })
    .await;
    let workers = c
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    let slow = workers
        .iter()
        .find(|w| w.rank == s.slow_ranks[0] as i32)
        .expect("the slow rank's worker");
    assert!(slow.slowness > 1.5, "{workers:#?}");
    // The gauge follows at the next membership tick.
    let mut text = String::new();
    for _ in 0..50 {
        text = scrape(co.metrics_addr.unwrap()).await;
        if text.lines().any(|l| l == "trellis_slow_ranks 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        text.lines().any(|l| l == "trellis_slow_ranks 1"),
        "{}",
        text.lines()
            .filter(|l| l.contains("slow"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    a0.abort();
    a1.abort();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_collected_only_after_a_newer_commit_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    let keep = 2;
    submit(
        &mut c,
        &spec("gc", 2, 120, 5, "")
            .replace("[checkpoint]\n", &format!("[checkpoint]\nkeep = {keep}\n")),
    )
    .await;
    let ep = format!("http://{}", co.grpc_addr);
    let f = fake(5);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    let root = dir.path().join("ckpt/gc");
    // Whenever the coordinator lists a checkpoint, it is on disk: GC never runs ahead of
    // the record that retires a checkpoint.
    let mut polls = 0;
    let done = loop {
        let s = c
            .get_status(pb::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        let (steps, _) = on_disk(&root);
        for ck in &s.checkpoints {
            assert!(
                steps.contains(&ck.step),
                "recorded step {} is not on disk ({steps:?})",
                ck.step
            );
        }
        polls += 1;
        // The catalogue lists durable records only: the final commit's record may land just
        // after the phase reads done.
        if s.phase == pb::JobPhase::Done as i32 && s.checkpoints.len() >= keep {
            break s;
        }
        assert!(
            polls < 3000,
            "the job did not finish with {keep} checkpoints listed: {s:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    let (steps, tmp) = on_disk(&root);
    let listed: Vec<u64> = done.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(listed.len(), keep, "{listed:?}");
    // What the final commit retired from the catalogue goes at the next commit: at most one
    // more than `keep` stays on disk.
    assert!(
        listed.iter().all(|s| steps.contains(s)) && steps.len() <= keep + 1,
        "on disk {steps:?}, listed {listed:?}"
    );
    assert!(tmp.is_empty(), "{tmp:?}");
    a0.abort();
    a1.abort();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_rank_is_evicted_and_an_idle_worker_takes_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator_with(dir.path(), |c| c.progress_timeout_secs = Some(4.0)).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("hung", 2, 400, 10, "")).await;
    let ep = format!("http://{}", co.grpc_addr);
    let a0 = spawn_agent(ep.clone(), fake(5));
    let hung = FakeConfig {
        hang_at_step: Some(40),
        ..fake(5)
    };
    let a1 = spawn_agent(ep.clone(), hung);
    wait_status(&mut c, "training", 30, |s| {
        s.phase == pb::JobPhase::Training as i32 && s.step > 5
    })
    .await;
    // The spare registers once both ranks are taken.
    let a2 = spawn_agent(ep.clone(), fake(5));
    let t0 = std::time::Instant::now();
    let s = wait_status(&mut c, "the hung rank evicted", 60, |s| s.evictions >= 1).await;
    let evicted_after = t0.elapsed();
    let done = wait_status(&mut c, "the job to finish without it", 90, |s| {
        s.phase == pb::JobPhase::Done as i32
    })
    .await;
    assert_eq!(done.evictions, 1, "{done:#?}");
    assert!(done.rollbacks >= 1, "{done:#?}");
    let workers = c
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    eprintln!(
        "hung rank: evicted {:.1} s after the spare joined (progress timeout 4 s); {} rollbacks; workers {:?}",
        evicted_after.as_secs_f64(),
        done.rollbacks,
        workers
            .iter()
            .map(|w| (w.state, w.progress_phase.clone(), w.last_step))
            .collect::<Vec<_>>()
    );
    let _ = s;
    a0.abort();
    a1.abort();
    a2.abort();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plateau_stage_grows_when_the_loss_flattens() {
    let dir = tempfile::tempdir().unwrap();
    let running = coordinator(dir.path()).await;
    let mut c = control(running.grpc_addr).await;
    let extra = "[[growth]]\ntrigger = \"plateau\"\nplateau_window = 20\nplateau_threshold = 0.05\nfactor = 2\n";
    submit(&mut c, &spec("plateau", 2, 2000, 0, extra)).await;
    let ep = format!("http://{}", running.grpc_addr);
    let f = fake(1);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    let s = wait_status(&mut c, "the plateau growth", 60, |s| {
        s.generation == 1 && s.layers == 4
    })
    .await;
    let g = &s.growth_history[0];
    // The fake loss 2 + 8/(1 + 0.05 s) improves by more than 5% per 20 steps until about step
    // 100: the stage must not fire at once, and must fire once the curve flattens.
    assert!(g.at_step > 60 && g.at_step < 400, "{g:#?}");
    let loss = c
        .get_loss(pb::GetLossRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        loss.anomalies
            .iter()
            .any(|a| a.kind == "plateau" && a.step <= g.at_step),
        "{:?}",
        loss.anomalies
    );
    a0.abort();
    a1.abort();
    running.stop().await;
}

/// gRPC reflection answers in both versions: `grpc.reflection.v1` and the `v1alpha` that older
/// clients (grpcurl before 1.8, many IDE plugins) ask for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let ep = format!("http://{}", co.grpc_addr);

    let channel = tonic::transport::Endpoint::from_shared(ep)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = alpha
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        resp.message_response
    else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"trellis.v1.ControlService".to_string()),
        "{names:?}"
    );

    let mut v1c = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = v1c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    assert!(
        format!("{resp:?}").contains("trellis.v1.WorkerService"),
        "{resp:?}"
    );
    co.stop().await;
}

/// Oversized specs are refused at submit with one line naming the field and the limit, and
/// the coordinator goes on serving (issue 10: no abort, no lock held for minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_specs_are_refused_at_submit_and_the_coordinator_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    for (field, text) in [
        (
            "model.intermediate_size",
            spec("big", 1, 10, 0, "").replace(
                "num_hidden_layers = 2",
                "num_hidden_layers = 2\nintermediate_size = 10000000000000",
            ),
        ),
        (
            "parallel.dp",
            spec("wide", 1, 10, 0, "").replace("dp = 1", "dp = 30000000000"),
        ),
    ] {
        let t0 = std::time::Instant::now();
        let e = c
            .submit_job(pb::SubmitJobRequest {
                spec_toml: text,
                base_dir: "/tmp".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(field) && e.message().contains("limit"),
            "{}",
            e.message()
        );
        assert!(!e.message().contains('\n'), "{}", e.message());
        assert!(t0.elapsed() < Duration::from_secs(5), "refused at once");
    }
    // Still serving, still without a job.
    let e = c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    submit(&mut c, &spec("fine", 1, 10, 0, "")).await;
    co.stop().await;
}

/// A panic on a worker's training thread ends the worker with an error, not a clean exit
/// (issue 10: it exited with status 0 and looked like a finished worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_training_thread_ends_the_agent_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("panic", 1, 50, 0, "")).await;
    let ep = format!("http://{}", co.grpc_addr);
    let cfg = FakeConfig {
        panic_at_step: Some(3),
        ..fake(5)
    };
    let a = spawn_agent(ep, cfg);
    let r = tokio::time::timeout(Duration::from_secs(30), a)
        .await
        .expect("the agent ends")
        .expect("the task itself did not panic");
    let e = r.expect_err("a panicked trainer is an error");
    assert!(e.to_string().contains("panicked"), "{e}");
    co.stop().await;
}

// ------------------------------------------------------------------------------------------
// Limits (issue 11): message size, registered workers, Watch streams. Each refusal is
// RESOURCE_EXHAUSTED with one line naming the flag and the config key, and the coordinator
// serves on.
// ------------------------------------------------------------------------------------------

#[track_caller]
fn names_limit(e: &tonic::Status, flag: &str, key: &str) {
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let m = e.message();
    assert!(m.contains(flag) && m.contains(key), "{m}");
    assert!(!m.contains('\n'), "one line: {m}");
}

type WorkerClient = pb::worker_service_client::WorkerServiceClient<tonic::transport::Channel>;

fn hello(id: &str) -> pb::WorkerMessage {
    pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
            worker_id: id.into(),
            host: "test".into(),
            pid: 1,
            device: "cpu".into(),
            ring_address: "127.0.0.1:9".into(),
            tp_ring_address: "127.0.0.1:9".into(),
            ..Default::default()
        })),
    }
}

/// An open worker session as `id` (kept open until both halves are dropped), or its refusal.
async fn open_session(
    w: &mut WorkerClient,
    id: &str,
) -> Result<
    (
        tokio::sync::mpsc::UnboundedSender<pb::WorkerMessage>,
        tonic::Streaming<pb::CoordinatorMessage>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(hello(id)).unwrap();
    let r = w
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await?;
    Ok((tx, r.into_inner()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_bytes_is_refused_and_the_coordinator_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator_with(dir.path(), |c| c.max_message_bytes = 64 << 10).await;
    let mut c = control(co.grpc_addr).await;
    // A 100 kB spec (a long comment): over the 64 KiB limit.
    let big = format!("{}\n# {}\n", spec("big", 1, 10, 0, ""), "x".repeat(100_000));
    let e = c
        .submit_job(pb::SubmitJobRequest {
            spec_toml: big,
            base_dir: "/tmp".into(),
        })
        .await
        .unwrap_err();
    names_limit(&e, "--max-message-bytes", "max_message_bytes");
    assert!(e.message().contains("65536"), "{}", e.message());
    // A worker's Hello over the limit: the same refusal, before anything is registered.
    let mut w = WorkerClient::connect(format!("http://{}", co.grpc_addr))
        .await
        .unwrap();
    let e = open_session(&mut w, &"w".repeat(70_000)).await.unwrap_err();
    names_limit(&e, "--max-message-bytes", "max_message_bytes");
    // Serving on, nothing created: no job, no worker; a normal submit works.
    let e = c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let ws = c
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(ws.workers.is_empty(), "{ws:?}");
    submit(&mut c, &spec("fine", 1, 10, 0, "")).await;
    c.get_status(pb::GetStatusRequest::default()).await.unwrap();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_beyond_max_workers_is_refused_and_the_job_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator_with(dir.path(), |c| c.max_workers = 2).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("lim", 2, 100_000, 0, "")).await;
    let ep = format!("http://{}", co.grpc_addr);
    let (a0, a1) = (
        spawn_agent(ep.clone(), fake(5)),
        spawn_agent(ep.clone(), fake(5)),
    );
    let s0 = wait_status(&mut c, "DP=2 training", 60, |s| {
        s.phase == pb::JobPhase::Training as i32 && s.step >= 3
    })
    .await;
    let mut w = WorkerClient::connect(ep.clone()).await.unwrap();
    let e = open_session(&mut w, "w-extra").await.unwrap_err();
    names_limit(&e, "--max-workers", "max_workers");
    assert!(
        e.message().contains(" 2 registered workers"),
        "{}",
        e.message()
    );
    // The job never noticed: same epoch, no rollback, training on with its two workers.
    let s1 = wait_status(&mut c, "training on", 60, |s| s.step >= s0.step + 10).await;
    assert_eq!((s1.epoch, s1.rollbacks), (s0.epoch, s0.rollbacks), "{s1:?}");
    assert_eq!(s1.phase, pb::JobPhase::Training as i32);
    let ws = c
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ws.workers.len(), 2, "{ws:?}");
    assert!(ws.workers.iter().all(|w| w.worker_id != "w-extra"));
    a0.abort();
    a1.abort();
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_worker_registry_makes_room_by_forgetting_a_disconnected_worker() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator_with(dir.path(), |c| c.max_workers = 2).await;
    let mut c = control(co.grpc_addr).await;
    let mut w = WorkerClient::connect(format!("http://{}", co.grpc_addr))
        .await
        .unwrap();
    let s0 = open_session(&mut w, "w0").await.unwrap();
    let _s1 = open_session(&mut w, "w1").await.unwrap();
    let e = open_session(&mut w, "w2").await.unwrap_err();
    names_limit(&e, "--max-workers", "max_workers");
    // A connected worker's id may always reconnect (it replaces its own entry).
    let _s1b = open_session(&mut w, "w1").await.unwrap();
    // w0 goes away: its entry (no rank, no session) makes room for w2.
    drop(s0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let _s2 = loop {
        match open_session(&mut w, "w2").await {
            Ok(s) => break s,
            Err(e) => {
                names_limit(&e, "--max-workers", "max_workers");
                assert!(
                    std::time::Instant::now() < deadline,
                    "w0's disconnect never made room"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut ids: Vec<String> = c
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers
        .into_iter()
        .map(|w| w.worker_id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["w1", "w2"]);
    co.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_beyond_max_watch_streams_are_refused_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator_with(dir.path(), |c| c.max_watch_streams = 2).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("watched", 1, 10, 0, "")).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = c
            .watch(pb::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(s.message().await.unwrap().is_some(), "the first status");
        open.push(s);
    }
    let e = c.watch(pb::WatchRequest::default()).await.unwrap_err();
    names_limit(&e, "--max-watch-streams", "max_watch_streams");
    // Serving on: unary calls are not limited by the streams.
    c.get_status(pb::GetStatusRequest::default()).await.unwrap();
    // A client that goes away frees its slot (no status change needed).
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match c.watch(pb::WatchRequest::default()).await {
            Ok(s) => {
                open.push(s.into_inner());
                break;
            }
            Err(e) => {
                names_limit(&e, "--max-watch-streams", "max_watch_streams");
                assert!(
                    std::time::Instant::now() < deadline,
                    "a closed Watch never freed its slot"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    co.stop().await;
}

// ------------------------------------------------------------------------------------------
// NCCL: backend choice and the unique-id relay, with raw worker sessions that claim CUDA + NCCL
// (fake 128-byte ids: the coordinator only relays them).

/// A fake NCCL id: (worker, offer, slot) in its first bytes, so a relayed id names its maker.
fn fake_id(worker: u8, offer: u8, slot: u8) -> Vec<u8> {
    let mut id = vec![0u8; 128];
    id[..4].copy_from_slice(&[0xcc, worker, offer, slot]);
    id
}

fn offer(worker: u8, n: u8) -> Vec<Vec<u8>> {
    vec![fake_id(worker, n, 0), fake_id(worker, n, 1)]
}

/// A raw worker session: Hello as `device` (`nccl` capable, offering `ids`) and a heartbeat
/// every 300 ms; dropping it (and aborting the heartbeat) ends the session.
struct RawWorker {
    tx: tokio::sync::mpsc::UnboundedSender<pb::WorkerMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl RawWorker {
    async fn open(
        addr: std::net::SocketAddr,
        id: &str,
        device: &str,
        nccl: bool,
        ids: Vec<Vec<u8>>,
    ) -> RawWorker {
        let mut w = WorkerClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
                worker_id: id.into(),
                host: "test".into(),
                pid: 1,
                device: device.into(),
                ring_address: "127.0.0.1:9".into(),
                tp_ring_address: "127.0.0.1:9".into(),
                nccl,
                nccl_ids: ids,
            })),
        })
        .unwrap();
        let inbound = w
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let hb = tx.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let m = pb::WorkerMessage {
                    kind: Some(pb::worker_message::Kind::Heartbeat(pb::Heartbeat {
                        phase: "idle".into(),
                        ..Default::default()
                    })),
                };
                if hb.send(m).is_err() {
                    return;
                }
            }
        });
        RawWorker {
            tx,
            inbound,
            heartbeat,
        }
    }

    /// The next Assignment (other messages skipped), bounded.
    async fn assignment(&mut self) -> pb::Assignment {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = tokio::time::timeout_at(deadline, self.inbound.message())
                .await
                .expect("an assignment within 30 s")
                .unwrap()
                .expect("the session is open");
            if let Some(pb::coordinator_message::Kind::Assignment(a)) = m.kind {
                return a;
            }
        }
    }

    fn offer(&self, ids: Vec<Vec<u8>>) {
        self.tx
            .send(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::NcclIds(pb::NcclIds { ids })),
            })
            .unwrap();
    }

    fn kill(self) {
        self.heartbeat.abort();
    }
}

/// Every rank of a DP = 2 × TP = 2 epoch gets the ids its groups' ranks 0 offered (DP and TP
/// ids distinct), `coordctl status` shows `nccl`, and after a worker is lost the next epoch
/// waits for the survivors' fresh offers and relays only fresh ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nccl_ids_are_relayed_from_each_groups_rank_0_fresh_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("nccl", 2, 100_000, 0, "tp = 2")).await;
    let mut ws = Vec::new();
    for w in 0..4u8 {
        ws.push(RawWorker::open(co.grpc_addr, &format!("w{w}"), "cuda:0", true, offer(w, 0)).await);
    }
    // (worker index by rank, assignments by rank)
    let check_epoch = |got: &[(u8, pb::Assignment)], epoch: u64| -> Vec<Vec<u8>> {
        let mut by_rank: Vec<(u8, pb::Assignment)> = got.to_vec();
        by_rank.sort_by_key(|(_, a)| a.rank);
        let worker_at = |r: usize| by_rank[r].0;
        let mut used = Vec::new();
        for (r, (_, a)) in by_rank.iter().enumerate() {
            assert_eq!(a.rank as usize, r);
            assert_eq!(a.epoch, epoch);
            assert_eq!((a.dp, a.tp), (2, 2));
            assert_eq!(
                (a.dp_backend.as_str(), a.tp_backend.as_str()),
                ("nccl", "nccl")
            );
            // DP group of tp_rank t: rank 0 is global rank t; TP group of dp_rank d: d * 2.
            let (d, t) = (r / 2, r % 2);
            assert_eq!(a.dp_nccl_id.len(), 128);
            assert_eq!(a.tp_nccl_id.len(), 128);
            assert_eq!(
                a.dp_nccl_id[1],
                worker_at(t),
                "rank {r}: DP id not from its root"
            );
            assert_eq!(
                a.tp_nccl_id[1],
                worker_at(d * 2),
                "rank {r}: TP id not from its root"
            );
            assert_ne!(
                a.dp_nccl_id, a.tp_nccl_id,
                "rank {r}: one id for two groups"
            );
            used.push(a.dp_nccl_id.clone());
            used.push(a.tp_nccl_id.clone());
        }
        // Members of one group got the same id; the four groups got four different ids.
        used.sort();
        used.dedup();
        assert_eq!(used.len(), 4, "four groups, four ids");
        used
    };
    let mut got = Vec::new();
    for (i, w) in ws.iter_mut().enumerate() {
        got.push((i as u8, w.assignment().await));
    }
    let first = check_epoch(&got, 1);
    let s = wait_status(&mut c, "training", 30, |s| s.epoch == 1).await;
    assert_eq!(
        (s.dp_backend.as_str(), s.tp_backend.as_str()),
        ("nccl", "nccl")
    );
    // The rank-3 worker dies. The survivors have not re-offered yet: the new epoch waits for
    // the fresh ids of its groups' ranks 0 instead of reusing the consumed ones.
    let dead = got.iter().find(|(_, a)| a.rank == 3).unwrap().0 as usize;
    let victim = ws.remove(dead);
    victim.kill();
    let w4 = RawWorker::open(co.grpc_addr, "w4", "cuda:0", true, offer(4, 0)).await;
    wait_status(&mut c, "a rollback", 30, |s| s.rollbacks >= 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.epoch, 1, "an epoch formed without fresh ids: {s:#?}");
    // The survivors offer fresh ids (an agent offers one per id an assignment used; two each
    // here: they join the unused ones and the coordinator keeps the newest two).
    let mut names: Vec<u8> = got
        .iter()
        .map(|(w, _)| *w)
        .filter(|&w| w as usize != dead)
        .collect();
    names.sort();
    for (w, rw) in names.iter().zip(&ws) {
        rw.offer(offer(*w, 1));
    }
    ws.push(w4);
    names.push(4);
    let mut got2 = Vec::new();
    for (w, rw) in names.iter().zip(ws.iter_mut()) {
        got2.push((*w, rw.assignment().await));
    }
    let second = check_epoch(&got2, 2);
    for id in &second {
        assert!(!first.contains(id), "an id of epoch 1 was relayed again");
        // An id a survivor offered and epoch 1 left unused is still fresh; the dead worker's
        // never travel again.
        assert_ne!(
            id[1] as usize,
            dead,
            "an id of the dead worker: {:?}",
            &id[..4]
        );
    }
    let s = wait_status(&mut c, "epoch 2", 30, |s| s.epoch == 2).await;
    assert_eq!(
        (s.dp_backend.as_str(), s.tp_backend.as_str()),
        ("nccl", "nccl")
    );
    co.stop().await;
}

/// A group mixing a CUDA and a CPU worker is never formed: the job waits and says why in one
/// line; a CPU group is a `ring`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_mixing_cuda_and_cpu_workers_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("mixed", 2, 100_000, 0, "")).await;
    let gpu = RawWorker::open(co.grpc_addr, "gpu", "cuda:0", true, offer(1, 0)).await;
    let mut cpu = RawWorker::open(co.grpc_addr, "cpu", "cpu", false, vec![]).await;
    let s = wait_status(&mut c, "the refusal", 30, |s| {
        s.message.contains("cannot form the groups")
    })
    .await;
    assert_eq!(s.phase, pb::JobPhase::WaitingForWorkers as i32);
    assert_eq!(s.epoch, 0);
    assert!(!s.message.contains('\n'), "{}", s.message);
    assert!(
        s.message.contains("mix CUDA and CPU")
            && s.message.contains("gpu on cuda:0")
            && s.message.contains("cpu on cpu"),
        "{}",
        s.message
    );
    // A second CPU worker joins: two of one kind are idle, so the coordinator takes them (the
    // GPU worker, registered first, stays idle) and a ring group forms.
    let mut cpu2 = RawWorker::open(co.grpc_addr, "cpu2", "cpu", false, vec![]).await;
    let a = cpu.assignment().await;
    let b = cpu2.assignment().await;
    for a in [&a, &b] {
        assert_eq!(
            (a.dp_backend.as_str(), a.tp_backend.as_str()),
            ("ring", "solo")
        );
        assert!(a.dp_nccl_id.is_empty() && a.tp_nccl_id.is_empty());
    }
    let s = wait_status(&mut c, "ring", 30, |s| s.epoch == 1).await;
    assert_eq!(s.dp_backend, "ring");
    let ws = c
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    let gpu_rank = ws.iter().find(|w| w.worker_id == "gpu").unwrap().rank;
    assert_eq!(gpu_rank, -1, "the GPU worker got a rank in a CPU job");
    gpu.kill();
    // A malformed offer (not 128 bytes) is refused at Hello.
    let mut w = WorkerClient::connect(format!("http://{}", co.grpc_addr))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
            worker_id: "short".into(),
            device: "cuda:0".into(),
            nccl: true,
            nccl_ids: vec![vec![1; 16]],
            ..Default::default()
        })),
    })
    .unwrap();
    let e = w
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("16 bytes"), "{}", e.message());
    co.stop().await;
}

/// Fake NCCL ids for real agents on this CPU machine: unique per call.
fn counted_nccl_id() -> Result<Vec<u8>, String> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut id = vec![0u8; 128];
    id[..4].copy_from_slice(&n.to_le_bytes());
    Ok(id)
}

/// Real agents that claim CUDA + NCCL on this CPU machine: the coordinator assigns `nccl`, each
/// agent forms its TCP ring, then fails to build the NCCL communicator with the one-line reason
/// (no CUDA driver here), and every new epoch is formed from the agents' fresh re-offered ids,
/// until the stalled rollbacks fail the job with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agents_relay_fresh_ids_each_epoch_and_refuse_nccl_without_cuda() {
    let dir = tempfile::tempdir().unwrap();
    let co = coordinator(dir.path()).await;
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec("nccl-cpu", 2, 1000, 0, "")).await;
    let endpoint = format!("http://{}", co.grpc_addr);
    let agents: Vec<_> = (0..2)
        .map(|i| {
            let opts = trellis_agent::AgentOptions {
                worker_id: Some(format!("gpu{i}")),
                device: "cuda:0".into(),
                nccl: Some(counted_nccl_id),
                ..agent_opts()
            };
            tokio::spawn(trellis_agent::run(
                endpoint.clone(),
                opts,
                trellis_agent::fake::FakeRunner::factory(fake(1)),
            ))
        })
        .collect();
    let s = wait_status(&mut c, "the job to fail", 90, |s| {
        s.phase == pb::JobPhase::Failed as i32
    })
    .await;
    assert_eq!(s.dp_backend, "nccl");
    assert!(
        s.epoch >= 3,
        "each epoch needs fresh ids from the agents' re-offers: {s:#?}"
    );
    assert!(s.message.contains("NCCL needs CUDA"), "{}", s.message);
    for a in agents {
        a.abort();
    }
    co.stop().await;
}
