//! `trellis-coordinator [--config FILE] [--listen ADDR] [--store file:DIR | etcd:URL[,URL…]]
//! [--metrics-listen ADDR] [--job FILE] [--tls-cert F --tls-key F --client-ca F | --insecure]
//! [--etcd-ca F [--etcd-cert F --etcd-key F]]
//! [--allowed-root DIR]... [--max-message-bytes N] [--max-workers N] [--max-watch-streams N]`
use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use trellis_coordinator::CoordinatorConfig;

#[derive(Parser, Debug)]
#[command(
    name = "trellis-coordinator",
    version,
    about = "Trellis coordinator: runs one growing training job"
)]
struct Cli {
    /// TOML config (see deploy/coordinator.example.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC listen address (port 0 = any free port).
    #[arg(long)]
    listen: Option<String>,
    /// State store: file:DIR (embedded) or etcd:URL[,URL...].
    #[arg(long)]
    store: Option<String>,
    /// Prometheus /metrics listen address ("" = off).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Submit this job spec at start (ignored if the store already holds a job).
    #[arg(long)]
    job: Option<PathBuf>,
    /// Per-rank device memory for the layout planner (default: unlimited).
    #[arg(long)]
    device_memory_bytes: Option<u64>,
    /// Worker heartbeat TTL in seconds.
    #[arg(long)]
    heartbeat_ttl_secs: Option<f64>,
    /// Evict a worker whose training thread is stuck in one step, evaluation or growth phase this
    /// many seconds (default:
    /// max(60, 20 x the measured step time)).
    #[arg(long, value_name = "SECS")]
    progress_timeout: Option<f64>,
    /// Bound on every wait on a peer in the ranks' collectives, seconds (default: half the
    /// progress timeout).
    #[arg(long, value_name = "SECS")]
    ring_timeout: Option<f64>,
    /// Abort a checkpoint not committed this many seconds after its barrier (default 1800).
    #[arg(long, value_name = "SECS")]
    checkpoint_deadline: Option<f64>,
    /// Roll back a growth whose phase runs longer than this many seconds (default 1800).
    #[arg(long, value_name = "SECS")]
    growth_phase_deadline: Option<f64>,
    /// Peak FLOP/s per rank, for trellis_mfu_ratio.
    #[arg(long)]
    peak_flops: Option<f64>,
    /// text or json.
    #[arg(long, env = "TRELLIS_LOG_FORMAT")]
    log_format: Option<String>,
    /// Leader lease TTL in seconds (etcd stores): a standby takes over this long after the
    /// leader dies.
    #[arg(long)]
    leader_ttl_secs: Option<u64>,
    /// mTLS: this server certificate (PEM; `coordctl certs init`). With --tls-key and
    /// --client-ca: gRPC requires client certificates signed by that CA, and roles.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// mTLS: the server certificate's private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// mTLS: the CA that client certificates must be signed by (ca.crt).
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// TLS to etcd (https:// store URLs): the CA that signed etcd's server certificate.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// TLS to etcd: this coordinator's client certificate (PEM), when etcd requires one.
    #[arg(long, requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    /// TLS to etcd: the client certificate's private key (PEM).
    #[arg(long, requires_all = ["etcd_cert", "etcd_ca"])]
    etcd_key: Option<PathBuf>,
    /// Serve gRPC without TLS on a non-loopback address (anyone who reaches it can do
    /// anything; logs a warning at every start).
    #[arg(long)]
    insecure: bool,
    /// A directory submitted job spec paths must stay inside (repeatable; with
    /// checkpoint_root). Required with TLS.
    #[arg(long = "allowed-root", value_name = "DIR")]
    allowed_roots: Vec<PathBuf>,
    /// Where metrics.jsonl and TensorBoard event files go (default: the job's checkpoint dir).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Largest gRPC message decoded or encoded, bytes (default 64 MiB).
    #[arg(long)]
    max_message_bytes: Option<usize>,
    /// Most registered workers (default 1024): a new id beyond it replaces a disconnected
    /// worker without a rank, or is refused.
    #[arg(long)]
    max_workers: Option<usize>,
    /// Most concurrent Watch streams (default 64).
    #[arg(long)]
    max_watch_streams: Option<usize>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("trellis-coordinator: {e:#}");
        std::process::exit(match e.downcast_ref::<trellis_coordinator::Error>() {
            Some(trellis_coordinator::Error::InvalidArgument(_)) => 2,
            _ => 1,
        });
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut cfg = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            CoordinatorConfig::from_toml(&text)?
        }
        None => CoordinatorConfig::default(),
    };
    if let Some(v) = cli.listen {
        cfg.listen = v;
    }
    if let Some(v) = cli.store {
        cfg.store = v;
    }
    if let Some(v) = cli.metrics_listen {
        cfg.metrics_listen = v;
    }
    if let Some(v) = cli.job {
        cfg.job = Some(v);
    }
    if let Some(v) = cli.device_memory_bytes {
        cfg.device_memory_bytes = Some(v);
    }
    if let Some(v) = cli.heartbeat_ttl_secs {
        cfg.heartbeat_ttl_secs = v;
    }
    if let Some(v) = cli.progress_timeout {
        cfg.progress_timeout_secs = Some(v);
    }
    if let Some(v) = cli.ring_timeout {
        cfg.ring_timeout_secs = Some(v);
    }
    if let Some(v) = cli.checkpoint_deadline {
        cfg.checkpoint_deadline_secs = v;
    }
    if let Some(v) = cli.growth_phase_deadline {
        cfg.growth_phase_deadline_secs = v;
    }
    if let Some(v) = cli.peak_flops {
        cfg.peak_flops_per_rank = v;
    }
    if let Some(v) = cli.log_format {
        cfg.log_format = v;
    }
    if let Some(v) = cli.leader_ttl_secs {
        cfg.leader_ttl_secs = v;
    }
    if let Some(v) = cli.tls_cert {
        cfg.tls_cert = Some(v);
    }
    if let Some(v) = cli.tls_key {
        cfg.tls_key = Some(v);
    }
    if let Some(v) = cli.client_ca {
        cfg.client_ca = Some(v);
    }
    if let Some(v) = cli.etcd_ca {
        cfg.etcd_ca = Some(v);
    }
    if let Some(v) = cli.etcd_cert {
        cfg.etcd_cert = Some(v);
    }
    if let Some(v) = cli.etcd_key {
        cfg.etcd_key = Some(v);
    }
    cfg.insecure |= cli.insecure;
    cfg.allowed_roots.extend(cli.allowed_roots);
    if let Some(v) = cli.run_dir {
        cfg.run_dir = Some(v);
    }
    if let Some(v) = cli.max_message_bytes {
        cfg.max_message_bytes = v;
    }
    if let Some(v) = cli.max_workers {
        cfg.max_workers = v;
    }
    if let Some(v) = cli.max_watch_streams {
        cfg.max_watch_streams = v;
    }
    // Logs (text/JSON) + OTLP span export when OTEL_EXPORTER_OTLP_ENDPOINT is set; the guard
    // flushes the exporter when `run` returns.
    let _telemetry = trellis_telemetry::init("trellis-coordinator", &cfg.log_format)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let spec = trellis_store::StoreSpec::parse(&cfg.store)?;
        let etcd_tls = trellis_coordinator::security::etcd_tls(&cfg, &spec)?;
        let store = spec.open_with(etcd_tls).await?;
        // Leader election (etcd): only the leader opens the job and listens; a standby blocks
        // here, not listening (workers given several endpoints skip it), until the leader's
        // lease expires. The embedded store needs none: its directory lock already admits one
        // coordinator.
        let leadership = match &spec {
            trellis_store::StoreSpec::Etcd(_) => {
                let election = trellis_store::keys::leader();
                let candidate = format!("{}-{}", trellis_core::ids::hostname(), std::process::id());
                if let Some(leader) = store.leader(&election).await? {
                    tracing::info!(%leader, candidate, "standby: waiting for leadership");
                }
                let l = tokio::select! {
                    l = store.campaign(&election, &candidate, cfg.leader_ttl_secs.max(1)) => l?,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = sigterm() => return Ok(()),
                };
                tracing::info!(candidate, "elected leader; recovering the job from the store");
                Some(l)
            }
            trellis_store::StoreSpec::File(_) => None,
        };
        // The leader's writes are fenced by its election revision: a deposed leader that has
        // not noticed yet cannot overwrite the new leader's state.
        let store: std::sync::Arc<dyn trellis_store::StateStore> = match &leadership {
            Some(l) => std::sync::Arc::new(trellis_store::FencedStore::new(store, l)),
            None => store,
        };
        let running = trellis_coordinator::server::start(&cfg, store).await?;
        println!("{}", running.banner());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let lost = async {
            match &leadership {
                Some(l) => l.lost().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = running_wait(running) => {}
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; exiting"); }
            _ = sigterm() => { tracing::info!("terminated; exiting"); }
            _ = lost => {
                anyhow::bail!("lost leadership (the lease in the store expired or was taken over); exiting so that only one coordinator acts");
            }
        }
        if let Some(l) = leadership {
            let _ = l.resign().await;
        }
        Ok::<_, anyhow::Error>(())
    })
}

/// SIGTERM (Kubernetes' stop signal): exit through `run`, so the telemetry guard flushes spans.
async fn sigterm() {
    #[cfg(unix)]
    {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await
}

async fn running_wait(r: trellis_coordinator::server::Running) {
    r.wait().await
}
