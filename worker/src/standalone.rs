//! `trellis-worker train`: a whole job in one process (no coordinator).
//!
//! Growth stages fire at their step; validation every `eval_interval` steps; checkpoints every
//! `checkpoint.interval` steps, right before each growth (the rollback point), right after the
//! first step of the grown model, and at the end. A run resumes automatically from
//! `<checkpoint root>/<job>/latest`. Outputs under `out`: `metrics.jsonl` (one JSON line per step,
//! plus `val` and `growth` lines) and TensorBoard event files (`events.out.tfevents.*`: the same
//! numbers as scalars `train/loss`, `train/lr`, `train/tokens_per_second`, `train/mfu`,
//! `train/layers`, `train/generation`, `val/loss`, `growth/to_layers`, …), both written by
//! [`trellis_telemetry::Tracker`]; `summary.json` and `loss.png`. MFU is against
//! `TRELLIS_PEAK_FLOPS` (FLOP/s of the device; default 1e12, as the coordinator's default).
use crate::grow::GrowthTimings;
use crate::trainer::{StepReport, Trainer};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use trellis_core::checkpoint;
use trellis_core::job::JobSpec;
use trellis_telemetry::Tracker;

/// What the run loop tells its observer (the CLI's progress bar).
#[derive(Debug)]
pub enum Event<'a> {
    Resumed {
        step: u64,
        dir: &'a Path,
    },
    Step(&'a StepReport),
    Validation {
        step: u64,
        tokens: u64,
        loss: f64,
    },
    Growth {
        stage: usize,
        step: u64,
        from_layers: usize,
        to_layers: usize,
        timings: &'a GrowthTimings,
    },
    Checkpoint {
        step: u64,
        dir: &'a Path,
    },
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop after this many optimizer steps in total (the schedule still uses the spec's
    /// `max_steps`). For benchmarks and tests.
    pub stop_at: Option<u64>,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricLine {
    Train {
        step: u64,
        tokens: u64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        step_seconds: f64,
        compute_seconds: f64,
        comm_seconds: f64,
        data_seconds: f64,
        tokens_per_second: f64,
        layers: usize,
        /// Model FLOP utilisation against `TRELLIS_PEAK_FLOPS`.
        #[serde(default)]
        mfu: f64,
        /// Growth generation of the model (0 before the first growth).
        #[serde(default)]
        generation: u64,
    },
    Val {
        step: u64,
        tokens: u64,
        loss: f64,
    },
    Growth {
        step: u64,
        tokens: u64,
        from_layers: usize,
        to_layers: usize,
        operator: String,
        #[serde(default)]
        generation: u64,
        timings: GrowthTimings,
    },
}

impl MetricLine {
    fn step(&self) -> u64 {
        match self {
            MetricLine::Train { step, .. }
            | MetricLine::Val { step, .. }
            | MetricLine::Growth { step, .. } => *step,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GrowthEvent {
    pub step: u64,
    pub tokens: u64,
    pub operator: String,
    pub factor: usize,
    pub optimizer: String,
    pub from_layers: usize,
    pub to_layers: usize,
}

/// `summary.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub job: String,
    pub steps: u64,
    pub tokens: u64,
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub wall_seconds: f64,
    pub resumed_from_step: Option<u64>,
    pub params_before: u64,
    pub params_after: u64,
    pub layers_before: usize,
    pub layers_after: usize,
    pub growth_events: Vec<GrowthEvent>,
    pub checkpoint: Option<String>,
}

/// The job's checkpoint root `<root>/<job>`.
pub fn job_root(spec: &JobSpec, out: &Path) -> PathBuf {
    spec.checkpoint
        .dir
        .clone()
        .unwrap_or_else(|| out.join("checkpoints"))
        .join(&spec.job.name)
}

/// The run's metrics: `metrics.jsonl` and TensorBoard event files (through the tracker), and
/// the lines in memory for the summary and the plot.
struct Metrics {
    tracker: Tracker,
    lines: Vec<MetricLine>,
}

impl Metrics {
    fn push(&mut self, l: MetricLine) -> Result<()> {
        let v = serde_json::to_value(&l).expect("metric line serialises");
        let kind = v["kind"].as_str().unwrap_or("event").to_string();
        self.tracker
            .event(&kind, l.step(), v)
            .map_err(tracking_err)?;
        self.lines.push(l);
        Ok(())
    }
}

/// A tracker's failure to write is an I/O error of the run.
fn tracking_err(e: trellis_telemetry::Error) -> Error {
    match e {
        trellis_telemetry::Error::Tracking { path, source } => {
            Error::io(format!("cannot write {}", path.display()), source)
        }
        other => Error::Invalid(other.to_string()),
    }
}

/// Peak FLOP/s for MFU: `TRELLIS_PEAK_FLOPS`, else 1e12.
fn peak_flops() -> f64 {
    std::env::var("TRELLIS_PEAK_FLOPS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(1e12)
}

/// Run (or resume) the job `spec` with outputs under `out`.
/// Validation loss now: recorded in `metrics.jsonl` and reported to the observer.
fn validate(t: &mut Trainer, metrics: &mut Metrics, observer: &mut dyn FnMut(Event)) -> Result<()> {
    let (step, tokens) = (t.step_count(), t.tokens());
    let loss = t.evaluate()?;
    metrics.push(MetricLine::Val { step, tokens, loss })?;
    observer(Event::Validation { step, tokens, loss });
    Ok(())
}

pub fn run_job(
    spec: &JobSpec,
    out: &Path,
    opts: &RunOptions,
    observer: &mut dyn FnMut(Event),
) -> Result<Summary> {
    let wall = Instant::now();
    std::fs::create_dir_all(out)
        .map_err(|e| Error::io(format!("cannot create output dir {}", out.display()), e))?;
    let root = job_root(spec, out);
    let mut t = Trainer::new(spec, out, 0, 1, Box::new(trellis_comm::Solo))?;
    let params_before = t.model().num_parameters();
    let layers_before = t.config().num_hidden_layers;
    let mut resumed_from = None;
    // The job's own latest checkpoint, else the spec's `checkpoint.init_from`.
    let start = match checkpoint::latest(&root)? {
        Some(dir) => Some(dir),
        None => spec.checkpoint.init_from.clone(),
    };
    if let Some(dir) = start {
        t.restore(&dir)?;
        resumed_from = Some(t.step_count());
        observer(Event::Resumed {
            step: t.step_count(),
            dir: &dir,
        });
    }
    // metrics.jsonl: keep what the resumed state has already seen, drop the rest; TensorBoard
    // drops its points from the first step logged again.
    let (step0, pending) = (t.step_count(), t.pending_growth_stage().is_some());
    let keep = |v: &serde_json::Value| -> bool {
        let Ok(l) = serde_json::from_value::<MetricLine>(v.clone()) else {
            return false;
        };
        resumed_from.is_some()
            && l.step() <= step0
            && !(matches!(l, MetricLine::Growth { .. }) && l.step() == step0 && pending)
    };
    let first_step = match (resumed_from, pending) {
        (None, _) => 0,
        (Some(_), true) => step0,
        (Some(_), false) => step0 + 1,
    };
    let (tracker, kept) = Tracker::open(out, first_step, keep).map_err(tracking_err)?;
    let mut metrics = Metrics {
        tracker,
        lines: kept
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect(),
    };
    let peak = peak_flops();

    let max_steps = spec.train.max_steps.min(opts.stop_at.unwrap_or(u64::MAX));
    let keep = spec.checkpoint.keep;
    let mut last_ckpt: Option<u64> = checkpoint::latest(&root)?.and(resumed_from);
    let mut last_ckpt_dir: Option<PathBuf> = checkpoint::latest(&root)?;
    let mut save =
        |t: &mut Trainer, last: &mut Option<u64>, observer: &mut dyn FnMut(Event)| -> Result<()> {
            if *last == Some(t.step_count()) && t.pending_growth_stage().is_none() {
                return Ok(());
            }
            let dir = t.save_checkpoint(&root, keep)?;
            *last = Some(t.step_count());
            observer(Event::Checkpoint {
                step: t.step_count(),
                dir: &dir,
            });
            last_ckpt_dir = Some(dir);
            Ok(())
        };
    let mut post_growth_ckpt = false;
    let mut last_val_step = None;
    loop {
        if let Some(i) = t.pending_growth_stage() {
            // The rollback point: the state right before the growth.
            if last_ckpt != Some(t.step_count()) {
                save(&mut t, &mut last_ckpt, observer)?;
            }
            let from = t.config().num_hidden_layers;
            let timings = t.grow_stage(i)?;
            let to = t.config().num_hidden_layers;
            let rec = t.growth_history().last().cloned().expect("growth recorded");
            metrics.push(MetricLine::Growth {
                step: t.step_count(),
                tokens: t.tokens(),
                from_layers: from,
                to_layers: to,
                operator: rec.operator.clone(),
                generation: t.generation(),
                timings: timings.clone(),
            })?;
            observer(Event::Growth {
                stage: i,
                step: t.step_count(),
                from_layers: from,
                to_layers: to,
                timings: &timings,
            });
            post_growth_ckpt = true;
            continue;
        }
        if t.step_count() >= max_steps {
            break;
        }
        let r = t.step()?;
        let flops = t.config().train_flops_per_token(spec.data.seq_len);
        metrics.push(MetricLine::Train {
            step: r.step,
            tokens: r.tokens,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            step_seconds: r.step_seconds,
            compute_seconds: r.compute_seconds,
            comm_seconds: r.comm_seconds,
            data_seconds: r.data_seconds,
            tokens_per_second: r.tokens_per_second,
            layers: t.config().num_hidden_layers,
            mfu: flops * r.tokens_per_second / peak,
            generation: t.generation(),
        })?;
        observer(Event::Step(&r));
        let s = t.step_count();
        let ei = spec.train.eval_interval;
        if ei > 0 && s % ei == 0 {
            validate(&mut t, &mut metrics, observer)?;
            last_val_step = Some(s);
        }
        let ci = spec.checkpoint.interval;
        if post_growth_ckpt || (ci > 0 && s % ci == 0) {
            save(&mut t, &mut last_ckpt, observer)?;
            post_growth_ckpt = false;
        }
    }
    let s = t.step_count();
    if last_val_step != Some(s)
        && !metrics
            .lines
            .iter()
            .any(|l| matches!(l, MetricLine::Val { step, .. } if *step == s))
    {
        validate(&mut t, &mut metrics, observer)?;
    }
    save(&mut t, &mut last_ckpt, observer)?;

    let lines = &metrics.lines;
    let final_train = lines.iter().rev().find_map(|l| match l {
        MetricLine::Train { loss, .. } => Some(*loss),
        _ => None,
    });
    let final_val = lines.iter().rev().find_map(|l| match l {
        MetricLine::Val { loss, .. } => Some(*loss),
        _ => None,
    });
    let growth_events = t
        .growth_history()
        .iter()
        .map(|g| GrowthEvent {
            step: g.at_step,
            tokens: g.tokens,
            operator: g.operator.clone(),
            factor: g.factor,
            optimizer: format!("{:?}", g.optimizer).to_lowercase(),
            from_layers: g.from_layers,
            to_layers: g.to_layers,
        })
        .collect::<Vec<_>>();
    let summary = Summary {
        job: spec.job.name.clone(),
        steps: s,
        tokens: t.tokens(),
        final_train_loss: final_train,
        final_val_loss: final_val,
        wall_seconds: wall.elapsed().as_secs_f64(),
        resumed_from_step: resumed_from,
        params_before,
        params_after: t.model().num_parameters(),
        layers_before,
        layers_after: t.config().num_hidden_layers,
        growth_events,
        checkpoint: last_ckpt_dir.map(|d| d.display().to_string()),
    };
    let spath = out.join("summary.json");
    std::fs::write(
        &spath,
        serde_json::to_string_pretty(&summary).expect("summary serialises"),
    )
    .map_err(|e| Error::io(format!("cannot write {}", spath.display()), e))?;
    plot(out, spec, lines)?;
    Ok(summary)
}

/// `loss.png`: train and validation loss vs tokens, growth marked.
fn plot(out: &Path, spec: &JobSpec, lines: &[MetricLine]) -> Result<()> {
    use trellis_core::plot::{loss_plot, Series};
    let mut train = Vec::new();
    let mut val = Vec::new();
    let mut markers = Vec::new();
    for l in lines {
        match l {
            MetricLine::Train { tokens, loss, .. } => train.push((*tokens as f64, *loss)),
            MetricLine::Val { tokens, loss, .. } => val.push((*tokens as f64, *loss)),
            MetricLine::Growth {
                tokens,
                from_layers,
                to_layers,
                operator,
                ..
            } => markers.push((
                *tokens as f64,
                format!("{operator} {from_layers}→{to_layers}"),
            )),
        }
    }
    let series = [
        Series {
            name: "train".into(),
            points: train,
        },
        Series {
            name: "validation".into(),
            points: val,
        },
    ];
    loss_plot(
        &out.join("loss.png"),
        &format!("{} loss", spec.job.name),
        "tokens",
        &series,
        &markers,
    )?;
    Ok(())
}
