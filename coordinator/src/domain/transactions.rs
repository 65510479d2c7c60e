//! Worker messages and the transactions they drive: steps, scheduled work, checkpoints and
//! growths — each effect of a [`crate::txn`] state machine carried out here, in order.
use super::*;

impl Domain {
    pub(super) async fn begin_growth(
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
            based_on: None,
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
        let world = job.world();
        let now = Instant::now();
        let before = growth::Before {
            generation: job.state.generation,
            layers: job.state.layers,
            layout: job.state.layout.clone(),
            next_growth_stage: job.state.next_growth_stage,
        };
        let txn = GrowthTxn::new(generation, world, relayout, before, at_step, &mut job.ids);
        let ckpt_cmd = txn
            .checkpoint_cmd()
            .expect("a new growth takes its checkpoint");
        let grow_cmd = txn.grow_cmd();
        job.active = Some(Active {
            txn: Txn::Growth(txn),
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
        // At an unchanged layout the Grow goes out with the checkpoint: every rank snapshots,
        // stacks and trains on while its shards are written (docs/design.md §3).
        if let Some(cmd) = grow_cmd {
            self.send_grow(generation, cmd, at_step)?;
        }
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

    /// Send a lockstep command to every rank of the epoch.
    pub(super) fn send_all(&mut self, at_step: Step, kind: pb::command::Kind) -> CommandId {
        let id = self.job.as_mut().expect("a job").ids.next();
        let trace_context = trellis_telemetry::inject(&Span::current());
        self.send(id, at_step, kind, None, trace_context);
        id
    }

    /// Send a command to every rank (or `only_rank`); `trace_context` is the W3C context of the
    /// span it belongs to ([`trellis_telemetry::inject`]), the parent of the workers' spans.
    pub(super) fn send(
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
    pub(super) fn send_commit(
        &mut self,
        commit: CommandId,
        step: Step,
        reason: Reason,
        reports: &[ShardReport],
        span: &Span,
    ) {
        // What rank 0 may not collect after this commit: everything the recorded catalogue
        // lists, the restore point (a "checkpoint + plan" restore point's checkpoint,
        // `based_on`) and a growth checkpoint still being written, named even when listed. The
        // new commit is not recorded yet, so nothing it would retire goes before the record
        // does.
        let keep_steps = self
            .job
            .as_ref()
            .map(|j| {
                let mut keep: Vec<u64> = j.checkpoints.iter().map(|c| c.step.0).collect();
                keep.extend(j.state.last_checkpoint.as_ref().map(|c| c.step.0));
                keep.extend(
                    j.growing()
                        .and_then(|g| g.checkpoint())
                        .map(|c| c.at_step.0),
                );
                keep.sort_unstable();
                keep.dedup();
                keep
            })
            .unwrap_or_default();
        self.send(
            commit,
            Step(0),
            pb::command::Kind::CommitCheckpoint(pb::CommitCheckpoint {
                step: step.0,
                reason: reason.label().into(),
                reports: reports.iter().map(Into::into).collect(),
                keep_steps,
            }),
            Some(Rank(0)),
            trellis_telemetry::inject(span),
        );
    }

    /// Start a (non-growth) checkpoint transaction. Its `checkpoint` span is a child of the
    /// current span (e.g. the SaveCheckpoint request).
    pub(super) fn start_checkpoint(
        &mut self,
        reason: Reason,
        at_step: Step,
        hold: bool,
    ) -> CommandId {
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
        if r.step_seconds.is_finite() && r.step_seconds > 0.0 {
            job.step_seconds = if job.step_seconds == 0.0 {
                r.step_seconds
            } else {
                0.9 * job.step_seconds + 0.1 * r.step_seconds
            };
        }
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
        job.record(
            "train",
            Step(r.step),
            serde_json::json!({
                "tokens": r.tokens,
                "loss": r.loss,
                "lr": r.lr,
                "grad_norm": r.grad_norm,
                "step_seconds": r.step_seconds,
                "tokens_per_second": job.tokens_per_second,
                "mfu": job.mfu,
                "layers": job.state.layers,
                "generation": r.generation,
            }),
        );
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
            job.record(
                "val",
                Step(v.step),
                serde_json::json!({ "tokens": tokens, "loss": v.loss, "generation": v.generation }),
            );
            if v.loss.is_finite() {
                self.metrics.val_loss.set(v.loss);
            }
        }
    }

    /// Scheduled work: spec growth stages, periodic and final checkpoints.
    pub(super) async fn check_triggers(&mut self) -> Result<()> {
        let Some(job) = self.job.as_ref() else {
            return Ok(());
        };
        if job.state.phase != Phase::Training || job.active.is_some() {
            return Ok(());
        }
        // A failed checkpoint waits out its backoff; then the schedule below re-derives it
        // (periodic, final, a growth stage), except the post-growth one it cannot.
        if let Some(r) = job.retry {
            if Instant::now() < r.at {
                return Ok(());
            }
            if r.reason == Reason::PostGrowth {
                self.job.as_mut().expect("a job").retry = None;
                self.start_checkpoint(Reason::PostGrowth, Step(0), false);
                return Ok(());
            }
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
            Err(error) if ack.checkpoint_io => {
                return self
                    .checkpoint_io_failed(rank, ack.cmd, ack.step, ack.phase, &error)
                    .await;
            }
            Err(error) if running => {
                self.now_idle(worker);
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
                // The growth's step S is the step its Grow ran at: the growth record says it as
                // soon as the ranks stack (its checkpoint, written in the background, may be
                // recorded later).
                if let AckKind::Phase(WorkerPhase::Stack) = kind {
                    if g.grow_cmd() == Some(cmd) {
                        if let Some(rec) = job.growths.get_mut(&g.generation) {
                            rec.at_step = ack.step;
                        }
                    }
                }
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
    pub(super) async fn on_checkpoint(&mut self, eff: checkpoint::Effect) -> Result<()> {
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
                self.check_commit_dir(&c)?;
                let job = self.job.as_ref().expect("a job");
                let holds = Holds::now(&job.state);
                self.record_checkpoint(&c, &active.clock, holds).await?;
                self.check_triggers().await
            }
        }
    }

    /// Carry out an effect of the growth transaction.
    pub(super) async fn on_growth(&mut self, eff: growth::Effect) -> Result<()> {
        if let growth::Effect::CheckpointCommitted(c) = &eff {
            if let Err(e) = self.check_commit_dir(c) {
                return self.rollback(&e.to_string(), None).await;
            }
        }
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
                let (relayout, before) = match &a.txn {
                    Txn::Growth(g) => (g.relayout.is_some(), g.before.clone()),
                    Txn::Checkpoint(_) => unreachable!("a growth effect"),
                };
                let clock = Clock {
                    issued: a.clock.issued,
                    started: a.clock.started,
                    phase_started: a.clock.phase_started,
                    span: span.clone(),
                    ckpt_span: None,
                    phase_span: None,
                };
                if relayout {
                    a.clock.phase_started = Instant::now();
                }
                // The checkpoint holds the job as it stood when the growth began, whatever the
                // job has reached since (the grown model may be training already).
                let holds = Holds {
                    generation: before.generation,
                    layers: before.layers,
                    layout: before.layout,
                    next_growth_stage: before.next_growth_stage,
                };
                self.record_checkpoint(&c, &clock, holds).await?;
                let job = self.job.as_mut().expect("a job");
                let rec = job.growth_record(gen);
                rec.times.checkpoint = secs;
                rec.at_step = c.step;
                rec.based_on = Some(c.dir.clone());
                if relayout {
                    rec.phase = GrowPhase::Reshard;
                    let msg = job.state.message.clone();
                    job::transition(&mut job.state, Phase::Growing(GrowPhase::Reshard), msg);
                }
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
                self.send_grow(gen, cmd, Step(0))?;
                self.persist_growth(gen).await?;
                self.persist_state().await?;
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
                job.record(
                    "growth",
                    step,
                    serde_json::json!({
                        "tokens": job.state.tokens,
                        "from_layers": rec.from_layers,
                        "to_layers": rec.to_layers,
                        "operator": rec.operator.name(),
                        "factor": rec.factor,
                        "generation": gen.0,
                        "seconds": total,
                    }),
                );
                job.loss.reset_smoothing();
                self.persist_growth(gen).await?;
                self.persist_state().await?;
            }
            growth::Effect::Committed => {
                let rec = job.growth_record(gen);
                rec.phase = GrowPhase::Done;
                let rec = rec.clone();
                job::growth_committed(&mut job.state, &rec);
                info!(job_id = %job.id, generation = %gen, based_on = ?rec.based_on, "growth committed: the restore point is its checkpoint + plan");
                // The growth's trace ends here (`span`, its last handle, drops).
                job.active = None;
                self.metrics
                    .growths_total
                    .get_or_create(&[("outcome", "done")])
                    .inc();
                self.persist_growth(gen).await?;
                self.persist_state().await?;
                return self.check_triggers().await;
            }
        }
        Ok(())
    }

    /// Send the Grow command `cmd` of the growth to `gen` (at the new layout, if it changes).
    fn send_grow(&mut self, gen: Generation, cmd: CommandId, at_step: Step) -> Result<()> {
        let job = self.job.as_mut().expect("a job");
        let a = job.active.as_mut().expect("a growth in flight");
        let span = a.clock.span.clone();
        let step = job.state.step;
        a.clock.phase_span = Some(
            info_span!(parent: &span, "grow.stack", job_id = %job.id, generation = gen.0, step = step.0),
        );
        let layout = match &a.txn {
            Txn::Growth(g) => g.relayout.clone().unwrap_or(job.state.layout.clone()),
            Txn::Checkpoint(_) => unreachable!("a growth"),
        };
        let rec = job.growth_record(gen);
        rec.phase = GrowPhase::Stack;
        let grow = grow_cmd(rec, &layout);
        let msg = job.state.message.clone();
        job::transition(&mut job.state, Phase::Growing(GrowPhase::Stack), msg);
        self.send(
            cmd,
            at_step,
            pb::command::Kind::Grow(grow),
            None,
            trellis_telemetry::inject(&span),
        );
        Ok(())
    }

    /// A rank could not write (or rank 0 commit) checkpoint command `cmd`: abort that
    /// checkpoint, not the training. A failure of a checkpoint already aborted is ignored.
    async fn checkpoint_io_failed(
        &mut self,
        rank: Rank,
        cmd: CommandId,
        step: Step,
        phase: &str,
        error: &str,
    ) -> Result<()> {
        let Some(job) = self.job.as_ref() else {
            return Ok(());
        };
        let ours = |c: &CheckpointTxn| c.cmd == cmd || c.commit_cmd() == Some(cmd);
        let current = match job.active.as_ref().map(|a| &a.txn) {
            Some(Txn::Checkpoint(c)) => ours(c),
            Some(Txn::Growth(g)) => g.checkpoint().is_some_and(ours),
            None => false,
        };
        if !current {
            return Ok(());
        }
        let verb = if phase == "commit" { "commit" } else { "write" };
        let why = format!("rank {rank} could not {verb} it: {error}");
        let label = if error.contains("No space left") || error.contains("os error 28") {
            "no_space"
        } else {
            "io"
        };
        self.abort_checkpoint(&why, label, Some(step)).await
    }

    /// Abort the checkpoint in flight — a plain one, or a growth's checkpoint phase — without
    /// a rollback: every rank discards its temp files (AbortCheckpoint) and trains on; the
    /// checkpoint is retried after a backoff (a manual one is not). A growth whose checkpoint
    /// failed while the ranks held (a re-layout growth) is aborted with the reason and the job
    /// keeps training the old generation. One whose Grow already went out (the grown model
    /// trains while its checkpoint is written) rolls back to the restore point before it. A
    /// growth stage of the spec is retried after the same backoff ([`job::Backoff`]); an
    /// operator's growth is not. An I/O error never counts as a failed growth or a stalled
    /// rollback.
    pub(super) async fn abort_checkpoint(
        &mut self,
        why: &str,
        label: &'static str,
        step: Option<Step>,
    ) -> Result<()> {
        let job = self.job.as_mut().expect("a job");
        let (cmd, reason, barrier, growth) = match job.active.as_ref().map(|a| &a.txn) {
            Some(Txn::Checkpoint(c)) => (c.cmd, c.reason, c.at_step, None),
            Some(Txn::Growth(g)) => match g.checkpoint() {
                // The Grow went out with the checkpoint: the ranks train the grown model, whose
                // restore point ("checkpoint + plan") will never exist. Back to the restore
                // point before the growth (never half-grown), counted as an I/O failure only.
                // A growth stage of the spec is retried after the backoff, like a failed
                // checkpoint (never at once: a full disk would be hammered in a loop).
                Some(_) if g.grow_sent() => {
                    let stage = job.growths.get(&g.generation).and_then(|r| r.stage);
                    let wait = job.backoff.failed(Reason::Growth, stage.is_some());
                    let why = format!(
                        "the growth checkpoint failed: {why}; growth {}",
                        job::retrying(wait)
                    );
                    self.metrics
                        .checkpoint_failures_total
                        .get_or_create(&[("reason", label)])
                        .inc();
                    self.rollback_io(&why).await?;
                    if let (Some(job), Some(wait)) = (self.job.as_mut(), wait) {
                        job.retry = Some(Retry {
                            reason: Reason::Growth,
                            at: Instant::now() + wait,
                        });
                    }
                    return Ok(());
                }
                Some(c) => (c.cmd, Reason::Growth, c.at_step, Some(g.generation)),
                None => return Ok(()),
            },
            None => return Ok(()),
        };
        let active = job.active.take().expect("checked");
        active.clock.span.record("otel.status_code", "error");
        active.clock.span.record("otel.status_message", why);
        let spec_stage = growth
            .and_then(|gen| job.growths.get(&gen))
            .is_some_and(|r| r.stage.is_some());
        let wait = job.backoff.failed(reason, spec_stage);
        if let Some(w) = wait {
            job.retry = Some(Retry {
                reason,
                at: Instant::now() + w,
            });
        }
        // The step it was written at (a rank's failed ack says it), else its barrier (a
        // deadline), else, for one taken at once, the job's step.
        let step = step.unwrap_or(if barrier > Step(0) {
            barrier
        } else {
            job.state.step
        });
        let msg = job::checkpoint_failed(&mut job.state, step, why, wait);
        self.metrics
            .checkpoint_failures_total
            .get_or_create(&[("reason", label)])
            .inc();
        warn!(parent: &active.clock.span, job_id = %job.id, step = %step, reason = reason.label(), failure = label, "checkpoint aborted: {why}; training goes on");
        match growth {
            Some(gen) => {
                let old = job.state.generation;
                let rec = job.growth_record(gen);
                rec.phase = GrowPhase::RolledBack;
                rec.error = format!(
                    "aborted: the growth checkpoint failed ({why}); the job trains on at generation {old}"
                );
                self.metrics
                    .growths_total
                    .get_or_create(&[("outcome", "aborted")])
                    .inc();
                let job = self.job.as_mut().expect("a job");
                job::transition(
                    &mut job.state,
                    Phase::Training,
                    format!("growth to generation {gen} aborted: {msg}"),
                );
                self.persist_growth(gen).await?;
            }
            None => {
                let phase = job.state.phase;
                job::transition(&mut job.state, phase, msg);
            }
        }
        self.persist_state().await?;
        let trace_context = trellis_telemetry::inject(&active.clock.span);
        let job = self.job.as_mut().expect("a job");
        let id = job.ids.next();
        self.send(
            id,
            Step(0),
            pb::command::Kind::AbortCheckpoint(pb::AbortCheckpoint {
                command: cmd.0,
                reason: why.to_string(),
            }),
            None,
            trace_context,
        );
        self.update_gauges();
        self.bump();
        Ok(())
    }

    /// Transaction deadlines: a checkpoint not committed within `checkpoint_deadline` of its
    /// barrier is aborted (and retried); a growth phase past `growth_phase_deadline` rolls the
    /// growth back.
    pub(super) async fn check_deadlines(&mut self, now: Instant) -> Result<()> {
        let Some(a) = self.job.as_ref().and_then(|j| j.active.as_ref()) else {
            return Ok(());
        };
        let in_checkpoint = match &a.txn {
            Txn::Checkpoint(_) => true,
            Txn::Growth(g) => g.checkpoint().is_some(),
        };
        if in_checkpoint {
            let limit = self.opts.checkpoint_deadline;
            if a.clock
                .started
                .is_some_and(|t| now.duration_since(t) > limit)
            {
                let why = format!(
                    "not committed within the checkpoint deadline ({:.0} s after its barrier)",
                    limit.as_secs_f64()
                );
                return self.abort_checkpoint(&why, "deadline", None).await;
            }
        }
        // A growth's worker phases run while its checkpoint is written: their deadline holds
        // beside the checkpoint's.
        let worker_phase = match &a.txn {
            Txn::Checkpoint(_) => false,
            Txn::Growth(g) => !matches!(
                g.stage,
                growth::Stage::AwaitCheckpoint | growth::Stage::Resumed
            ),
        };
        if !worker_phase {
            return Ok(());
        }
        let limit = self.opts.growth_phase_deadline;
        if now.duration_since(a.clock.phase_started) > limit {
            let phase = match self.job.as_ref().map(|j| j.state.phase) {
                Some(Phase::Growing(p)) => p.label(),
                _ => "growing",
            };
            let why = format!(
                "the growth phase ({phase}) ran past its deadline ({:.0} s)",
                limit.as_secs_f64()
            );
            return self.rollback(&why, None).await;
        }
        Ok(())
    }

    pub(super) fn observe_phase(&self, label: &'static str, secs: f64) {
        self.metrics
            .growth_phase_seconds
            .get_or_create(&[("phase", label)])
            .observe(secs);
        self.metrics
            .growth_last_phase_seconds
            .get_or_create(&[("phase", label)])
            .set(secs);
    }

    /// A committed checkpoint must be where the coordinator told the workers to write it,
    /// `<job_root>/step-N`; anything else is refused (never recorded as a restore point).
    fn check_commit_dir(&self, c: &Committed) -> Result<()> {
        let job = self.job.as_ref().expect("a job");
        let expected = trellis_core::checkpoint::step_dir(&job.job_root(&self.opts), c.step.0);
        if std::path::Path::new(&c.dir) == expected {
            return Ok(());
        }
        warn!(job_id = %job.id, step = %c.step, reported = %c.dir, expected = %expected.display(), "refused a checkpoint commit outside the job root");
        Err(Error::InvalidArgument(format!(
            "rank 0 reported checkpoint step {} committed at {}, not at {}; not recorded as a \
             restore point",
            c.step,
            c.dir,
            expected.display()
        )))
    }

    /// Record a committed checkpoint (rank 0's commit ack is in): it becomes the restore point.
    /// `holds`: the generation, depth, layout and growth stage the checkpoint was written at.
    pub(super) async fn record_checkpoint(
        &mut self,
        c: &Committed,
        clock: &Clock,
        holds: Holds,
    ) -> Result<()> {
        let job = self.job.as_mut().expect("a job");
        let rec = CheckpointRecord {
            step: c.step,
            tokens: c.tokens,
            generation: holds.generation,
            layers: holds.layers,
            data_cursor: c.data_cursor,
            dir: c.dir.clone(),
            reason: c.reason,
            committed_at: now_unix(),
            next_growth_stage: holds.next_growth_stage,
            layout: Some(holds.layout),
            unusable: None,
        };
        self.persist
            .put(keys::checkpoint(&job.id, rec.step), json(&rec));
        let seq = self.persist.ticket().seq();
        let job = self.job.as_mut().expect("a job");
        job.unconfirmed.push((rec.step, seq));
        job.checkpoints.retain(|x| x.step != rec.step);
        job.checkpoints.push(rec.clone());
        job.checkpoints.sort_by_key(|c| c.step);
        job::committed(&mut job.state, &rec);
        // Mirror the workers' garbage collection (`checkpoint.keep`, newest first): the
        // catalogue lists only checkpoints that still exist.
        // Unusable checkpoints (set aside after a restart) are not counted and stay listed.
        let keep = job.spec.checkpoint.keep.max(1);
        let mut usable = job
            .checkpoints
            .iter()
            .filter(|c| c.unusable.is_none())
            .count();
        let mut pruned: Vec<CheckpointRecord> = Vec::new();
        job.checkpoints.retain(|c| {
            if usable > keep && c.unusable.is_none() {
                usable -= 1;
                pruned.push(c.clone());
                false
            } else {
                true
            }
        });
        let id = job.id.clone();
        for p in &pruned {
            self.persist.delete(keys::checkpoint(&id, p.step));
        }
        let job = self.job.as_mut().expect("a job");
        job.last_commit = Some(Instant::now());
        job.retry = None;
        job.backoff.reset();
        let secs = clock
            .started
            .unwrap_or(clock.issued)
            .elapsed()
            .as_secs_f64();
        self.metrics.checkpoint_seconds.observe(secs);
        self.metrics.checkpoints_total.inc();
        self.metrics.checkpoint_age_seconds.set(0.0);
        info!(job_id = %job.id, step = %rec.step, generation = %rec.generation, reason = rec.reason.label(), dir = %rec.dir, "checkpoint committed");
        let job = self.job.as_mut().expect("a job");
        if c.reason == Reason::Final {
            let msg = format!(
                "done: {} steps, {} tokens, {} layers",
                job.state.step, job.state.tokens, job.state.layers
            );
            job::transition(&mut job.state, Phase::Done, msg);
            info!(job_id = %job.id, "{}", job.state.message);
            self.persist_state().await?;
            // The workers exit on Stop: only once the final state is durable, so that a
            // coordinator restarted now does not wait for them at an older restore point.
            self.stop_when_durable = Some((self.persist.ticket().seq(), "the job is done".into()));
        } else {
            self.persist_state().await?;
        }
        Ok(())
    }
}

/// What a checkpoint holds besides its step, tokens and cursor (recorded with it).
pub(super) struct Holds {
    generation: Generation,
    layers: usize,
    layout: LayoutInfo,
    next_growth_stage: usize,
}

impl Holds {
    /// The job as it stands (a checkpoint of the current generation).
    fn now(s: &JobState) -> Holds {
        Holds {
            generation: s.generation,
            layers: s.layers,
            layout: s.layout.clone(),
            next_growth_stage: s.next_growth_stage,
        }
    }
}

/// The Grow command of a growth record at `layout` (online, and for a restore of checkpoint +
/// plan: `Assignment.restore_grow`).
pub(super) fn grow_cmd(rec: &GrowthRecordState, layout: &LayoutInfo) -> pb::GrowCmd {
    let (operator, stacking_list, mask_ramp_steps) = operator_to_pb(&rec.operator);
    pb::GrowCmd {
        generation: rec.generation.0,
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
    }
}
