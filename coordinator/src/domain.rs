//! The coordinator's domain logic: the job state machine, membership, lockstep commands, the
//! checkpoint commit protocol, the growth transaction, fencing and the loss watcher's actions.
//!
//! Plain Rust over a [`StateStore`]: every state change is persisted before it is acted on
//! (before a command or assignment is sent). Worker sessions are represented by outboxes
//! (channels); the gRPC layer only forwards messages in and out.
use crate::error::{Error, Result};
use crate::loss::{AnomalyKind, LossWatcher, WatcherConfig};
use crate::metrics::Metrics;
use crate::state::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, info_span, warn, Span};
use trellis_core::config::ModelConfig;
use trellis_core::growth::{Operator, OptimizerPolicy, MAX_LAYERS};
use trellis_core::ids::{Generation, JobId, Step, WorkerId};
use trellis_core::job::JobSpec;
use trellis_proto::v1 as pb;
use trellis_store::{keys, StateStore};

/// Steps ahead of a scheduled barrier (growth stage, periodic checkpoint) at which its command is
/// sent, so that it reaches every rank before the ranks get there.
const LOOKAHEAD_STEPS: u64 = 3;
/// A job fails after this many consecutive failed growths.
const MAX_GROWTH_FAILURES: u32 = 3;
/// A job fails after this many consecutive rollbacks to the same checkpoint without progress
/// (a deterministic failure would otherwise roll it back forever).
const MAX_STALLED_ROLLBACKS: u32 = 3;
/// How many steps further than the previous rollback a job must get before a new rollback
/// counts as progress rather than the same failure again.
const STALL_SLACK_STEPS: u64 = 2 * LOOKAHEAD_STEPS;
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

struct WorkerEntry {
    seq: u64,
    session: u64,
    host: String,
    pid: u32,
    device: String,
    ring_address: String,
    tp_ring_address: String,
    tx: Option<Outbox>,
    last_seen: Instant,
    lost: bool,
    /// The session ended after the job was done or failed (the worker exited on Stop).
    exited: bool,
    rank: Option<u32>,
    last_step: u64,
}

struct CkptTxn {
    cmd: u64,
    reason: String,
    at_step: u64,
    issued: Instant,
    started: Option<Instant>,
    reports: BTreeMap<u32, serde_json::Value>,
    step: u64,
    tokens: u64,
    cursor: u64,
    commit_cmd: Option<u64>,
    /// The span its commands carry (`Command.trace_context`): its own `checkpoint` span, or the
    /// `grow` span for a growth's checkpoint.
    span: Span,
}

struct GrowthTxn {
    generation: u64,
    ckpt: CkptTxn,
    cmd: u64,
    acks: BTreeMap<String, BTreeSet<u32>>,
    phase_started: Instant,
    started: Instant,
    span: Span,
    phase_span: Option<Span>,
    /// While the growth re-forms the groups at a new layout (its reshard, before the stack):
    /// when that began, and the ranks whose runner is ready in the new layout.
    relayout: Option<(Instant, BTreeSet<u32>)>,
}

enum Txn {
    Checkpoint(CkptTxn),
    Growth(GrowthTxn),
}

struct Job {
    id: JobId,
    record: JobRecord,
    spec: JobSpec,
    model0: ModelConfig,
    state: JobState,
    checkpoints: Vec<CheckpointRecord>,
    growths: BTreeMap<u64, GrowthRecordState>,
    ranks: Vec<WorkerId>,
    group_token: String,
    next_cmd: u64,
    txn: Option<Txn>,
    loss: LossWatcher,
    rate: Option<(Instant, u64)>,
    tokens_per_second: f64,
    mfu: f64,
    persisted_at: Instant,
    /// The first loss-history chunk not yet written complete to the store.
    loss_flushed: u64,
    last_commit: Option<Instant>,
    /// The loss watcher reported a plateau since the last trigger check.
    plateau_seen: bool,
}

impl Job {
    fn world(&self) -> usize {
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
    fn growing(&self) -> Option<&GrowthTxn> {
        match &self.txn {
            Some(Txn::Growth(g)) => Some(g),
            _ => None,
        }
    }
}

/// A growth request, decoded.
#[derive(Debug, Clone)]
pub struct GrowRequest {
    pub factor: i64,
    pub operator: String,
    pub stacking_list: Vec<usize>,
    pub optimizer: OptimizerPolicy,
    pub at_step: Option<u64>,
    pub mask_ramp_steps: u64,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub warmup_steps: Option<u64>,
}

pub struct Domain {
    store: Arc<dyn StateStore>,
    opts: DomainOptions,
    metrics: Arc<Metrics>,
    job: Option<Job>,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    next_seq: u64,
    fenced: u64,
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

    async fn persist_growth(&self, g: &GrowthRecordState) -> Result<()> {
        let job = self.job.as_ref().ok_or_else(no_job)?;
        self.store
            .put(&keys::growth(&job.id, Generation(g.generation)), json(g))
            .await?;
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
        info!(job_id = %id, phase = ?state.phase, epoch = state.epoch, generation = state.generation, step = state.step, "recovered job from the store");
        self.job = Some(Job {
            id,
            record,
            model0,
            loss,
            loss_flushed,
            spec,
            state,
            checkpoints,
            growths,
            ranks: Vec::new(),
            group_token: String::new(),
            next_cmd: 1,
            txn: None,
            rate: None,
            tokens_per_second: 0.0,
            mfu: 0.0,
            persisted_at: Instant::now(),
            last_commit: None,
            plateau_seen: false,
        });
        let phase = self.job.as_ref().unwrap().state.phase;
        if !matches!(phase, Phase::Done | Phase::Failed) {
            self.restore_point("recovered after a coordinator restart")
                .await?;
            let job = self.job.as_mut().unwrap();
            job.state.phase = Phase::WaitingForWorkers;
            self.persist_state().await?;
        }
        self.update_gauges();
        Ok(())
    }

    /// Reset the job's progress to its last committed checkpoint (or the start), marking every
    /// growth beyond it rolled back. Does not persist.
    async fn restore_point(&mut self, why: &str) -> Result<()> {
        let job = self.job.as_mut().ok_or_else(no_job)?;
        let lc = job.state.last_checkpoint.clone();
        let (gen, step, tokens, cursor, layers, stage) = match &lc {
            Some(c) => (
                c.generation,
                c.step,
                c.tokens,
                c.data_cursor,
                c.layers,
                c.next_growth_stage,
            ),
            None => (0, 0, 0, 0, job.model0.num_hidden_layers, 0),
        };
        job.state.generation = gen;
        job.state.step = step;
        job.state.tokens = tokens;
        job.state.data_cursor = cursor;
        job.state.layers = layers;
        job.state.parameters = job.model0.with_layers(layers).num_parameters();
        job.state.next_growth_stage = stage;
        job.state.message = match &lc {
            Some(c) => format!(
                "{why}; restarting from checkpoint step {} (generation {})",
                c.step, c.generation
            ),
            None => format!("{why}; no committed checkpoint yet, restarting from step 0"),
        };
        let mut rolled = Vec::new();
        for g in job.growths.values_mut() {
            if g.generation > gen && !matches!(g.phase, GrowPhase::Done | GrowPhase::RolledBack) {
                g.phase = GrowPhase::RolledBack;
                if g.error.is_empty() {
                    g.error = why.to_string();
                }
                rolled.push(g.clone());
            }
        }
        for g in rolled {
            self.metrics
                .growths_total
                .get_or_create(&[("outcome", "rolled_back")])
                .inc();
            self.persist_growth(&g).await?;
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
        let layout = self.layout_info(&spec, &cfg, world)?;
        let record = JobRecord {
            job_id: id.0.clone(),
            spec_toml: spec_toml.to_string(),
            base_dir: base.to_string(),
            submitted_at: now_unix(),
        };
        let state = JobState {
            phase: Phase::Pending,
            epoch: 0,
            generation: 0,
            step: 0,
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
        let mut state = state;
        if let Some((c, cfg)) = init {
            info!(job_id = %id, dir = %c.dir, step = c.step, layers = c.layers, "job starts from checkpoint.init_from");
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
        self.job = Some(Job {
            id: id.clone(),
            record,
            spec,
            model0,
            state,
            checkpoints: Vec::new(),
            growths: BTreeMap::new(),
            ranks: Vec::new(),
            group_token: String::new(),
            next_cmd: 1,
            txn: None,
            loss: LossWatcher::new(self.opts.watcher.clone()),
            rate: None,
            tokens_per_second: 0.0,
            mfu: 0.0,
            persisted_at: Instant::now(),
            loss_flushed: 0,
            last_commit: None,
            plateau_seen: false,
        });
        self.try_start_epoch().await?;
        self.update_gauges();
        self.bump();
        Ok(pb::SubmitJobResponse {
            job_id: id.0,
            status: Some(self.status(None)?),
        })
    }

    fn layout_info(&self, spec: &JobSpec, cfg: &ModelConfig, world: usize) -> Result<LayoutInfo> {
        let budget = self.opts.device_memory_bytes.unwrap_or(u64::MAX);
        let per_rank = spec.train.global_batch / spec.parallel.dp.max(1);
        let mb = spec.train.micro_batch.unwrap_or(per_rank);
        let tp = spec.parallel.tp;
        for (what, n) in [
            ("num_attention_heads", cfg.num_attention_heads),
            ("num_key_value_heads", cfg.num_key_value_heads),
            ("intermediate_size", cfg.intermediate_size),
        ] {
            if n % tp != 0 {
                return Err(Error::InvalidArgument(format!(
                    "{what} {n} is not divisible by parallel.tp {tp}; choose a tp that divides it"
                )));
            }
        }
        let est = trellis_core::layout::memory_per_rank(cfg, tp, mb, spec.data.seq_len);
        if est.total > budget {
            return Err(Error::FailedPrecondition(format!(
                "a {}-layer model needs {:.2} GiB per rank at tp={tp} but the device budget is {:.2} GiB \
                 (--device-memory-bytes); raise parallel.tp, lower train.micro_batch, or use a smaller model",
                cfg.num_hidden_layers,
                gib(est.total),
                gib(budget)
            )));
        }
        let explanation = match trellis_core::layout::plan_layout(cfg, world, budget, mb, spec.data.seq_len) {
            Ok(p) if p.tp == tp => p.explanation,
            Ok(p) => format!(
                "spec layout dp={} tp={tp} ({:.2} GiB per rank); the planner would choose dp={} tp={}: {}",
                spec.parallel.dp,
                gib(est.total),
                p.dp,
                p.tp,
                p.explanation
            ),
            Err(e) => format!("spec layout dp={} tp={tp} ({:.2} GiB per rank); planner: {e}", spec.parallel.dp, gib(est.total)),
        };
        Ok(LayoutInfo {
            dp: spec.parallel.dp,
            tp,
            explanation,
            memory_per_rank_bytes: est.total,
            budget_bytes: self.opts.device_memory_bytes.unwrap_or(0),
        })
    }

    /// The layout a grown model (`cfg`) trains at: the current one while it fits the per-rank
    /// budget (no reshard), else the smallest TP of the same world that fits (DP = world / TP,
    /// dividing the global batch). Refuses with the numbers when no layout holds it.
    fn growth_layout(&self, cfg: &ModelConfig) -> Result<LayoutInfo> {
        let job = self.job.as_ref().ok_or_else(no_job)?;
        let spec = &job.spec;
        let world = job.world();
        let cur = &job.state.layout;
        let budget = self.opts.device_memory_bytes.unwrap_or(u64::MAX);
        let seq = spec.data.seq_len;
        let need = |tp: usize| {
            let dp = world / tp;
            let mb = spec
                .train
                .micro_batch
                .unwrap_or(spec.train.global_batch / dp.max(1));
            trellis_core::layout::memory_per_rank(cfg, tp, mb.max(1), seq).total
        };
        // The TP degrees the model allows on this world whose DP divides the global batch.
        let candidates: Vec<usize> = trellis_core::layout::valid_tps(cfg, world)
            .into_iter()
            .filter(|&t| spec.train.global_batch % (world / t) == 0)
            .collect();
        let budget_text = if self.opts.device_memory_bytes.is_some() {
            format!("the {:.2} GiB per-rank budget", gib(budget))
        } else {
            "the unlimited budget (no --device-memory-bytes)".to_string()
        };
        let layers = cfg.num_hidden_layers;
        if candidates.contains(&cur.tp) && need(cur.tp) <= budget {
            return Ok(LayoutInfo {
                dp: cur.dp,
                tp: cur.tp,
                explanation: format!(
                    "TP={} × DP={} kept at growth: the {layers}-layer model needs {:.2} GiB per rank, within {budget_text}",
                    cur.tp,
                    cur.dp,
                    gib(need(cur.tp))
                ),
                memory_per_rank_bytes: need(cur.tp),
                budget_bytes: self.opts.device_memory_bytes.unwrap_or(0),
            });
        }
        if let Some(&tp) = candidates.iter().find(|&&t| need(t) <= budget) {
            return Ok(LayoutInfo {
                dp: world / tp,
                tp,
                explanation: format!(
                    "re-planned at growth to TP={tp} × DP={}: the {layers}-layer model needs {:.2} GiB per rank at TP={}, over {budget_text}; at TP={tp} it needs {:.2} GiB",
                    world / tp,
                    gib(need(cur.tp)),
                    cur.tp,
                    gib(need(tp))
                ),
                memory_per_rank_bytes: need(tp),
                budget_bytes: self.opts.device_memory_bytes.unwrap_or(0),
            });
        }
        let options: Vec<String> = candidates
            .iter()
            .map(|&t| format!("TP={t}: {:.2} GiB", gib(need(t))))
            .collect();
        Err(Error::FailedPrecondition(format!(
            "no layout of the {world} rank(s) holds the grown {layers}-layer model ({:.2}B parameters) within {budget_text}: {}; \
             add workers (TP up to the heads' divisors), use devices with more memory, set train.micro_batch, or grow by a smaller factor",
            cfg.num_parameters() as f64 / 1e9,
            if options.is_empty() { "no TP degree divides the heads, KV heads, FFN width and global batch".to_string() } else { options.join(", ") }
        )))
    }

    fn job_for(&self, job_id: Option<&str>) -> Result<&Job> {
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
        Ok(self.job.as_mut().unwrap())
    }

    pub fn status(&self, job_id: Option<&str>) -> Result<pb::JobStatus> {
        let job = self.job_for(job_id)?;
        let s = &job.state;
        let summary = self.workers_summary(job.world());
        let growth = job
            .growing()
            .and_then(|g| job.growths.get(&g.generation))
            .map(|g| {
                let mut e = growth_event(g);
                if g.phase == GrowPhase::Checkpoint && s.step < g.at_step {
                    e.phase = pb::GrowthPhase::Pending as i32;
                }
                e
            });
        let last = job
            .growths
            .values()
            .rev()
            .find(|g| g.phase == GrowPhase::Done || g.phase == GrowPhase::Committing)
            .map(|g| timings(&g.times));
        Ok(pb::JobStatus {
            job_id: job.id.0.clone(),
            phase: phase_pb(s.phase) as i32,
            generation: s.generation,
            epoch: s.epoch,
            step: s.step,
            max_steps: job.spec.train.max_steps,
            tokens: s.tokens,
            data_cursor: s.data_cursor,
            layers: s.layers as u32,
            parameters: s.parameters,
            layout: Some(pb::Layout {
                dp: s.layout.dp as u32,
                tp: s.layout.tp as u32,
                explanation: s.layout.explanation.clone(),
                memory_per_rank_bytes: s.layout.memory_per_rank_bytes,
                budget_bytes: s.layout.budget_bytes,
            }),
            train_loss: job.loss.last_train(),
            val_loss: job.loss.last_val(),
            tokens_per_second: job.tokens_per_second,
            mfu: job.mfu,
            growth,
            last_growth_timings: last,
            growth_history: {
                let mut all: Vec<&GrowthRecordState> = job
                    .state
                    .failed_growths
                    .iter()
                    .chain(job.growths.values())
                    .collect();
                all.sort_by_key(|g| (g.generation, g.at_step));
                all.into_iter().map(growth_event).collect()
            },
            checkpoints: job.checkpoints.iter().map(ckpt_info).collect(),
            workers: Some(summary),
            message: s.message.clone(),
            loss_anomalies: s.anomalies,
            rollbacks: s.rollbacks,
            next_growth_stage: s.next_growth_stage as u32,
            fenced_messages: self.fenced,
        })
    }

    fn workers_summary(&self, expected: usize) -> pb::WorkersSummary {
        let mut w = pb::WorkersSummary {
            expected: expected as u32,
            ..Default::default()
        };
        for e in self.workers.values() {
            if e.exited {
                w.exited += 1;
            } else if e.lost {
                w.lost += 1;
            } else if e.rank.is_some() {
                w.active += 1;
            } else {
                w.idle += 1;
            }
        }
        w
    }

    pub fn list_workers(&self) -> Vec<pb::WorkerInfo> {
        let now = Instant::now();
        let epoch = self.job.as_ref().map(|j| j.state.epoch).unwrap_or(0);
        let mut v: Vec<(u64, pb::WorkerInfo)> = self
            .workers
            .iter()
            .map(|(id, e)| {
                (
                    e.seq,
                    pb::WorkerInfo {
                        worker_id: id.0.clone(),
                        host: e.host.clone(),
                        pid: e.pid,
                        device: e.device.clone(),
                        state: if e.exited {
                            pb::WorkerState::Exited
                        } else if e.lost {
                            pb::WorkerState::Lost
                        } else if e.rank.is_some() {
                            pb::WorkerState::Active
                        } else {
                            pb::WorkerState::Idle
                        } as i32,
                        rank: e.rank.map(|r| r as i32).unwrap_or(-1),
                        epoch: if e.rank.is_some() { epoch } else { 0 },
                        last_step: e.last_step,
                        last_seen_seconds_ago: now.duration_since(e.last_seen).as_secs_f64(),
                        ring_address: e.ring_address.clone(),
                    },
                )
            })
            .collect();
        v.sort_by_key(|(s, _)| *s);
        v.into_iter().map(|(_, w)| w).collect()
    }

    pub fn checkpoints(&self, job_id: Option<&str>) -> Result<Vec<pb::CheckpointInfo>> {
        Ok(self
            .job_for(job_id)?
            .checkpoints
            .iter()
            .map(ckpt_info)
            .collect())
    }

    pub fn loss(&self, job_id: Option<&str>, max_points: usize) -> Result<pb::GetLossResponse> {
        let job = self.job_for(job_id)?;
        Ok(pb::GetLossResponse {
            points: job
                .loss
                .thinned(max_points)
                .into_iter()
                .map(|p| pb::LossPoint {
                    step: p.step,
                    tokens: p.tokens,
                    train_loss: p.train,
                    val_loss: p.val,
                    generation: p.generation,
                })
                .collect(),
            growth_events: job.growths.values().map(growth_event).collect(),
            anomalies: job
                .loss
                .anomalies
                .iter()
                .map(|a| pb::LossAnomaly {
                    step: a.step,
                    kind: a.kind.label().into(),
                    loss: a.loss,
                    ema: a.ema,
                })
                .collect(),
            ema: job.loss.ema(),
        })
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
        job.state.phase = Phase::Paused;
        job.state.message = "paused by the operator; `coordctl resume` continues".into();
        self.persist_state().await?;
        let id = self.send_all(0, pb::command::Kind::Pause(pb::Pause {}));
        self.update_gauges();
        self.bump();
        Ok(id)
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
        job.state.phase = Phase::Training;
        job.state.message = "training".into();
        self.persist_state().await?;
        let id = self.send_all(0, pb::command::Kind::Resume(pb::Resume {}));
        self.update_gauges();
        self.bump();
        Ok(id)
    }

    pub async fn save_checkpoint(&mut self, job_id: Option<&str>) -> Result<u64> {
        let job = self.job_mut_for(job_id)?;
        if !matches!(job.state.phase, Phase::Training | Phase::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot checkpoint in phase {:?}; wait until the job is training",
                job.state.phase
            )));
        }
        if job.txn.is_some() {
            return Err(Error::FailedPrecondition(
                "a checkpoint or growth is already in flight; wait for it (`coordctl checkpoint list`)".into(),
            ));
        }
        Ok(self.start_checkpoint("manual", 0, false))
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
        if factor < 2 {
            return Err(Error::InvalidArgument(format!(
                "growth factor must be an integer >= 2 (the paper recommends 4); got {factor}"
            )));
        }
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
        let job = self.job.as_mut().ok_or_else(no_job)?;
        // Validate the request first (INVALID_ARGUMENT), then whether the job can grow now
        // (FAILED_PRECONDITION).
        let op_name = if req.operator.is_empty() {
            "stack".to_string()
        } else {
            req.operator.to_ascii_lowercase()
        };
        let operator = if op_name == "stacking_list" {
            if req.stacking_list.is_empty() {
                return Err(Error::InvalidArgument(
                    "operator stacking_list needs a non-empty stacking_list of source layer indices".into(),
                ));
            }
            Operator::StackingList {
                layers: req.stacking_list.clone(),
            }
        } else {
            match Operator::parse(&op_name)? {
                Operator::Random { .. } => Operator::Random {
                    mask_ramp_steps: req.mask_ramp_steps,
                },
                o => o,
            }
        };
        let from = job.state.layers;
        let to = match &operator {
            Operator::StackingList { layers } => {
                if let Some(bad) = layers.iter().find(|&&l| l >= from) {
                    return Err(Error::InvalidArgument(format!(
                        "stacking_list names layer {bad} but the model has {from} layers (0..{})",
                        from - 1
                    )));
                }
                if layers.len() <= from {
                    return Err(Error::InvalidArgument(format!(
                        "stacking_list has {} entries; it must be longer than the current {from} layers",
                        layers.len()
                    )));
                }
                layers.len()
            }
            _ => {
                if req.factor < 2 {
                    return Err(Error::InvalidArgument(format!(
                        "growth factor must be an integer >= 2 (the paper recommends 4); got {}",
                        req.factor
                    )));
                }
                (req.factor as usize).saturating_mul(from)
            }
        };
        if to > MAX_LAYERS {
            return Err(Error::InvalidArgument(format!(
                "growing {from} layers by {} gives {to} layers, more than the limit of {MAX_LAYERS}; check --factor",
                req.factor
            )));
        }
        if let Some(s) = req.at_step {
            if s < job.state.step {
                return Err(Error::InvalidArgument(format!(
                    "at_step {s} has already passed (the job is at step {}); pick a later step or omit --at-step",
                    job.state.step
                )));
            }
            if s >= job.spec.train.max_steps {
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
                    job.state.generation + 1,
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
        if matches!(job.txn, Some(Txn::Checkpoint(_))) {
            return Err(Error::Busy(
                "a checkpoint is being committed; retry in a moment".into(),
            ));
        }
        let new_cfg = job.model0.with_layers(to);
        let spec = job.spec.clone();
        let layout = self.growth_layout(&new_cfg)?;
        let job = self.job.as_mut().unwrap();
        let generation = job.state.generation + 1;
        let stage_spec = stage.map(|i| spec.growth[i].clone());
        let at_step = req.at_step.unwrap_or(0);
        let record = GrowthRecordState {
            generation,
            at_step: at_step.max(job.state.step),
            tokens: job.state.tokens,
            operator: operator.name().to_string(),
            stacking_list: req.stacking_list.clone(),
            factor: if matches!(operator, Operator::StackingList { .. }) {
                to.div_ceil(from.max(1))
            } else {
                req.factor as usize
            },
            optimizer: req.optimizer,
            mask_ramp_steps: req.mask_ramp_steps,
            lr: req.lr.or(stage_spec.as_ref().map(|s| s.lr)).unwrap_or(3e-4),
            min_lr: req
                .min_lr
                .or(stage_spec.as_ref().map(|s| s.min_lr))
                .unwrap_or(3e-5),
            warmup_steps: req
                .warmup_steps
                .or(stage_spec.as_ref().map(|s| s.warmup_steps))
                .unwrap_or(spec.train.warmup_steps),
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
        job.state.phase = Phase::Growing(GrowPhase::Checkpoint);
        job.state.message = format!("growing {from} -> {to} layers (generation {generation})");
        self.persist_growth(&record).await?;
        self.persist_state().await?;
        let job = self.job.as_mut().unwrap();
        let span = info_span!(
            "grow",
            job_id = %job.id,
            generation,
            step = job.state.step,
            at_step = record.at_step,
            operator = %record.operator,
            factor = record.factor,
            from_layers = from,
            to_layers = to,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        );
        let phase_span = info_span!(parent: &span, "grow.checkpoint", job_id = %job.id, generation, step = job.state.step);
        let trace_context = trellis_telemetry::inject(&span);
        info!(parent: &span, job_id = %job.id, generation, from, to, operator = %record.operator, at_step, "growth started");
        let ckpt_cmd = self.next_id();
        let job = self.job.as_mut().unwrap();
        let now = Instant::now();
        job.txn = Some(Txn::Growth(GrowthTxn {
            generation,
            ckpt: CkptTxn {
                cmd: ckpt_cmd,
                reason: "growth".into(),
                at_step,
                issued: now,
                started: (at_step <= job.state.step).then_some(now),
                reports: BTreeMap::new(),
                step: 0,
                tokens: 0,
                cursor: 0,
                commit_cmd: None,
                span: span.clone(),
            },
            cmd: 0,
            acks: BTreeMap::new(),
            phase_started: now,
            started: now,
            span,
            phase_span: Some(phase_span),
            relayout: None,
        }));
        self.send_with_id(
            ckpt_cmd,
            at_step,
            pb::command::Kind::Checkpoint(pb::CheckpointCmd {
                reason: "growth".into(),
                hold: true,
                growth_generation: generation,
            }),
            None,
            trace_context,
        );
        self.update_gauges();
        self.bump();
        Ok(pb::GrowResponse {
            generation,
            at_step: record.at_step,
            from_layers: from as u32,
            to_layers: to as u32,
            layout: Some(pb::Layout {
                dp: layout.dp as u32,
                tp: layout.tp as u32,
                explanation: layout.explanation,
                memory_per_rank_bytes: layout.memory_per_rank_bytes,
                budget_bytes: layout.budget_bytes,
            }),
        })
    }

    // ---------------------------------------------------------------- commands

    fn next_id(&mut self) -> u64 {
        let job = self.job.as_mut().expect("job");
        let id = job.next_cmd;
        job.next_cmd += 1;
        id
    }

    /// Send a lockstep command to every rank of the epoch.
    fn send_all(&mut self, at_step: u64, kind: pb::command::Kind) -> u64 {
        let id = self.next_id();
        let trace_context = trellis_telemetry::inject(&Span::current());
        self.send_with_id(id, at_step, kind, None, trace_context);
        id
    }

    /// Send a command to every rank (or `only_rank`); `trace_context` is the W3C context of the
    /// span it belongs to ([`trellis_telemetry::inject`]), the parent of the workers' spans.
    fn send_with_id(
        &mut self,
        id: u64,
        at_step: u64,
        kind: pb::command::Kind,
        only_rank: Option<u32>,
        trace_context: std::collections::HashMap<String, String>,
    ) {
        let Some(job) = self.job.as_ref() else { return };
        let msg = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Command(pb::Command {
                id,
                epoch: job.state.epoch,
                at_step,
                kind: Some(kind),
                trace_context,
            })),
        };
        for (rank, w) in job.ranks.iter().enumerate() {
            if only_rank.is_some_and(|r| r as usize != rank) {
                continue;
            }
            if let Some(tx) = self.workers.get(w).and_then(|e| e.tx.as_ref()) {
                let _ = tx.send(Ok(msg.clone()));
            }
        }
    }

    /// Start a (non-growth) checkpoint transaction. Its `checkpoint` span is a child of the
    /// current span (e.g. the SaveCheckpoint request, or the growth a post-growth checkpoint
    /// belongs to).
    fn start_checkpoint(&mut self, reason: &str, at_step: u64, hold: bool) -> u64 {
        let id = self.next_id();
        let job = self.job.as_mut().unwrap();
        let now = Instant::now();
        let span = info_span!("checkpoint", job_id = %job.id, generation = job.state.generation, step = job.state.step, reason, at_step);
        let trace_context = trellis_telemetry::inject(&span);
        job.txn = Some(Txn::Checkpoint(CkptTxn {
            cmd: id,
            reason: reason.into(),
            at_step,
            issued: now,
            started: (at_step <= job.state.step).then_some(now),
            reports: BTreeMap::new(),
            step: 0,
            tokens: 0,
            cursor: 0,
            commit_cmd: None,
            span,
        }));
        info!(job_id = %job.id, step = job.state.step, generation = job.state.generation, reason, at_step, "checkpoint requested");
        self.send_with_id(
            id,
            at_step,
            pb::command::Kind::Checkpoint(pb::CheckpointCmd {
                reason: reason.into(),
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

    /// Roll the job back to its last committed checkpoint: new epoch, every rank restores.
    pub async fn rollback(&mut self, why: &str, skip: Option<(u64, u64)>) -> Result<()> {
        let job = self.job.as_mut().ok_or_else(no_job)?;
        if matches!(job.state.phase, Phase::Done | Phase::Failed) {
            return Ok(());
        }
        warn!(job_id = %job.id, epoch = job.state.epoch, generation = job.state.generation, step = job.state.step, reason = why, "rolling back");
        job.state.rollbacks += 1;
        self.metrics.rollbacks_total.inc();
        let failed_growth = match job.txn.take() {
            Some(Txn::Growth(g)) => {
                // The growth's trace ends failed, with the reason as an event.
                g.span.record("otel.status_code", "error");
                g.span.record("otel.status_message", why);
                warn!(parent: &g.span, job_id = %job.id, generation = g.generation, reason = why, "growth rolled back");
                Some(g.generation)
            }
            _ => None,
        };
        if let Some(w) = skip {
            job.state.skip.push(w);
        }
        if let Some(gen) = failed_growth {
            job.state.growth_failures += 1;
            if let Some(g) = job.growths.get_mut(&gen) {
                g.error = why.to_string();
            }
        }
        let failures = job.state.growth_failures;
        // Progress since the last rollback: a commit (which clears the count) or getting clearly
        // further than the last rollback did. Ranks run a few steps past a failing barrier
        // before the failure reaches them, so "clearly" allows STALL_SLACK_STEPS of jitter;
        // otherwise a deterministic failure seen at steps 11, 12, 11, 12… would never count.
        let at = job.state.step;
        let target = job.state.last_checkpoint.as_ref().map_or(0, |c| c.step);
        let stalled = match job.state.last_rollback {
            Some((prev_at, prev_target))
                if job.state.stalled_rollbacks > 0
                    && at <= prev_at + STALL_SLACK_STEPS
                    && target == prev_target =>
            {
                job.state.stalled_rollbacks + 1
            }
            _ => 1,
        };
        job.state.stalled_rollbacks = stalled;
        // Within a stalled series the reference is the furthest step any of its rollbacks saw.
        let reference = match job.state.last_rollback {
            Some((prev_at, _)) if stalled > 1 => prev_at.max(at),
            _ => at,
        };
        job.state.last_rollback = Some((reference, target));
        for w in job.ranks.drain(..) {
            if let Some(e) = self.workers.get_mut(&w) {
                e.rank = None;
            }
        }
        self.restore_point(why).await?;
        let job = self.job.as_mut().unwrap();
        job.loss.reset_smoothing();
        job.plateau_seen = false;
        job.rate = None;
        let failed = if failures >= MAX_GROWTH_FAILURES {
            Some(format!(
                "failed: {failures} growths in a row failed; last: {why}"
            ))
        } else if stalled >= MAX_STALLED_ROLLBACKS {
            Some(format!(
                "failed: rolled back {stalled} times in a row to checkpoint step {target} without progress \
                 (the failure is deterministic); last: {why}; fix the cause and resubmit, or restart \
                 from an earlier checkpoint"
            ))
        } else {
            None
        };
        if let Some(message) = failed {
            job.state.phase = Phase::Failed;
            job.state.message = message;
            error!(job_id = %job.id, "{}", job.state.message);
            self.persist_state().await?;
            self.stop_all("the job failed");
            return Ok(());
        }
        job.state.phase = Phase::RollingBack;
        self.persist_state().await?;
        // The group is re-formed at the next membership tick, not now: a rank's collective
        // error usually means a peer died, and that peer's session end (or missed heartbeat)
        // must be seen first, or the new epoch would include the dead worker.
        self.update_gauges();
        self.bump();
        Ok(())
    }

    fn stop_all(&mut self, reason: &str) {
        let Some(job) = self.job.as_mut() else { return };
        let msg = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Command(pb::Command {
                id: job.next_cmd,
                epoch: job.state.epoch,
                at_step: 0,
                kind: Some(pb::command::Kind::Stop(pb::Stop {
                    reason: reason.into(),
                })),
                trace_context: Default::default(),
            })),
        };
        job.next_cmd += 1;
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

    /// If the job needs ranks and enough workers are idle, start a new epoch.
    async fn try_start_epoch(&mut self) -> Result<()> {
        let Some(job) = self.job.as_ref() else {
            return Ok(());
        };
        // A growth re-forming the groups at a new layout keeps its transaction and phase.
        let relayout = job.state.phase == Phase::Growing(GrowPhase::Reshard)
            && matches!(&job.txn, Some(Txn::Growth(g)) if g.relayout.is_some());
        if !relayout
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
        if idle.len() < world && relayout {
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
            let job = self.job.as_mut().unwrap();
            let msg = format!(
                "waiting for workers: {} of {world} registered{}",
                idle.len(),
                match &job.state.last_checkpoint {
                    Some(c) => format!("; will restart from checkpoint step {}", c.step),
                    None => String::new(),
                }
            );
            if job.state.phase != Phase::WaitingForWorkers || job.state.message != msg {
                job.state.phase = Phase::WaitingForWorkers;
                job.state.message = msg;
                self.persist_state().await?;
            }
            return Ok(());
        }
        let token = self.fresh_token();
        let opts = self.opts.clone();
        let job = self.job.as_mut().unwrap();
        job.state.epoch += 1;
        job.state.phase = if relayout {
            job.state.phase
        } else if job.state.paused {
            Phase::Paused
        } else {
            Phase::Training
        };
        job.state.message = if relayout {
            format!(
                "growing to generation {}: resharding to TP={} × DP={}",
                job.state.generation + 1,
                job.state.layout.tp,
                job.state.layout.dp
            )
        } else if job.state.paused {
            "paused by the operator; `coordctl resume` continues".into()
        } else {
            format!(
                "training (epoch {}, generation {}, {} layers)",
                job.state.epoch, job.state.generation, job.state.layers
            )
        };
        job.ranks = idle.into_iter().take(world).map(|(_, id)| id).collect();
        job.group_token = token;
        job.next_cmd = 1;
        if !relayout {
            job.txn = None;
        }
        self.persist_state().await?;
        let job = self.job.as_ref().unwrap();
        let peers: Vec<String> = job
            .ranks
            .iter()
            .map(|w| self.workers[w].ring_address.clone())
            .collect();
        let tp_peers: Vec<String> = job
            .ranks
            .iter()
            .map(|w| self.workers[w].tp_ring_address.clone())
            .collect();
        let restore = job
            .state
            .last_checkpoint
            .as_ref()
            .map(|c| c.dir.clone())
            .unwrap_or_default();
        info!(job_id = %job.id, epoch = job.state.epoch, generation = job.state.generation, step = job.state.step, world, restore = %restore, "starting epoch");
        let base = pb::Assignment {
            epoch: job.state.epoch,
            generation: job.state.generation,
            job_id: job.id.0.clone(),
            spec_toml: job.record.spec_toml.clone(),
            base_dir: job.record.base_dir.clone(),
            rank: 0,
            dp: job.state.layout.dp as u32,
            tp: job.state.layout.tp as u32,
            peers,
            tp_peers,
            hold: relayout,
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
            e.rank = Some(rank as u32);
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
            self.send_all(0, pb::command::Kind::Pause(pb::Pause {}));
        }
        self.update_gauges();
        self.bump();
        Ok(())
    }

    // ---------------------------------------------------------------- worker messages

    /// Common fencing: the session must be the worker's current one and hold a rank of the
    /// current epoch, and the message must carry that epoch. Returns the rank.
    fn fence(
        &mut self,
        worker: &WorkerId,
        session: u64,
        epoch: u64,
        kind: &'static str,
    ) -> Option<u32> {
        let cur_epoch = self.job.as_ref().map(|j| j.state.epoch);
        let ok = match self.workers.get_mut(worker) {
            Some(e) if e.session == session => {
                e.last_seen = Instant::now();
                if Some(epoch) == cur_epoch {
                    e.rank
                } else {
                    None
                }
            }
            _ => None,
        };
        if ok.is_none() {
            self.fenced += 1;
            self.metrics
                .fenced_messages_total
                .get_or_create(&[("kind", kind)])
                .inc();
        }
        ok
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
        let Some(rank) = self.fence(worker, session, r.epoch, "step") else {
            return Ok(());
        };
        if let Some(e) = self.workers.get_mut(worker) {
            e.last_step = r.step;
        }
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        if r.generation < job.state.generation {
            self.fenced += 1;
            self.metrics
                .fenced_messages_total
                .get_or_create(&[("kind", "step")])
                .inc();
            return Ok(());
        }
        if rank != 0 {
            return Ok(());
        }
        job.state.step = r.step;
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
        m.step_seconds
            .get_or_create(&[("part", "total")])
            .observe(r.step_seconds);
        m.step_seconds
            .get_or_create(&[("part", "compute")])
            .observe(r.compute_seconds);
        m.step_seconds
            .get_or_create(&[("part", "comm")])
            .observe(r.comm_seconds);
        m.step_seconds
            .get_or_create(&[("part", "data")])
            .observe(r.data_seconds);
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
        // A growth's checkpoint phase starts when the barrier step is reached.
        if let Some(Txn::Growth(g)) = &mut job.txn {
            if g.ckpt.started.is_none() && r.step >= g.ckpt.at_step {
                g.ckpt.started = Some(now);
            }
        }
        if let Some(Txn::Checkpoint(c)) = &mut job.txn {
            if c.started.is_none() && r.step >= c.at_step {
                c.started = Some(now);
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
                    self.rollback(
                        &format!("non-finite loss {} at step {}", r.loss, r.step),
                        Some((r.sample_start, r.sample_end)),
                    )
                    .await?;
                    return Ok(());
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
        let Some(rank) = self.fence(worker, session, v.epoch, "val_loss") else {
            return;
        };
        if rank != 0 {
            return;
        }
        if let Some(job) = self.job.as_mut() {
            // The grown model's loss before it trains (sent right after a growth's resume).
            if let Some(g) = job.growths.get_mut(&v.generation) {
                if g.at_step == v.step && g.val_loss_after.is_none() && v.loss.is_finite() {
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
        if job.state.phase != Phase::Training || job.txn.is_some() {
            return Ok(());
        }
        let step = job.state.step;
        let max = job.spec.train.max_steps;
        if step >= max {
            self.start_checkpoint("final", max, false);
            return Ok(());
        }
        let i = job.state.next_growth_stage;
        if i < job.spec.growth.len() {
            let plateau = job.spec.is_plateau_stage(i);
            let s = if plateau {
                if job.plateau_seen {
                    info!(job_id = %job.id, stage = i, step, "loss plateau: firing growth stage {i}");
                    step
                } else {
                    u64::MAX
                }
            } else {
                job.spec.growth_step(i)
            };
            if s != u64::MAX && step + LOOKAHEAD_STEPS >= s {
                let g = &job.spec.growth[i];
                let req = GrowRequest {
                    factor: g.factor as i64,
                    operator: g.operator.clone(),
                    stacking_list: g.stacking_list.clone().unwrap_or_default(),
                    optimizer: g.optimizer,
                    at_step: Some(s.max(step)),
                    mask_ramp_steps: g.mask_ramp_steps,
                    lr: Some(g.lr),
                    min_lr: Some(g.min_lr),
                    warmup_steps: Some(g.warmup_steps),
                };
                if let Err(e) = self.begin_growth(req, Some(i)).await {
                    let job = self.job.as_mut().unwrap();
                    error!(job_id = %job.id, stage = i, "growth stage refused: {e}; skipping it");
                    job.state.next_growth_stage += 1;
                    job.state.message = format!("growth stage {i} skipped: {e}");
                    self.persist_state().await?;
                }
                return Ok(());
            }
        }
        let interval = job.spec.checkpoint.interval;
        if interval > 0 {
            let last = job
                .state
                .last_checkpoint
                .as_ref()
                .map(|c| c.step)
                .unwrap_or(0);
            let next = (last / interval + 1) * interval;
            if next < max && step + LOOKAHEAD_STEPS >= next {
                self.start_checkpoint("periodic", next.max(step), false);
            }
        }
        Ok(())
    }

    pub async fn ack(&mut self, worker: &WorkerId, session: u64, ack: pb::Ack) -> Result<()> {
        let Some(rank) = self.fence(worker, session, ack.epoch, "ack") else {
            return Ok(());
        };
        // A rank's acks from before the current generation (a late ack of the previous model)
        // are fenced too.
        if self
            .job
            .as_ref()
            .is_some_and(|j| ack.generation < j.state.generation)
        {
            self.fenced += 1;
            self.metrics
                .fenced_messages_total
                .get_or_create(&[("kind", "ack")])
                .inc();
            return Ok(());
        }
        let running = self
            .job
            .as_ref()
            .is_some_and(|j| j.state.phase.is_running());
        if !ack.ok && !running {
            return Ok(());
        }
        if !ack.ok {
            let why = format!(
                "rank {rank} failed {} (command {}): {}",
                ack.phase, ack.command_id, ack.error
            );
            return self.rollback(&why, None).await;
        }
        if ack.phase == "assign" {
            self.rank_ready(rank).await?;
            self.update_gauges();
            self.bump();
            return Ok(());
        }
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        let world = job.world();
        let opts = self.opts.clone();
        match &mut job.txn {
            Some(Txn::Checkpoint(c)) => {
                if let Some(commit) = ckpt_progress(c, rank, &ack, world) {
                    let id = job.next_cmd;
                    job.next_cmd += 1;
                    c.commit_cmd = Some(id);
                    let trace_context = trellis_telemetry::inject(&c.span);
                    self.send_with_id(
                        id,
                        0,
                        pb::command::Kind::CommitCheckpoint(commit),
                        Some(0),
                        trace_context,
                    );
                } else if c.commit_cmd == Some(ack.command_id) && ack.phase == "commit" {
                    let c = match job.txn.take() {
                        Some(Txn::Checkpoint(c)) => c,
                        _ => unreachable!(),
                    };
                    self.committed(&c, &ack).await?;
                    self.check_triggers().await?;
                }
            }
            Some(Txn::Growth(g)) => {
                if g.cmd == 0 {
                    if let Some(commit) = ckpt_progress(&mut g.ckpt, rank, &ack, world) {
                        let id = job.next_cmd;
                        job.next_cmd += 1;
                        g.ckpt.commit_cmd = Some(id);
                        let trace_context = trellis_telemetry::inject(&g.ckpt.span);
                        self.send_with_id(
                            id,
                            0,
                            pb::command::Kind::CommitCheckpoint(commit),
                            Some(0),
                            trace_context,
                        );
                    } else if g.ckpt.commit_cmd == Some(ack.command_id) && ack.phase == "commit" {
                        // The rollback point is committed: stack.
                        let c = std::mem::replace(
                            &mut g.ckpt,
                            CkptTxn {
                                cmd: 0,
                                reason: String::new(),
                                at_step: 0,
                                issued: Instant::now(),
                                started: None,
                                reports: BTreeMap::new(),
                                step: 0,
                                tokens: 0,
                                cursor: 0,
                                commit_cmd: None,
                                span: Span::none(),
                            },
                        );
                        let gen = g.generation;
                        let ckpt_secs = c.started.unwrap_or(c.issued).elapsed().as_secs_f64();
                        self.committed(&c, &ack).await?;
                        let job = self.job.as_mut().unwrap();
                        let rec = job.growths.get_mut(&gen).unwrap();
                        rec.times.checkpoint = ckpt_secs;
                        rec.phase = GrowPhase::Stack;
                        rec.at_step = c.step;
                        let cur = &job.state.layout;
                        let relayout = rec
                            .layout_after
                            .clone()
                            .filter(|l| (l.dp, l.tp) != (cur.dp, cur.tp));
                        if relayout.is_some() {
                            rec.phase = GrowPhase::Reshard;
                        }
                        let rec = rec.clone();
                        job.state.phase = Phase::Growing(rec.phase);
                        self.persist_growth(&rec).await?;
                        self.persist_state().await?;
                        self.metrics
                            .growth_phase_seconds
                            .get_or_create(&[("phase", "checkpoint")])
                            .observe(ckpt_secs);
                        self.metrics
                            .growth_last_phase_seconds
                            .get_or_create(&[("phase", "checkpoint")])
                            .set(ckpt_secs);
                        match relayout {
                            Some(l) => self.relayout(gen, l).await?,
                            None => self.send_grow(gen),
                        }
                    }
                } else if ack.command_id == g.cmd {
                    g.acks.entry(ack.phase.clone()).or_default().insert(rank);
                    self.advance_growth(&opts).await?;
                }
            }
            None => {}
        }
        self.update_gauges();
        self.bump();
        Ok(())
    }

    /// Send the growth's stack/reshard/resume command to every rank of the epoch (the stack
    /// phase starts now).
    fn send_grow(&mut self, gen: u64) {
        let id = self.next_id();
        let job = self.job.as_mut().unwrap();
        let Some(Txn::Growth(g)) = &mut job.txn else {
            return;
        };
        let Some(rec) = job.growths.get_mut(&gen) else {
            return;
        };
        rec.phase = GrowPhase::Stack;
        job.state.phase = Phase::Growing(GrowPhase::Stack);
        let step = job.state.step;
        g.cmd = id;
        g.phase_started = Instant::now();
        g.phase_span = Some(
            info_span!(parent: &g.span, "grow.stack", job_id = %job.id, generation = gen, step),
        );
        let cmd = pb::GrowCmd {
            generation: gen,
            factor: rec.factor as u32,
            operator: rec.operator.clone(),
            stacking_list: rec.stacking_list.iter().map(|&l| l as u32).collect(),
            optimizer: optimizer_pb(rec.optimizer) as i32,
            mask_ramp_steps: rec.mask_ramp_steps,
            lr: rec.lr,
            min_lr: rec.min_lr,
            warmup_steps: rec.warmup_steps,
            dp: job.state.layout.dp as u32,
            tp: job.state.layout.tp as u32,
        };
        let trace_context = trellis_telemetry::inject(&g.span);
        self.send_with_id(id, 0, pb::command::Kind::Grow(cmd), None, trace_context);
    }

    /// The growth's reshard when the grown model needs another layout: every rank gets a new
    /// assignment at `layout` (new groups) restoring its slices of the growth checkpoint just
    /// committed; once every rank reports its runner ready, the stack command follows, and the
    /// ranks stack their own slices.
    async fn relayout(&mut self, gen: u64, layout: LayoutInfo) -> Result<()> {
        let job = self.job.as_mut().unwrap();
        info!(job_id = %job.id, generation = gen, from_dp = job.state.layout.dp, from_tp = job.state.layout.tp,
              dp = layout.dp, tp = layout.tp, "growth re-forms the groups: {}", layout.explanation);
        job.state.layout = layout;
        let step = job.state.step;
        if let Some(Txn::Growth(g)) = &mut job.txn {
            g.relayout = Some((Instant::now(), BTreeSet::new()));
            g.phase_span = Some(
                info_span!(parent: &g.span, "grow.reshard", job_id = %job.id, generation = gen, step),
            );
        }
        for w in job.ranks.drain(..) {
            if let Some(e) = self.workers.get_mut(&w) {
                e.rank = None;
            }
        }
        self.try_start_epoch().await
    }

    /// A rank's runner is ready in a new epoch (`assign` ack): during a growth's re-layout,
    /// the reshard is done once every rank is, and the stack follows.
    async fn rank_ready(&mut self, rank: u32) -> Result<()> {
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        let world = job.world();
        let Some(Txn::Growth(g)) = &mut job.txn else {
            return Ok(());
        };
        let Some((t0, ready)) = &mut g.relayout else {
            return Ok(());
        };
        ready.insert(rank);
        if ready.len() < world {
            return Ok(());
        }
        let secs = t0.elapsed().as_secs_f64();
        g.relayout = None;
        let gen = g.generation;
        if let Some(rec) = job.growths.get_mut(&gen) {
            rec.times.reshard = secs;
        }
        info!(job_id = %job.id, generation = gen, seconds = secs, "growth reshard done: every rank holds its slices at the new layout");
        self.send_grow(gen);
        Ok(())
    }

    async fn advance_growth(&mut self, _opts: &DomainOptions) -> Result<()> {
        loop {
            let job = self.job.as_mut().unwrap();
            let world = job.world();
            let Some(Txn::Growth(g)) = &mut job.txn else {
                return Ok(());
            };
            let gen = g.generation;
            let phase = match job.state.phase {
                Phase::Growing(p) => p,
                _ => return Ok(()),
            };
            let label = phase.label();
            if g.acks.get(label).map(|s| s.len()).unwrap_or(0) < world {
                return Ok(());
            }
            let secs = g.phase_started.elapsed().as_secs_f64();
            g.phase_started = Instant::now();
            let next = match phase {
                GrowPhase::Stack => GrowPhase::Reshard,
                GrowPhase::Reshard => GrowPhase::Resume,
                GrowPhase::Resume => GrowPhase::Committing,
                _ => return Ok(()),
            };
            let step = job.state.step;
            g.phase_span = (next != GrowPhase::Committing).then(|| {
                let name = match next {
                    GrowPhase::Reshard => info_span!(parent: &g.span, "grow.reshard", job_id = %job.id, generation = gen, step),
                    _ => info_span!(parent: &g.span, "grow.resume", job_id = %job.id, generation = gen, step),
                };
                name
            });
            let total = g.started.elapsed().as_secs_f64();
            let rec = job.growths.get_mut(&gen).unwrap();
            match phase {
                GrowPhase::Stack => rec.times.stack = secs,
                // After a re-layout the worker's own reshard phase is a no-op: add it.
                GrowPhase::Reshard => rec.times.reshard += secs,
                _ => rec.times.resume = secs,
            }
            self.metrics
                .growth_phase_seconds
                .get_or_create(&[("phase", label)])
                .observe(secs);
            self.metrics
                .growth_last_phase_seconds
                .get_or_create(&[("phase", label)])
                .set(secs);
            rec.phase = next;
            if next == GrowPhase::Committing {
                rec.times.total = total;
                let to = rec.to_layers;
                let stage = rec.stage;
                job.state.generation = gen;
                job.state.layers = to;
                job.state.parameters = job.model0.with_layers(to).num_parameters();
                job.state.phase = Phase::Training;
                job.state.growth_failures = 0;
                if let Some(i) = stage {
                    job.state.next_growth_stage = job.state.next_growth_stage.max(i + 1);
                }
                job.state.message = format!("training generation {gen} ({to} layers); committing the post-growth checkpoint");
                info!(job_id = %job.id, generation = gen, step, layers = to, seconds = total, "growth resumed");
                let rec = rec.clone();
                // The post-growth checkpoint is part of the growth's trace; `grow` ends after it
                // is requested (when the last handle, `grow_span`, drops).
                let grow_span = g.span.clone();
                job.txn = None;
                job.loss.reset_smoothing();
                self.persist_growth(&rec).await?;
                self.persist_state().await?;
                grow_span.in_scope(|| self.start_checkpoint("post-growth", 0, false));
                return Ok(());
            }
            job.state.phase = Phase::Growing(next);
            let rec = rec.clone();
            self.persist_growth(&rec).await?;
            self.persist_state().await?;
        }
    }

    /// Record a committed checkpoint (the commit ack from rank 0 is in).
    async fn committed(&mut self, c: &CkptTxn, ack: &pb::Ack) -> Result<()> {
        let dir = serde_json::from_str::<serde_json::Value>(&ack.payload_json)
            .ok()
            .and_then(|v| v.get("dir").and_then(|d| d.as_str()).map(String::from))
            .unwrap_or_default();
        let job = self.job.as_mut().unwrap();
        let rec = CheckpointRecord {
            step: c.step,
            tokens: c.tokens,
            generation: job.state.generation,
            layers: job.state.layers,
            data_cursor: c.cursor,
            dir,
            reason: c.reason.clone(),
            committed_at: now_unix(),
            next_growth_stage: job.state.next_growth_stage,
        };
        self.store
            .put(&keys::checkpoint(&job.id, Step(rec.step)), json(&rec))
            .await?;
        let job = self.job.as_mut().unwrap();
        job.checkpoints.retain(|x| x.step != rec.step);
        job.checkpoints.push(rec.clone());
        job.checkpoints.sort_by_key(|c| c.step);
        job.state.last_checkpoint = Some(rec.clone());
        job.state.stalled_rollbacks = 0;
        // Mirror the workers' garbage collection (`checkpoint.keep`, newest first): the
        // catalogue lists only checkpoints that still exist.
        let keep = job.spec.checkpoint.keep.max(1);
        let cut = job.checkpoints.len().saturating_sub(keep);
        let pruned: Vec<CheckpointRecord> = job.checkpoints.drain(..cut).collect();
        let id = job.id.clone();
        for p in &pruned {
            self.store
                .delete(&keys::checkpoint(&id, Step(p.step)))
                .await?;
        }
        let job = self.job.as_mut().unwrap();
        job.last_commit = Some(Instant::now());
        let secs = c.started.unwrap_or(c.issued).elapsed().as_secs_f64();
        self.metrics.checkpoint_seconds.observe(secs);
        self.metrics.checkpoints_total.inc();
        self.metrics.checkpoint_age_seconds.set(0.0);
        info!(job_id = %job.id, step = rec.step, generation = rec.generation, reason = %rec.reason, dir = %rec.dir, "checkpoint committed");
        if c.reason == "post-growth" {
            let gen = rec.generation;
            if let Some(g) = job.growths.get_mut(&gen) {
                if g.phase == GrowPhase::Committing {
                    g.phase = GrowPhase::Done;
                    let g = g.clone();
                    job.state.message =
                        format!("training generation {gen} ({} layers)", g.to_layers);
                    self.metrics
                        .growths_total
                        .get_or_create(&[("outcome", "done")])
                        .inc();
                    self.persist_growth(&g).await?;
                }
            }
        }
        let job = self.job.as_mut().unwrap();
        if c.reason == "final" {
            job.state.phase = Phase::Done;
            job.state.message = format!(
                "done: {} steps, {} tokens, {} layers",
                job.state.step, job.state.tokens, job.state.layers
            );
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
            m.generation.set(job.state.generation as i64);
            m.epoch.set(job.state.epoch as i64);
            let cur = phase_label(job.state.phase);
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

/// Count a checkpoint ack; when every rank has acked, return the commit command for rank 0.
fn ckpt_progress(
    c: &mut CkptTxn,
    rank: u32,
    ack: &pb::Ack,
    world: usize,
) -> Option<pb::CommitCheckpoint> {
    if ack.command_id != c.cmd || ack.phase != "checkpoint" || c.commit_cmd.is_some() {
        return None;
    }
    // Payload: {"report": ShardReport | null, "tokens": T, "data_cursor": C} at the checkpoint step.
    let v: serde_json::Value =
        serde_json::from_str(&ack.payload_json).unwrap_or(serde_json::Value::Null);
    c.reports.insert(
        rank,
        v.get("report").cloned().unwrap_or(serde_json::Value::Null),
    );
    if rank == 0 {
        c.step = ack.step;
        c.tokens = v.get("tokens").and_then(|t| t.as_u64()).unwrap_or(0);
        c.cursor = v.get("data_cursor").and_then(|t| t.as_u64()).unwrap_or(0);
    }
    if c.reports.len() < world {
        return None;
    }
    let reports: Vec<&serde_json::Value> = c.reports.values().filter(|v| !v.is_null()).collect();
    Some(pb::CommitCheckpoint {
        step: c.step,
        reports_json: serde_json::to_string(&reports).unwrap_or_else(|_| "[]".into()),
        reason: c.reason.clone(),
    })
}

/// The committed checkpoint a job starts from (`checkpoint.init_from`), verified (manifest and
/// every file's hash, off the async threads) and checked against the spec: same sizes (the
/// depth may differ), a step before `max_steps`. Returns its record and model config.
async fn init_checkpoint(
    dir: &std::path::Path,
    spec: &JobSpec,
    model0: &ModelConfig,
) -> Result<(CheckpointRecord, ModelConfig)> {
    let path = dir.to_path_buf();
    let ck = tokio::task::spawn_blocking(move || trellis_core::checkpoint::Checkpoint::open(&path))
        .await
        .map_err(|e| Error::Internal(format!("checkpoint verification panicked: {e}")))?
        .map_err(|e| {
            Error::InvalidArgument(format!("checkpoint.init_from {}: {e}", dir.display()))
        })?;
    let st = ck.state;
    if st.model.with_layers(model0.num_hidden_layers) != *model0 {
        return Err(Error::InvalidArgument(format!(
            "checkpoint.init_from {}: its model (hidden {}, ffn {}, heads {}/{}, vocab {}) differs from the              [model] section (hidden {}, ffn {}, heads {}/{}, vocab {}); make [model] describe the checkpoint's model",
            dir.display(),
            st.model.hidden_size,
            st.model.intermediate_size,
            st.model.num_attention_heads,
            st.model.num_key_value_heads,
            st.model.vocab_size,
            model0.hidden_size,
            model0.intermediate_size,
            model0.num_attention_heads,
            model0.num_key_value_heads,
            model0.vocab_size,
        )));
    }
    if st.step >= spec.train.max_steps {
        return Err(Error::InvalidArgument(format!(
            "checkpoint.init_from {} is at step {} but train.max_steps is {}; raise max_steps",
            dir.display(),
            st.step,
            spec.train.max_steps
        )));
    }
    Ok((
        CheckpointRecord {
            step: st.step,
            tokens: st.tokens,
            generation: st.generation,
            layers: st.model.num_hidden_layers,
            data_cursor: st.data_cursor,
            dir: dir.display().to_string(),
            reason: "init_from".into(),
            committed_at: now_unix(),
            next_growth_stage: 0,
        },
        st.model,
    ))
}

fn reject(reason: &str) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage {
        kind: Some(pb::coordinator_message::Kind::Reject(pb::Reject {
            reason: reason.into(),
        })),
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// The initial model config. The coordinator has no tokenizer: the vocabulary is the spec's
/// `model.vocab_size` or `data.vocab_size`.
pub fn model_config(spec: &JobSpec) -> Result<ModelConfig> {
    Ok(spec.model_config(spec.model.vocab_size.unwrap_or(spec.data.vocab_size))?)
}

pub fn phase_label(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "pending",
        Phase::WaitingForWorkers => "waiting_for_workers",
        Phase::Training => "training",
        Phase::Paused => "paused",
        Phase::Growing(_) => "growing",
        Phase::RollingBack => "rolling_back",
        Phase::Done => "done",
        Phase::Failed => "failed",
    }
}

fn phase_pb(p: Phase) -> pb::JobPhase {
    match p {
        Phase::Pending => pb::JobPhase::Pending,
        Phase::WaitingForWorkers => pb::JobPhase::WaitingForWorkers,
        Phase::Training => pb::JobPhase::Training,
        Phase::Paused => pb::JobPhase::Paused,
        Phase::Growing(_) => pb::JobPhase::Growing,
        Phase::RollingBack => pb::JobPhase::RollingBack,
        Phase::Done => pb::JobPhase::Done,
        Phase::Failed => pb::JobPhase::Failed,
    }
}

fn grow_phase_pb(p: GrowPhase) -> pb::GrowthPhase {
    match p {
        GrowPhase::Pending => pb::GrowthPhase::Pending,
        GrowPhase::Checkpoint => pb::GrowthPhase::Checkpoint,
        GrowPhase::Stack => pb::GrowthPhase::Stack,
        GrowPhase::Reshard => pb::GrowthPhase::Reshard,
        GrowPhase::Resume | GrowPhase::Committing => pb::GrowthPhase::Resume,
        GrowPhase::Done => pb::GrowthPhase::Done,
        GrowPhase::RolledBack => pb::GrowthPhase::RolledBack,
    }
}

pub fn optimizer_pb(o: OptimizerPolicy) -> pb::OptimizerPolicy {
    match o {
        OptimizerPolicy::Reset => pb::OptimizerPolicy::Reset,
        OptimizerPolicy::Carry => pb::OptimizerPolicy::Carry,
    }
}

fn timings(t: &PhaseTimes) -> pb::GrowthTimings {
    pb::GrowthTimings {
        checkpoint_seconds: t.checkpoint,
        stack_seconds: t.stack,
        reshard_seconds: t.reshard,
        resume_seconds: t.resume,
        total_seconds: t.total,
    }
}

fn growth_event(g: &GrowthRecordState) -> pb::GrowthEvent {
    pb::GrowthEvent {
        generation: g.generation,
        at_step: g.at_step,
        tokens: g.tokens,
        operator: g.operator.clone(),
        factor: g.factor as u32,
        optimizer: optimizer_pb(g.optimizer) as i32,
        from_layers: g.from_layers as u32,
        to_layers: g.to_layers as u32,
        phase: grow_phase_pb(g.phase) as i32,
        timings: Some(timings(&g.times)),
        error: g.error.clone(),
        val_loss_after: g.val_loss_after,
        dp_after: g.layout_after.as_ref().map_or(0, |l| l.dp as u32),
        tp_after: g.layout_after.as_ref().map_or(0, |l| l.tp as u32),
    }
}

fn ckpt_info(c: &CheckpointRecord) -> pb::CheckpointInfo {
    pb::CheckpointInfo {
        step: c.step,
        tokens: c.tokens,
        generation: c.generation,
        dir: c.dir.clone(),
        committed_at: c.committed_at,
        reason: c.reason.clone(),
        layers: c.layers as u32,
    }
}
