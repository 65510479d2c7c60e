//! The coordinator's configuration: one struct, read from `--config FILE` (TOML) and overridden
//! by flags. `deploy/coordinator.example.toml` documents every field (a test parses it).
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC listen address (ControlService, WorkerService, health, reflection).
    pub listen: String,
    /// Prometheus `/metrics` listen address; empty = no metrics endpoint.
    pub metrics_listen: String,
    /// `file:DIR` (embedded store) or `etcd:URL[,URL…]`.
    pub store: String,
    /// A job spec to submit at start (ignored if the store already holds a job).
    pub job: Option<PathBuf>,
    /// A worker whose last message is older than this is lost.
    pub heartbeat_ttl_secs: f64,
    /// How often workers send a heartbeat (sent to them in the assignment).
    pub heartbeat_interval_secs: f64,
    /// Per-rank device memory for the layout planner; absent = unlimited.
    pub device_memory_bytes: Option<u64>,
    /// Peak FLOP/s of one rank, for `trellis_mfu_ratio`.
    pub peak_flops_per_rank: f64,
    /// Loss spike: loss > EMA + k·σ.
    pub spike_sigma: f64,
    /// EMA smoothing factor of the loss watcher.
    pub ema_alpha: f64,
    /// Plateau: relative EMA improvement below this over `plateau_window` steps.
    pub plateau_threshold: f64,
    pub plateau_window: u64,
    /// How often membership (heartbeat TTL) and triggers are checked, milliseconds.
    pub tick_ms: u64,
    /// A worker whose training thread has been inside one step (or evaluation, or growth phase)
    /// this long, while its heartbeats go on, is evicted; default (absent): max(60 s, 20 × the measured step
    /// time).
    pub progress_timeout_secs: Option<f64>,
    /// Bound on every wait on a peer in the ranks' collectives, sent in each assignment;
    /// default (absent): half the progress timeout, so a rank waiting on a hung peer fails its
    /// step before it could look hung itself.
    pub ring_timeout_secs: Option<f64>,
    /// A checkpoint not committed this long after its barrier is aborted (training goes on;
    /// it is retried).
    pub checkpoint_deadline_secs: f64,
    /// A growth phase (stack, reshard, resume, re-layout) running longer than this rolls the
    /// growth back; its checkpoint phase has `checkpoint_deadline_secs`.
    pub growth_phase_deadline_secs: f64,
    /// A failed checkpoint, or a growth stage whose checkpoint failed, is retried after 1 s,
    /// doubling up to this many seconds.
    pub checkpoint_retry_max_secs: f64,
    /// `text` or `json`.
    pub log_format: String,
    /// Where checkpoints go when the job spec has no `checkpoint.dir`; default: `<spec dir>/checkpoints`.
    pub checkpoint_root: Option<PathBuf>,
    /// Where the job's `metrics.jsonl` and TensorBoard event files go; default: the job's
    /// checkpoint directory `<checkpoint root>/<job>`.
    pub run_dir: Option<PathBuf>,
    /// At recovery, verify the restore point's files and hashes and fall back to an older
    /// checkpoint when it is unusable (needs the checkpoint volume mounted; default true).
    pub verify_checkpoints: bool,
    /// gRPC health turns NOT_SERVING once state writes have failed for this long (the store is
    /// unreachable or full); SERVING again when they succeed.
    pub store_down_secs: f64,
    /// Leader election (etcd stores): the leader's lease TTL. A standby coordinator takes over
    /// about this long after the leader dies.
    pub leader_ttl_secs: u64,
    /// mTLS for gRPC (all three or none): this server certificate and key (PEM), and the CA
    /// that client certificates must be signed by (`coordctl certs init`).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// TLS to etcd (`https://` store URLs): the CA that signed etcd's server certificate, and
    /// this coordinator's client certificate and key when etcd requires client certificates.
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    /// Serve gRPC without TLS on a non-loopback address (unauthenticated; logs a warning).
    pub insecure: bool,
    /// Directories every path of a submitted job spec must stay inside (with
    /// `checkpoint_root`); required with TLS. None on plaintext loopback: paths are not confined.
    pub allowed_roots: Vec<PathBuf>,
    /// Largest gRPC message the coordinator decodes or encodes, bytes (a bigger request is
    /// refused with RESOURCE_EXHAUSTED naming this key).
    pub max_message_bytes: usize,
    /// Most workers the registry holds: a new worker id beyond it takes the place of a
    /// disconnected one without a rank, or is refused (RESOURCE_EXHAUSTED) when all are live.
    pub max_workers: usize,
    /// Most concurrent `Watch` streams (one more is refused with RESOURCE_EXHAUSTED).
    pub max_watch_streams: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: "127.0.0.1:50051".into(),
            metrics_listen: "127.0.0.1:9464".into(),
            store: "file:./trellis-state".into(),
            job: None,
            heartbeat_ttl_secs: 10.0,
            heartbeat_interval_secs: 2.0,
            device_memory_bytes: None,
            peak_flops_per_rank: 1e12,
            spike_sigma: 4.0,
            ema_alpha: 0.05,
            plateau_threshold: 0.001,
            plateau_window: 200,
            tick_ms: 500,
            progress_timeout_secs: None,
            ring_timeout_secs: None,
            checkpoint_deadline_secs: 1800.0,
            growth_phase_deadline_secs: 1800.0,
            checkpoint_retry_max_secs: 300.0,
            log_format: "text".into(),
            checkpoint_root: None,
            run_dir: None,
            verify_checkpoints: true,
            store_down_secs: 10.0,
            leader_ttl_secs: 5,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            insecure: false,
            allowed_roots: Vec::new(),
            max_message_bytes: 64 << 20,
            max_workers: 1024,
            max_watch_streams: 64,
        }
    }
}

impl CoordinatorConfig {
    pub fn from_toml(text: &str) -> crate::Result<Self> {
        toml::from_str(text).map_err(|e| {
            crate::Error::InvalidArgument(format!(
                "coordinator config: {}; see deploy/coordinator.example.toml",
                e.to_string().trim().replace('\n', " ")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../deploy/coordinator.example.toml");
        let c = CoordinatorConfig::from_toml(text).unwrap();
        assert_eq!(c.listen, "0.0.0.0:50051");
        assert_eq!(c.log_format, "json");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = CoordinatorConfig::from_toml("lisen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen") && e.contains("example"), "{e}");
    }
}
