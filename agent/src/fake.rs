//! A [`Runner`] without libtorch, for protocol tests and the control-plane benchmark: "training"
//! is arithmetic (a deterministic loss from the step and the data cursor), checkpoints are small
//! JSON files in the real directory layout (`step-<N>.tmp/` → `step-<N>/`, `latest`).
use crate::{Assignment, BoxError, GrowOrder, Runner, RunnerState, ShardWriteJob, StepOutcome};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_core::checkpoint::{FileEntry, ShardReport};
use trellis_core::growth::Operator;

/// Something a fake runner did, with the step at which it did it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub epoch: u64,
    pub rank: u32,
    pub what: String,
    pub step: u64,
    pub generation: u64,
    pub layers: usize,
}

#[derive(Clone, Default)]
pub struct FakeConfig {
    /// Sleep per step.
    pub step_delay: Duration,
    /// The step whose batch contains this global sample index yields a NaN loss.
    pub nan_at_sample: Option<u64>,
    /// Fail the stack phase of every growth.
    pub fail_grow: bool,
    /// Fail every checkpoint commit (rank 0 cannot finalize: a checkpoint failure, not a
    /// training failure).
    pub fail_commit: bool,
    /// While set, writing checkpoint shards fails like a full disk ([`crate::CheckpointIo`]).
    pub fail_write: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Every step at this step count fails (a deterministic training failure).
    pub fail_at_step: Option<u64>,
    /// The training thread hangs for good when it starts this step (a stuck kernel); the
    /// session and its heartbeats go on.
    pub hang_at_step: Option<u64>,
    /// Panic on the training thread at this step (a bug in the trainer).
    pub panic_at_step: Option<u64>,
    /// Commit checkpoints into this directory instead of `<job_root>/step-N` (a rank 0 that
    /// writes elsewhere: the coordinator must not record it).
    pub commit_elsewhere: Option<std::path::PathBuf>,
    /// Every runner appends what it did here.
    pub events: Arc<Mutex<Vec<Event>>>,
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Default)]
struct FakeState {
    step: u64,
    tokens: u64,
    cursor: u64,
    generation: u64,
    layers: usize,
}

pub struct FakeRunner {
    cfg: FakeConfig,
    a: Assignment,
    groups: crate::Collectives,
    st: FakeState,
    pending: Option<FakeState>,
    /// `st.step`, readable by a background checkpoint write.
    steps_done: Arc<AtomicU64>,
}

impl FakeRunner {
    pub fn new(
        a: &Assignment,
        groups: crate::Collectives,
        cfg: FakeConfig,
    ) -> Result<FakeRunner, BoxError> {
        let st = match &a.restore_from {
            Some(dir) => {
                let text = std::fs::read_to_string(dir.join("trainer_state.json"))
                    .map_err(|e| format!("cannot restore {}: {e}", dir.display()))?;
                serde_json::from_str(&text)?
            }
            None => FakeState {
                layers: a.spec.model.num_hidden_layers.unwrap_or(2),
                ..Default::default()
            },
        };
        let steps_done = Arc::new(AtomicU64::new(st.step));
        let mut r = FakeRunner {
            cfg,
            a: a.clone(),
            groups,
            st,
            pending: None,
            steps_done,
        };
        r.log("build");
        // A restore point of checkpoint + plan.
        if let Some(order) = &a.restore_grow {
            r.apply(order);
            r.log("restore-grow");
        }
        Ok(r)
    }

    /// A factory for [`crate::run`].
    pub fn factory(cfg: FakeConfig) -> impl crate::RunnerFactory {
        move |a: &Assignment, groups: crate::Collectives| -> Result<Box<dyn Runner>, BoxError> {
            Ok(Box::new(FakeRunner::new(a, groups, cfg.clone())?))
        }
    }

    fn apply(&mut self, order: &GrowOrder) {
        self.st.layers = match &order.spec.operator {
            Operator::StackingList { layers } => layers.len(),
            _ => self.st.layers * order.spec.factor,
        };
        self.st.generation = order.generation;
    }

    fn log(&self, what: &str) {
        self.cfg.events.lock().unwrap().push(Event {
            epoch: self.a.epoch,
            rank: self.a.rank.0,
            what: what.into(),
            step: self.st.step,
            generation: self.st.generation,
            layers: self.st.layers,
        });
    }
}

impl Runner for FakeRunner {
    fn step(&mut self) -> Result<StepOutcome, BoxError> {
        if self.cfg.panic_at_step == Some(self.st.step + 1) {
            panic!("fake: a bug at step {}", self.st.step + 1);
        }
        if self.cfg.hang_at_step == Some(self.st.step + 1) {
            self.log("hang");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if self.cfg.fail_at_step == Some(self.st.step + 1) {
            return Err(format!("fake: step {} fails every time", self.st.step + 1).into());
        }
        let t0 = Instant::now();
        let batch = self.a.spec.train.global_batch as u64;
        let mut start = self.st.cursor;
        for &(from, to) in &self.a.skip {
            if start >= from && start < to {
                start = to;
            }
        }
        let end = start + batch;
        let s = self.st.step as f64;
        let mut loss = 2.0 + 8.0 / (1.0 + 0.05 * s) + 0.001 * (start % 7) as f64
            - 0.01 * self.st.generation as f64;
        if self
            .cfg
            .nan_at_sample
            .is_some_and(|n| n >= start && n < end)
        {
            loss = f64::NAN;
        }
        if !self.cfg.step_delay.is_zero() {
            std::thread::sleep(self.cfg.step_delay);
        }
        self.st.step += 1;
        self.steps_done.store(self.st.step, Ordering::SeqCst);
        self.st.tokens += batch * self.a.spec.data.seq_len as u64;
        self.st.cursor = end;
        let secs = t0.elapsed().as_secs_f64();
        Ok(StepOutcome {
            step: self.st.step,
            tokens: self.st.tokens,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            step_seconds: secs,
            compute_seconds: secs * 0.8,
            comm_seconds: secs * 0.15,
            data_seconds: secs * 0.05,
            sample_start: start,
            sample_end: end,
        })
    }

    fn evaluate(&mut self) -> Result<f64, BoxError> {
        Ok(2.1 + 8.0 / (1.0 + 0.05 * self.st.step as f64))
    }

    fn write_checkpoint_shards(
        &mut self,
        job_root: &Path,
    ) -> Result<Option<ShardReport>, BoxError> {
        let tmp = job_root.join(format!("step-{}.tmp", self.st.step));
        std::fs::create_dir_all(&tmp)?;
        if self
            .cfg
            .fail_write
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        {
            // A partial file, as a full disk leaves one.
            let _ = std::fs::write(tmp.join(format!("fake-rank{}.json", self.a.rank.0)), b"{");
            return Err(Box::new(crate::CheckpointIo(format!(
                "fake: cannot write {}: No space left on device (os error 28)",
                tmp.display()
            ))));
        }
        let name = format!("fake-rank{}.json", self.a.rank.0);
        let body = serde_json::to_vec(&self.st)?;
        std::fs::write(tmp.join(&name), &body)?;
        self.pending = Some(self.st.clone());
        self.log("checkpoint");
        Ok(Some(ShardReport {
            files: vec![FileEntry {
                path: name,
                size: body.len() as u64,
                sha256: String::new(),
            }],
            tensors: Default::default(),
        }))
    }

    /// The files are written now, as in [`Runner::begin_checkpoint_shards`]'s default; the
    /// background job logs `growth-write` with the step the runner has reached when the agent
    /// lets it run (after the grown model's first step: docs/design.md §3).
    fn begin_growth_checkpoint_shards(
        &mut self,
        job_root: &Path,
    ) -> Result<ShardWriteJob, BoxError> {
        let r = self.write_checkpoint_shards(job_root)?;
        let (events, steps_done) = (self.cfg.events.clone(), self.steps_done.clone());
        let (epoch, rank) = (self.a.epoch, self.a.rank.0);
        let (generation, layers) = (self.st.generation, self.st.layers);
        Ok(Box::new(move || {
            events.lock().unwrap().push(Event {
                epoch,
                rank,
                what: "growth-write".into(),
                step: steps_done.load(Ordering::SeqCst),
                generation,
                layers,
            });
            Ok(r)
        }))
    }

    fn finalize_checkpoint(
        &mut self,
        job_root: &Path,
        step: u64,
        reports: &[ShardReport],
    ) -> Result<PathBuf, BoxError> {
        if self.cfg.fail_commit {
            return Err(format!("fake: cannot commit the checkpoint of step {step}").into());
        }
        let st = self
            .pending
            .clone()
            .ok_or("finalize without a written checkpoint")?;
        if st.step != step {
            return Err(format!(
                "finalize step {step} but the pending checkpoint is step {}",
                st.step
            )
            .into());
        }
        let tmp = job_root.join(format!("step-{step}.tmp"));
        for r in reports {
            for f in &r.files {
                if !tmp.join(&f.path).exists() {
                    return Err(format!("shard {} missing from {}", f.path, tmp.display()).into());
                }
            }
        }
        std::fs::write(tmp.join("trainer_state.json"), serde_json::to_vec(&st)?)?;
        let dir = match &self.cfg.commit_elsewhere {
            Some(d) => d.join(format!("step-{step}")),
            None => job_root.join(format!("step-{step}")),
        };
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&tmp, &dir)?;
        std::fs::write(job_root.join("latest"), format!("step-{step}"))?;
        self.log("commit");
        Ok(dir)
    }

    fn grow(&mut self, order: &GrowOrder) -> Result<(), BoxError> {
        if self.cfg.fail_grow {
            self.log("grow-failed");
            return Err("injected growth failure".into());
        }
        self.apply(order);
        self.log("grow");
        Ok(())
    }

    fn state(&self) -> RunnerState {
        RunnerState {
            step: self.st.step,
            tokens: self.st.tokens,
            generation: self.st.generation,
            layers: self.st.layers,
            data_cursor: self.st.cursor,
        }
    }

    fn agree_min(&mut self, v: u64) -> Result<u64, BoxError> {
        let v = self.groups.tp.all_reduce_min_u64(v)?;
        Ok(self.groups.dp.all_reduce_min_u64(v)?)
    }
}
