//! Spans reach an OTLP/gRPC receiver; a child made from an injected carrier (as a worker makes
//! it from `Command.trace_context`) shares the parent's trace id.
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_telemetry::testing::OtlpReceiver;
use trellis_telemetry::{init_with, inject, set_parent, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_export_and_carriers_link_them() {
    let rx = OtlpReceiver::start().await;
    let guard = Arc::new(
        init_with(Options {
            otlp_endpoint: Some(rx.endpoint()),
            default_log_filter: "warn".into(),
            batch_delay: Some(Duration::from_millis(100)),
            test_writer: true,
            ..Options::new("telemetry-test")
        })
        .unwrap(),
    );
    assert!(guard.exporting());
    let carrier = {
        let parent = tracing::info_span!("parent", job_id = "j", generation = 3u64);
        let carrier = inject(&parent);
        assert!(carrier.contains_key("traceparent"), "{carrier:?}");
        // On "another process": a span created from the carrier only.
        std::thread::spawn({
            let carrier = carrier.clone();
            move || {
                let child =
                    tracing::info_span!(parent: None, "child", rank = 1u32, worker_id = "w1");
                set_parent(&child, &carrier);
                let _e = child.enter();
            }
        })
        .join()
        .unwrap();
        carrier
    };
    let g = guard.clone();
    tokio::task::spawn_blocking(move || g.force_flush())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = rx.spans();
        if spans.iter().any(|s| s.name == "parent") && spans.iter().any(|s| s.name == "child") {
            break spans;
        }
        assert!(Instant::now() < deadline, "spans not received: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let parent = spans.iter().find(|s| s.name == "parent").unwrap();
    let child = spans.iter().find(|s| s.name == "child").unwrap();
    assert_eq!(child.trace_id, parent.trace_id);
    assert_eq!(child.parent_span_id, parent.span_id);
    assert!(carrier["traceparent"].contains(&parent.trace_id));
    assert_eq!(parent.attr("generation"), Some("3"));
    assert_eq!(child.attr("rank"), Some("1"));
    assert_eq!(child.attr("worker_id"), Some("w1"));
    assert_eq!(parent.service_name, "telemetry-test");
}
