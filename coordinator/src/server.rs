//! Wiring: the gRPC server (services, health, reflection; mTLS and roles when configured),
//! `/metrics` (plaintext, on its own listener), the membership ticker.
use crate::config::CoordinatorConfig;
use crate::domain::{Domain, DomainOptions};
use crate::error::{Error, Result};
use crate::limits::{Limits, MessageLimitLayer};
use crate::loss::WatcherConfig;
use crate::metrics::Metrics;
use crate::persist::Progress;
use crate::security;
use crate::service::{ControlSvc, Shared, WorkerSvc};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use trellis_proto::v1 as pb;
use trellis_store::StateStore;

/// A running coordinator.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub domain: Shared,
    tasks: Vec<JoinHandle<()>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Running {
    /// The line the binary prints at startup (tests parse it).
    pub fn banner(&self) -> String {
        format!(
            "trellis-coordinator listening grpc={} metrics={}",
            self.grpc_addr,
            self.metrics_addr
                .map(|a| a.to_string())
                .unwrap_or_else(|| "none".into())
        )
    }

    /// Stop serving (in-flight sessions end).
    pub async fn stop(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// Wait until the gRPC server ends.
    pub async fn wait(mut self) {
        if let Some(t) = self.tasks.pop() {
            let _ = t.await;
        }
    }
}

/// The span of one gRPC request (tonic `trace_fn`): unary ControlService calls get a server
/// span, a child of the caller's `traceparent` metadata when it sent one, so a `coordctl grow`
/// that propagates its context owns the growth's trace. Read-only calls (polled) get one only
/// when the caller sent a `traceparent`; streams (Session, Watch), health and reflection none.
fn request_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let Some(method) = req.uri().path().strip_prefix("/trellis.v1.ControlService/") else {
        return tracing::Span::none();
    };
    let polled = matches!(
        method,
        "GetStatus" | "ListWorkers" | "ListCheckpoints" | "GetLoss" | "Plan"
    );
    if method == "Watch" || (polled && !trellis_telemetry::has_traceparent(req.headers())) {
        return tracing::Span::none();
    }
    trellis_telemetry::grpc_server_span(req)
}

/// The gRPC listen backlog. `TcpListener::bind` uses 128: when hundreds of workers reconnect
/// at once (a coordinator restart) the accept queue overflows and their session opens fail
/// with connection resets (docs/benchmarks.md, connection storm). The kernel caps it at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = match a {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the address resolves to nothing",
        )
    }))
}

/// How long the health check waits for the domain lock before it reports NOT_SERVING.
const LOCK_BOUND: Duration = Duration::from_secs(5);

/// Why the coordinator cannot answer now, if it cannot.
fn unhealthy(p: &Progress, store_down: Duration) -> Option<String> {
    if let Some(why) = &p.fenced {
        return Some(format!("not the leader: {why}"));
    }
    let since = p.failing_since?;
    (since.elapsed() >= store_down).then(|| {
        format!(
            "state writes have failed for {:.0} s: {}",
            since.elapsed().as_secs_f64(),
            p.last_error.as_deref().unwrap_or("unknown error")
        )
    })
}

/// The health service name that only says whether the process is alive and answering (its
/// lock is free, it still leads): Kubernetes' liveness probe asks for it, so a store outage makes
/// the coordinator unready (NOT_SERVING on "") but never gets it restarted, which would drop
/// the state it has queued for the store.
pub const LIVENESS_SERVICE: &str = "liveness";

/// gRPC health (`grpc.health.v1`): the overall service "" and both Trellis services are
/// SERVING while the coordinator can answer and persist; NOT_SERVING while state writes have
/// failed for `store_down` or longer, while the domain lock cannot be taken within
/// [`LOCK_BOUND`], or once fenced off by another leader. [`LIVENESS_SERVICE`] is NOT_SERVING
/// only for the last two.
async fn health_check(
    shared: Shared,
    progress: tokio::sync::watch::Receiver<Progress>,
    reporter: tonic_health::server::HealthReporter,
    store_down: Duration,
) {
    use tonic_health::ServingStatus;
    let status = |ok: bool| {
        if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    reporter
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    let (mut ready, mut live) = (true, true);
    let mut iv = tokio::time::interval(Duration::from_millis(500));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        iv.tick().await;
        let (why, alive) = match tokio::time::timeout(LOCK_BOUND, shared.lock()).await {
            Err(_) => (
                Some(format!(
                    "the coordinator's state lock was not free within {} s",
                    LOCK_BOUND.as_secs()
                )),
                false,
            ),
            Ok(_guard) => {
                let p = progress.borrow();
                (unhealthy(&p, store_down), p.fenced.is_none())
            }
        };
        if alive != live {
            live = alive;
            reporter
                .set_service_status(LIVENESS_SERVICE, status(live))
                .await;
        }
        if why.is_none() == ready {
            continue;
        }
        ready = why.is_none();
        match &why {
            Some(why) => warn!("health: NOT_SERVING: {why}"),
            None => info!("health: SERVING again"),
        }
        for name in [
            "",
            <pb::control_service_server::ControlServiceServer<ControlSvc> as tonic::server::NamedService>::NAME,
            <pb::worker_service_server::WorkerServiceServer<WorkerSvc> as tonic::server::NamedService>::NAME,
        ] {
            reporter.set_service_status(name, status(ready)).await;
        }
    }
}

pub fn domain_options(cfg: &CoordinatorConfig) -> DomainOptions {
    DomainOptions {
        heartbeat_ttl: Duration::from_secs_f64(cfg.heartbeat_ttl_secs.max(0.1)),
        heartbeat_interval: Duration::from_secs_f64(cfg.heartbeat_interval_secs.max(0.05)),
        device_memory_bytes: cfg.device_memory_bytes,
        peak_flops_per_rank: cfg.peak_flops_per_rank,
        watcher: WatcherConfig {
            ema_alpha: cfg.ema_alpha,
            spike_sigma: cfg.spike_sigma,
            plateau_threshold: cfg.plateau_threshold,
            plateau_window: cfg.plateau_window,
            ..WatcherConfig::default()
        },
        checkpoint_root: cfg.checkpoint_root.clone(),
        run_dir: cfg.run_dir.clone(),
        verify_checkpoints: cfg.verify_checkpoints,
        max_workers: cfg.max_workers,
        progress_timeout: secs(cfg.progress_timeout_secs),
        ring_timeout: secs(cfg.ring_timeout_secs),
        checkpoint_deadline: Duration::from_secs_f64(cfg.checkpoint_deadline_secs.max(0.1)),
        growth_phase_deadline: Duration::from_secs_f64(cfg.growth_phase_deadline_secs.max(0.1)),
        checkpoint_retry_max: Duration::from_secs_f64(cfg.checkpoint_retry_max_secs.max(0.1)),
    }
}

/// A positive, finite number of seconds; anything else is "not set".
fn secs(v: Option<f64>) -> Option<Duration> {
    v.filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
}

/// Open the domain over `store`, bind the listeners and serve.
pub async fn start(cfg: &CoordinatorConfig, store: Arc<dyn StateStore>) -> Result<Running> {
    let metrics = Arc::new(Metrics::new());
    let domain = Domain::open(store, domain_options(cfg), metrics.clone()).await?;
    let shared: Shared = Arc::new(Mutex::new(domain));
    let limits = Limits::new(cfg)?;
    let tls = security::server_tls(cfg)?;
    let confinement = security::confinement(cfg, tls.is_some())?.map(Arc::new);
    let listener = listen(&cfg.listen).await.map_err(|e| {
        Error::Unavailable(format!(
            "cannot listen on {} for gRPC: {e}; pick another --listen address",
            cfg.listen
        ))
    })?;
    let grpc_addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    security::check_plaintext(cfg, tls.is_some(), grpc_addr)?;
    if let Some(job) = &cfg.job {
        let mut d = shared.lock().await;
        if d.status(None).is_err() {
            let text = std::fs::read_to_string(job).map_err(|e| {
                Error::InvalidArgument(format!("cannot read job spec {}: {e}", job.display()))
            })?;
            let base = job
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let base = if base.is_empty() { ".".into() } else { base };
            if let Some(c) = &confinement {
                // Confined paths must be absolute: resolve the spec's directory here.
                let base = std::path::absolute(&base)
                    .map_err(|e| Error::InvalidArgument(format!("--job {}: {e}", job.display())))?
                    .display()
                    .to_string();
                c.check_spec(&text, &base)?;
                d.submit(&text, &base).await?;
            } else {
                d.submit(&text, &base).await?;
            }
            let ticket = d.ticket();
            drop(d);
            ticket.wait().await?;
        } else {
            info!(
                "the store already holds a job; --job {} ignored",
                job.display()
            );
        }
    }
    let mut tasks = Vec::new();
    let mut metrics_addr = None;
    if !cfg.metrics_listen.is_empty() {
        let ml = tokio::net::TcpListener::bind(&cfg.metrics_listen)
            .await
            .map_err(|e| {
                Error::Unavailable(format!(
                    "cannot listen on {} for /metrics: {e}; pick another --metrics-listen address",
                    cfg.metrics_listen
                ))
            })?;
        metrics_addr = Some(
            ml.local_addr()
                .map_err(|e| Error::Internal(e.to_string()))?,
        );
        let m = metrics.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(ml, app).await {
                warn!("metrics server ended: {e}");
            }
        }));
    }
    // Membership / trigger ticker.
    let tick = Duration::from_millis(cfg.tick_ms.max(10));
    let d = shared.clone();
    tasks.push(tokio::spawn(async move {
        let mut iv = tokio::time::interval(tick);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            iv.tick().await;
            if let Err(e) = d.lock().await.tick().await {
                warn!("coordinator tick: {e}");
            }
        }
    }));
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<pb::control_service_server::ControlServiceServer<ControlSvc>>()
        .await;
    reporter
        .set_serving::<pb::worker_service_server::WorkerServiceServer<WorkerSvc>>()
        .await;
    let progress = shared.lock().await.persist_watch();
    tasks.push(tokio::spawn(health_check(
        shared.clone(),
        progress,
        reporter,
        Duration::from_secs_f64(cfg.store_down_secs.max(0.1)),
    )));
    // Reflection in both versions: `grpc.reflection.v1` and the `v1alpha` older clients ask for.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let (stx, srx) = tokio::sync::oneshot::channel::<()>();
    let max_msg = limits.max_message_bytes;
    let control = pb::control_service_server::ControlServiceServer::new(ControlSvc(
        shared.clone(),
        confinement,
        limits,
    ))
    .max_decoding_message_size(max_msg)
    .max_encoding_message_size(max_msg);
    let workers = pb::worker_service_server::WorkerServiceServer::new(WorkerSvc(shared.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let hint = MessageLimitLayer {
        max_message_bytes: max_msg,
    };
    // TCP_NODELAY: without it small answers (GetStatus, commands) wait out delayed ACKs (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    // With TLS: client certificates required (the handshake fails without one from the
    // job's CA) and every call needs its role (`AuthLayer`: PERMISSION_DENIED naming it).
    let secured = tls
        .map(|t| tonic::transport::Server::builder().tls_config(t))
        .transpose()
        .map_err(|e| Error::InvalidArgument(format!("TLS configuration: {e}")))?;
    macro_rules! serve {
        ($builder:expr) => {
            $builder
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .trace_fn(request_span)
                .add_service(health)
                .add_service(reflection)
                .add_service(reflection_alpha)
                .add_service(control)
                .add_service(workers)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = srx.await;
                })
                .await
        };
    }
    tasks.push(tokio::spawn(async move {
        let r = match secured {
            Some(b) => serve!(b.layer(trellis_auth::AuthLayer).layer(hint)),
            None => serve!(tonic::transport::Server::builder().layer(hint)),
        };
        if let Err(e) = r {
            warn!("gRPC server ended: {e}");
        }
    }));
    Ok(Running {
        grpc_addr,
        metrics_addr,
        domain: shared,
        tasks,
        shutdown: Some(stx),
    })
}
