//! Membership: worker sessions, heartbeats, fencing, epochs and rollback.
use super::*;

impl Domain {
    /// A worker opened a session. Returns the session number the caller passes back with every
    /// message of this session.
    pub async fn hello(&mut self, hello: pb::Hello, tx: Outbox) -> Result<u64> {
        if hello.worker_id.is_empty() {
            return Err(Error::InvalidArgument(
                "Hello.worker_id must not be empty".into(),
            ));
        }
        let offered = crate::wire::nccl_ids(&hello.nccl_ids)?;
        let id = WorkerId(hello.worker_id.clone());
        if !self.workers.contains_key(&id) && self.workers.len() >= self.opts.max_workers {
            self.make_room_for_a_worker()?;
        }
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
        info!(worker_id = %id, host = %hello.host, pid = hello.pid, device = %hello.device, nccl = hello.nccl, ring = %hello.ring_address, "worker registered");
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
                nccl: hello.nccl,
                nccl_ids: offered,
                tx: Some(tx),
                last_seen: Instant::now(),
                lost: false,
                exited: false,
                rank: None,
                last_step: 0,
                activity: "idle".into(),
                activity_since: Instant::now(),
                step_seconds: 0.0,
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

    /// The registry is full (`max_workers`) and a new worker id says Hello: forget the
    /// disconnected worker without a rank that was seen longest ago, or refuse the newcomer
    /// (RESOURCE_EXHAUSTED) when every registered worker is connected or holds a rank.
    fn make_room_for_a_worker(&mut self) -> Result<()> {
        let gone = self
            .workers
            .iter()
            .filter(|(_, e)| e.tx.is_none() && e.rank.is_none())
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(id, _)| id.clone());
        match gone {
            Some(id) => {
                info!(worker_id = %id, "forgot a disconnected worker to make room (max_workers)");
                self.workers.remove(&id);
                Ok(())
            }
            None => {
                warn!(
                    max_workers = self.opts.max_workers,
                    "refused a new worker: the registry is full"
                );
                Err(crate::limits::too_many_workers(self.opts.max_workers))
            }
        }
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
        self.after_durable();
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
        // Liveness that sees progress: a training thread stuck inside one step (or evaluation)
        // past the progress timeout, its heartbeats going on, gets its worker evicted.
        let timeout = self.progress_timeout();
        let mut evicted = Vec::new();
        let stalled = &self.stalled;
        for (id, e) in self.workers.iter_mut() {
            // Once evicted, a worker that reconnects still stuck stays idle (and unpicked)
            // rather than being evicted again at every tick.
            if e.lost
                || e.exited
                || e.tx.is_none()
                || stalled.contains(id)
                || !e.stuck_for(now, timeout)
            {
                continue;
            }
            let why = format!(
                "its training thread made no progress for {:.1} s in phase {} (progress timeout {:.1} s)",
                now.duration_since(e.activity_since).as_secs_f64(),
                e.activity,
                timeout.as_secs_f64()
            );
            e.lost = true;
            if let Some(tx) = e.tx.take() {
                let _ = tx.send(Err(tonic::Status::unavailable(format!(
                    "evicted: {why}; reconnect"
                ))));
            }
            evicted.push((id.clone(), e.rank.take().is_some(), why));
        }
        // Forget workers lost long ago.
        self.workers
            .retain(|_, e| !((e.lost || e.exited) && now.duration_since(e.last_seen) > ttl * 30));
        let known = &self.workers;
        self.stalled.retain(|id| known.contains_key(id));
        for id in expired {
            warn!(worker_id = %id, "worker heartbeat expired");
            self.rank_lost(&id, "a worker's heartbeat expired").await?;
        }
        for (id, had_rank, why) in evicted {
            warn!(worker_id = %id, "worker evicted: {why}");
            self.metrics.worker_evictions_total.inc();
            self.stalled.insert(id.clone());
            if let Some(job) = self.job.as_mut() {
                job.state.evictions += 1;
            }
            if had_rank {
                self.rank_lost(&id, &format!("a worker was evicted: {why}"))
                    .await?;
            }
        }
        self.check_deadlines(now).await?;
        self.check_triggers().await?;
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

    pub(super) async fn rank_lost(&mut self, worker: &WorkerId, why: &str) -> Result<()> {
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
        self.roll_back(why, skip, false).await
    }

    /// [`Self::rollback`] forced by an I/O failure (a growth checkpoint that could not be
    /// written while the grown model trained): counted neither as a failed growth nor toward
    /// the stalled rollbacks ([`job::count_io_rollback`]).
    pub(super) async fn rollback_io(&mut self, why: &str) -> Result<()> {
        self.roll_back(why, None, true).await
    }

    async fn roll_back(&mut self, why: &str, skip: Option<(u64, u64)>, io: bool) -> Result<()> {
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
        let verdict = if io {
            job::count_io_rollback(&mut job.state, why)
        } else {
            job::count_rollback(&mut job.state, why, skip, failed_growth.is_some())
        };
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

    pub(super) fn stop_all(&mut self, reason: &str) {
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

    /// A fresh group token per epoch: 256 random bits in hex, from which every rank derives
    /// its ring key (the token travels only inside the worker's session).
    pub(super) fn fresh_token(&mut self) -> String {
        self.token_nonce += 1;
        let mut bytes = [0u8; 32];
        let random = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
        if random.is_err() {
            // No /dev/urandom: time, process and a counter, hashed (unique, not secret).
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let seed = format!("{t}/{}/{}", std::process::id(), self.token_nonce);
            bytes = sha256_of(seed.as_bytes());
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// If the job needs ranks and enough workers are idle, start a new epoch. A growth
    /// re-forming the groups at a new layout keeps its transaction and phase.
    pub(super) async fn try_start_epoch(&mut self) -> Result<()> {
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
        // Suspects last: a worker evicted for making no progress (until it reports progress),
        // or one whose training thread has been stuck in a step for a while (it was dropped
        // from the group by a peer's failure): picked only when no other idle worker is left.
        let now = Instant::now();
        // A stepping worker's reported activity is never older than a heartbeat period plus a
        // step; a thread stuck that much longer is not stepping.
        let suspect_after = self.opts.heartbeat_interval
            + Duration::from_secs_f64(job.step_seconds * 5.0)
            + Duration::from_millis(500);
        let suspect = |id: &WorkerId| {
            self.stalled.contains(id) || self.workers[id].stuck_for(now, suspect_after)
        };
        // Then by host, then registration order: ranks are TP-major, so adjacent ranks (one TP
        // group) land on one host where the hosts allow.
        idle.sort_by(|a, b| {
            let host = |id: &WorkerId| self.workers[id].host.clone();
            (suspect(&a.1), host(&a.1), a.0).cmp(&(suspect(&b.1), host(&b.1), b.0))
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
        // A group may not mix devices: take `world` workers of one kind (CPU, CUDA with NCCL,
        // CUDA without) when enough of a kind are idle — the first candidate's kind first —
        // else the first `world`, which the backend choice below refuses with the reason.
        let kind = |id: &WorkerId| {
            let e = &self.workers[id];
            let cuda = backend::is_cuda(&e.device);
            (cuda, cuda && e.nccl)
        };
        let enough = idle
            .iter()
            .map(|(_, id)| kind(id))
            .find(|k| idle.iter().filter(|(_, id)| kind(id) == *k).count() >= world);
        let chosen: Vec<WorkerId> = idle
            .iter()
            .filter(|(_, id)| enough.is_none_or(|k| kind(id) == k))
            .take(world)
            .map(|(_, id)| id.clone())
            .collect();
        // The groups' backends (from what the chosen workers said in Hello), and for NCCL
        // groups one fresh id from each group's rank 0 (all or none).
        let layout = relayout.as_ref().unwrap_or(&job.state.layout);
        let (dp, tp) = (layout.dp, layout.tp);
        let members: Vec<backend::Member> = chosen
            .iter()
            .map(|id| backend::Member {
                worker: id.0.clone(),
                device: self.workers[id].device.clone(),
                nccl: self.workers[id].nccl,
            })
            .collect();
        let backends = match backend::choose_layout(dp, tp, &members) {
            Ok(b) => b,
            Err(refusal) => {
                let msg = format!("cannot form the groups: {refusal}");
                if relayout.is_some() {
                    return self.rollback(&msg, None).await;
                }
                let job = self.job.as_mut().expect("a job");
                if job.state.phase != Phase::WaitingForWorkers || job.state.message != msg {
                    warn!(job_id = %job.id, "{msg}");
                    job::transition(&mut job.state, Phase::WaitingForWorkers, msg);
                    self.persist_state().await?;
                }
                return Ok(());
            }
        };
        let mut offers: Vec<VecDeque<Vec<u8>>> = chosen
            .iter()
            .map(|id| self.workers[id].nccl_ids.clone())
            .collect();
        let nccl_ids = match backend::relay(dp, tp, backends, &mut offers) {
            Ok(ids) => ids,
            Err(rank) => {
                // It offers fresh ids right after its current assignment; the offer retries.
                debug!(worker_id = %chosen[rank], rank, "waiting for a fresh NCCL id from a group's rank 0");
                return Ok(());
            }
        };
        for (id, left) in chosen.iter().zip(offers) {
            self.workers.get_mut(id).expect("chosen").nccl_ids = left;
        }
        let token = self.fresh_token();
        let ring_timeout = self.ring_timeout();
        let opts = self.opts.clone();
        let job = self.job.as_mut().expect("a job");
        job::start_epoch(&mut job.state, relayout.is_some());
        job.ranks = chosen;
        job.group_token = token;
        job.backends = Some(backends);
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
        // A restore point of checkpoint + plan: the ranks restore the checkpoint and apply the
        // growth's plan (never during a re-layout, which restores the growth checkpoint itself).
        let restore_grow = match (relayout.is_none(), job.state.restore_growth) {
            (true, Some(g)) => job.growths.get(&g).map(|rec| {
                let layout = rec.layout_after.as_ref().unwrap_or(&job.state.layout);
                transactions::grow_cmd(rec, layout)
            }),
            _ => None,
        };
        info!(job_id = %job.id, epoch = %job.state.epoch, generation = %job.state.generation, step = %job.state.step, world, restore = %restore, restore_grow = restore_grow.is_some(), dp_backend = %backends.0, tp_backend = %backends.1, "starting epoch");
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
            ring_timeout_seconds: ring_timeout.as_secs_f64(),
            restore_grow,
            dp_backend: backends.0.name().into(),
            tp_backend: backends.1.name().into(),
            dp_nccl_id: Vec::new(),
            tp_nccl_id: Vec::new(),
        };
        let ranks = job.ranks.clone();
        let paused = job.state.paused;
        for (rank, w) in ranks.iter().enumerate() {
            let e = self.workers.get_mut(w).unwrap();
            e.rank = Some(Rank(rank as u32));
            let (dp_nccl_id, tp_nccl_id) = nccl_ids.for_rank(rank, layout.tp);
            let a = pb::Assignment {
                rank: rank as u32,
                dp_nccl_id,
                tp_nccl_id,
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

    /// Count a message rejected by fencing.
    pub(super) fn count_fenced(&mut self, kind: &'static str) {
        self.fenced += 1;
        self.metrics
            .fenced_messages_total
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    /// Common fencing: the session must be the worker's current one and hold a rank of the
    /// current epoch, and the message must carry that epoch and not an older generation.
    /// Returns the rank.
    pub(super) fn fence(
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

    /// A heartbeat: the worker is alive, and its training thread is in `hb.phase` since
    /// `hb.phase_seconds` ago.
    pub fn heartbeat(&mut self, worker: &WorkerId, session: u64, hb: &pb::Heartbeat) {
        let timeout = self.progress_timeout();
        let Some(e) = self.workers.get_mut(worker) else {
            return;
        };
        if e.session != session {
            return;
        }
        let now = Instant::now();
        e.last_seen = now;
        if !hb.phase.is_empty() {
            let ago = Duration::from_secs_f64(hb.phase_seconds.clamp(0.0, 1e9));
            e.activity = hb.phase.clone();
            e.activity_since = now.checked_sub(ago).unwrap_or(now);
        }
        if hb.step_seconds.is_finite() && hb.step_seconds > 0.0 {
            e.step_seconds = hb.step_seconds;
        }
        // An evicted worker is a candidate again once it shows progress.
        if !e.stuck_for(now, timeout) && self.stalled.remove(worker) {
            info!(worker_id = %worker, phase = %e.activity, "an evicted worker makes progress again");
        }
    }

    /// `worker` offers fresh NCCL ids (after an assignment used some of its earlier ones): they
    /// join its unused ones (the newest [`backend::NCCL_IDS_OFFERED`] are kept), and an epoch
    /// waiting for them can start.
    pub async fn nccl_offer(
        &mut self,
        worker: &WorkerId,
        session: u64,
        ids: VecDeque<Vec<u8>>,
    ) -> Result<()> {
        let Some(e) = self.workers.get_mut(worker) else {
            return Ok(());
        };
        if e.session != session {
            return Ok(());
        }
        e.last_seen = Instant::now();
        e.nccl_ids.extend(ids);
        while e.nccl_ids.len() > backend::NCCL_IDS_OFFERED {
            e.nccl_ids.pop_front();
        }
        self.try_start_epoch().await
    }

    /// The training thread of `worker` failed a command and waits for a new assignment.
    pub(super) fn now_idle(&mut self, worker: &WorkerId) {
        if let Some(e) = self.workers.get_mut(worker) {
            e.activity = "idle".into();
            e.activity_since = Instant::now();
        }
    }
}

/// SHA-256 of `data` (the fallback token when the OS has no random source).
fn sha256_of(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}
