#![allow(dead_code)]
//! Service-test helpers: an in-process coordinator on 127.0.0.1:0 over the embedded store, fake
//! agents, polling with bounded timeouts.
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use trellis_agent::fake::{FakeConfig, FakeRunner};
use trellis_agent::AgentOptions;
use trellis_coordinator::server::{start, Running};
use trellis_coordinator::CoordinatorConfig;
use trellis_proto::v1 as pb;

pub type Control = pb::control_service_client::ControlServiceClient<Channel>;

pub fn spec(name: &str, dp: usize, max_steps: u64, interval: u64, extra: &str) -> String {
    format!(
        r#"
[job]
name = "{name}"
[model]
preset = "tiny"
num_hidden_layers = 2
vocab_size = 256
[data]
train = "train.txt"
valid = "valid.txt"
seq_len = 16
[train]
global_batch = 4
max_steps = {max_steps}
eval_interval = 10
[checkpoint]
interval = {interval}
[parallel]
dp = {dp}
{extra}
"#
    )
}

pub fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        metrics_listen: "127.0.0.1:0".into(),
        heartbeat_ttl_secs: 5.0,
        heartbeat_interval_secs: 0.5,
        tick_ms: 100,
        // The fake agents write stand-in checkpoints, not the Trellis format.
        verify_checkpoints: false,
        ..Default::default()
    }
}

pub async fn coordinator(dir: &std::path::Path) -> Running {
    coordinator_with(dir, |_| {}).await
}

/// [`coordinator`] with `change` applied to its config.
pub async fn coordinator_with(
    dir: &std::path::Path,
    change: impl FnOnce(&mut CoordinatorConfig),
) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let store = trellis_store::StoreSpec::File(dir.join("state"))
        .open()
        .await
        .unwrap();
    let mut cfg = CoordinatorConfig {
        checkpoint_root: Some(dir.join("ckpt")),
        ..config()
    };
    change(&mut cfg);
    start(&cfg, store).await.unwrap()
}

pub async fn control(addr: std::net::SocketAddr) -> Control {
    Control::connect(format!("http://{addr}")).await.unwrap()
}

pub fn agent_opts() -> AgentOptions {
    AgentOptions {
        ring_timeout: Duration::from_secs(10),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        idle_poll: Duration::from_millis(10),
        ..Default::default()
    }
}

pub fn spawn_agent(
    endpoint: String,
    cfg: FakeConfig,
) -> tokio::task::JoinHandle<trellis_agent::Result<()>> {
    tokio::spawn(trellis_agent::run(
        endpoint,
        agent_opts(),
        FakeRunner::factory(cfg),
    ))
}

pub fn fake(delay_ms: u64) -> FakeConfig {
    FakeConfig {
        step_delay: Duration::from_millis(delay_ms),
        events: Arc::new(std::sync::Mutex::new(Vec::new())),
        ..Default::default()
    }
}

/// Poll the status until `pred` holds (bounded).
pub async fn wait_status(
    c: &mut Control,
    what: &str,
    secs: u64,
    pred: impl Fn(&pb::JobStatus) -> bool,
) -> pb::JobStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(s) = c.get_status(pb::GetStatusRequest::default()).await {
            let s = s.into_inner();
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}; last status: {last:#?}");
}

pub async fn submit(c: &mut Control, spec: &str) {
    c.submit_job(pb::SubmitJobRequest {
        spec_toml: spec.into(),
        base_dir: "/tmp".into(),
    })
    .await
    .unwrap();
}

/// GET /metrics over plain HTTP/1.0.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
