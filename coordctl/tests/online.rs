//! The online commands against a scripted `ControlService` on `127.0.0.1:0` (not the real
//! coordinator: this pins coordctl's side of the contract — JSON shapes, exit codes for refused
//! and unavailable calls, watch ending on Done/Failed, loss plots). The lead's end-to-end tests
//! run coordctl against the real coordinator.
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use trellis_proto as pb;
use trellis_proto::control_service_server::{ControlService, ControlServiceServer};

#[derive(Default)]
struct Seen {
    submit: Option<pb::SubmitJobRequest>,
    grow: Option<pb::GrowRequest>,
}

#[derive(Clone, Default)]
struct Fake {
    seen: Arc<Mutex<Seen>>,
    /// The phase the watch stream ends in.
    watch_end: Option<pb::JobPhase>,
}

fn growth_event() -> pb::GrowthEvent {
    pb::GrowthEvent {
        generation: 1,
        at_step: 50,
        tokens: 25_600,
        operator: "stack".into(),
        factor: 4,
        optimizer: pb::OptimizerPolicy::Reset as i32,
        from_layers: 2,
        to_layers: 8,
        phase: pb::GrowthPhase::Done as i32,
        timings: Some(pb::GrowthTimings {
            checkpoint_seconds: 0.5,
            stack_seconds: 0.1,
            reshard_seconds: 0.0,
            resume_seconds: 0.2,
            total_seconds: 0.8,
        }),
        error: String::new(),
        val_loss_after: Some(5.1),
        dp_after: 2,
        tp_after: 1,
    }
}

fn checkpoint_info() -> pb::CheckpointInfo {
    pb::CheckpointInfo {
        step: 50,
        tokens: 25_600,
        generation: 1,
        dir: "/ckpt/demo/step-50".into(),
        committed_at: 1.7e9,
        reason: "post-growth".into(),
        layers: 8,
        unusable: String::new(),
    }
}

fn status(phase: pb::JobPhase, step: u64) -> pb::JobStatus {
    pb::JobStatus {
        job_id: "demo".into(),
        phase: phase as i32,
        generation: 1,
        epoch: 1,
        step,
        max_steps: 100,
        tokens: step * 512,
        data_cursor: step * 8,
        layers: 8,
        parameters: 1_234_567,
        layout: Some(pb::Layout {
            dp: 2,
            tp: 1,
            explanation: "fits on one rank".into(),
            memory_per_rank_bytes: 0,
            budget_bytes: 0,
        }),
        train_loss: Some(3.25),
        val_loss: None,
        tokens_per_second: 12_345.0,
        mfu: 0.031,
        growth: None,
        last_growth_timings: growth_event().timings,
        growth_history: vec![growth_event()],
        checkpoints: vec![checkpoint_info()],
        workers: Some(pb::WorkersSummary {
            expected: 2,
            active: 2,
            idle: 0,
            lost: 0,
            exited: 0,
        }),
        message: "training generation 1".into(),
        loss_anomalies: 0,
        rollbacks: 0,
        next_growth_stage: 1,
        dp_backend: "nccl".into(),
        tp_backend: "solo".into(),
        retry: "growth".into(),
        retry_in_seconds: 3.5,
        ..Default::default()
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl ControlService for Fake {
    async fn submit_job(
        &self,
        r: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.seen.lock().unwrap().submit = Some(r.into_inner());
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: "cli-test".into(),
            status: Some(status(pb::JobPhase::WaitingForWorkers, 0)),
        }))
    }
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        Ok(Response::new(status(pb::JobPhase::Training, 60)))
    }
    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let w = |i: i32| pb::WorkerInfo {
            worker_id: format!("host-{i}-abc"),
            host: "host".into(),
            pid: 100 + i as u32,
            device: "cpu".into(),
            state: pb::WorkerState::Active as i32,
            rank: i,
            epoch: 1,
            last_step: 60,
            last_seen_seconds_ago: 0.4,
            ring_address: format!("127.0.0.1:{}", 4000 + i),
            progress_phase: "step".into(),
            progress_seconds: 0.1,
            slowness: 1.0,
        };
        let mut idle = w(2);
        idle.state = pb::WorkerState::Idle as i32;
        idle.rank = -1;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: vec![w(0), w(1), idle],
        }))
    }
    async fn grow(
        &self,
        r: Request<pb::GrowRequest>,
    ) -> Result<Response<pb::GrowResponse>, Status> {
        let r = r.into_inner();
        self.seen.lock().unwrap().grow = Some(r.clone());
        if r.factor > 8 {
            return Err(Status::failed_precondition(
                "a growth to generation 2 is already in flight (phase stack); wait for it to finish",
            ));
        }
        Ok(Response::new(pb::GrowResponse {
            generation: 2,
            at_step: r.at_step.unwrap_or(61),
            from_layers: 8,
            to_layers: 8 * r.factor as u32,
            layout: Some(pb::Layout {
                dp: 1,
                tp: 2,
                explanation: "the grown model needs two ranks".into(),
                memory_per_rank_bytes: 3 << 30,
                budget_bytes: 4 << 30,
            }),
        }))
    }
    async fn pause(
        &self,
        _: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::PauseResponse>, Status> {
        Err(Status::unavailable("the coordinator is shutting down"))
    }
    async fn resume(
        &self,
        _: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::ResumeResponse>, Status> {
        Ok(Response::new(pb::ResumeResponse { command_id: 7 }))
    }
    async fn save_checkpoint(
        &self,
        _: Request<pb::SaveCheckpointRequest>,
    ) -> Result<Response<pb::SaveCheckpointResponse>, Status> {
        Err(Status::failed_precondition(
            "no job has been submitted; run coordctl job submit JOB.toml",
        ))
    }
    async fn list_checkpoints(
        &self,
        _: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: vec![checkpoint_info()],
        }))
    }
    async fn get_loss(
        &self,
        r: Request<pb::GetLossRequest>,
    ) -> Result<Response<pb::GetLossResponse>, Status> {
        let n = match r.into_inner().max_points {
            0 => 100,
            n => n as u64,
        };
        let points = (1..=n)
            .map(|s| pb::LossPoint {
                step: s,
                tokens: s * 512,
                train_loss: Some(6.0 - (s as f64).ln()),
                val_loss: (s % 10 == 0).then(|| 6.2 - (s as f64).ln()),
                generation: (s >= 50) as u64,
            })
            .collect();
        Ok(Response::new(pb::GetLossResponse {
            points,
            growth_events: vec![growth_event()],
            anomalies: vec![pb::LossAnomaly {
                step: 51,
                kind: "spike".into(),
                loss: 5.0,
                ema: 2.5,
            }],
            ema: Some(2.0),
        }))
    }
    async fn plan(
        &self,
        r: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(pb::PlanResponse {
            params: r.params,
            budget_tokens: r.tokens,
            flops: 6.0 * r.params * r.tokens,
            formula_tokens: 1.0,
            in_range: true,
            recommended_tokens: 1.0,
            rule: "server".into(),
            factor: if r.factor == 0 { 4 } else { r.factor },
        }))
    }
    type WatchStream = WatchStream;
    async fn watch(&self, _: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let end = self.watch_end;
        let mut items: Vec<Result<pb::JobStatus, Status>> = (1..=3)
            .map(|i| Ok(status(pb::JobPhase::Training, i * 10)))
            .collect();
        let mut growing = status(pb::JobPhase::Growing, 40);
        growing.growth = Some(pb::GrowthEvent {
            phase: pb::GrowthPhase::Stack as i32,
            ..growth_event()
        });
        items.push(Ok(growing));
        if let Some(end) = end {
            let mut last = status(end, 100);
            if end == pb::JobPhase::Failed {
                last.message = "growth rolled back twice: out of memory".into();
            }
            items.push(Ok(last));
            Ok(Response::new(Box::pin(tokio_stream::iter(items))))
        } else {
            // Never ends: the stream stays open after the items.
            let s =
                tokio_stream::StreamExt::chain(tokio_stream::iter(items), tokio_stream::pending());
            Ok(Response::new(Box::pin(s)))
        }
    }
}

/// Serve `fake` on a free loopback port from a background runtime.
fn serve(fake: Fake) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            tonic::transport::Server::builder()
                .add_service(ControlServiceServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn coordctl(addr: SocketAddr, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_coordctl"))
        .arg("--endpoint")
        .arg(format!("http://{addr}"))
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok_json(r: &Run) -> serde_json::Value {
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.stdout))
}

fn one_error_line(r: &Run, code: i32) -> String {
    assert_eq!(r.code, code, "stderr: {} stdout: {}", r.stderr, r.stdout);
    assert_eq!(r.stderr.lines().count(), 1, "{:?}", r.stderr);
    assert!(r.stderr.starts_with("error: "));
    r.stderr.trim_end().to_string()
}

#[test]
fn status_json_and_table() {
    let addr = serve(Fake::default());
    let v = ok_json(&coordctl(addr, &["--output", "json", "status"]));
    assert_eq!(v["job_id"], "demo");
    assert_eq!(v["phase"], "training");
    assert_eq!(v["step"], 60);
    assert_eq!(v["layers"], 8);
    assert_eq!(v["train_loss"], 3.25);
    assert!(v["val_loss"].is_null());
    assert!(v["growth"].is_null());
    assert_eq!(v["layout"]["dp"], 2);
    assert_eq!(v["backend"]["dp"], "nccl");
    assert_eq!(v["backend"]["tp"], "solo");
    assert_eq!(v["workers"]["active"], 2);
    assert_eq!(v["growth_history"][0]["phase"], "done");
    assert_eq!(v["growth_history"][0]["optimizer"], "reset");
    assert_eq!(v["growth_history"][0]["timings"]["total_seconds"], 0.8);
    assert_eq!(v["checkpoints"][0]["reason"], "post-growth");
    assert_eq!(v["retry"]["what"], "growth");
    assert_eq!(v["retry"]["in_seconds"], 3.5);

    let r = coordctl(addr, &["status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for want in [
        "training (generation 1",
        "60 / 100",
        "8 layers",
        "train 3.2500",
        "2 active / 2 expected",
        "2 → 8 layers",
        "dp nccl, tp solo",
        "growth stage in 3.5 s",
    ] {
        assert!(r.stdout.contains(want), "{want:?} in\n{}", r.stdout);
    }
}

#[test]
fn workers_and_checkpoint_list() {
    let addr = serve(Fake::default());
    let v = ok_json(&coordctl(addr, &["workers", "--output", "json"]));
    let ws = v.as_array().unwrap();
    assert_eq!(ws.len(), 3);
    assert_eq!(ws[0]["rank"], 0);
    assert_eq!(ws[2]["rank"], serde_json::Value::Null);
    assert_eq!(ws[2]["state"], "idle");
    let r = coordctl(addr, &["workers"]);
    assert!(
        r.stdout.starts_with("WORKER") && r.stdout.lines().count() == 4,
        "{}",
        r.stdout
    );

    let v = ok_json(&coordctl(addr, &["--output", "json", "checkpoint", "list"]));
    assert_eq!(v[0]["step"], 50);
    assert_eq!(v[0]["dir"], "/ckpt/demo/step-50");
    let r = coordctl(addr, &["checkpoint", "list"]);
    assert!(
        r.stdout.contains("STEP") && r.stdout.contains("/ckpt/demo/step-50"),
        "{}",
        r.stdout
    );
}

#[test]
fn grow_sends_the_request_and_refusals_exit_1() {
    let fake = Fake::default();
    let seen = fake.seen.clone();
    let addr = serve(fake);
    let v = ok_json(&coordctl(
        addr,
        &[
            "--output",
            "json",
            "grow",
            "--factor",
            "2",
            "--operator",
            "zero",
            "--optimizer",
            "carry",
            "--at-step",
            "70",
        ],
    ));
    assert_eq!(v["generation"], 2);
    assert_eq!(v["at_step"], 70);
    assert_eq!(v["to_layers"], 16);
    assert_eq!(v["layout"]["tp"], 2);
    let g = seen.lock().unwrap().grow.clone().unwrap();
    assert_eq!(g.factor, 2);
    assert_eq!(g.operator(), pb::GrowthOperator::Zero);
    assert_eq!(g.optimizer(), pb::OptimizerPolicy::Carry);
    assert_eq!(g.at_step, Some(70));

    let r = coordctl(
        addr,
        &[
            "grow",
            "--factor",
            "4",
            "--operator",
            "random",
            "--mask-ramp-steps",
            "20",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("8 → 32 layers"), "{}", r.stdout);
    let g = seen.lock().unwrap().grow.clone().unwrap();
    assert_eq!(
        (g.operator(), g.mask_ramp_steps, g.optimizer()),
        (pb::GrowthOperator::Random, 20, pb::OptimizerPolicy::Reset)
    );

    let r = coordctl(addr, &["grow", "--stacking-list", "0,1,0,1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let g = seen.lock().unwrap().grow.clone().unwrap();
    assert_eq!(
        (g.operator(), g.stacking_list.clone()),
        (pb::GrowthOperator::StackingList, vec![0, 1, 0, 1])
    );

    // The coordinator refuses: exit 1, its reason on one line.
    let line = one_error_line(&coordctl(addr, &["grow", "--factor", "16"]), 1);
    assert!(
        line.contains("refused grow") && line.contains("already in flight"),
        "{line}"
    );
}

#[test]
fn refused_and_unavailable_calls() {
    let addr = serve(Fake::default());
    let line = one_error_line(&coordctl(addr, &["checkpoint", "save"]), 1);
    assert!(line.contains("no job has been submitted"), "{line}");
    // UNAVAILABLE from the server is retryable: exit 3.
    let line = one_error_line(&coordctl(addr, &["pause"]), 3);
    assert!(line.contains("shutting down"), "{line}");
    let r = coordctl(addr, &["resume"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "resume requested (command 7)\n");
    let v = ok_json(&coordctl(addr, &["--output", "json", "resume"]));
    assert_eq!(v, serde_json::json!({"action": "resume", "command_id": 7}));
}

#[test]
fn submit_sends_text_and_absolute_base_dir() {
    let fake = Fake::default();
    let seen = fake.seen.clone();
    let addr = serve(fake);
    let tmp = tempfile::tempdir().unwrap();
    let text = "[job]\nname = \"cli-test\"\n[model]\npreset = \"tiny\"\n[data]\ntrain = \"t.txt\"\nvalid = \"v.txt\"\nseq_len = 32\n[train]\nglobal_batch = 4\nmax_steps = 10\n";
    std::fs::write(tmp.path().join("job.toml"), text).unwrap();
    // A relative path, from the file's directory.
    let out = Command::new(env!("CARGO_BIN_EXE_coordctl"))
        .current_dir(tmp.path())
        .args([
            "--endpoint",
            &format!("http://{addr}"),
            "--output",
            "json",
            "job",
            "submit",
            "job.toml",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["job_id"], "cli-test");
    assert_eq!(v["status"]["phase"], "waiting_for_workers");
    let s = seen.lock().unwrap().submit.clone().unwrap();
    assert_eq!(s.spec_toml, text);
    assert_eq!(
        std::path::Path::new(&s.base_dir),
        tmp.path().canonicalize().unwrap()
    );
}

#[test]
fn loss_table_json_and_plot() {
    let addr = serve(Fake::default());
    let v = ok_json(&coordctl(addr, &["--output", "json", "loss"]));
    assert_eq!(v["points"].as_array().unwrap().len(), 100);
    assert!(v["points"][9]["val_loss"].as_f64().is_some());
    assert!(v["points"][0]["val_loss"].is_null());
    assert_eq!(v["growth_events"][0]["to_layers"], 8);
    assert_eq!(v["anomalies"][0]["kind"], "spike");

    let r = coordctl(addr, &["loss"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("STEP"), "{}", r.stdout);
    assert_eq!(
        r.stdout
            .lines()
            .filter(|l| l.chars().next().unwrap().is_ascii_digit())
            .count(),
        40
    );
    assert!(
        r.stdout.contains("growth: gen 1 at step 50"),
        "{}",
        r.stdout
    );

    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("loss.png");
    let r = coordctl(addr, &["loss", "--plot", png.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("100 points, 1 growth events"),
        "{}",
        r.stdout
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    // The plot's directory must exist: checked before connecting (exit 2).
    let bad = tmp.path().join("no/such/dir/loss.png");
    one_error_line(
        &coordctl(addr, &["loss", "--plot", bad.to_str().unwrap()]),
        2,
    );
}

#[test]
fn watch_prints_a_line_per_update_and_ends_with_the_job() {
    let addr = serve(Fake {
        watch_end: Some(pb::JobPhase::Done),
        ..Fake::default()
    });
    let r = coordctl(addr, &["watch"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", r.stdout);
    assert!(
        lines[0].starts_with("phase=training generation=1 layers=8 step=10/100"),
        "{}",
        lines[0]
    );
    assert!(
        lines[3].contains("phase=growing") && lines[3].contains("growth=stack"),
        "{}",
        lines[3]
    );
    assert!(lines[4].starts_with("phase=done"), "{}", lines[4]);

    let r = coordctl(addr, &["watch", "--output", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let objs: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs.len(), 5);
    assert_eq!(objs[3]["growth"]["phase"], "stack");
    assert_eq!(objs[4]["phase"], "done");

    let failed = serve(Fake {
        watch_end: Some(pb::JobPhase::Failed),
        ..Fake::default()
    });
    let r = coordctl(failed, &["watch"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("job demo failed: growth rolled back twice"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stdout.lines().count(), 5);
}

#[test]
fn watch_stops_on_ctrl_c() {
    let addr = serve(Fake::default());
    let mut child = Command::new(env!("CARGO_BIN_EXE_coordctl"))
        .args(["--endpoint", &format!("http://{addr}"), "watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the four updates, then interrupt.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.lines().count() < 4 {
        use std::io::Read;
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "watch ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn plan_remote_uses_the_server() {
    let addr = serve(Fake::default());
    let v = ok_json(&coordctl(
        addr,
        &[
            "--output", "json", "plan", "--params", "7B", "--tokens", "2T", "--remote",
        ],
    ));
    assert_eq!(v["rule"], "server");
    assert_eq!(v["factor"], 4);
}
