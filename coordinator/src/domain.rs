//! The coordinator's driver: the one place that feeds events to the transactions of
//! [`crate::txn`] and carries out their effects — persist, then send — over a [`StateStore`].
//!
//! Worker sessions are outboxes (channels); the gRPC layer ([`crate::service`]) converts wire
//! messages at the edge ([`crate::wire`]) and forwards them here. Status views live in
//! [`crate::views`], admission and layout planning in [`crate::plan`].
use crate::error::{Error, Result};
use crate::loss::{AnomalyKind, LossWatcher, WatcherConfig};
use crate::metrics::Metrics;
use crate::plan::{growth_layout, init_checkpoint, model_config, submitted_layout};
use crate::state::*;
use crate::txn::checkpoint::{self, CheckpointTxn, Committed, Reason, ShardAck};
use crate::txn::growth::{self, GrowthTxn, WorkerPhase};
use crate::txn::job::{self, Due, Verdict};
use crate::txn::{CommandIds, Txn};
use crate::views;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, info_span, warn, Span};
use trellis_core::checkpoint::ShardReport;
use trellis_core::config::ModelConfig;
use trellis_core::growth::{GrowthSpec, Operator};
use trellis_core::ids::{CommandId, Epoch, Generation, JobId, Rank, Step, WorkerId};
use trellis_core::job::JobSpec;
use trellis_proto::convert::operator_to_pb;
use trellis_proto::v1 as pb;
use trellis_store::{keys, StateStore};

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
        }
    }
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
    tx: Option<Outbox>,
    pub(crate) last_seen: Instant,
    pub(crate) lost: bool,
    /// The session ended after the job was done or failed (the worker exited on Stop).
    pub(crate) exited: bool,
    pub(crate) rank: Option<Rank>,
    pub(crate) last_step: u64,
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
    ids: CommandIds,
    active: Option<Active>,
    pub(crate) loss: LossWatcher,
    rate: Option<(Instant, u64)>,
    pub(crate) tokens_per_second: f64,
    pub(crate) mfu: f64,
    persisted_at: Instant,
    /// The first loss-history chunk not yet written complete to the store.
    loss_flushed: u64,
    last_commit: Option<Instant>,
    /// The loss watcher reported a plateau since the last trigger check.
    plateau_seen: bool,
}

impl Job {
    fn new(
        id: JobId,
        record: JobRecord,
        spec: JobSpec,
        model0: ModelConfig,
        state: JobState,
        loss: LossWatcher,
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
            ids: CommandIds::default(),
            active: None,
            loss,
            rate: None,
            tokens_per_second: 0.0,
            mfu: 0.0,
            persisted_at: Instant::now(),
            loss_flushed: 0,
            last_commit: None,
            plateau_seen: false,
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
    fn growth_record(&mut self, gen: Generation) -> &mut GrowthRecordState {
        self.growths
            .get_mut(&gen)
            .expect("a growth in flight has a record")
    }
}

pub struct Domain {
    store: Arc<dyn StateStore>,
    opts: DomainOptions,
    metrics: Arc<Metrics>,
    pub(crate) job: Option<Job>,
    pub(crate) workers: BTreeMap<WorkerId, WorkerEntry>,
    next_seq: u64,
    pub(crate) fenced: u64,
    changed: watch::Sender<u64>,
    token_nonce: u64,
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
            store,
            opts,
            metrics,
            job: None,
            workers: BTreeMap::new(),
            next_seq: 0,
            fenced: 0,
            changed,
            token_nonce: 0,
        };
        d.recover().await?;
        Ok(d)
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

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    // ---------------------------------------------------------------- persistence

    async fn persist_state(&mut self) -> Result<()> {
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        self.store
            .put(&keys::job_state(&job.id), json(&job.state))
            .await?;
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
            self.store
                .put(
                    &keys::loss(&job.id, Step(k * LOSS_CHUNK_STEPS)),
                    json(&chunk),
                )
                .await?;
        }
        job.loss_flushed = newest;
        Ok(())
    }

    async fn persist_growth(&self, gen: Generation) -> Result<()> {
        let job = self.job.as_ref().ok_or_else(no_job)?;
        if let Some(g) = job.growths.get(&gen) {
            self.store.put(&keys::growth(&job.id, gen), json(g)).await?;
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
        let model0 = model_config(&spec)?;
        info!(job_id = %id, phase = ?state.phase, epoch = %state.epoch, generation = %state.generation, step = %state.step, "recovered job from the store");
        let mut job = Job::new(id, record, spec, model0, state, loss);
        job.checkpoints = checkpoints;
        job.growths = growths;
        job.loss_flushed = loss_flushed;
        self.job = Some(job);
        let phase = self.job.as_mut().expect("a job").state.phase;
        if !matches!(phase, Phase::Done | Phase::Failed) {
            self.restore_point("recovered after a coordinator restart")
                .await?;
            let job = self.job.as_mut().expect("a job");
            let msg = job.state.message.clone();
            job::transition(&mut job.state, Phase::WaitingForWorkers, msg);
            self.persist_state().await?;
        }
        self.update_gauges();
        Ok(())
    }

    /// Reset the job's progress to its restore point and mark every growth beyond it rolled
    /// back (persisted). Does not persist the job state.
    async fn restore_point(&mut self, why: &str) -> Result<()> {
        let job = self.job.as_mut().ok_or_else(no_job)?;
        let gen = job::restore_point(&mut job.state, &job.model0, why);
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

    // ---------------------------------------------------------------- control plane

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
        let model0 = model_config(&spec)?;
        let id = JobId(spec.job.name.clone());
        keys::check_segment("job name", &id.0)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let world = spec.parallel.dp * spec.parallel.tp;
        let init = match &spec.checkpoint.init_from {
            Some(dir) => Some(init_checkpoint(dir, &spec, &model0).await?),
            None => None,
        };
        let cfg = init.as_ref().map_or(model0.clone(), |(_, c)| c.clone());
        let layout = submitted_layout(&spec, &cfg, world, self.opts.device_memory_bytes)?;
        let record = JobRecord {
            job_id: id.0.clone(),
            spec_toml: spec_toml.to_string(),
            base_dir: base.to_string(),
            submitted_at: now_unix(),
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
            skip: Vec::new(),
            next_growth_stage: 0,
            rollbacks: 0,
            anomalies: 0,
            paused: false,
            growth_failures: 0,
            stalled_rollbacks: 0,
            failed_growths: Vec::new(),
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
        self.store.put(&keys::job_spec(&id), json(&record)).await?;
        self.store.put(&keys::job_state(&id), json(&state)).await?;
        info!(job_id = %id, world, layers = state.layers, "job submitted");
        let loss = LossWatcher::new(self.opts.watcher.clone());
        self.job = Some(Job::new(id.clone(), record, spec, model0, state, loss));
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

    async fn begin_growth(
        &mut self,
        req: GrowRequest,
        stage: Option<usize>,
    ) -> Result<pb::GrowResponse> {
        let job = self.job.as_ref().ok_or_else(no_job)?;
        // The request first (INVALID_ARGUMENT: core's plan is the one judge of factor,
        // operator and depth), then whether the job can grow now (FAILED_PRECONDITION).
        let plan = trellis_core::growth::plan(&job.model(), &req.spec)?;
        let (from, to) = (job.state.layers, plan.new.num_hidden_layers);
        if let Some(s) = req.at_step {
            if s < job.state.step {
                return Err(Error::InvalidArgument(format!(
                    "at_step {s} has already passed (the job is at step {}); pick a later step or omit --at-step",
                    job.state.step
                )));
            }
            if s.0 >= job.spec.train.max_steps {
                return Err(Error::InvalidArgument(format!(
                    "at_step {s} is not before the end of the run (max_steps {})",
                    job.spec.train.max_steps
                )));
            }
        }
        match job.state.phase {
            Phase::Training => {}
            Phase::Growing(p) => {
                return Err(Error::FailedPrecondition(format!(
                    "a growth to generation {} is already in flight (phase {}); wait for it to finish (`coordctl watch`)",
                    job.state.generation.0 + 1,
                    p.label()
                )))
            }
            Phase::Paused => {
                return Err(Error::FailedPrecondition(
                    "the job is paused; `coordctl resume` it first, then grow".into(),
                ))
            }
            p => {
                return Err(Error::FailedPrecondition(format!(
                    "the job is not training (phase {p:?}); growth needs all ranks running"
                )))
            }
        }
        if job.active.is_some() {
            return Err(Error::Busy(
                "a checkpoint is being committed; retry in a moment".into(),
            ));
        }
        let layout = growth_layout(
            &job.spec,
            &plan.new,
            job.world(),
            &job.state.layout,
            self.opts.device_memory_bytes,
        )?;
        let job = self.job.as_mut().expect("a job");
        let cur = &job.state.layout;
        let relayout = ((layout.dp, layout.tp) != (cur.dp, cur.tp)).then(|| layout.clone());
        let generation = Generation(job.state.generation.0 + 1);
        let stage_spec = stage.map(|i| job.spec.growth[i].clone());
        let at_step = req.at_step.unwrap_or(Step(0));
        let record = GrowthRecordState {
            generation,
            at_step: at_step.max(job.state.step),
            tokens: job.state.tokens,
            factor: match req.spec.operator {
                Operator::StackingList { .. } => to.div_ceil(from.max(1)),
                _ => req.spec.factor,
            },
            operator: req.spec.operator.clone(),
            optimizer: req.spec.optimizer,
            lr: req.lr.or(stage_spec.as_ref().map(|s| s.lr)).unwrap_or(3e-4),
            min_lr: req
                .min_lr
                .or(stage_spec.as_ref().map(|s| s.min_lr))
                .unwrap_or(3e-5),
            warmup_steps: req
                .warmup_steps
                .or(stage_spec.as_ref().map(|s| s.warmup_steps))
                .unwrap_or(job.spec.train.warmup_steps),
            from_layers: from,
            to_layers: to,
            phase: GrowPhase::Checkpoint,
            times: PhaseTimes::default(),
            error: String::new(),
            stage,
            layout_after: Some(layout.clone()),
            val_loss_after: None,
        };
        // A retry of a rolled-back growth: keep the failed attempt in the history.
        if let Some(old) = job.growths.insert(generation, record.clone()) {
            job.state.failed_growths.push(old);
            let n = job.state.failed_growths.len();
            if n > MAX_FAILED_GROWTHS {
                job.state.failed_growths.drain(..n - MAX_FAILED_GROWTHS);
            }
        }
        job.plateau_seen = false;
        job::transition(
            &mut job.state,
            Phase::Growing(GrowPhase::Checkpoint),
            format!("growing {from} -> {to} layers (generation {generation})"),
        );
        self.persist_growth(generation).await?;
        self.persist_state().await?;
        let job = self.job.as_mut().expect("a job");
        let span = info_span!(
            "grow",
            job_id = %job.id,
            generation = generation.0,
            step = job.state.step.0,
            at_step = record.at_step.0,
            operator = %record.operator.name(),
            factor = record.factor,
            from_layers = from,
            to_layers = to,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        );
        let phase_span = info_span!(parent: &span, "grow.checkpoint", job_id = %job.id, generation = generation.0, step = job.state.step.0);
        info!(parent: &span, job_id = %job.id, generation = generation.0, from, to, operator = %record.operator.name(), at_step = at_step.0, "growth started");
        let ckpt_cmd = job.ids.next();
        let world = job.world();
        let now = Instant::now();
        job.active = Some(Active {
            txn: Txn::Growth(GrowthTxn::new(
                generation, world, relayout, ckpt_cmd, at_step,
            )),
            clock: Clock {
                issued: now,
                started: (at_step <= job.state.step).then_some(now),
                phase_started: now,
                span: span.clone(),
                ckpt_span: Some(span.clone()),
                phase_span: Some(phase_span),
            },
        });
        self.send(
            ckpt_cmd,
            at_step,
            pb::command::Kind::Checkpoint(pb::CheckpointCmd {
                reason: Reason::Growth.label().into(),
                hold: true,
                growth_generation: generation.0,
            }),
            None,
            trellis_telemetry::inject(&span),
        );
        self.update_gauges();
        self.bump();
        Ok(pb::GrowResponse {
            generation: generation.0,
            at_step: record.at_step.0,
            from_layers: from as u32,
            to_layers: to as u32,
            layout: Some(views::layout(&layout)),
        })
    }

    // ---------------------------------------------------------------- commands

    /// Send a lockstep command to every rank of the epoch.
    fn send_all(&mut self, at_step: Step, kind: pb::command::Kind) -> CommandId {
        let id = self.job.as_mut().expect("a job").ids.next();
        let trace_context = trellis_telemetry::inject(&Span::current());
        self.send(id, at_step, kind, None, trace_context);
        id
    }

    /// Send a command to every rank (or `only_rank`); `trace_context` is the W3C context of the
    /// span it belongs to ([`trellis_telemetry::inject`]), the parent of the workers' spans.
    fn send(
        &mut self,
        id: CommandId,
        at_step: Step,
        kind: pb::command::Kind,
        only_rank: Option<Rank>,
        trace_context: HashMap<String, String>,
    ) {
        let Some(job) = self.job.as_ref() else { return };
        let msg = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Command(pb::Command {
                id: id.0,
                epoch: job.state.epoch.0,
                at_step: at_step.0,
                kind: Some(kind),
                trace_context,
            })),
        };
        for (rank, w) in job.ranks.iter().enumerate() {
            if only_rank.is_some_and(|r| r.0 as usize != rank) {
                continue;
            }
            if let Some(tx) = self.workers.get(w).and_then(|e| e.tx.as_ref()) {
                let _ = tx.send(Ok(msg.clone()));
            }
        }
    }

    /// Send a checkpoint's commit to rank 0 with every rank's report.
    fn send_commit(
        &mut self,
        commit: CommandId,
        step: Step,
        reason: Reason,
        reports: &[ShardReport],
        span: &Span,
    ) {
        self.send(
            commit,
            Step(0),
            pb::command::Kind::CommitCheckpoint(pb::CommitCheckpoint {
                step: step.0,
                reason: reason.label().into(),
                reports: reports.iter().map(Into::into).collect(),
            }),
            Some(Rank(0)),
            trellis_telemetry::inject(span),
        );
    }

    /// Start a (non-growth) checkpoint transaction. Its `checkpoint` span is a child of the
    /// current span (e.g. the SaveCheckpoint request, or the growth a post-growth checkpoint
    /// belongs to).
    fn start_checkpoint(&mut self, reason: Reason, at_step: Step, hold: bool) -> CommandId {
        let job = self.job.as_mut().expect("a job");
        let id = job.ids.next();
        let now = Instant::now();
        let span = info_span!("checkpoint", job_id = %job.id, generation = job.state.generation.0, step = job.state.step.0, reason = reason.label(), at_step = at_step.0);
        let trace_context = trellis_telemetry::inject(&span);
        let world = job.world();
        job.active = Some(Active {
            txn: Txn::Checkpoint(CheckpointTxn::new(id, reason, at_step, world)),
            clock: Clock {
                issued: now,
                started: (at_step <= job.state.step).then_some(now),
                phase_started: now,
                span,
                ckpt_span: None,
                phase_span: None,
            },
        });
        info!(job_id = %job.id, step = %job.state.step, generation = %job.state.generation, reason = reason.label(), at_step = %at_step, "checkpoint requested");
        self.send(
            id,
            at_step,
            pb::command::Kind::Checkpoint(pb::CheckpointCmd {
                reason: reason.label().into(),
                hold,
                growth_generation: 0,
            }),
            None,
            trace_context,
        );
        id
    }

    // ---------------------------------------------------------------- membership

    /// A worker opened a session. Returns the session number the caller passes back with every
    /// message of this session.
    pub async fn hello(&mut self, hello: pb::Hello, tx: Outbox) -> Result<u64> {
        if hello.worker_id.is_empty() {
            return Err(Error::InvalidArgument(
                "Hello.worker_id must not be empty".into(),
            ));
        }
        let id = WorkerId(hello.worker_id.clone());
        self.next_seq += 1;
        let session = self.next_seq;
        let had_rank = self.workers.get(&id).and_then(|e| e.rank).is_some();
        if let Some(old) = self.workers.get(&id) {
            if let Some(otx) = &old.tx {
                let _ = otx.send(Ok(reject(
                    "superseded by a newer session of the same worker id",
                )));
            }
        }
        info!(worker_id = %id, host = %hello.host, pid = hello.pid, ring = %hello.ring_address, "worker registered");
        self.workers.insert(
            id.clone(),
            WorkerEntry {
                seq: session,
                session,
                host: hello.host,
                pid: hello.pid,
                device: hello.device,
                ring_address: hello.ring_address,
                tp_ring_address: hello.tp_ring_address,
                tx: Some(tx),
                last_seen: Instant::now(),
                lost: false,
                exited: false,
                rank: None,
                last_step: 0,
            },
        );
        if had_rank {
            self.rank_lost(&id, "a rank's worker reconnected with a new session")
                .await?;
        } else {
            self.try_start_epoch().await?;
        }
        self.update_gauges();
        self.bump();
        Ok(session)
    }

    /// The session's stream ended.
    pub async fn disconnected(&mut self, worker: &WorkerId, session: u64) -> Result<()> {
        let Some(e) = self.workers.get_mut(worker) else {
            return Ok(());
        };
        if e.session != session {
            return Ok(());
        }
        e.tx = None;
        let ended = self
            .job
            .as_ref()
            .is_some_and(|j| matches!(j.state.phase, Phase::Done | Phase::Failed));
        if ended {
            // It exited on Stop (or after the job failed): not a lost worker.
            e.exited = true;
            e.rank = None;
            info!(worker_id = %worker, "worker exited after the job ended");
            self.update_gauges();
            self.bump();
            return Ok(());
        }
        e.lost = true;
        let had = e.rank.take().is_some();
        warn!(worker_id = %worker, "worker session ended");
        if had {
            self.rank_lost(worker, "a worker's session ended").await?;
        }
        self.update_gauges();
        self.bump();
        Ok(())
    }

    /// Periodic: heartbeat TTL, gauges.
    pub async fn tick(&mut self) -> Result<()> {
        let now = Instant::now();
        let ttl = self.opts.heartbeat_ttl;
        let mut expired = Vec::new();
        for (id, e) in self.workers.iter_mut() {
            if !e.lost && !e.exited && now.duration_since(e.last_seen) > ttl {
                e.lost = true;
                if let Some(tx) = e.tx.take() {
                    let _ = tx.send(Err(tonic::Status::unavailable(format!(
                        "no heartbeat for {:.1} s (TTL {:.1} s); reconnect",
                        now.duration_since(e.last_seen).as_secs_f64(),
                        ttl.as_secs_f64()
                    ))));
                }
                if e.rank.take().is_some() {
                    expired.push(id.clone());
                }
            }
        }
        // Forget workers lost long ago.
        self.workers
            .retain(|_, e| !((e.lost || e.exited) && now.duration_since(e.last_seen) > ttl * 30));
        for id in expired {
            warn!(worker_id = %id, "worker heartbeat expired");
            self.rank_lost(&id, "a worker's heartbeat expired").await?;
        }
        if let Some(job) = &self.job {
            if let Some(t) = job.last_commit {
                self.metrics
                    .checkpoint_age_seconds
                    .set(now.duration_since(t).as_secs_f64());
            }
            if job.state.phase.is_running()
                && now.duration_since(job.persisted_at) > Duration::from_secs(2)
            {
                self.persist_state().await?;
            }
        }
        if self
            .job
            .as_ref()
            .is_some_and(|j| j.state.phase == Phase::RollingBack)
        {
            self.try_start_epoch().await?;
        }
        self.update_gauges();
        Ok(())
    }

    async fn rank_lost(&mut self, worker: &WorkerId, why: &str) -> Result<()> {
        let Some(job) = self.job.as_ref() else {
            return Ok(());
        };
        if !job.state.phase.is_running() || !job.ranks.contains(worker) {
            return Ok(());
        }
        self.rollback(&format!("{why} ({worker})"), None).await
    }

    /// Roll the job back to its last committed checkpoint: the transaction in flight is
    /// aborted, and a new epoch restores every rank (or the job fails, see
    /// [`job::count_rollback`]).
    pub async fn rollback(&mut self, why: &str, skip: Option<(u64, u64)>) -> Result<()> {
        let job = self.job.as_mut().ok_or_else(no_job)?;
        if matches!(job.state.phase, Phase::Done | Phase::Failed) {
            return Ok(());
        }
        warn!(job_id = %job.id, epoch = %job.state.epoch, generation = %job.state.generation, step = %job.state.step, reason = why, "rolling back");
        self.metrics.rollbacks_total.inc();
        let failed_growth = match job.active.take() {
            Some(Active {
                txn: Txn::Growth(g),
                clock,
            }) => {
                // The growth's trace ends failed, with the reason as an event.
                clock.span.record("otel.status_code", "error");
                clock.span.record("otel.status_message", why);
                warn!(parent: &clock.span, job_id = %job.id, generation = %g.generation, reason = why, "growth rolled back");
                job.growth_record(g.generation).error = why.to_string();
                Some(g.generation)
            }
            _ => None,
        };
        let verdict = job::count_rollback(&mut job.state, why, skip, failed_growth.is_some());
        for w in job.ranks.drain(..) {
            if let Some(e) = self.workers.get_mut(&w) {
                e.rank = None;
            }
        }
        self.restore_point(why).await?;
        let job = self.job.as_mut().expect("a job");
        job.loss.reset_smoothing();
        job.plateau_seen = false;
        job.rate = None;
        match verdict {
            Verdict::Fail(message) => {
                job::transition(&mut job.state, Phase::Failed, message);
                error!(job_id = %job.id, "{}", job.state.message);
                self.persist_state().await?;
                self.stop_all("the job failed");
            }
            Verdict::Restart => {
                let msg = job.state.message.clone();
                job::transition(&mut job.state, Phase::RollingBack, msg);
                self.persist_state().await?;
                // The group is re-formed at the next membership tick, not now: a rank's
                // collective error usually means a peer died, and that peer's session end (or
                // missed heartbeat) must be seen first, or the new epoch would include the dead
                // worker.
                self.update_gauges();
                self.bump();
            }
        }
        Ok(())
    }

    fn stop_all(&mut self, reason: &str) {
        let Some(job) = self.job.as_mut() else { return };
        let msg = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Command(pb::Command {
                id: job.ids.next().0,
                epoch: job.state.epoch.0,
                at_step: 0,
                kind: Some(pb::command::Kind::Stop(pb::Stop {
                    reason: reason.into(),
                })),
                trace_context: Default::default(),
            })),
        };
        for e in self.workers.values() {
            if let Some(tx) = &e.tx {
                let _ = tx.send(Ok(msg.clone()));
            }
        }
    }

    fn fresh_token(&mut self) -> String {
        self.token_nonce += 1;
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // A u64 in decimal (the ring's group token); unique per epoch and coordinator process.
        let mixed = (t as u64)
            ^ ((std::process::id() as u64) << 32)
            ^ self.token_nonce.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        mixed.to_string()
    }

    /// If the job needs ranks and enough workers are idle, start a new epoch. A growth
    /// re-forming the groups at a new layout keeps its transaction and phase.
    async fn try_start_epoch(&mut self) -> Result<()> {
        let Some(job) = self.job.as_ref() else {
            return Ok(());
        };
        let relayout = job
            .growing()
            .and_then(|g| g.relayout_in_progress())
            .cloned();
        if relayout.is_none()
            && !matches!(
                job.state.phase,
                Phase::Pending | Phase::WaitingForWorkers | Phase::RollingBack
            )
        {
            return Ok(());
        }
        let world = job.world();
        let mut idle: Vec<(u64, WorkerId)> = self
            .workers
            .iter()
            .filter(|(_, e)| !e.lost && e.tx.is_some() && e.rank.is_none())
            .map(|(id, e)| (e.seq, id.clone()))
            .collect();
        // By host, then registration order: ranks are TP-major, so adjacent ranks (one TP
        // group) land on one host where the hosts allow.
        idle.sort_by(|a, b| {
            let host = |id: &WorkerId| self.workers[id].host.clone();
            (host(&a.1), a.0).cmp(&(host(&b.1), b.0))
        });
        if idle.len() < world && relayout.is_some() {
            return self
                .rollback(
                    &format!(
                        "only {} of {world} workers are available to re-form the groups for the grown model",
                        idle.len()
                    ),
                    None,
                )
                .await;
        }
        if idle.len() < world {
            let job = self.job.as_mut().expect("a job");
            let msg = format!(
                "waiting for workers: {} of {world} registered{}",
                idle.len(),
                match &job.state.last_checkpoint {
                    Some(c) => format!("; will restart from checkpoint step {}", c.step),
                    None => String::new(),
                }
            );
            if job.state.phase != Phase::WaitingForWorkers || job.state.message != msg {
                job::transition(&mut job.state, Phase::WaitingForWorkers, msg);
                self.persist_state().await?;
            }
            return Ok(());
        }
        let token = self.fresh_token();
        let opts = self.opts.clone();
        let job = self.job.as_mut().expect("a job");
        job::start_epoch(&mut job.state, relayout.is_some());
        job.ranks = idle.into_iter().take(world).map(|(_, id)| id).collect();
        job.group_token = token;
        job.ids.reset();
        if relayout.is_none() {
            job.active = None;
        }
        self.persist_state().await?;
        let job = self.job.as_ref().unwrap();
        let layout = relayout.as_ref().unwrap_or(&job.state.layout);
        let restore = job
            .state
            .last_checkpoint
            .as_ref()
            .map(|c| c.dir.clone())
            .unwrap_or_default();
        info!(job_id = %job.id, epoch = %job.state.epoch, generation = %job.state.generation, step = %job.state.step, world, restore = %restore, "starting epoch");
        let base = pb::Assignment {
            epoch: job.state.epoch.0,
            generation: job.state.generation.0,
            job_id: job.id.0.clone(),
            spec_toml: job.record.spec_toml.clone(),
            base_dir: job.record.base_dir.clone(),
            rank: 0,
            dp: layout.dp as u32,
            tp: layout.tp as u32,
            peers: job
                .ranks
                .iter()
                .map(|w| self.workers[w].ring_address.clone())
                .collect(),
            tp_peers: job
                .ranks
                .iter()
                .map(|w| self.workers[w].tp_ring_address.clone())
                .collect(),
            hold: relayout.is_some(),
            group_token: job.group_token.clone(),
            restore_from: restore,
            job_root: job.job_root(&opts).display().to_string(),
            skip: job
                .state
                .skip
                .iter()
                .map(|&(from, to)| pb::SkipWindow { from, to })
                .collect(),
            heartbeat_seconds: opts.heartbeat_interval.as_secs_f64(),
            command_base: 0,
        };
        let ranks = job.ranks.clone();
        let paused = job.state.paused;
        for (rank, w) in ranks.iter().enumerate() {
            let e = self.workers.get_mut(w).unwrap();
            e.rank = Some(Rank(rank as u32));
            let a = pb::Assignment {
                rank: rank as u32,
                ..base.clone()
            };
            if let Some(tx) = &e.tx {
                let _ = tx.send(Ok(pb::CoordinatorMessage {
                    kind: Some(pb::coordinator_message::Kind::Assignment(a)),
                }));
            }
        }
        if paused {
            self.send_all(Step(0), pb::command::Kind::Pause(pb::Pause {}));
        }
        self.update_gauges();
        self.bump();
        Ok(())
    }

    // ---------------------------------------------------------------- worker messages

    /// Count a message rejected by fencing.
    fn count_fenced(&mut self, kind: &'static str) {
        self.fenced += 1;
        self.metrics
            .fenced_messages_total
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    /// Common fencing: the session must be the worker's current one and hold a rank of the
    /// current epoch, and the message must carry that epoch and not an older generation.
    /// Returns the rank.
    fn fence(
        &mut self,
        worker: &WorkerId,
        session: u64,
        epoch: Epoch,
        generation: Generation,
        kind: &'static str,
    ) -> Option<Rank> {
        let cur = self
            .job
            .as_ref()
            .map(|j| (j.state.epoch, j.state.generation));
        let rank = match self.workers.get_mut(worker) {
            Some(e) if e.session == session => {
                e.last_seen = Instant::now();
                match cur {
                    Some((ep, gen)) if ep == epoch && generation >= gen => e.rank,
                    _ => None,
                }
            }
            _ => None,
        };
        if rank.is_none() {
            self.count_fenced(kind);
        }
        rank
    }

    pub fn heartbeat(&mut self, worker: &WorkerId, session: u64) {
        if let Some(e) = self.workers.get_mut(worker) {
            if e.session == session {
                e.last_seen = Instant::now();
            }
        }
    }

    pub async fn step_report(
        &mut self,
        worker: &WorkerId,
        session: u64,
        r: pb::StepReport,
    ) -> Result<()> {
        let Some(rank) = self.fence(
            worker,
            session,
            Epoch(r.epoch),
            Generation(r.generation),
            "step",
        ) else {
            return Ok(());
        };
        if let Some(e) = self.workers.get_mut(worker) {
            e.last_step = r.step;
        }
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        // Rank 0 speaks for the group; a duplicate or reordered report never moves the job
        // (and its data cursor) backwards.
        if rank != Rank(0) || Step(r.step) <= job.state.step {
            return Ok(());
        }
        job.state.step = Step(r.step);
        job.state.tokens = r.tokens;
        job.state.data_cursor = r.sample_end;
        let now = Instant::now();
        if let Some((t0, tok0)) = job.rate {
            let dt = now.duration_since(t0).as_secs_f64();
            if dt > 0.0 && r.tokens > tok0 {
                let inst = (r.tokens - tok0) as f64 / dt;
                job.tokens_per_second = if job.tokens_per_second == 0.0 {
                    inst
                } else {
                    0.8 * job.tokens_per_second + 0.2 * inst
                };
            }
        }
        job.rate = Some((now, r.tokens));
        let flops = job.model().train_flops_per_token(job.spec.data.seq_len);
        job.mfu =
            flops * job.tokens_per_second / (job.world() as f64 * self.opts.peak_flops_per_rank);
        let m = &self.metrics;
        m.step.set(r.step as i64);
        m.tokens_total.set(r.tokens as i64);
        m.tokens_per_second.set(job.tokens_per_second);
        m.mfu_ratio.set(job.mfu);
        for (part, secs) in [
            ("total", r.step_seconds),
            ("compute", r.compute_seconds),
            ("comm", r.comm_seconds),
            ("data", r.data_seconds),
        ] {
            m.step_seconds
                .get_or_create(&[("part", part)])
                .observe(secs);
        }
        if r.loss.is_finite() {
            m.train_loss.set(r.loss);
        }
        // The plateau rule of the next growth stage when it is a `trigger = "plateau"` stage.
        let i = job.state.next_growth_stage;
        let (window, threshold) = match job.spec.growth.get(i) {
            Some(g) if job.spec.is_plateau_stage(i) => (
                g.plateau_window.unwrap_or(self.opts.watcher.plateau_window),
                g.plateau_threshold
                    .unwrap_or(self.opts.watcher.plateau_threshold),
            ),
            _ => (
                self.opts.watcher.plateau_window,
                self.opts.watcher.plateau_threshold,
            ),
        };
        job.loss.set_plateau(window, threshold);
        let anomaly = job.loss.observe(r.step, r.tokens, r.generation, r.loss);
        if let Some(ema) = job.loss.ema() {
            m.loss_ema.set(ema);
        }
        // A transaction's writing starts when the barrier step is reached.
        if let Some(a) = &mut job.active {
            let at = match &a.txn {
                Txn::Checkpoint(c) => Some(c.at_step),
                Txn::Growth(g) => g.checkpoint().map(|c| c.at_step),
            };
            if a.clock.started.is_none() && at.is_some_and(|at| Step(r.step) >= at) {
                a.clock.started = Some(now);
            }
        }
        if let Some(a) = anomaly {
            job.state.anomalies += 1;
            m.loss_anomalies_total
                .get_or_create(&[("kind", a.kind.label())])
                .inc();
            match a.kind {
                AnomalyKind::Nan | AnomalyKind::Inf => {
                    warn!(job_id = %job.id, step = r.step, generation = r.generation, loss = r.loss, window = ?(r.sample_start, r.sample_end), "non-finite loss; rolling back and skipping the batch");
                    return self
                        .rollback(
                            &format!("non-finite loss {} at step {}", r.loss, r.step),
                            Some((r.sample_start, r.sample_end)),
                        )
                        .await;
                }
                AnomalyKind::Spike => {
                    info!(job_id = %job.id, step = r.step, loss = r.loss, ema = a.ema, "loss spike")
                }
                AnomalyKind::Plateau => {
                    info!(job_id = %job.id, step = r.step, ema = a.ema, "loss plateau");
                    job.plateau_seen = true;
                }
            }
        }
        if now.duration_since(job.persisted_at) > Duration::from_secs(1) {
            self.persist_state().await?;
        }
        self.check_triggers().await?;
        self.bump();
        Ok(())
    }

    pub fn val_loss(&mut self, worker: &WorkerId, session: u64, v: pb::ValLoss) {
        let Some(rank) = self.fence(
            worker,
            session,
            Epoch(v.epoch),
            Generation(v.generation),
            "val_loss",
        ) else {
            return;
        };
        if rank != Rank(0) {
            return;
        }
        if let Some(job) = self.job.as_mut() {
            // The grown model's loss before it trains (sent right after a growth's resume).
            if let Some(g) = job.growths.get_mut(&Generation(v.generation)) {
                if g.at_step == Step(v.step) && g.val_loss_after.is_none() && v.loss.is_finite() {
                    g.val_loss_after = Some(v.loss);
                }
            }
            let tokens = job.state.tokens;
            job.loss.observe_val(v.step, tokens, v.generation, v.loss);
            if v.loss.is_finite() {
                self.metrics.val_loss.set(v.loss);
            }
        }
    }

    /// Scheduled work: spec growth stages, periodic and final checkpoints.
    async fn check_triggers(&mut self) -> Result<()> {
        let Some(job) = self.job.as_ref() else {
            return Ok(());
        };
        if job.state.phase != Phase::Training || job.active.is_some() {
            return Ok(());
        }
        match job::due(&job.state, &job.spec, job.plateau_seen) {
            None => {}
            Some(Due::FinalCheckpoint { at }) => {
                self.start_checkpoint(Reason::Final, at, false);
            }
            Some(Due::Periodic { at }) => {
                self.start_checkpoint(Reason::Periodic, at, false);
            }
            Some(Due::Growth { stage, at }) => {
                let g = &job.spec.growth[stage];
                if job.spec.is_plateau_stage(stage) {
                    info!(job_id = %job.id, stage, step = %job.state.step, "loss plateau: firing growth stage {stage}");
                }
                let req = GrowRequest {
                    spec: g.spec()?,
                    at_step: Some(at),
                    lr: Some(g.lr),
                    min_lr: Some(g.min_lr),
                    warmup_steps: Some(g.warmup_steps),
                };
                if let Err(e) = self.begin_growth(req, Some(stage)).await {
                    let job = self.job.as_mut().expect("a job");
                    error!(job_id = %job.id, stage, "growth stage refused: {e}; skipping it");
                    job.state.next_growth_stage += 1;
                    let phase = job.state.phase;
                    job::transition(
                        &mut job.state,
                        phase,
                        format!("growth stage {stage} skipped: {e}"),
                    );
                    self.persist_state().await?;
                }
            }
        }
        Ok(())
    }

    pub async fn ack(&mut self, worker: &WorkerId, session: u64, ack: Ack) -> Result<()> {
        let Some(rank) = self.fence(worker, session, ack.epoch, ack.generation, "ack") else {
            return Ok(());
        };
        let running = self
            .job
            .as_ref()
            .is_some_and(|j| j.state.phase.is_running());
        let kind = match ack.result {
            Err(error) if running => {
                let why = format!(
                    "rank {rank} failed {} (command {}): {error}",
                    ack.phase, ack.cmd
                );
                return self.rollback(&why, None).await;
            }
            Err(_) => return Ok(()),
            Ok(k) => k,
        };
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        let cmd = ack.cmd;
        let ckpt_event = |k: AckKind| match k {
            AckKind::Written(a) => Some(checkpoint::Event::Written { cmd, rank, ack: a }),
            AckKind::Finalized { dir } => Some(checkpoint::Event::Finalized { cmd, dir }),
            _ => None,
        };
        match job.active.as_mut().map(|a| &mut a.txn) {
            Some(Txn::Checkpoint(c)) => {
                if let Some(ev) = ckpt_event(kind) {
                    let eff = c.on(ev, &mut job.ids);
                    self.on_checkpoint(eff).await?;
                }
            }
            Some(Txn::Growth(g)) => {
                let ev = match kind {
                    AckKind::Assigned => Some(growth::Event::RankReady(rank)),
                    AckKind::Phase(phase) => Some(growth::Event::Phase { cmd, phase, rank }),
                    k => ckpt_event(k).map(growth::Event::Checkpoint),
                };
                if let Some(ev) = ev {
                    let effects = g.on(ev, &mut job.ids);
                    for e in effects {
                        // An effect may end the transaction (a rollback): stop there.
                        if self.job.as_ref().and_then(|j| j.growing()).is_none() {
                            break;
                        }
                        self.on_growth(e).await?;
                    }
                }
            }
            None => {}
        }
        self.update_gauges();
        self.bump();
        Ok(())
    }

    /// Carry out an effect of a (non-growth) checkpoint transaction.
    async fn on_checkpoint(&mut self, eff: checkpoint::Effect) -> Result<()> {
        match eff {
            checkpoint::Effect::Wait | checkpoint::Effect::Stale => Ok(()),
            checkpoint::Effect::Abort(why) => self.rollback(&why, None).await,
            checkpoint::Effect::SendCommit {
                commit,
                step,
                reports,
            } => {
                let a = self
                    .job
                    .as_mut()
                    .expect("a job")
                    .active
                    .as_ref()
                    .expect("active");
                let (reason, span) = match &a.txn {
                    Txn::Checkpoint(c) => (c.reason, a.clock.span.clone()),
                    Txn::Growth(_) => unreachable!("a checkpoint effect"),
                };
                self.send_commit(commit, step, reason, &reports, &span);
                Ok(())
            }
            checkpoint::Effect::Record(c) => {
                let active = self
                    .job
                    .as_mut()
                    .expect("a job")
                    .active
                    .take()
                    .expect("active");
                self.record_checkpoint(&c, &active.clock).await?;
                self.check_triggers().await
            }
        }
    }

    /// Carry out an effect of the growth transaction.
    async fn on_growth(&mut self, eff: growth::Effect) -> Result<()> {
        let job = self.job.as_mut().expect("a job");
        let a = job.active.as_mut().expect("a growth in flight");
        let gen = match &a.txn {
            Txn::Growth(g) => g.generation,
            Txn::Checkpoint(_) => unreachable!("a growth effect"),
        };
        let step = job.state.step;
        let span = a.clock.span.clone();
        match eff {
            growth::Effect::Abort(why) => return self.rollback(&why, None).await,
            growth::Effect::SendCommit {
                commit,
                step,
                reports,
            } => {
                let ckpt_span = a.clock.ckpt_span.clone().unwrap_or(span);
                self.send_commit(commit, step, Reason::Growth, &reports, &ckpt_span);
            }
            growth::Effect::CheckpointCommitted(c) => {
                let secs = a
                    .clock
                    .started
                    .unwrap_or(a.clock.issued)
                    .elapsed()
                    .as_secs_f64();
                let relayout = matches!(&a.txn, Txn::Growth(g) if g.relayout.is_some());
                a.clock.phase_started = Instant::now();
                let clock = Clock {
                    issued: a.clock.issued,
                    started: a.clock.started,
                    phase_started: a.clock.phase_started,
                    span: span.clone(),
                    ckpt_span: None,
                    phase_span: None,
                };
                self.record_checkpoint(&c, &clock).await?;
                let job = self.job.as_mut().expect("a job");
                let rec = job.growth_record(gen);
                rec.times.checkpoint = secs;
                rec.at_step = c.step;
                rec.phase = if relayout {
                    GrowPhase::Reshard
                } else {
                    GrowPhase::Stack
                };
                let phase = rec.phase;
                let msg = job.state.message.clone();
                job::transition(&mut job.state, Phase::Growing(phase), msg);
                self.persist_growth(gen).await?;
                self.persist_state().await?;
                self.observe_phase("checkpoint", secs);
            }
            growth::Effect::StartRelayout(layout) => {
                info!(job_id = %job.id, generation = %gen, from_dp = job.state.layout.dp, from_tp = job.state.layout.tp,
                      dp = layout.dp, tp = layout.tp, "growth re-forms the groups: {}", layout.explanation);
                a.clock.phase_span = Some(
                    info_span!(parent: &span, "grow.reshard", job_id = %job.id, generation = gen.0, step = step.0),
                );
                for w in job.ranks.drain(..) {
                    if let Some(e) = self.workers.get_mut(&w) {
                        e.rank = None;
                    }
                }
                return self.try_start_epoch().await;
            }
            growth::Effect::RelayoutDone => {
                let secs = a.clock.phase_started.elapsed().as_secs_f64();
                job.growth_record(gen).times.reshard = secs;
                info!(job_id = %job.id, generation = %gen, seconds = secs, "growth reshard done: every rank holds its slices at the new layout");
            }
            growth::Effect::SendGrow { cmd } => {
                a.clock.phase_started = Instant::now();
                a.clock.phase_span = Some(
                    info_span!(parent: &span, "grow.stack", job_id = %job.id, generation = gen.0, step = step.0),
                );
                let layout = match &a.txn {
                    Txn::Growth(g) => g.relayout.clone().unwrap_or(job.state.layout.clone()),
                    Txn::Checkpoint(_) => unreachable!(),
                };
                let rec = job.growth_record(gen);
                rec.phase = GrowPhase::Stack;
                let (operator, stacking_list, mask_ramp_steps) = operator_to_pb(&rec.operator);
                let grow = pb::GrowCmd {
                    generation: gen.0,
                    factor: rec.factor as u32,
                    operator: operator as i32,
                    stacking_list,
                    optimizer: pb::OptimizerPolicy::from(rec.optimizer) as i32,
                    mask_ramp_steps,
                    lr: rec.lr,
                    min_lr: rec.min_lr,
                    warmup_steps: rec.warmup_steps,
                    dp: layout.dp as u32,
                    tp: layout.tp as u32,
                };
                let msg = job.state.message.clone();
                job::transition(&mut job.state, Phase::Growing(GrowPhase::Stack), msg);
                self.persist_growth(gen).await?;
                self.persist_state().await?;
                self.send(
                    cmd,
                    Step(0),
                    pb::command::Kind::Grow(grow),
                    None,
                    trellis_telemetry::inject(&span),
                );
            }
            growth::Effect::PhaseDone(phase) => {
                let secs = a.clock.phase_started.elapsed().as_secs_f64();
                a.clock.phase_started = Instant::now();
                let next = match phase {
                    WorkerPhase::Stack => Some(GrowPhase::Reshard),
                    WorkerPhase::Reshard => Some(GrowPhase::Resume),
                    WorkerPhase::Resume => None,
                };
                a.clock.phase_span = next.map(|n| match n {
                    GrowPhase::Reshard => info_span!(parent: &span, "grow.reshard", job_id = %job.id, generation = gen.0, step = step.0),
                    _ => info_span!(parent: &span, "grow.resume", job_id = %job.id, generation = gen.0, step = step.0),
                });
                let rec = job.growth_record(gen);
                let label = match phase {
                    WorkerPhase::Stack => {
                        rec.times.stack = secs;
                        "stack"
                    }
                    WorkerPhase::Reshard => {
                        // After a re-layout the worker's own reshard phase is a no-op: add it.
                        rec.times.reshard += secs;
                        "reshard"
                    }
                    WorkerPhase::Resume => {
                        rec.times.resume = secs;
                        "resume"
                    }
                };
                if let Some(n) = next {
                    rec.phase = n;
                    let msg = job.state.message.clone();
                    job::transition(&mut job.state, Phase::Growing(n), msg);
                    self.persist_growth(gen).await?;
                    self.persist_state().await?;
                }
                self.observe_phase(label, secs);
            }
            growth::Effect::Resumed => {
                let total = a.clock.issued.elapsed().as_secs_f64();
                let rec = job.growth_record(gen);
                rec.times.total = total;
                rec.phase = GrowPhase::Committing;
                let rec = rec.clone();
                job::grown(&mut job.state, &rec, &job.model0);
                info!(job_id = %job.id, generation = %gen, step = %step, layers = rec.to_layers, seconds = total, "growth resumed");
                job.active = None;
                job.loss.reset_smoothing();
                self.persist_growth(gen).await?;
                self.persist_state().await?;
                // The post-growth checkpoint is part of the growth's trace; `grow` ends after it
                // is requested (when the last handle, `span`, drops).
                span.in_scope(|| self.start_checkpoint(Reason::PostGrowth, Step(0), false));
            }
        }
        Ok(())
    }

    fn observe_phase(&self, label: &'static str, secs: f64) {
        self.metrics
            .growth_phase_seconds
            .get_or_create(&[("phase", label)])
            .observe(secs);
        self.metrics
            .growth_last_phase_seconds
            .get_or_create(&[("phase", label)])
            .set(secs);
    }

    /// Record a committed checkpoint (rank 0's commit ack is in): it becomes the restore point.
    async fn record_checkpoint(&mut self, c: &Committed, clock: &Clock) -> Result<()> {
        let job = self.job.as_mut().expect("a job");
        let rec = CheckpointRecord {
            step: c.step,
            tokens: c.tokens,
            generation: job.state.generation,
            layers: job.state.layers,
            data_cursor: c.data_cursor,
            dir: c.dir.clone(),
            reason: c.reason,
            committed_at: now_unix(),
            next_growth_stage: job.state.next_growth_stage,
            layout: Some(job.state.layout.clone()),
        };
        self.store
            .put(&keys::checkpoint(&job.id, rec.step), json(&rec))
            .await?;
        let job = self.job.as_mut().expect("a job");
        job.checkpoints.retain(|x| x.step != rec.step);
        job.checkpoints.push(rec.clone());
        job.checkpoints.sort_by_key(|c| c.step);
        job::committed(&mut job.state, &rec);
        // Mirror the workers' garbage collection (`checkpoint.keep`, newest first): the
        // catalogue lists only checkpoints that still exist.
        let keep = job.spec.checkpoint.keep.max(1);
        let cut = job.checkpoints.len().saturating_sub(keep);
        let pruned: Vec<CheckpointRecord> = job.checkpoints.drain(..cut).collect();
        let id = job.id.clone();
        for p in &pruned {
            self.store.delete(&keys::checkpoint(&id, p.step)).await?;
        }
        let job = self.job.as_mut().expect("a job");
        job.last_commit = Some(Instant::now());
        let secs = clock
            .started
            .unwrap_or(clock.issued)
            .elapsed()
            .as_secs_f64();
        self.metrics.checkpoint_seconds.observe(secs);
        self.metrics.checkpoints_total.inc();
        self.metrics.checkpoint_age_seconds.set(0.0);
        info!(job_id = %job.id, step = %rec.step, generation = %rec.generation, reason = rec.reason.label(), dir = %rec.dir, "checkpoint committed");
        if c.reason == Reason::PostGrowth {
            let gen = rec.generation;
            if let Some(g) = job.growths.get_mut(&gen) {
                if g.phase == GrowPhase::Committing {
                    g.phase = GrowPhase::Done;
                    let msg = format!("training generation {gen} ({} layers)", g.to_layers);
                    let phase = job.state.phase;
                    job::transition(&mut job.state, phase, msg);
                    self.metrics
                        .growths_total
                        .get_or_create(&[("outcome", "done")])
                        .inc();
                    self.persist_growth(gen).await?;
                }
            }
        }
        let job = self.job.as_mut().expect("a job");
        if c.reason == Reason::Final {
            let msg = format!(
                "done: {} steps, {} tokens, {} layers",
                job.state.step, job.state.tokens, job.state.layers
            );
            job::transition(&mut job.state, Phase::Done, msg);
            info!(job_id = %job.id, "{}", job.state.message);
            self.persist_state().await?;
            self.stop_all("the job is done");
        } else {
            self.persist_state().await?;
        }
        Ok(())
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
