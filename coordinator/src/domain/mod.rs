//! The coordinator's driver: the one place that feeds events to the transactions of
//! [`crate::txn`] and carries out their effects — persist, then send — over a [`StateStore`].
//!
//! Worker sessions are outboxes (channels); the gRPC layer ([`crate::service`]) converts wire
//! messages at the edge ([`crate::wire`]) and forwards them here. Status views live in
//! [`crate::views`], admission and layout planning in [`crate::plan`].
use crate::error::{Error, Result};
use crate::loss::{AnomalyKind, LossWatcher, WatcherConfig};
use crate::metrics::Metrics;
use crate::persist::{Persister, Progress, Ticket};
use crate::plan::{growth_layout, init_checkpoint, model_config, submitted_layout};
use crate::state::*;
use crate::txn::checkpoint::{self, CheckpointTxn, Committed, Reason, ShardAck};
use crate::txn::growth::{self, GrowthTxn, WorkerPhase};
use crate::txn::job::{self, Due, Verdict};
use crate::txn::{CommandIds, Txn};
use crate::views;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, info_span, warn, Span};
use trellis_core::backend::{self as backend, Backend};
use trellis_core::checkpoint::ShardReport;
use trellis_core::config::ModelConfig;
use trellis_core::growth::{GrowthSpec, Operator};
use trellis_core::ids::{CommandId, Epoch, Generation, JobId, Rank, Step, WorkerId};
use trellis_core::job::JobSpec;
use trellis_proto::convert::operator_to_pb;
use trellis_proto::v1 as pb;
use trellis_store::{keys, StateStore};

mod membership;
mod transactions;

/// Steps per stored chunk of loss history.
const LOSS_CHUNK_STEPS: u64 = 1000;

/// What a session sends to its worker.
pub type Outbox = mpsc::UnboundedSender<Result<pb::CoordinatorMessage, tonic::Status>>;

#[derive(Debug, Clone)]
pub struct DomainOptions {
    pub heartbeat_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub device_memory_bytes: Option<u64>,
    pub peak_flops_per_rank: f64,
    pub watcher: WatcherConfig,
    pub checkpoint_root: Option<PathBuf>,
    /// Experiment tracking directory; default: the job's checkpoint directory.
    pub run_dir: Option<PathBuf>,
    /// Verify the restore point at recovery (files, hashes) and fall back when unusable.
    pub verify_checkpoints: bool,
    /// Most workers in the registry (`max_workers`).
    pub max_workers: usize,
    /// Evict a worker stuck this long inside one step, evaluation or growth phase; `None`:
    /// max(60 s, 20 × step time).
    pub progress_timeout: Option<Duration>,
    /// Every wait on a peer in the ranks' collectives; `None`: half the progress timeout.
    pub ring_timeout: Option<Duration>,
    /// A checkpoint not committed this long after its barrier is aborted (and retried).
    pub checkpoint_deadline: Duration,
    /// A growth phase past this rolls the growth back.
    pub growth_phase_deadline: Duration,
    /// The longest wait before retrying a failed checkpoint or a growth stage whose checkpoint
    /// failed (from 1 s, doubling; [`job::Backoff`]).
    pub checkpoint_retry_max: Duration,
}

impl Default for DomainOptions {
    fn default() -> Self {
        DomainOptions {
            heartbeat_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            device_memory_bytes: None,
            peak_flops_per_rank: 1e12,
            watcher: WatcherConfig::default(),
            checkpoint_root: None,
            run_dir: None,
            verify_checkpoints: true,
            max_workers: 1024,
            progress_timeout: None,
            ring_timeout: None,
            checkpoint_deadline: Duration::from_secs(1800),
            growth_phase_deadline: Duration::from_secs(1800),
            checkpoint_retry_max: Duration::from_secs(300),
        }
    }
}

/// The floor of the automatic progress timeout.
const MIN_PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// The automatic progress timeout is this many measured step times (when above the floor).
const PROGRESS_TIMEOUT_STEPS: f64 = 20.0;

/// Training-thread activities in which a worker must make progress (a step, an evaluation or
/// a growth's stack, reshard and resume completing: compute on the rank's own tensors) within
/// the progress timeout. Checkpoint and commit work waits on storage, whose speed is not the
/// rank's: it is bounded by the checkpoint deadline instead (an abort, not an eviction); idle,
/// assign, hold and paused are waits for the coordinator or the group.
fn busy(activity: &str) -> bool {
    matches!(activity, "step" | "evaluate" | "grow")
}

/// A worker's Ack, decoded at the edge ([`crate::wire::ack`]).
#[derive(Debug, Clone)]
pub struct Ack {
    pub epoch: Epoch,
    pub generation: Generation,
    pub cmd: CommandId,
    /// The step at which the command was executed.
    pub step: Step,
    pub rank: Rank,
    /// The acked phase, for messages.
    pub phase: &'static str,
    /// What the rank did, or why it failed.
    pub result: std::result::Result<AckKind, String>,
    /// A failure is a checkpoint's I/O error (the rank trains on), not a training failure.
    pub checkpoint_io: bool,
}

#[derive(Debug, Clone)]
pub enum AckKind {
    /// The runner of a new assignment is ready.
    Assigned,
    /// This rank's checkpoint shards are written.
    Written(ShardAck),
    /// Rank 0 finalized a checkpoint into `dir`.
    Finalized { dir: String },
    /// A growth phase is done on this rank.
    Phase(WorkerPhase),
    /// Pause, unpause or evaluate done.
    Done,
}

/// A growth request, validated at the edge for form; [`trellis_core::growth::plan`] judges it
/// against the model when the growth begins.
#[derive(Debug, Clone)]
pub struct GrowRequest {
    pub spec: GrowthSpec,
    pub at_step: Option<Step>,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub warmup_steps: Option<u64>,
}

pub(crate) struct WorkerEntry {
    pub(crate) seq: u64,
    session: u64,
    pub(crate) host: String,
    pub(crate) pid: u32,
    pub(crate) device: String,
    pub(crate) ring_address: String,
    tp_ring_address: String,
    /// It can run NCCL (`Hello.nccl`).
    pub(crate) nccl: bool,
    /// Fresh NCCL unique ids it offered and no assignment has used yet (oldest first).
    nccl_ids: VecDeque<Vec<u8>>,
    tx: Option<Outbox>,
    pub(crate) last_seen: Instant,
    pub(crate) lost: bool,
    /// The session ended after the job was done or failed (the worker exited on Stop).
    pub(crate) exited: bool,
    pub(crate) rank: Option<Rank>,
    pub(crate) last_step: u64,
    /// The training thread's activity (its heartbeat's `phase`) and since when.
    pub(crate) activity: String,
    pub(crate) activity_since: Instant,
    /// Its last step's duration, seconds (0 = unknown).
    pub(crate) step_seconds: f64,
}

impl WorkerEntry {
    /// Whether its training thread has been busy without progress for longer than `after`.
    pub(crate) fn stuck_for(&self, now: Instant, after: Duration) -> bool {
        busy(&self.activity) && now.duration_since(self.activity_since) > after
    }
}

/// Scheduled work whose checkpoint failed, waiting for its retry: a checkpoint, or a growth
/// stage (`reason` = growth); no scheduled work starts before `at`.
#[derive(Debug, Clone, Copy)]
struct Retry {
    reason: Reason,
    at: Instant,
}

/// Wall-clock and tracing context of the transaction in flight: the driver's, never the
/// state machine's.
struct Clock {
    issued: Instant,
    /// When the barrier step was reached (the checkpoint's writing began).
    started: Option<Instant>,
    phase_started: Instant,
    /// The span its commands carry (`Command.trace_context`): `checkpoint` or `grow`.
    span: Span,
    /// The growth's checkpoint span, when the transaction is a growth.
    ckpt_span: Option<Span>,
    phase_span: Option<Span>,
}

struct Active {
    txn: Txn,
    clock: Clock,
}

pub(crate) struct Job {
    pub(crate) id: JobId,
    record: JobRecord,
    pub(crate) spec: JobSpec,
    model0: ModelConfig,
    pub(crate) state: JobState,
    pub(crate) checkpoints: Vec<CheckpointRecord>,
    pub(crate) growths: BTreeMap<Generation, GrowthRecordState>,
    ranks: Vec<WorkerId>,
    group_token: String,
    /// The collective backends of the current epoch's (DP, TP) groups.
    pub(crate) backends: Option<(Backend, Backend)>,
    ids: CommandIds,
    active: Option<Active>,
    pub(crate) loss: LossWatcher,
    rate: Option<(Instant, u64)>,
    pub(crate) tokens_per_second: f64,
    pub(crate) mfu: f64,
    persisted_at: Instant,
    /// The first loss-history chunk not yet written complete to the store.
    loss_flushed: u64,
    /// Checkpoint records enqueued but not yet durable: (step, persister sequence number).
    unconfirmed: Vec<(Step, u64)>,
    last_commit: Option<Instant>,
    /// The loss watcher reported a plateau since the last trigger check.
    plateau_seen: bool,
    /// Rank 0's step time, smoothed (seconds; 0 before the first report).
    step_seconds: f64,
    /// Failed work's retry, and the wait before the next one.
    retry: Option<Retry>,
    backoff: job::Backoff,
    /// `metrics.jsonl` and TensorBoard events in the job's directory.
    tracker: Option<crate::tracking::RunTracker>,
}

impl Job {
    fn new(
        id: JobId,
        record: JobRecord,
        spec: JobSpec,
        model0: ModelConfig,
        state: JobState,
        loss: LossWatcher,
        retry_max: Duration,
    ) -> Job {
        Job {
            id,
            record,
            spec,
            model0,
            state,
            checkpoints: Vec::new(),
            growths: BTreeMap::new(),
            ranks: Vec::new(),
            group_token: String::new(),
            backends: None,
            ids: CommandIds::default(),
            active: None,
            loss,
            rate: None,
            tokens_per_second: 0.0,
            mfu: 0.0,
            persisted_at: Instant::now(),
            loss_flushed: 0,
            unconfirmed: Vec::new(),
            last_commit: None,
            plateau_seen: false,
            step_seconds: 0.0,
            retry: None,
            backoff: job::Backoff::new(retry_max),
            tracker: None,
        }
    }
    /// Start experiment tracking in the job's directory, from the step it (re)starts at.
    fn track(&mut self, opts: &DomainOptions) {
        let dir = opts.run_dir.clone().unwrap_or_else(|| self.job_root(opts));
        self.tracker = crate::tracking::RunTracker::open(&dir, self.state.step.0 + 1);
    }
    fn record(&self, kind: &str, step: Step, fields: serde_json::Value) {
        if let Some(t) = &self.tracker {
            t.record(kind, step.0, fields);
        }
    }
    pub(crate) fn world(&self) -> usize {
        self.spec.parallel.dp * self.spec.parallel.tp
    }
    fn model(&self) -> ModelConfig {
        self.model0.with_layers(self.state.layers)
    }
    fn job_root(&self, opts: &DomainOptions) -> PathBuf {
        let root = self
            .spec
            .checkpoint
            .dir
            .clone()
            .or_else(|| opts.checkpoint_root.clone())
            .unwrap_or_else(|| PathBuf::from(&self.record.base_dir).join("checkpoints"));
        root.join(&self.id.0)
    }
    pub(crate) fn growing(&self) -> Option<&GrowthTxn> {
        match &self.active {
            Some(Active {
                txn: Txn::Growth(g),
                ..
            }) => Some(g),
            _ => None,
        }
    }
    /// Failed work waiting for its retry: what (a checkpoint reason; "growth" for a growth
    /// stage) and the seconds left, while the wait lasts.
    pub(crate) fn retry_in(&self, now: Instant) -> Option<(&'static str, f64)> {
        let r = self.retry?;
        let left = r.at.checked_duration_since(now)?;
        Some((r.reason.label(), left.as_secs_f64()))
    }
    fn growth_record(&mut self, gen: Generation) -> &mut GrowthRecordState {
        self.growths
            .get_mut(&gen)
            .expect("a growth in flight has a record")
    }
}

pub struct Domain {
    /// Read at recovery only; every write goes through `persist` (no store I/O under the lock).
    store: Arc<dyn StateStore>,
    persist: Persister,
    /// The job is done, but its final state is not durable yet: stop the workers once the
    /// persister has written up to this sequence number (and say why).
    stop_when_durable: Option<(u64, String)>,
    opts: DomainOptions,
    metrics: Arc<Metrics>,
    pub(crate) job: Option<Job>,
    pub(crate) workers: BTreeMap<WorkerId, WorkerEntry>,
    next_seq: u64,
    pub(crate) fenced: u64,
    changed: watch::Sender<u64>,
    token_nonce: u64,
    /// Workers evicted for making no progress, until they report progress again (kept across
    /// their reconnects): never picked for a group while another idle worker exists.
    stalled: std::collections::BTreeSet<WorkerId>,
}

fn no_job() -> Error {
    Error::NotFound(
        "no job on this coordinator; submit one with `coordctl job submit JOB.toml`".into(),
    )
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state types serialise")
}

impl Domain {
    /// A domain over `store`, recovering a job it already holds (coordinator restart).
    pub async fn open(
        store: Arc<dyn StateStore>,
        opts: DomainOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Domain> {
        let (changed, _) = watch::channel(0);
        let mut d = Domain {
            persist: Persister::start(store.clone()),
            stop_when_durable: None,
            store,
            opts,
            metrics,
            job: None,
            workers: BTreeMap::new(),
            next_seq: 0,
            fenced: 0,
            changed,
            token_nonce: 0,
            stalled: Default::default(),
        };
        d.recover().await?;
        // What recovery wrote (a restore point set aside, growths rolled back) is durable
        // before the coordinator serves.
        d.ticket().wait().await?;
        Ok(d)
    }

    /// A promise that every state change made so far is durable: take it under the lock,
    /// await it after dropping the lock ([`Ticket::wait`]).
    pub fn ticket(&self) -> Ticket {
        self.persist.ticket()
    }

    /// Where the state writes stand (health, tests).
    pub fn persist_progress(&self) -> Progress {
        self.persist.progress()
    }

    /// Follow the state writes (the health check watches it without taking the lock).
    pub fn persist_watch(&self) -> watch::Receiver<Progress> {
        self.persist.watch()
    }

    /// Stop the persister and wait until it has released the store (a simulated crash keeps
    /// only what is durable: await [`Domain::ticket`] first to keep everything).
    pub async fn close(self) {
        self.persist.close().await;
    }

    /// Work that waited for the persister (called from the ticker).
    fn after_durable(&mut self) {
        let durable = self.persist.durable();
        if let Some(job) = self.job.as_mut() {
            job.unconfirmed.retain(|(_, seq)| *seq > durable);
        }
        if self
            .stop_when_durable
            .as_ref()
            .is_some_and(|(seq, _)| *seq <= durable)
        {
            let (_, why) = self.stop_when_durable.take().expect("checked");
            self.stop_all(&why);
        }
    }

    /// Whether the checkpoint record of `step` is in the store (a record not yet written is not
    /// listed: only durable checkpoints are shown as committed).
    pub(crate) fn checkpoint_durable(&self, job: &Job, step: Step) -> bool {
        let durable = self.persist.durable();
        !job.unconfirmed
            .iter()
            .any(|(s, seq)| *s == step && *seq > durable)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The job's persisted state (for tests and tools).
    pub fn job_state(&self) -> Option<&JobState> {
        self.job.as_ref().map(|j| &j.state)
    }

    /// The checkpoint catalogue, oldest first.
    pub fn checkpoint_records(&self) -> &[CheckpointRecord] {
        self.job.as_ref().map_or(&[], |j| &j.checkpoints)
    }

    /// Every growth record, by generation.
    pub fn growth_records(&self) -> Vec<GrowthRecordState> {
        self.job
            .as_ref()
            .map_or(vec![], |j| j.growths.values().cloned().collect())
    }

    /// The progress timeout now: configured, or max(60 s, 20 × the measured step time).
    pub(crate) fn progress_timeout(&self) -> Duration {
        self.opts.progress_timeout.unwrap_or_else(|| {
            let step = self.job.as_ref().map_or(0.0, |j| j.step_seconds);
            MIN_PROGRESS_TIMEOUT.max(Duration::from_secs_f64(step * PROGRESS_TIMEOUT_STEPS))
        })
    }

    /// The ranks' wait on a peer: configured, or half the progress timeout (a rank waiting on a
    /// hung peer fails its step before it could look hung itself).
    pub(crate) fn ring_timeout(&self) -> Duration {
        self.opts
            .ring_timeout
            .unwrap_or_else(|| self.progress_timeout() / 2)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    async fn persist_state(&mut self) -> Result<()> {
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        self.persist.put(keys::job_state(&job.id), json(&job.state));
        job.persisted_at = Instant::now();
        self.persist_loss().await
    }

    /// Write the loss history to the store in chunks of `LOSS_CHUNK_STEPS` steps (a few tens of
    /// KB each, well under etcd's value limit): the chunks changed since the last write, i.e.
    /// from the first incomplete one to the newest.
    async fn persist_loss(&mut self) -> Result<()> {
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        let pts = job.loss.points();
        let Some(newest) = pts.iter().map(|p| p.step / LOSS_CHUNK_STEPS).max() else {
            return Ok(());
        };
        let from = job.loss_flushed.min(newest);
        let mut chunks: BTreeMap<u64, Vec<&crate::loss::LossPoint>> = BTreeMap::new();
        for p in pts {
            let k = p.step / LOSS_CHUNK_STEPS;
            if k >= from {
                chunks.entry(k).or_default().push(p);
            }
        }
        for (k, chunk) in chunks {
            self.persist.put(
                keys::loss(&job.id, Step(k * LOSS_CHUNK_STEPS)),
                json(&chunk),
            );
        }
        job.loss_flushed = newest;
        Ok(())
    }

    async fn persist_growth(&self, gen: Generation) -> Result<()> {
        let job = self.job.as_ref().ok_or_else(no_job)?;
        if let Some(g) = job.growths.get(&gen) {
            self.persist.put(keys::growth(&job.id, gen), json(g));
        }
        Ok(())
    }

    async fn recover(&mut self) -> Result<()> {
        let specs = self.store.list(&keys::jobs_prefix()).await?;
        let Some((key, v)) = specs
            .into_iter()
            .find(|(k, _)| keys::parse_job_spec(k).is_some())
        else {
            return Ok(());
        };
        let id = keys::parse_job_spec(&key).expect("filtered");
        let record: JobRecord =
            serde_json::from_slice(&v.value).map_err(|e| Error::json("job record", e))?;
        let state: JobState = match self.store.get(&keys::job_state(&id)).await? {
            Some(v) => serde_json::from_slice(&v.value).map_err(|e| Error::json("job state", e))?,
            None => {
                return Err(Error::Internal(format!(
                    "job {id} has a spec but no state in the store"
                )))
            }
        };
        let mut checkpoints = Vec::new();
        for (_, v) in self.store.list(&keys::checkpoints_prefix(&id)).await? {
            checkpoints.push(
                serde_json::from_slice::<CheckpointRecord>(&v.value)
                    .map_err(|e| Error::json("checkpoint record", e))?,
            );
        }
        checkpoints.sort_by_key(|c| c.step);
        let mut growths = BTreeMap::new();
        for (_, v) in self.store.list(&keys::growth_prefix(&id)).await? {
            let g: GrowthRecordState =
                serde_json::from_slice(&v.value).map_err(|e| Error::json("growth record", e))?;
            growths.insert(g.generation, g);
        }
        let mut points = Vec::new();
        let mut loss_flushed = 0;
        for (k, v) in self.store.list(&keys::loss_prefix(&id)).await? {
            let chunk: Vec<crate::loss::LossPoint> =
                serde_json::from_slice(&v.value).map_err(|e| Error::json(&k, e))?;
            loss_flushed = chunk
                .iter()
                .map(|p| p.step / LOSS_CHUNK_STEPS)
                .max()
                .unwrap_or(0);
            points.extend(chunk);
        }
        let mut loss = LossWatcher::new(self.opts.watcher.clone());
        loss.restore_points(points);
        let spec = JobSpec::from_toml(
            &record.spec_toml,
            std::path::Path::new(&record.base_dir),
            "stored job spec",
        )?;
        let model0 = model_config(&spec, record.init_vocab_size)?;
        info!(job_id = %id, phase = ?state.phase, epoch = %state.epoch, generation = %state.generation, step = %state.step, "recovered job from the store");
        let mut job = Job::new(
            id,
            record,
            spec,
            model0,
            state,
            loss,
            self.opts.checkpoint_retry_max,
        );
        job.checkpoints = checkpoints;
        job.growths = growths;
        job.loss_flushed = loss_flushed;
        self.job = Some(job);
        let phase = self.job.as_mut().expect("a job").state.phase;
        if !matches!(phase, Phase::Done | Phase::Failed) {
            if let Some(why) = self.verify_restore_point().await? {
                let job = self.job.as_mut().expect("a job");
                job::transition(&mut job.state, Phase::Failed, why);
                error!(job_id = %job.id, "{}", job.state.message);
                self.persist_state().await?;
                self.update_gauges();
                return Ok(());
            }
            self.restore_point("recovered after a coordinator restart")
                .await?;
            let job = self.job.as_mut().expect("a job");
            let msg = job.state.message.clone();
            job::transition(&mut job.state, Phase::WaitingForWorkers, msg);
            job.track(&self.opts);
            self.persist_state().await?;
        }
        self.update_gauges();
        Ok(())
    }

    /// After a restart the restore point must still be restorable (its files present, every
    /// hash matching). One that is not is marked unusable — in the catalogue, and on disk by
    /// renaming `step-N` to `step-N.unusable`, which garbage collection never removes — and the
    /// next older usable committed checkpoint becomes the restore point. Returns the job's
    /// failure message when no committed checkpoint is usable, naming each and why.
    async fn verify_restore_point(&mut self) -> Result<Option<String>> {
        if !self.opts.verify_checkpoints {
            return Ok(None);
        }
        let mut refused: Vec<String> = Vec::new();
        let original = self
            .job
            .as_ref()
            .and_then(|j| j.state.last_checkpoint.clone());
        loop {
            let job = self.job.as_mut().expect("a job");
            let Some(c) = job.state.last_checkpoint.clone() else {
                return Ok(None);
            };
            let dir = PathBuf::from(&c.dir);
            let probe = dir.clone();
            let verdict = tokio::task::spawn_blocking(move || {
                // A replace of this step interrupted by a crash left its good copy as
                // `step-N.old`: put it back first.
                trellis_core::checkpoint::recover_replaced(&probe)?;
                trellis_core::checkpoint::Checkpoint::open(&probe).map(|_| ())
            })
            .await
            .map_err(|e| Error::Internal(format!("checkpoint verification panicked: {e}")))?;
            let Err(e) = verdict else {
                if !refused.is_empty() {
                    info!(job_id = %job.id, step = %c.step, "restoring from the newest usable checkpoint, step {}", c.step);
                }
                return Ok(None);
            };
            let why = e.to_string();
            warn!(job_id = %job.id, step = %c.step, dir = %c.dir, "checkpoint is unusable: {why}; falling back to the next older one");
            self.metrics.checkpoints_unusable_total.inc();
            refused.push(format!("step {} ({}): {why}", c.step, c.dir));
            let aside = dir.with_extension("unusable");
            let kept = if dir.is_dir() {
                match std::fs::rename(&dir, &aside) {
                    Ok(()) => aside.display().to_string(),
                    Err(e) => {
                        warn!(dir = %c.dir, "cannot set the unusable checkpoint aside: {e}");
                        c.dir.clone()
                    }
                }
            } else {
                c.dir.clone()
            };
            let job = self.job.as_mut().expect("a job");
            let marked = CheckpointRecord {
                dir: kept,
                unusable: Some(why),
                ..c.clone()
            };
            if c.reason != Reason::InitFrom {
                self.persist
                    .put(keys::checkpoint(&job.id, c.step), json(&marked));
            }
            let job = self.job.as_mut().expect("a job");
            for x in job.checkpoints.iter_mut().filter(|x| x.step == c.step) {
                *x = marked.clone();
            }
            let older = job
                .checkpoints
                .iter()
                .rev()
                .find(|x| x.step < c.step && x.unusable.is_none())
                .cloned();
            match older {
                Some(o) => {
                    // The plan of a growth applies to the checkpoint it was based on only.
                    job.state.last_checkpoint = Some(o);
                    job.state.restore_growth = None;
                }
                None => {
                    // The job fails where it stood; nothing is restored.
                    job.state.last_checkpoint = original;
                    return Ok(Some(format!(
                        "failed: no committed checkpoint can be restored: {}; restore one from a backup                          (`coordctl checkpoint list` shows them) or resubmit",
                        refused.join("; ")
                    )));
                }
            }
        }
    }

    /// Reset the job's progress to its restore point and mark every growth beyond it rolled
    /// back (persisted). Does not persist the job state.
    async fn restore_point(&mut self, why: &str) -> Result<()> {
        let job = self.job.as_mut().ok_or_else(no_job)?;
        let gen = job::restore_point(&mut job.state, &job.model0, &job.growths, why);
        let mut rolled = Vec::new();
        for g in job.growths.values_mut() {
            if g.generation > gen && !matches!(g.phase, GrowPhase::Done | GrowPhase::RolledBack) {
                g.phase = GrowPhase::RolledBack;
                if g.error.is_empty() {
                    g.error = why.to_string();
                }
                rolled.push(g.generation);
            }
        }
        for g in rolled {
            self.metrics
                .growths_total
                .get_or_create(&[("outcome", "rolled_back")])
                .inc();
            self.persist_growth(g).await?;
        }
        Ok(())
    }

    pub async fn submit(
        &mut self,
        spec_toml: &str,
        base_dir: &str,
    ) -> Result<pb::SubmitJobResponse> {
        if let Some(job) = &self.job {
            return Err(Error::AlreadyExists(format!(
                "job '{}' already runs on this coordinator (phase {:?}); one coordinator runs one job: \
                 start another coordinator with its own --store for a second job",
                job.id, job.state.phase
            )));
        }
        let base = if base_dir.is_empty() { "." } else { base_dir };
        let spec = JobSpec::from_toml(spec_toml, std::path::Path::new(base), "submitted job spec")?;
        let id = JobId(spec.job.name.clone());
        keys::check_segment("job name", &id.0)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let world = spec.parallel.dp * spec.parallel.tp;
        // A job from a checkpoint takes its vocabulary from it ([model] vocab_size optional).
        let (init, model0) = match &spec.checkpoint.init_from {
            Some(dir) => {
                let (rec, cfg, model0) = init_checkpoint(dir, &spec).await?;
                (Some((rec, cfg)), model0)
            }
            None => (None, model_config(&spec, None)?),
        };
        let cfg = init.as_ref().map_or(model0.clone(), |(_, c)| c.clone());
        let layout = submitted_layout(&spec, &cfg, world, self.opts.device_memory_bytes)?;
        let record = JobRecord {
            job_id: id.0.clone(),
            spec_toml: spec_toml.to_string(),
            base_dir: base.to_string(),
            submitted_at: now_unix(),
            init_vocab_size: init.as_ref().map(|_| model0.vocab_size),
        };
        let mut state = JobState {
            phase: Phase::Pending,
            epoch: Epoch(0),
            generation: Generation(0),
            step: Step(0),
            tokens: 0,
            data_cursor: 0,
            layers: model0.num_hidden_layers,
            parameters: model0.num_parameters(),
            layout,
            last_checkpoint: None,
            restore_growth: None,
            skip: Vec::new(),
            next_growth_stage: 0,
            rollbacks: 0,
            anomalies: 0,
            paused: false,
            growth_failures: 0,
            stalled_rollbacks: 0,
            failed_growths: Vec::new(),
            checkpoint_failures: 0,
            checkpoint_error: String::new(),
            evictions: 0,
            last_rollback: None,
            message: format!("submitted; waiting for {world} workers"),
        };
        if let Some((c, cfg)) = init {
            info!(job_id = %id, dir = %c.dir, step = %c.step, layers = c.layers, "job starts from checkpoint.init_from");
            state.step = c.step;
            state.tokens = c.tokens;
            state.data_cursor = c.data_cursor;
            state.generation = c.generation;
            state.layers = c.layers;
            state.parameters = cfg.num_parameters();
            state.last_checkpoint = Some(c);
        }
        self.persist.put(keys::job_spec(&id), json(&record));
        self.persist.put(keys::job_state(&id), json(&state));
        info!(job_id = %id, world, layers = state.layers, "job submitted");
        let loss = LossWatcher::new(self.opts.watcher.clone());
        let mut job = Job::new(
            id.clone(),
            record,
            spec,
            model0,
            state,
            loss,
            self.opts.checkpoint_retry_max,
        );
        job.track(&self.opts);
        self.job = Some(job);
        self.try_start_epoch().await?;
        self.update_gauges();
        self.bump();
        Ok(pb::SubmitJobResponse {
            job_id: id.0,
            status: Some(self.status(None)?),
        })
    }

    pub(crate) fn job_for(&self, job_id: Option<&str>) -> Result<&Job> {
        let job = self.job.as_ref().ok_or_else(no_job)?;
        match job_id {
            Some(id) if !id.is_empty() && id != job.id.0 => Err(Error::NotFound(format!(
                "job '{id}' is not known to this coordinator; it runs job '{}'",
                job.id
            ))),
            _ => Ok(job),
        }
    }

    fn job_mut_for(&mut self, job_id: Option<&str>) -> Result<&mut Job> {
        self.job_for(job_id)?;
        Ok(self.job.as_mut().expect("a job"))
    }

    pub async fn pause(&mut self, job_id: Option<&str>) -> Result<u64> {
        let job = self.job_mut_for(job_id)?;
        match job.state.phase {
            Phase::Training => {}
            Phase::Paused => {
                return Err(Error::FailedPrecondition(
                    "the job is already paused; `coordctl resume` continues it".into(),
                ))
            }
            Phase::Growing(p) => {
                return Err(Error::FailedPrecondition(format!(
                    "a growth is in flight (phase {}); wait until it finishes (`coordctl watch`) and pause then",
                    p.label()
                )))
            }
            p => {
                return Err(Error::FailedPrecondition(format!(
                    "the job is not training (phase {p:?}); nothing to pause"
                )))
            }
        }
        job.state.paused = true;
        job::transition(
            &mut job.state,
            Phase::Paused,
            "paused by the operator; `coordctl resume` continues",
        );
        self.persist_state().await?;
        let id = self.send_all(Step(0), pb::command::Kind::Pause(pb::Pause {}));
        self.update_gauges();
        self.bump();
        Ok(id.0)
    }

    pub async fn resume(&mut self, job_id: Option<&str>) -> Result<u64> {
        let job = self.job_mut_for(job_id)?;
        if job.state.phase != Phase::Paused {
            return Err(Error::FailedPrecondition(format!(
                "the job is not paused (phase {:?}); nothing to resume",
                job.state.phase
            )));
        }
        job.state.paused = false;
        job::transition(&mut job.state, Phase::Training, "training");
        self.persist_state().await?;
        let id = self.send_all(Step(0), pb::command::Kind::Resume(pb::Resume {}));
        self.update_gauges();
        self.bump();
        Ok(id.0)
    }

    pub async fn save_checkpoint(&mut self, job_id: Option<&str>) -> Result<u64> {
        let job = self.job_mut_for(job_id)?;
        if !matches!(job.state.phase, Phase::Training | Phase::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot checkpoint in phase {:?}; wait until the job is training",
                job.state.phase
            )));
        }
        if job.active.is_some() {
            return Err(Error::FailedPrecondition(
                "a checkpoint or growth is already in flight; wait for it (`coordctl checkpoint list`)".into(),
            ));
        }
        Ok(self.start_checkpoint(Reason::Manual, Step(0), false).0)
    }

    /// Validate and start a growth transaction.
    pub async fn grow(
        &mut self,
        job_id: Option<&str>,
        req: GrowRequest,
    ) -> Result<pb::GrowResponse> {
        self.job_for(job_id)?;
        self.begin_growth(req, None).await
    }

    pub fn plan(&self, params: f64, tokens: f64, factor: u32) -> Result<pb::PlanResponse> {
        if !(params.is_finite() && params > 0.0 && tokens.is_finite() && tokens > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "params ({params}) and tokens ({tokens}) must be positive numbers, e.g. --params 7e9 --tokens 2e12"
            )));
        }
        let factor = if factor == 0 {
            trellis_core::growth::RECOMMENDED_FACTOR
        } else {
            factor as usize
        };
        trellis_core::growth::check_factor(factor)?;
        let g = trellis_core::guideline::guideline(params, tokens, factor);
        Ok(pb::PlanResponse {
            params: g.params,
            budget_tokens: g.budget_tokens,
            flops: g.flops,
            formula_tokens: g.formula_tokens,
            in_range: g.in_range,
            recommended_tokens: g.recommended_tokens,
            rule: g.rule,
            factor: g.factor as u32,
        })
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        let (mut active, mut idle, mut lost) = (0, 0, 0);
        for e in self.workers.values().filter(|e| !e.exited) {
            if e.lost {
                lost += 1;
            } else if e.rank.is_some() {
                active += 1;
            } else {
                idle += 1;
            }
        }
        m.workers.get_or_create(&[("state", "active")]).set(active);
        m.workers.get_or_create(&[("state", "idle")]).set(idle);
        m.workers.get_or_create(&[("state", "lost")]).set(lost);
        m.slow_ranks.set(
            self.slowness()
                .iter()
                .filter(|(_, x)| *x > views::SLOW)
                .count() as i64,
        );
        if let Some(job) = &self.job {
            m.model_layers.set(job.state.layers as i64);
            m.model_parameters.set(job.state.parameters as i64);
            m.generation.set(job.state.generation.0 as i64);
            m.epoch.set(job.state.epoch.0 as i64);
            let cur = views::phase_label(job.state.phase);
            for p in [
                "pending",
                "waiting_for_workers",
                "training",
                "paused",
                "growing",
                "rolling_back",
                "done",
                "failed",
            ] {
                m.job_phase
                    .get_or_create(&[("phase", p)])
                    .set((p == cur) as i64);
            }
        }
    }

    /// The number of messages rejected by fencing so far.
    pub fn fenced(&self) -> u64 {
        self.fenced
    }
}

fn reject(reason: &str) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage {
        kind: Some(pb::coordinator_message::Kind::Reject(pb::Reject {
            reason: reason.into(),
        })),
    }
}
