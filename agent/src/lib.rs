//! The worker's side of the coordinator session (no libtorch).
//!
//! [`run`] connects to the coordinator, sends `Hello` (with the ring listen address, bound
//! first, and fresh NCCL ids when this worker can run NCCL), receives an `Assignment`, builds
//! the rank's collectives ([`TcpRing`], [`Solo`] for a group of one, or an NCCL communicator
//! from the relayed id beside the ring when the group's backend is `nccl`), asks the worker's [`RunnerFactory`] for a [`Runner`] and drives it on **one
//! dedicated OS thread** that owns it (tch tensors are `Send`, not `Sync`):
//!
//! ```text
//! loop {
//!     target = runner.agree_min(highest lockstep command id received)   // all ranks agree
//!     execute queued commands with id <= target in order (stop at one whose at_step is ahead)
//!     unless paused / holding / finished: runner.step(), send StepReport (+ ValLoss on eval steps)
//! }
//! ```
//!
//! so every rank executes every command at the same step without the coordinator on the hot path.
//! `CommitCheckpoint` (rank 0 only) and `Stop` are immediate, not lockstep. A new `Assignment`
//! (rollback, re-layout, coordinator restart) drops the runner and builds a fresh one from the
//! checkpoint it names. If the coordinator goes away the agent reconnects with backoff; training
//! continues meanwhile, and the next coordinator re-assigns the ranks.
use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn, Span};
use trellis_comm::{Collective, Solo, TcpRing};
use trellis_core::backend::{Backend, NCCL_IDS_OFFERED, NCCL_ID_BYTES};
use trellis_core::checkpoint::ShardReport;
use trellis_core::growth::GrowthSpec;
use trellis_core::ids::{JobId, Rank};
use trellis_core::job::JobSpec;
use trellis_proto::convert::operator_from_pb;
use trellis_proto::v1 as pb;
use trellis_proto::v1::AckPhase;

pub mod fake;

/// Logs + OTLP traces for the worker binary (`telemetry::init("trellis-worker", fmt)`), re-exported
/// so a worker that depends on the agent needs no extra dependency.
pub use trellis_telemetry as telemetry;

/// The agent's one error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the coordinator at {endpoint}: {detail}; check --coordinator and that the coordinator is running")]
    Unavailable { endpoint: String, detail: String },
    #[error("the coordinator rejected this worker: {0}")]
    Rejected(String),
    #[error("ring listen socket {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("runner: {0}")]
    Runner(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a [`Runner`] returns on failure (any error type the worker uses).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A checkpoint's files could not be written (disk full, an I/O error): a [`Runner`] returns it
/// (boxed) from [`Runner::begin_checkpoint_shards`] when the failure leaves its training state
/// intact. The agent then acks the checkpoint failed with `FAILURE_KIND_CHECKPOINT_IO` and
/// trains on; any other error there is a training failure. Errors of the background write job
/// and of [`Runner::finalize_checkpoint`] are always checkpoint failures.
#[derive(Debug)]
pub struct CheckpointIo(pub String);

impl std::fmt::Display for CheckpointIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckpointIo {}

/// What an ack reports: the typed result it carries (a checkpoint's or a commit's) and the
/// seconds the work took, or why it failed.
type AckResult = std::result::Result<(Option<pb::ack::Result>, f64), String>;

/// A rank's place in an epoch, decoded from the coordinator's `Assignment`.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub epoch: u64,
    pub generation: u64,
    pub job_id: JobId,
    pub spec: JobSpec,
    pub spec_toml: String,
    pub base_dir: PathBuf,
    pub rank: Rank,
    pub dp: usize,
    pub tp: usize,
    /// A committed checkpoint to restore, or `None` for a fresh start.
    pub restore_from: Option<PathBuf>,
    /// `<checkpoint root>/<job>`.
    pub job_root: PathBuf,
    /// Data-cursor windows `[from, to)` to skip: when the cursor reaches `from`, jump to `to`.
    pub skip: Vec<(u64, u64)>,
    /// The restore point is `restore_from` + this growth: apply it after the restore (the same
    /// code as the online stack) to reach `generation`.
    pub restore_grow: Option<GrowOrder>,
    /// Ring listen addresses of every rank, by rank (the DP group's ring).
    pub peers: Vec<String>,
    /// TP ring listen addresses of every rank, by rank (used when `tp > 1`).
    pub tp_peers: Vec<String>,
    pub group_token: String,
    /// The backends of this rank's DP and TP groups.
    pub dp_backend: Backend,
    pub tp_backend: Backend,
    /// With backend `nccl`: the group's NCCL unique id, relayed from its rank 0.
    pub dp_nccl_id: Vec<u8>,
    pub tp_nccl_id: Vec<u8>,
}

impl Assignment {
    pub fn world(&self) -> usize {
        self.dp * self.tp
    }

    /// This rank's `(dp_rank, tp_rank)`: global rank `r` is `(r / tp, r % tp)` (TP-major, so the
    /// ranks of a TP group are adjacent and the coordinator can keep them on one host).
    pub fn coords(&self) -> (usize, usize) {
        let r = self.rank.0 as usize;
        (r / self.tp, r % self.tp)
    }
}

/// A rank's two process groups, built by the agent from its assignment: `dp` joins the ranks
/// with this rank's TP slice (gradients are averaged over it), `tp` the ranks holding the
/// slices of this rank's model replica. A group of one is [`Solo`]; an NCCL group is a
/// [`trellis_comm::nccl::NcclGroup`] (its [`Collective::device`] moves device memory).
pub struct Collectives {
    pub dp: Box<dyn Collective>,
    pub tp: Box<dyn Collective>,
}

/// One completed optimizer step.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    /// Steps completed after this one.
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub step_seconds: f64,
    pub compute_seconds: f64,
    pub comm_seconds: f64,
    pub data_seconds: f64,
    /// Global sample range `[sample_start, sample_end)` the step consumed.
    pub sample_start: u64,
    pub sample_end: u64,
}

/// Where the runner stands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunnerState {
    pub step: u64,
    pub tokens: u64,
    pub generation: u64,
    pub layers: usize,
    pub data_cursor: u64,
}

/// A growth order (the stack, reshard and resume phases).
#[derive(Debug, Clone)]
pub struct GrowOrder {
    /// The generation after growth.
    pub generation: u64,
    pub spec: GrowthSpec,
    /// Post-growth schedule under `OptimizerPolicy::Reset`.
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// The layout after growth.
    pub dp: usize,
    pub tp: usize,
}

/// A checkpoint's file writes, detached from the runner ([`Runner::begin_checkpoint_shards`]):
/// the agent runs it on another thread while training goes on.
pub type ShardWriteJob = Box<dyn FnOnce() -> Result<Option<ShardReport>, BoxError> + Send>;

/// The worker's trainer as the agent drives it. Every method runs on the agent's training
/// thread; methods that use the collective are called by every rank at the same point.
pub trait Runner {
    /// One optimizer step (collective: gradients are reduced over the group).
    fn step(&mut self) -> Result<StepOutcome, BoxError>;
    /// Validation loss (collective when the evaluation is split over ranks).
    fn evaluate(&mut self) -> Result<f64, BoxError>;
    /// Write this rank's shards into `<job_root>/step-<N>.tmp/` and remember the state at this
    /// step for [`Runner::finalize_checkpoint`]. `None` if this rank writes nothing (a DP
    /// replica other than DP rank 0).
    fn write_checkpoint_shards(&mut self, job_root: &Path)
        -> Result<Option<ShardReport>, BoxError>;
    /// [`Runner::write_checkpoint_shards`] split in two: everything that needs the runner (and
    /// the collectives) now — the state at this step copied out — and the file writes as a
    /// job that may run on another thread while the runner trains on. Default: all now.
    fn begin_checkpoint_shards(&mut self, job_root: &Path) -> Result<ShardWriteJob, BoxError> {
        let r = self.write_checkpoint_shards(job_root)?;
        Ok(Box::new(move || Ok(r)))
    }
    /// [`Runner::begin_checkpoint_shards`] for a growth's checkpoint, taken holding: the
    /// runner takes no step before the growth replaces every tensor of the snapshot (the agent
    /// makes sure of it), so the snapshot may share those tensors instead of copying them.
    /// Default: the copying snapshot.
    fn begin_growth_checkpoint_shards(
        &mut self,
        job_root: &Path,
    ) -> Result<ShardWriteJob, BoxError> {
        self.begin_checkpoint_shards(job_root)
    }
    /// Rank 0 only, not collective: merge `reports`, write manifest + trainer state, rename to
    /// `step-<step>` and point `latest` at it. Returns the final directory.
    fn finalize_checkpoint(
        &mut self,
        job_root: &Path,
        step: u64,
        reports: &[ShardReport],
    ) -> Result<PathBuf, BoxError>;
    /// The stack phase: apply the growth operator to weights (and optimizer state per policy).
    fn grow(&mut self, order: &GrowOrder) -> Result<(), BoxError>;
    /// The reshard phase (a no-op while TP is unchanged).
    fn reshard(&mut self, _order: &GrowOrder) -> Result<(), BoxError> {
        Ok(())
    }
    /// The resume phase: optimizer and LR schedule per policy, ready to step.
    fn resume(&mut self, _order: &GrowOrder) -> Result<(), BoxError> {
        Ok(())
    }
    fn state(&self) -> RunnerState;
    /// `min(v)` over all ranks (the collective's `all_reduce_min_u64`).
    fn agree_min(&mut self, v: u64) -> Result<u64, BoxError>;
}

/// Builds a fresh [`Runner`] for an assignment (restoring `restore_from` when set, skipping the
/// `skip` windows). Called on the training thread.
pub trait RunnerFactory: Send + 'static {
    fn build(&mut self, a: &Assignment, groups: Collectives) -> Result<Box<dyn Runner>, BoxError>;
}

impl<F> RunnerFactory for F
where
    F: FnMut(&Assignment, Collectives) -> Result<Box<dyn Runner>, BoxError> + Send + 'static,
{
    fn build(&mut self, a: &Assignment, groups: Collectives) -> Result<Box<dyn Runner>, BoxError> {
        self(a, groups)
    }
}

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Default: `<host>-<pid>-<nonce>`.
    pub worker_id: Option<String>,
    pub device: String,
    /// Where the ring listens (`127.0.0.1:0`, or `0.0.0.0:0` on a cluster). The TP group's ring
    /// listens on the next port (or any free one when this port is 0).
    pub ring_bind: String,
    /// The host to advertise for the ring when `ring_bind` is a wildcard.
    pub ring_advertise_host: Option<String>,
    /// Bound on ring formation and on every wait on a peer.
    pub ring_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Give up when the coordinator is unreachable this long (`None` = never).
    pub give_up_after: Option<Duration>,
    /// Sleep between loop iterations while not stepping (paused, holding, finished).
    pub idle_poll: Duration,
    /// mTLS to the coordinator (`https://` endpoints): the job's CA and this worker's
    /// certificate (`trellis_auth::tls::client_tls`); its worker id must be `worker_id`.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Set when this worker can run NCCL (a CUDA device, libcuda and libnccl load): makes one
    /// fresh NCCL unique id ([`nccl_unique_id`]). The agent says `nccl` in `Hello` and offers
    /// fresh ids in every `Hello` and after every assignment.
    pub nccl: Option<NcclIdSource>,
}

/// Makes a fresh NCCL unique id (128 bytes) in this process, or says why it cannot.
pub type NcclIdSource = fn() -> std::result::Result<Vec<u8>, String>;

/// The real [`NcclIdSource`]: `ncclGetUniqueId` (NCCL's bootstrap root for the id runs in
/// this process).
pub fn nccl_unique_id() -> std::result::Result<Vec<u8>, String> {
    trellis_comm::nccl::unique_id()
        .map(|id| id.0.to_vec())
        .map_err(|e| e.to_string())
}

/// `n` fresh ids from `source` (none when it fails: logged, and the coordinator waits for a
/// later offer before it forms an NCCL group with this rank as root).
fn fresh_nccl_ids(source: Option<NcclIdSource>, n: usize) -> Vec<Vec<u8>> {
    let Some(make) = source else {
        return Vec::new();
    };
    (0..n)
        .map(|_| make())
        .collect::<std::result::Result<Vec<_>, String>>()
        .unwrap_or_else(|e| {
            warn!("cannot make an NCCL unique id: {e}");
            Vec::new()
        })
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            worker_id: None,
            device: "cpu".into(),
            ring_bind: "127.0.0.1:0".into(),
            ring_advertise_host: None,
            ring_timeout: Duration::from_secs(60),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            give_up_after: None,
            idle_poll: Duration::from_millis(20),
            tls: None,
            nccl: None,
        }
    }
}

enum Control {
    Assign(pb::Assignment),
    Command(pb::Command),
}

type Sink = Arc<Mutex<Option<mpsc::UnboundedSender<pb::WorkerMessage>>>>;

fn send(sink: &Sink, kind: pb::worker_message::Kind) {
    if let Some(tx) = sink.lock().unwrap().as_ref() {
        let _ = tx.send(pb::WorkerMessage { kind: Some(kind) });
    }
}

/// Run the worker's side of the session until the coordinator says `Stop` (Ok) or rejects the
/// worker / stays unreachable past `give_up_after` (Err).
///
/// `endpoint` may list several coordinators, comma-separated (a leader and its standbys, which
/// do not listen until they lead): the agent tries them in turn, backing off after each full
/// round, and stays with the one that accepts its session.
pub async fn run<F: RunnerFactory>(
    endpoint: String,
    options: AgentOptions,
    factory: F,
) -> Result<()> {
    let listener = TcpListener::bind(&options.ring_bind).map_err(|e| Error::Listen {
        addr: options.ring_bind.clone(),
        source: e,
    })?;
    // A second listener for the TP group's ring (the two rings of a rank form independently):
    // on the next port when the ring port is fixed, else on any free one.
    let tp_bind = match options.ring_bind.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok_and(|p| p != 0) => {
            format!("{host}:{}", port.parse::<u16>().unwrap().wrapping_add(1))
        }
        _ => options.ring_bind.clone(),
    };
    let tp_listener = TcpListener::bind(&tp_bind).map_err(|e| Error::Listen {
        addr: tp_bind.clone(),
        source: e,
    })?;
    let advertise = |l: &TcpListener| -> Result<String> {
        let local = l.local_addr().map_err(|e| Error::Listen {
            addr: options.ring_bind.clone(),
            source: e,
        })?;
        Ok(
            match (&options.ring_advertise_host, local.ip().is_unspecified()) {
                (Some(h), _) => format!("{h}:{}", local.port()),
                (None, true) => format!("{}:{}", trellis_core::ids::hostname(), local.port()),
                (None, false) => local.to_string(),
            },
        )
    };
    let ring_address = advertise(&listener)?;
    let tp_ring_address = advertise(&tp_listener)?;
    let host = trellis_core::ids::hostname();
    let pid = std::process::id();
    let worker_id = options.worker_id.clone().unwrap_or_else(|| {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("{host}-{pid}-{nonce:x}")
    });
    let sink: Sink = Arc::new(Mutex::new(None));
    let progress = Arc::new(Progress::default());
    let (ctl_tx, ctl_rx) = std::sync::mpsc::channel::<Control>();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    {
        let sink = sink.clone();
        let opts = options.clone();
        let progress = progress.clone();
        let wid = worker_id.clone();
        std::thread::Builder::new()
            .name(format!("trellis-train-{worker_id}"))
            .spawn(move || {
                let r = Trainer {
                    factory,
                    worker_id: wid,
                    listener,
                    tp_listener,
                    sink,
                    opts,
                    progress,
                    epoch: None,
                }
                .run(ctl_rx);
                let _ = done_tx.send(r);
            })
            .map_err(|e| Error::Runner(format!("cannot start the training thread: {e}")))?;
    }
    let hello = pb::Hello {
        worker_id: worker_id.clone(),
        host,
        pid,
        device: options.device.clone(),
        ring_address,
        tp_ring_address,
        nccl: options.nccl.is_some(),
        // Fresh ones per session (see `session`).
        nccl_ids: Vec::new(),
    };
    // Dropping this future (or returning) detaches the trainer from the session and, through the
    // closed control channel, ends the training thread.
    struct ClearSink(Sink);
    impl Drop for ClearSink {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = None;
        }
    }
    let _clear = ClearSink(sink.clone());
    let mut backoff = options.reconnect_min;
    let mut unreachable_since: Option<Instant> = None;
    let endpoints: Vec<String> = endpoint
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    let endpoints = if endpoints.is_empty() {
        vec![endpoint.clone()]
    } else {
        endpoints
    };
    let mut next = 0usize;
    loop {
        let current = endpoints[next % endpoints.len()].clone();
        let session = session(
            &current,
            options.tls.as_ref(),
            pb::Hello {
                nccl_ids: fresh_nccl_ids(options.nccl, NCCL_IDS_OFFERED),
                ..hello.clone()
            },
            options.nccl,
            &sink,
            &ctl_tx,
            &progress,
        );
        tokio::select! {
            r = &mut done_rx => return r.unwrap_or_else(|_| Err(trainer_panicked())),
            r = session => match r {
                Ok(connected) => {
                    if connected {
                        backoff = options.reconnect_min;
                        unreachable_since = None;
                    }
                }
                Err(Error::Rejected(why)) => {
                    *sink.lock().unwrap() = None;
                    return Err(Error::Rejected(why));
                }
                Err(e) => {
                    debug!("session: {e}");
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if options.give_up_after.is_some_and(|g| since.elapsed() > g) {
                        return Err(e);
                    }
                }
            }
        }
        *sink.lock().unwrap() = None;
        next += 1;
        if next % endpoints.len() != 0 {
            // Try the next coordinator of the list at once; back off after a full round.
            continue;
        }
        tokio::select! {
            r = &mut done_rx => return r.unwrap_or_else(|_| Err(trainer_panicked())),
            _ = tokio::time::sleep(jittered(backoff)) => {}
        }
        backoff = (backoff * 2).min(options.reconnect_max);
    }
}

/// The training thread ended without a result: it panicked (its message is on stderr above).
/// The process must not exit 0 then.
fn trainer_panicked() -> Error {
    Error::Runner("the training thread panicked (see the panic message above); exiting".into())
}

/// A reconnect delay spread over `[d/2, d)`, so that workers that lost the same coordinator do
/// not all reconnect at the same moment.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos() as u64)
        .unwrap_or(0);
    // A cheap per-process, per-call spread: the clock's nanoseconds mixed with the pid.
    let x = (nanos ^ ((std::process::id() as u64) << 17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let frac = (x >> 11) as f64 / (1u64 << 53) as f64;
    d.mul_f64(0.5 + 0.5 * frac)
}

#[derive(Default)]
struct Progress {
    epoch: AtomicU64,
    step: AtomicU64,
    /// Heartbeat period in milliseconds (from the assignment).
    heartbeat_ms: AtomicU64,
    /// What the training thread does ([`Activity`]) and since when (ms after [`origin`]):
    /// reset by every step started and every command executed.
    activity: AtomicU8,
    since_ms: AtomicU64,
    /// The last completed step's duration, microseconds.
    step_us: AtomicU64,
}

/// What the training thread is doing, as the heartbeat reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Activity {
    Idle = 0,
    Assign,
    Step,
    Evaluate,
    Checkpoint,
    Commit,
    Grow,
    Hold,
    Paused,
}

impl Activity {
    const ALL: [Activity; 9] = [
        Activity::Idle,
        Activity::Assign,
        Activity::Step,
        Activity::Evaluate,
        Activity::Checkpoint,
        Activity::Commit,
        Activity::Grow,
        Activity::Hold,
        Activity::Paused,
    ];
    fn label(self) -> &'static str {
        match self {
            Activity::Idle => "idle",
            Activity::Assign => "assign",
            Activity::Step => "step",
            Activity::Evaluate => "evaluate",
            Activity::Checkpoint => "checkpoint",
            Activity::Commit => "commit",
            Activity::Grow => "grow",
            Activity::Hold => "hold",
            Activity::Paused => "paused",
        }
    }
}

/// The process's time origin for [`Progress::since_ms`].
fn origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    origin().elapsed().as_millis() as u64
}

impl Progress {
    /// The thread starts `a` now (a new step, a command): progress.
    fn begin(&self, a: Activity) {
        self.since_ms.store(now_ms(), Ordering::Relaxed);
        self.activity.store(a as u8, Ordering::Relaxed);
    }
    /// The thread is in `a`; the clock restarts only when that is a change.
    fn keep(&self, a: Activity) {
        if self.activity.load(Ordering::Relaxed) != a as u8 {
            self.begin(a);
        }
    }
    fn heartbeat(&self) -> pb::Heartbeat {
        let a = self.activity.load(Ordering::Relaxed) as usize;
        let since = self.since_ms.load(Ordering::Relaxed);
        pb::Heartbeat {
            epoch: self.epoch.load(Ordering::Relaxed),
            step: self.step.load(Ordering::Relaxed),
            phase: Activity::ALL
                .get(a)
                .copied()
                .unwrap_or(Activity::Idle)
                .label()
                .into(),
            phase_seconds: now_ms().saturating_sub(since) as f64 / 1000.0,
            step_seconds: self.step_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// One session; Ok(true) once it had connected and then ended.
async fn session(
    endpoint: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
    hello: pb::Hello,
    nccl: Option<NcclIdSource>,
    sink: &Sink,
    ctl: &std::sync::mpsc::Sender<Control>,
    progress: &Arc<Progress>,
) -> Result<bool> {
    let unavailable = |detail: String| Error::Unavailable {
        endpoint: endpoint.to_string(),
        detail,
    };
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| unavailable(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(t) = tls {
        ep = ep
            .tls_config(t.clone())
            .map_err(|e| Error::Rejected(format!("TLS to {endpoint}: {e}")))?;
    }
    let channel = ep.connect().await.map_err(|e| unavailable(e.to_string()))?;
    let mut client = pb::worker_service_client::WorkerServiceClient::new(channel);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Hello(hello.clone())),
    })
    .ok();
    let mut inbound = client
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .map_err(|e| match e.code() {
            // The coordinator refused this worker's certificate or the id it claims: retrying
            // cannot help.
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                Error::Rejected(format!("{endpoint}: {}", e.message()))
            }
            _ => unavailable(e.message().to_string()),
        })?
        .into_inner();
    *sink.lock().unwrap() = Some(tx.clone());
    info!(worker_id = %hello.worker_id, endpoint, "connected to the coordinator");
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _hb = AbortOnDrop({
        let tx = tx.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                let ms = progress.heartbeat_ms.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(if ms == 0 { 1000 } else { ms })).await;
                let hbm = pb::WorkerMessage {
                    kind: Some(pb::worker_message::Kind::Heartbeat(progress.heartbeat())),
                };
                if tx.send(hbm).is_err() {
                    return;
                }
            }
        })
    });
    let tx_offer = tx;
    let result = loop {
        match inbound.next().await {
            Some(Ok(m)) => match m.kind {
                Some(pb::coordinator_message::Kind::Assignment(a)) => {
                    if a.heartbeat_seconds > 0.0 {
                        progress.heartbeat_ms.store(
                            (a.heartbeat_seconds * 1000.0).max(10.0) as u64,
                            Ordering::Relaxed,
                        );
                    }
                    // The assignment used one offered id per NCCL group this rank is rank 0
                    // of: replace exactly those (an unused id keeps NCCL's bootstrap root
                    // thread alive in this process, so none is made in vain).
                    let used = nccl_ids_used(&a);
                    let _ = ctl.send(Control::Assign(a));
                    if nccl.is_some() && used > 0 {
                        let ids = fresh_nccl_ids(nccl, used);
                        let _ = tx_offer.send(pb::WorkerMessage {
                            kind: Some(pb::worker_message::Kind::NcclIds(pb::NcclIds { ids })),
                        });
                    }
                }
                Some(pb::coordinator_message::Kind::Command(c)) => {
                    let _ = ctl.send(Control::Command(c));
                }
                Some(pb::coordinator_message::Kind::Reject(r)) => {
                    break Err(Error::Rejected(r.reason))
                }
                None => {}
            },
            Some(Err(s)) => {
                warn!("coordinator session ended: {}", s.message());
                break Ok(true);
            }
            None => {
                warn!("coordinator closed the session");
                break Ok(true);
            }
        }
    };
    result
}

/// How many of this worker's offered NCCL ids assignment `a` used: one per NCCL group whose
/// rank 0 it is (its DP group when its DP rank is 0, its TP group when its TP rank is 0).
fn nccl_ids_used(a: &pb::Assignment) -> usize {
    let tp = a.tp.max(1);
    let dp_root = a.dp_backend == "nccl" && a.rank / tp == 0;
    let tp_root = a.tp_backend == "nccl" && a.rank % tp == 0;
    dp_root as usize + tp_root as usize
}

/// The state of one epoch on the training thread.
struct Epoch {
    a: Assignment,
    runner: Box<dyn Runner>,
    /// Lockstep commands received, in id order, not yet executed.
    queue: VecDeque<pb::Command>,
    highest: u64,
    paused: bool,
    hold: bool,
    /// The runner failed; wait for a new assignment.
    failed: bool,
    /// The generation of the growth whose checkpoint this rank wrote last (for the `generation`
    /// of the commit's span), 0 outside a growth.
    growth_generation: u64,
    /// A checkpoint whose files are being written in the background.
    writing: Option<PendingWrite>,
    /// (Checkpoint command id, the step it was written at) of this epoch's latest checkpoints,
    /// for an AbortCheckpoint to find the temp dir.
    written: VecDeque<(u64, u64)>,
}

/// A checkpoint write in flight: acked (with the state of the step it snapshotted) when done.
struct PendingWrite {
    cmd_id: u64,
    /// A growth checkpoint's snapshot shares the runner's tensors: no step until the growth has
    /// replaced them (cleared by a successful stack).
    shared: bool,
    handle: std::thread::JoinHandle<std::result::Result<Option<ShardReport>, String>>,
    state: RunnerState,
    started: Instant,
    /// A growth checkpoint's writer waits until this is dropped ([`PendingWrite::release`]):
    /// after the grown model's first step, so the write does not take the CPU from it, or as
    /// soon as the rank stops stepping or must wait for the write.
    gate: Option<std::sync::mpsc::Sender<()>>,
}

impl PendingWrite {
    fn release(&mut self) {
        self.gate = None;
    }
}

struct Trainer<F> {
    factory: F,
    worker_id: String,
    listener: TcpListener,
    tp_listener: TcpListener,
    sink: Sink,
    opts: AgentOptions,
    progress: Arc<Progress>,
    epoch: Option<Epoch>,
}

fn decode_assignment(a: &pb::Assignment) -> std::result::Result<Assignment, BoxError> {
    let base = PathBuf::from(if a.base_dir.is_empty() {
        "."
    } else {
        &a.base_dir
    });
    let spec = JobSpec::from_toml(&a.spec_toml, &base, "assigned job spec")?;
    let (dp, tp) = (a.dp.max(1) as usize, a.tp.max(1) as usize);
    // A coordinator that names no backend (older) means the TCP ring.
    let default = |n: usize| if n == 1 { Backend::Solo } else { Backend::Ring };
    let dp_backend = Backend::parse(&a.dp_backend)?.unwrap_or(default(dp));
    let tp_backend = Backend::parse(&a.tp_backend)?.unwrap_or(default(tp));
    for (kind, b, id) in [
        ("DP", dp_backend, &a.dp_nccl_id),
        ("TP", tp_backend, &a.tp_nccl_id),
    ] {
        if b == Backend::Nccl && id.len() != NCCL_ID_BYTES {
            return Err(format!(
                "the assignment names backend nccl for the {kind} group but relays a {}-byte NCCL id (expected {NCCL_ID_BYTES})",
                id.len()
            )
            .into());
        }
    }
    Ok(Assignment {
        epoch: a.epoch,
        generation: a.generation,
        job_id: JobId(a.job_id.clone()),
        spec,
        spec_toml: a.spec_toml.clone(),
        base_dir: base,
        rank: Rank(a.rank),
        dp,
        tp,
        restore_from: (!a.restore_from.is_empty()).then(|| PathBuf::from(&a.restore_from)),
        job_root: PathBuf::from(&a.job_root),
        skip: a.skip.iter().map(|w| (w.from, w.to)).collect(),
        restore_grow: a.restore_grow.as_ref().map(grow_order).transpose()?,
        peers: a.peers.clone(),
        tp_peers: a.tp_peers.clone(),
        group_token: a.group_token.clone(),
        dp_backend,
        tp_backend,
        dp_nccl_id: a.dp_nccl_id.clone(),
        tp_nccl_id: a.tp_nccl_id.clone(),
    })
}

/// The ring of `members` (global ranks, in group-rank order) that this rank (group rank `me`)
/// joins over `listener`, or [`Solo`] for a group of one. `kind` + `index` make the group's
/// token distinct from every other group of the epoch. With backend `nccl` the ring stays for
/// control-plane agreements and an NCCL communicator joins the relayed id `nccl_id` beside it.
fn form_group(
    backend: Backend,
    nccl_id: &[u8],
    listener: &TcpListener,
    addrs: &[String],
    members: &[usize],
    me: usize,
    token: &str,
    kind: &str,
    index: usize,
    timeout: Duration,
    op_timeout: Option<Duration>,
) -> std::result::Result<Box<dyn Collective>, BoxError> {
    if members.len() == 1 {
        return Ok(Box::new(Solo));
    }
    let peers = members
        .iter()
        .map(|&r| {
            let a = addrs.get(r).ok_or_else(|| {
                format!(
                    "the assignment has {} {kind} ring addresses but names rank {r}",
                    addrs.len()
                )
            })?;
            resolve(a)
        })
        .collect::<std::result::Result<Vec<_>, BoxError>>()?;
    let mut opts = trellis_comm::ring::RingOptions::new(timeout);
    // Benchmark hook (bench/tls_cost.sh): TRELLIS_BENCH_RING_MAC=0 leaves the per-message MACs
    // out to measure their cost; the handshake stays authenticated.
    if std::env::var("TRELLIS_BENCH_RING_MAC").is_ok_and(|v| v == "0") {
        warn!("TRELLIS_BENCH_RING_MAC=0: ring messages are not authenticated (benchmark only)");
        opts.message_mac = false;
    }
    let mut ring = TcpRing::with_options(
        me,
        members.len(),
        listener.try_clone()?,
        peers,
        // The ring key: secret as long as the coordinator's token is (sent over its session).
        &trellis_comm::ring::derive_key(&format!("{token}/{kind}/{index}")),
        opts,
    )?;
    if let Some(t) = op_timeout {
        ring.set_timeout(t)?;
    }
    if backend != Backend::Nccl {
        return Ok(Box::new(ring));
    }
    let mut id = [0u8; NCCL_ID_BYTES];
    id.copy_from_slice(nccl_id);
    // Every rank of the group has joined the ring, so every rank is here to join NCCL too.
    let comm =
        trellis_comm::nccl::NcclComm::new(me, members.len(), &trellis_comm::nccl::UniqueId(id))
            .map_err(|e| format!("{kind} group {index}: {e}"))?;
    Ok(Box::new(trellis_comm::nccl::NcclGroup::new(
        Box::new(ring),
        comm,
    )?))
}

fn resolve(addr: &str) -> std::result::Result<SocketAddr, BoxError> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| format!("peer address {addr} does not resolve").into())
}

/// The span of a command's work on this rank (see docs/operations.md "Tracing"): a child of the
/// coordinator span in `Command.trace_context`, with the fixed fields `job_id`, `worker_id`,
/// `rank`, `step`, `generation`.
macro_rules! command_span {
    ($name:literal, $worker_id:expr, $e:expr, $cmd:expr, $generation:expr) => {{
        let span = tracing::info_span!(
            $name,
            job_id = %$e.a.job_id,
            worker_id = %$worker_id,
            rank = $e.a.rank.0,
            step = $e.runner.state().step,
            generation = $generation,
            epoch = $e.a.epoch,
            command_id = $cmd.id,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        );
        trellis_telemetry::set_parent(&span, &$cmd.trace_context);
        span
    }};
}

impl<F: RunnerFactory> Trainer<F> {
    fn ack(&self, cmd_id: u64, phase: AckPhase, r: AckResult) {
        let Some(e) = &self.epoch else { return };
        self.ack_at(cmd_id, phase, r, &e.runner.state());
    }

    /// [`Self::ack`] for work done at the step of `st` (a checkpoint written in the background
    /// is acked with the step it snapshotted, not the step training has reached since). The ack
    /// carries the rank's current generation (a growth checkpoint's ack comes after the stack;
    /// its `CheckpointAck` says which generation the shards hold).
    fn ack_at(&self, cmd_id: u64, phase: AckPhase, r: AckResult, st: &RunnerState) {
        self.ack_failure(cmd_id, phase, r, st, pb::FailureKind::Unspecified);
    }

    fn ack_failure(
        &self,
        cmd_id: u64,
        phase: AckPhase,
        r: AckResult,
        st: &RunnerState,
        failure: pb::FailureKind,
    ) {
        let Some(e) = &self.epoch else { return };
        let generation = e.runner.state().generation;
        let (ok, error, result, seconds) = match r {
            Ok((p, s)) => (true, String::new(), p, s),
            Err(err) => (false, err, None, 0.0),
        };
        send(
            &self.sink,
            pb::worker_message::Kind::Ack(pb::Ack {
                epoch: e.a.epoch,
                generation,
                command_id: cmd_id,
                phase: phase as i32,
                ok,
                error,
                result,
                seconds,
                step: st.step,
                rank: e.a.rank.0,
                failure: if ok { 0 } else { failure as i32 },
            }),
        );
    }

    /// A checkpoint could not be written or committed: not a training failure. The rank acks
    /// command `cmd_id` failed with `FAILURE_KIND_CHECKPOINT_IO` and trains on; the coordinator
    /// aborts that checkpoint (AbortCheckpoint removes its temp dir) and retries later.
    fn checkpoint_failed(&self, cmd_id: u64, phase: AckPhase, err: String, st: &RunnerState) {
        let span = Span::current();
        span.record("otel.status_code", "error");
        span.record("otel.status_message", err.as_str());
        warn!(
            phase = phase.label(),
            step = st.step,
            "checkpoint failed: {err}; training goes on"
        );
        self.ack_failure(cmd_id, phase, Err(err), st, pb::FailureKind::CheckpointIo);
    }

    fn fail(&mut self, phase: AckPhase, err: String) {
        // Marks the command's span (when one is entered) as failed in the trace.
        let span = Span::current();
        span.record("otel.status_code", "error");
        span.record("otel.status_message", err.as_str());
        warn!(
            phase = phase.label(),
            "runner failed: {err}; waiting for a new assignment"
        );
        self.ack(0, phase, Err(err));
        if let Some(e) = self.epoch.as_mut() {
            e.failed = true;
        }
    }

    fn assign(&mut self, a: pb::Assignment) {
        // A checkpoint still being written finishes first (a later one may reuse its temp dir);
        // the old epoch's ack would be fenced anyway.
        if let Some(mut w) = self.epoch.as_mut().and_then(|e| e.writing.take()) {
            w.release();
            let _ = w.handle.join();
        }
        // Drop the old runner (and its collective) before forming the new group.
        self.epoch = None;
        let t0 = Instant::now();
        self.progress.begin(Activity::Assign);
        self.progress.epoch.store(a.epoch, Ordering::Relaxed);
        // Waits on a peer after formation: the coordinator's bound, derived from the measured
        // step time (0 = this worker's own `ring_timeout`, which always bounds formation).
        let op_timeout = (a.ring_timeout_seconds.is_finite() && a.ring_timeout_seconds > 0.0)
            .then(|| Duration::from_secs_f64(a.ring_timeout_seconds));
        let built = (|| -> std::result::Result<Epoch, BoxError> {
            let a_hold = a.hold;
            let a = decode_assignment(&a)?;
            let (dp_rank, tp_rank) = a.coords();
            let t = self.opts.ring_timeout;
            // Every rank forms its TP group first, then its DP group: no rank waits on a ring
            // that a peer will only join later.
            let tp_members: Vec<usize> = (0..a.tp).map(|j| dp_rank * a.tp + j).collect();
            let tp = form_group(
                a.tp_backend,
                &a.tp_nccl_id,
                &self.tp_listener,
                &a.tp_peers,
                &tp_members,
                tp_rank,
                &a.group_token,
                "tp",
                dp_rank,
                t,
                op_timeout,
            )?;
            let dp_members: Vec<usize> = (0..a.dp).map(|i| i * a.tp + tp_rank).collect();
            let dp = form_group(
                a.dp_backend,
                &a.dp_nccl_id,
                &self.listener,
                &a.peers,
                &dp_members,
                dp_rank,
                &a.group_token,
                "dp",
                tp_rank,
                t,
                op_timeout,
            )?;
            let runner = self.factory.build(&a, Collectives { dp, tp })?;
            Ok(Epoch {
                a,
                runner,
                queue: VecDeque::new(),
                highest: 0,
                paused: false,
                hold: a_hold,
                failed: false,
                growth_generation: 0,
                writing: None,
                written: VecDeque::new(),
            })
        })();
        match built {
            Ok(e) => {
                info!(
                    epoch = e.a.epoch,
                    rank = e.a.rank.0,
                    dp = e.a.dp,
                    tp = e.a.tp,
                    generation = e.a.generation,
                    dp_backend = %e.a.dp_backend,
                    tp_backend = %e.a.tp_backend,
                    seconds = t0.elapsed().as_secs_f64(),
                    "assignment: runner ready"
                );
                let st = e.runner.state();
                send(
                    &self.sink,
                    pb::worker_message::Kind::Ack(pb::Ack {
                        epoch: e.a.epoch,
                        generation: st.generation,
                        command_id: 0,
                        phase: AckPhase::Assign as i32,
                        ok: true,
                        error: String::new(),
                        result: None,
                        seconds: t0.elapsed().as_secs_f64(),
                        step: st.step,
                        rank: e.a.rank.0,
                        failure: 0,
                    }),
                );
                self.progress
                    .step
                    .store(e.runner.state().step, Ordering::Relaxed);
                self.epoch = Some(e);
            }
            Err(err) => {
                warn!(epoch = a.epoch, "assignment failed: {err}");
                send(
                    &self.sink,
                    pb::worker_message::Kind::Ack(pb::Ack {
                        epoch: a.epoch,
                        generation: a.generation,
                        command_id: 0,
                        phase: AckPhase::Assign as i32,
                        ok: false,
                        error: err.to_string(),
                        result: None,
                        seconds: 0.0,
                        step: 0,
                        rank: a.rank,
                        failure: 0,
                    }),
                );
            }
        }
    }

    /// Returns false on Stop.
    fn control(&mut self, c: Control) -> bool {
        match c {
            Control::Assign(a) => {
                self.assign(a);
                true
            }
            Control::Command(cmd) => {
                let Some(e) = self.epoch.as_mut() else {
                    return !is_stop(&cmd);
                };
                match &cmd.kind {
                    Some(pb::command::Kind::Stop(s)) => {
                        info!("stop: {}", s.reason);
                        return false;
                    }
                    Some(pb::command::Kind::CommitCheckpoint(_)) => {
                        if cmd.epoch == e.a.epoch && !e.failed {
                            self.execute(cmd);
                        }
                    }
                    _ => {
                        if cmd.epoch == e.a.epoch {
                            e.highest = e.highest.max(cmd.id);
                            e.queue.push_back(cmd);
                        }
                    }
                }
                true
            }
        }
    }

    fn run(mut self, ctl: std::sync::mpsc::Receiver<Control>) -> Result<()> {
        loop {
            // Drain control messages; block briefly when there is nothing to step.
            let stepping = self.epoch.as_ref().is_some_and(|e| {
                !e.failed
                    && !e.paused
                    && !e.hold
                    && e.runner.state().step < e.a.spec.train.max_steps
            });
            let first = if stepping {
                match ctl.try_recv() {
                    Ok(c) => Some(c),
                    Err(std::sync::mpsc::TryRecvError::Empty) => None,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(()),
                }
            } else {
                match ctl.recv_timeout(self.opts.idle_poll) {
                    Ok(c) => Some(c),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
            };
            if let Some(c) = first {
                if !self.control(c) {
                    return Ok(());
                }
                while let Ok(c) = ctl.try_recv() {
                    if !self.control(c) {
                        return Ok(());
                    }
                }
            }
            self.poll_write(false);
            let Some(e) = self.epoch.as_mut() else {
                self.progress.keep(Activity::Idle);
                continue;
            };
            if e.failed {
                if let Some(w) = e.writing.as_mut() {
                    w.release();
                }
                self.progress.keep(Activity::Idle);
                continue;
            }
            // Agree which commands every rank has.
            let target = match e.runner.agree_min(e.highest) {
                Ok(t) => t,
                Err(err) => {
                    self.fail(AckPhase::Agree, err.to_string());
                    continue;
                }
            };
            loop {
                let Some(e) = self.epoch.as_mut() else { break };
                if e.failed {
                    break;
                }
                let Some(front) = e.queue.front() else { break };
                if front.id > target || front.at_step > e.runner.state().step {
                    break;
                }
                let cmd = e.queue.pop_front().unwrap();
                self.execute(cmd);
            }
            let Some(e) = self.epoch.as_mut() else {
                continue;
            };
            if e.failed || e.paused || e.hold || e.runner.state().step >= e.a.spec.train.max_steps {
                // No step to wait for: a gated write goes now.
                if let Some(w) = e.writing.as_mut() {
                    w.release();
                }
                self.progress.keep(if e.failed {
                    Activity::Idle
                } else if e.paused {
                    Activity::Paused
                } else if e.hold {
                    Activity::Hold
                } else {
                    Activity::Idle
                });
                continue;
            }
            // A snapshot that shares the runner's tensors must be written before they change
            // (not a stuck step: the thread waits on the disk, as in a checkpoint).
            if e.writing.as_ref().is_some_and(|w| w.shared) {
                self.progress.keep(Activity::Checkpoint);
                self.poll_write(true);
                continue;
            }
            let e = self.epoch.as_mut().expect("epoch");
            self.progress.begin(Activity::Step);
            let stepped = e.runner.step();
            // The grown model's first step is done (or failed): a gated growth write goes.
            if let Some(w) = e.writing.as_mut() {
                w.release();
            }
            match stepped {
                Ok(o) => {
                    self.progress.step.store(o.step, Ordering::Relaxed);
                    self.progress
                        .step_us
                        .store((o.step_seconds * 1e6) as u64, Ordering::Relaxed);
                    let generation = e.runner.state().generation;
                    send(
                        &self.sink,
                        pb::worker_message::Kind::Step(pb::StepReport {
                            epoch: e.a.epoch,
                            generation,
                            step: o.step,
                            tokens: o.tokens,
                            loss: o.loss,
                            lr: o.lr,
                            grad_norm: o.grad_norm,
                            step_seconds: o.step_seconds,
                            compute_seconds: o.compute_seconds,
                            comm_seconds: o.comm_seconds,
                            data_seconds: o.data_seconds,
                            sample_start: o.sample_start,
                            sample_end: o.sample_end,
                            rank: e.a.rank.0,
                        }),
                    );
                    let every = e.a.spec.train.eval_interval;
                    let max = e.a.spec.train.max_steps;
                    if (every > 0 && o.step % every == 0) || o.step == max {
                        self.progress.begin(Activity::Evaluate);
                        match e.runner.evaluate() {
                            Ok(v) => send(
                                &self.sink,
                                pb::worker_message::Kind::ValLoss(pb::ValLoss {
                                    epoch: e.a.epoch,
                                    generation,
                                    step: o.step,
                                    loss: v,
                                    rank: e.a.rank.0,
                                }),
                            ),
                            Err(err) => self.fail(AckPhase::Evaluate, err.to_string()),
                        }
                    }
                }
                Err(err) => self.fail(AckPhase::Step, err.to_string()),
            }
        }
    }

    /// Ack the background checkpoint write once it is done; with `wait`, block until it is.
    fn poll_write(&mut self, wait: bool) {
        let Some(e) = self.epoch.as_mut() else { return };
        match &e.writing {
            Some(w) if wait || w.handle.is_finished() => {}
            _ => return,
        }
        let mut w = e.writing.take().expect("checked");
        w.release();
        let r = w
            .handle
            .join()
            .unwrap_or_else(|_| Err("the checkpoint writer thread panicked".into()));
        match r {
            Ok(report) => self.ack_at(
                w.cmd_id,
                AckPhase::Checkpoint,
                Ok((
                    Some(checkpoint_ack(&report, &w.state)),
                    w.started.elapsed().as_secs_f64(),
                )),
                &w.state,
            ),
            Err(err) => self.checkpoint_failed(w.cmd_id, AckPhase::Checkpoint, err, &w.state),
        }
    }

    fn execute(&mut self, cmd: pb::Command) {
        let Some(kind) = cmd.kind else { return };
        // Commands run in order: one that depends on the disk or the state (another
        // checkpoint, its commit) waits for a background write to finish. A growth does not:
        // it builds new tensors and leaves the snapshot's alone, so the growth checkpoint is
        // written while the ranks stack and train the grown model.
        if !matches!(
            kind,
            pb::command::Kind::Pause(_) | pb::command::Kind::Resume(_) | pb::command::Kind::Grow(_)
        ) {
            self.poll_write(true);
            if self.epoch.as_ref().is_none_or(|e| e.failed) {
                return;
            }
        }
        let t0 = Instant::now();
        self.progress.begin(match &kind {
            pb::command::Kind::Pause(_) => Activity::Paused,
            pb::command::Kind::Evaluate(_) => Activity::Evaluate,
            pb::command::Kind::CommitCheckpoint(_) => Activity::Commit,
            pb::command::Kind::Grow(_) => Activity::Grow,
            pb::command::Kind::Checkpoint(_) | pb::command::Kind::AbortCheckpoint(_) => {
                Activity::Checkpoint
            }
            pb::command::Kind::Resume(_) | pb::command::Kind::Stop(_) => Activity::Idle,
        });
        let e = self.epoch.as_mut().expect("epoch");
        let was_hold = e.hold;
        // Any lockstep command ends a hold (the growth checkpoint's).
        if !matches!(kind, pb::command::Kind::CommitCheckpoint(_)) {
            e.hold = false;
        }
        match kind {
            pb::command::Kind::Pause(_) => {
                e.paused = true;
                self.ack(cmd.id, AckPhase::Pause, Ok((None, 0.0)));
            }
            pb::command::Kind::Resume(_) => {
                e.paused = false;
                self.ack(cmd.id, AckPhase::Unpause, Ok((None, 0.0)));
            }
            pb::command::Kind::Evaluate(_) => {
                let r = e.runner.evaluate();
                match r {
                    Ok(_) => self.ack(
                        cmd.id,
                        AckPhase::Evaluate,
                        Ok((None, t0.elapsed().as_secs_f64())),
                    ),
                    Err(err) => self.fail(AckPhase::Evaluate, err.to_string()),
                }
            }
            pb::command::Kind::Checkpoint(c) => {
                let span = if c.reason == "growth" {
                    e.growth_generation = c.growth_generation;
                    command_span!(
                        "worker.grow.checkpoint",
                        self.worker_id,
                        e,
                        cmd,
                        c.growth_generation
                    )
                } else {
                    e.growth_generation = 0;
                    let g = e.runner.state().generation;
                    command_span!("worker.checkpoint", self.worker_id, e, cmd, g)
                };
                let _span = span.enter();
                let root = e.a.job_root.clone();
                let st = e.runner.state();
                e.written.push_back((cmd.id, st.step));
                if e.written.len() > 8 {
                    e.written.pop_front();
                }
                // Written in the background and acked when its files are durable
                // (`poll_write`); a failed write acks `CheckpointIo`, not a training failure.
                // A growth's checkpoint holds the ranks (no step before the growth) and its
                // snapshot shares the tensors the growth replaces.
                let begun = if c.hold {
                    e.hold = true;
                    e.runner.begin_growth_checkpoint_shards(&root)
                } else {
                    e.runner.begin_checkpoint_shards(&root)
                };
                match begun {
                    Ok(job) => {
                        // A growth's write waits for the grown model's first step (the gate).
                        let (gate, go) = std::sync::mpsc::channel::<()>();
                        let gated = c.hold;
                        let spawned = std::thread::Builder::new()
                            .name("trellis-ckpt-write".into())
                            .spawn(move || {
                                if gated {
                                    let _ = go.recv(); // returns when the gate is dropped
                                }
                                job().map_err(|e| e.to_string())
                            });
                        match spawned {
                            Ok(handle) => {
                                e.writing = Some(PendingWrite {
                                    cmd_id: cmd.id,
                                    shared: c.hold,
                                    handle,
                                    state: st,
                                    started: t0,
                                    gate: Some(gate),
                                })
                            }
                            Err(err) => self.checkpoint_failed(
                                cmd.id,
                                AckPhase::Checkpoint,
                                format!("cannot start the writer thread: {err}"),
                                &st,
                            ),
                        }
                    }
                    // The runner's state is intact (nothing but files failed): train on.
                    Err(err) if err.is::<CheckpointIo>() => {
                        e.hold = c.hold;
                        self.checkpoint_failed(cmd.id, AckPhase::Checkpoint, err.to_string(), &st)
                    }
                    Err(err) => self.fail(AckPhase::Checkpoint, err.to_string()),
                }
            }
            pb::command::Kind::AbortCheckpoint(c) => {
                // Every rank has waited for its own write of it (above); remove what is left.
                // Ranks of one TP group share the temp dir: whoever comes first removes it.
                let step = e
                    .written
                    .iter()
                    .find(|(id, _)| *id == c.command)
                    .map(|w| w.1);
                if let Some(step) = step {
                    let tmp = trellis_core::checkpoint::tmp_dir(&e.a.job_root, step);
                    match std::fs::remove_dir_all(&tmp) {
                        Ok(()) => {
                            info!(step, reason = %c.reason, "checkpoint aborted; removed {}", tmp.display())
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                        Err(err) => {
                            warn!(
                                "cannot remove the aborted checkpoint's {}: {err}",
                                tmp.display()
                            )
                        }
                    }
                }
                self.ack(
                    cmd.id,
                    AckPhase::AbortCheckpoint,
                    Ok((None, t0.elapsed().as_secs_f64())),
                );
            }
            pb::command::Kind::CommitCheckpoint(c) => {
                let span = if c.reason == "growth" {
                    let g = e.growth_generation;
                    command_span!("worker.grow.commit", self.worker_id, e, cmd, g)
                } else {
                    let g = e.runner.state().generation;
                    command_span!("worker.commit", self.worker_id, e, cmd, g)
                };
                let _span = span.enter();
                e.hold = was_hold;
                let root = e.a.job_root.clone();
                let reports: Vec<ShardReport> = c.reports.iter().map(Into::into).collect();
                match e.runner.finalize_checkpoint(&root, c.step, &reports) {
                    Ok(dir) => {
                        let commit = pb::ack::Result::Commit(pb::CommitAck {
                            dir: dir.display().to_string(),
                        });
                        self.ack(
                            cmd.id,
                            AckPhase::Commit,
                            Ok((Some(commit), t0.elapsed().as_secs_f64())),
                        );
                        // Only what the coordinator's recorded catalogue no longer lists, and
                        // older than this commit (docs/design.md §5): a failure here costs
                        // disk, not the commit.
                        let keep = c.keep_steps.iter().copied().collect();
                        match trellis_core::checkpoint::gc_keeping(&root, &keep, c.step) {
                            Ok(removed) if !removed.is_empty() => {
                                debug!(removed = ?removed, "collected old checkpoints")
                            }
                            Ok(_) => {}
                            Err(err) => warn!("checkpoint garbage collection: {err}"),
                        }
                    }
                    Err(err) => {
                        let st = e.runner.state();
                        self.checkpoint_failed(cmd.id, AckPhase::Commit, err.to_string(), &st)
                    }
                }
            }
            pb::command::Kind::Grow(g) => {
                let order = match grow_order(&g) {
                    Ok(o) => o,
                    Err(err) => {
                        let span = command_span!(
                            "worker.grow.stack",
                            self.worker_id,
                            e,
                            cmd,
                            g.generation
                        );
                        let _span = span.enter();
                        return self.fail(AckPhase::Stack, err);
                    }
                };
                let phases: [(
                    AckPhase,
                    fn(&mut dyn Runner, &GrowOrder) -> std::result::Result<(), BoxError>,
                ); 3] = [
                    (AckPhase::Stack, |r, o| r.grow(o)),
                    (AckPhase::Reshard, |r, o| r.reshard(o)),
                    (AckPhase::Resume, |r, o| r.resume(o)),
                ];
                for (name, f) in phases {
                    let t = Instant::now();
                    let e = self.epoch.as_mut().expect("epoch");
                    let gen = order.generation;
                    let span = match name {
                        AckPhase::Stack => {
                            command_span!("worker.grow.stack", self.worker_id, e, cmd, gen)
                        }
                        AckPhase::Reshard => {
                            command_span!("worker.grow.reshard", self.worker_id, e, cmd, gen)
                        }
                        _ => command_span!("worker.grow.resume", self.worker_id, e, cmd, gen),
                    };
                    let _span = span.enter();
                    match f(e.runner.as_mut(), &order) {
                        Ok(()) => {
                            if name == AckPhase::Stack {
                                // The grown model's tensors are new: the growth checkpoint's
                                // snapshot no longer shares anything the runner changes.
                                if let Some(w) = e.writing.as_mut() {
                                    w.shared = false;
                                }
                            }
                            self.ack(cmd.id, name, Ok((None, t.elapsed().as_secs_f64())))
                        }
                        Err(err) => return self.fail(name, err.to_string()),
                    }
                }
                // The grown model's validation loss before it trains (the loss jump of the
                // growth), when the job evaluates at all; after the resume ack, so the growth's
                // timings do not include it.
                let e = self.epoch.as_mut().expect("epoch");
                if e.a.spec.train.eval_interval > 0 {
                    match e.runner.evaluate() {
                        Ok(v) => send(
                            &self.sink,
                            pb::worker_message::Kind::ValLoss(pb::ValLoss {
                                epoch: e.a.epoch,
                                generation: order.generation,
                                step: e.runner.state().step,
                                loss: v,
                                rank: e.a.rank.0,
                            }),
                        ),
                        Err(err) => self.fail(AckPhase::Evaluate, err.to_string()),
                    }
                }
            }
            pb::command::Kind::Stop(_) => {}
        }
    }
}

/// The `checkpoint` ack: this rank's shard report and the state of its step.
fn checkpoint_ack(report: &Option<ShardReport>, st: &RunnerState) -> pb::ack::Result {
    pb::ack::Result::Checkpoint(pb::CheckpointAck {
        step: st.step,
        tokens: st.tokens,
        data_cursor: st.data_cursor,
        generation: st.generation,
        report: report.as_ref().map(Into::into),
    })
}

fn is_stop(c: &pb::Command) -> bool {
    matches!(c.kind, Some(pb::command::Kind::Stop(_)))
}

fn grow_order(g: &pb::GrowCmd) -> std::result::Result<GrowOrder, String> {
    let operator = pb::GrowthOperator::try_from(g.operator)
        .map_err(|_| format!("unknown growth operator {} in the Grow command", g.operator))?;
    let operator = operator_from_pb(operator, &g.stacking_list, g.mask_ramp_steps);
    let optimizer = pb::OptimizerPolicy::try_from(g.optimizer)
        .unwrap_or(pb::OptimizerPolicy::Reset)
        .into();
    Ok(GrowOrder {
        generation: g.generation,
        spec: GrowthSpec {
            factor: g.factor as usize,
            operator,
            optimizer,
        },
        lr: g.lr,
        min_lr: g.min_lr,
        warmup_steps: g.warmup_steps,
        dp: g.dp.max(1) as usize,
        tp: g.tp.max(1) as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_uses_one_offered_id_per_nccl_group_this_rank_roots() {
        let a = |rank: u32, dp: u32, tp: u32, dpb: &str, tpb: &str| pb::Assignment {
            rank,
            dp,
            tp,
            dp_backend: dpb.into(),
            tp_backend: tpb.into(),
            ..Default::default()
        };
        // DP = 2 × TP = 2, both NCCL: rank 0 roots both groups, 1 its DP group, 2 its TP group.
        let used: Vec<usize> = (0..4)
            .map(|r| nccl_ids_used(&a(r, 2, 2, "nccl", "nccl")))
            .collect();
        assert_eq!(used, vec![2, 1, 1, 0]);
        // DP only: rank 0 roots the one DP group; a TP group of one is solo.
        assert_eq!(nccl_ids_used(&a(0, 2, 1, "nccl", "solo")), 1);
        assert_eq!(nccl_ids_used(&a(1, 2, 1, "nccl", "solo")), 0);
        // Ring groups use no ids.
        assert_eq!(nccl_ids_used(&a(0, 2, 2, "ring", "ring")), 0);
    }
}
