//! Tracing across processes: the coordinator binary exports its spans over OTLP/gRPC
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`) to an in-process receiver; the two fake workers run in this
//! process and export theirs (service `trellis-worker`) to the same receiver. One growth must be
//! ONE trace: the caller's span → `ControlService/Grow` → `grow` → its four phase spans, and every
//! rank's `worker.grow.*` spans (context carried in `Command.trace_context`), all under one
//! trace id.
mod common;
use common::*;
use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_proto::v1 as pb;
use trellis_telemetry::testing::{OtlpReceiver, ReceivedSpan};

const COORD_PHASES: [&str; 4] = [
    "grow.checkpoint",
    "grow.stack",
    "grow.reshard",
    "grow.resume",
];
const WORKER_PHASES: [&str; 4] = [
    "worker.grow.checkpoint",
    "worker.grow.stack",
    "worker.grow.reshard",
    "worker.grow.resume",
];

/// What the trace must hold; `Err(why)` while it does not (yet).
fn check(spans: &[ReceivedSpan], root_trace: &str, root_span: &str) -> Result<(), String> {
    let grows: Vec<_> = spans.iter().filter(|s| s.name == "grow").collect();
    let [grow] = grows.as_slice() else {
        return Err(format!("{} grow spans", grows.len()));
    };
    if grow.service_name != "trellis-coordinator" {
        return Err(format!("grow from {:?}", grow.service_name));
    }
    let trace = &grow.trace_id;
    if trace != root_trace {
        return Err(format!(
            "grow is in trace {trace}, the caller's is {root_trace}"
        ));
    }
    // The caller's traceparent (gRPC metadata) → the server span → grow.
    let rpc = spans
        .iter()
        .find(|s| s.span_id == grow.parent_span_id)
        .ok_or("grow's parent (the Grow request span) not received")?;
    if rpc.name != "trellis.v1.ControlService/Grow" || rpc.parent_span_id != root_span {
        return Err(format!("grow's parent: {rpc:?}"));
    }
    for (k, v) in [("generation", "1"), ("job_id", "traced"), ("factor", "2")] {
        if grow.attr(k) != Some(v) {
            return Err(format!("grow {k}: {:?}", grow.attributes));
        }
    }
    for name in COORD_PHASES {
        let n = spans
            .iter()
            .filter(|s| s.name == name && s.parent_span_id == grow.span_id)
            .count();
        if n != 1 {
            return Err(format!("{n} coordinator {name} spans under grow"));
        }
    }
    let mut ids = BTreeSet::new();
    for rank in ["0", "1"] {
        let mut phases: Vec<&str> = WORKER_PHASES.to_vec();
        if rank == "0" {
            phases.push("worker.grow.commit");
        }
        for name in phases {
            let found: Vec<_> = spans
                .iter()
                .filter(|s| s.name == name && s.attr("rank") == Some(rank))
                .collect();
            let [s] = found.as_slice() else {
                return Err(format!("{} {name} spans of rank {rank}", found.len()));
            };
            if &s.trace_id != trace || s.parent_span_id != grow.span_id {
                return Err(format!(
                    "{name} of rank {rank} is not a child of grow: {s:?}"
                ));
            }
            if s.service_name != "trellis-worker" {
                return Err(format!("{name} from {:?}", s.service_name));
            }
            let wid = s.attr("worker_id").unwrap_or("");
            if wid.is_empty()
                || s.attr("generation") != Some("1")
                || s.attr("job_id") != Some("traced")
                || s.attr("step").is_none()
            {
                return Err(format!("{name} of rank {rank}: {:?}", s.attributes));
            }
            ids.insert((rank, wid.to_string()));
        }
    }
    let workers: BTreeSet<_> = ids.iter().map(|(_, w)| w.clone()).collect();
    if ids.len() != 2 || workers.len() != 2 {
        return Err(format!("one worker_id per rank expected: {ids:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_growth_is_one_trace_over_the_coordinator_and_every_rank() {
    let rx = OtlpReceiver::start().await;
    // This process plays the workers.
    let telemetry = Arc::new(
        trellis_telemetry::init_with(trellis_telemetry::Options {
            otlp_endpoint: Some(rx.endpoint()),
            default_log_filter: "warn".into(),
            batch_delay: Some(Duration::from_millis(200)),
            test_writer: true,
            ..trellis_telemetry::Options::new("trellis-worker")
        })
        .unwrap(),
    );
    assert!(telemetry.exporting());

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", ""])
        .arg("--store")
        .arg(format!("file:{}", dir.path().join("state").display()))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("TRELLIS_TRACE_FILTER")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    let addr = banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap_or_else(|| panic!("banner: {banner}"))
        .to_string();
    let ep = format!("http://{addr}");
    let mut c = Control::connect(ep.clone()).await.unwrap();
    let text = spec("traced", 2, 100_000, 0, "").replace(
        "[checkpoint]\n",
        &format!(
            "[checkpoint]\ndir = \"{}\"\n",
            dir.path().join("ckpt").display()
        ),
    );
    submit(&mut c, &text).await;
    let f = fake(10);
    let a0 = spawn_agent(ep.clone(), f.clone());
    let a1 = spawn_agent(ep.clone(), f.clone());
    wait_status(&mut c, "training", 60, |s| {
        s.phase == pb::JobPhase::Training as i32 && s.step >= 3
    })
    .await;

    // The operator's side: a span whose context goes out as `traceparent` metadata.
    let caller = tracing::info_span!("test.grow_request");
    let carrier = trellis_telemetry::inject(&caller);
    let tp = carrier["traceparent"].clone();
    let (root_trace, root_span) = {
        let parts: Vec<&str> = tp.split('-').collect();
        (parts[1].to_string(), parts[2].to_string())
    };
    let mut req = tonic::Request::new(pb::GrowRequest {
        factor: 2,
        operator: pb::GrowthOperator::Stack as i32,
        // At the next step boundary (a fixed at_step could already have passed on a busy box).
        ..Default::default()
    });
    for (k, v) in &carrier {
        req.metadata_mut().insert(
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let r = c.grow(req).await.unwrap().into_inner();
    assert_eq!((r.generation, r.from_layers, r.to_layers), (1, 2, 4));
    drop(caller);
    wait_status(&mut c, "growth done", 90, |s| {
        s.growth_history
            .first()
            .is_some_and(|g| g.phase == pb::GrowthPhase::Done as i32)
    })
    .await;

    // Workers' spans: flush now; the coordinator's: its batch goes out every 200 ms.
    let t = telemetry.clone();
    tokio::task::spawn_blocking(move || t.force_flush())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = rx.spans();
        match check(&spans, &root_trace, &root_span) {
            Ok(()) => break,
            Err(why) if Instant::now() > deadline => {
                let names: Vec<_> = spans
                    .iter()
                    .map(|s| format!("{} {} {:?}", s.service_name, s.name, s.attributes))
                    .collect();
                panic!("no single growth trace: {why}; received: {names:#?}");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    a0.abort();
    a1.abort();
    child.kill().unwrap();
    child.wait().unwrap();
}
