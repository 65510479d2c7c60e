//! What `coordctl` prints: one plain-data view per answer (its JSON shape is the stable script
//! interface documented in `docs/coordctl.md`) and its human table.
//!
//! Renderers return a `String`; `main` writes it once (a closed pipe is not an error).
use crate::units::{fmt_count, fmt_sci};
use serde::Serialize;
use std::fmt::Write as _;
use trellis_proto as pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Pretty JSON with a trailing newline.
pub fn json<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("views serialise");
    s.push('\n');
    s
}

/// Compact JSON on one line (for streams: one object per line).
pub fn json_line<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string(v).expect("views serialise");
    s.push('\n');
    s
}

// ------------------------------------------------------------------------------------------
// Views
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct LayoutView {
    pub dp: u32,
    pub tp: u32,
    pub explanation: String,
    pub memory_per_rank_bytes: u64,
    pub budget_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct TimingsView {
    pub checkpoint_seconds: f64,
    pub stack_seconds: f64,
    pub reshard_seconds: f64,
    pub resume_seconds: f64,
    pub total_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GrowthView {
    pub generation: u64,
    pub at_step: u64,
    pub tokens: u64,
    pub operator: String,
    pub factor: u32,
    pub optimizer: &'static str,
    pub from_layers: u32,
    pub to_layers: u32,
    pub phase: &'static str,
    pub timings: TimingsView,
    pub error: String,
    /// Validation loss of the grown model before it trained.
    pub val_loss_after: Option<f64>,
    /// The layout the grown model trains at.
    pub dp_after: u32,
    pub tp_after: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointView {
    pub step: u64,
    pub tokens: u64,
    pub generation: u64,
    pub layers: u32,
    pub reason: String,
    pub committed_at: f64,
    pub dir: String,
    /// Why it cannot be restored; absent for a usable checkpoint.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub unusable: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct WorkersSummaryView {
    pub expected: u32,
    pub active: u32,
    pub idle: u32,
    pub lost: u32,
    /// Exited after the job ended (not lost).
    pub exited: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    pub job_id: String,
    pub phase: &'static str,
    pub message: String,
    pub generation: u64,
    pub epoch: u64,
    pub step: u64,
    pub max_steps: u64,
    pub tokens: u64,
    pub data_cursor: u64,
    pub layers: u32,
    pub parameters: u64,
    pub layout: Option<LayoutView>,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub tokens_per_second: f64,
    pub mfu: f64,
    /// The growth in flight, if any.
    pub growth: Option<GrowthView>,
    pub last_growth_timings: Option<TimingsView>,
    pub growth_history: Vec<GrowthView>,
    pub checkpoints: Vec<CheckpointView>,
    pub workers: WorkersSummaryView,
    pub loss_anomalies: u64,
    pub rollbacks: u64,
    pub next_growth_stage: u32,
    /// Messages rejected by fencing (stale epoch / generation / session).
    pub fenced_messages: u64,
    /// Checkpoints aborted without a rollback (write or commit failed, deadline): training
    /// went on and the checkpoint was retried.
    pub checkpoint_failures: u64,
    /// The last checkpoint failure; empty once a checkpoint commits again.
    pub checkpoint_error: String,
    /// Workers evicted because their training thread made no progress.
    pub evictions: u64,
    /// Ranks whose last step took over 1.5x the group's median.
    pub slow_ranks: Vec<u32>,
    /// Collective backends of the current epoch's groups (solo | ring | nccl); empty before
    /// the first epoch.
    pub backend: BackendView,
    /// Scheduled work whose checkpoint failed, waiting out its backoff ("periodic", "growth",
    /// ...); absent when nothing waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    pub dp: String,
    pub tp: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryView {
    pub what: String,
    pub in_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    pub worker_id: String,
    pub host: String,
    pub pid: u32,
    pub device: String,
    pub state: &'static str,
    /// `null` when the worker holds no rank.
    pub rank: Option<u32>,
    pub epoch: u64,
    pub last_step: u64,
    pub last_seen_seconds_ago: f64,
    pub ring_address: String,
    /// What its training thread is doing (idle, step, checkpoint, ...) and for how long.
    pub progress_phase: String,
    pub progress_seconds: f64,
    /// Its last step time over the group's median (0 = unknown; > 1.5 is slow).
    pub slowness: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossPointView {
    pub step: u64,
    pub tokens: u64,
    pub generation: u64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AnomalyView {
    pub step: u64,
    pub kind: String,
    pub loss: f64,
    pub ema: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossView {
    pub points: Vec<LossPointView>,
    pub growth_events: Vec<GrowthView>,
    pub anomalies: Vec<AnomalyView>,
    pub ema: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubmitView {
    pub job_id: String,
    pub status: Option<StatusView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GrowView {
    pub generation: u64,
    pub at_step: u64,
    pub from_layers: u32,
    pub to_layers: u32,
    pub layout: Option<LayoutView>,
}

/// Pause, resume and checkpoint save: the command the coordinator queued.
#[derive(Debug, Clone, Serialize)]
pub struct CommandView {
    pub action: &'static str,
    pub command_id: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlotView {
    pub plot: String,
    pub points: usize,
    pub growth_events: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanView {
    /// Target parameters N.
    pub params: f64,
    /// Token budget D.
    pub budget_tokens: f64,
    /// C = 6·N·D.
    pub flops: f64,
    /// The formula's d, even out of range.
    pub formula_tokens: f64,
    pub in_range: bool,
    /// The d to use (the formula's in range, else the fallback rule's).
    pub recommended_tokens: f64,
    pub rule: String,
    pub factor: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileView {
    pub path: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OfflineGrowView {
    pub input: String,
    pub output: String,
    pub operator: String,
    pub factor: usize,
    pub optimizer: &'static str,
    pub from_layers: usize,
    pub to_layers: usize,
    pub from_parameters: u64,
    pub to_parameters: u64,
    pub files: Vec<FileView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportView {
    pub input: String,
    pub output: String,
    pub layers: usize,
    pub parameters: u64,
    pub files: Vec<FileView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportView {
    pub input: String,
    pub output: String,
    pub layers: usize,
    pub parameters: u64,
    pub source_dtypes: Vec<String>,
    pub tie_word_embeddings: bool,
    pub skipped: Vec<String>,
    pub tokenizer: bool,
    pub files: Vec<FileView>,
}

// ------------------------------------------------------------------------------------------
// proto -> view
// ------------------------------------------------------------------------------------------

pub fn optimizer_label(p: pb::OptimizerPolicy) -> &'static str {
    match p {
        pb::OptimizerPolicy::Carry => "carry",
        _ => "reset",
    }
}

fn worker_state_label(s: pb::WorkerState) -> &'static str {
    match s {
        pb::WorkerState::Unspecified => "unspecified",
        pb::WorkerState::Idle => "idle",
        pb::WorkerState::Active => "active",
        pb::WorkerState::Lost => "lost",
        pb::WorkerState::Exited => "exited",
    }
}

impl From<&pb::Layout> for LayoutView {
    fn from(l: &pb::Layout) -> Self {
        LayoutView {
            dp: l.dp,
            tp: l.tp,
            explanation: l.explanation.clone(),
            memory_per_rank_bytes: l.memory_per_rank_bytes,
            budget_bytes: l.budget_bytes,
        }
    }
}

impl From<&pb::GrowthTimings> for TimingsView {
    fn from(t: &pb::GrowthTimings) -> Self {
        TimingsView {
            checkpoint_seconds: t.checkpoint_seconds,
            stack_seconds: t.stack_seconds,
            reshard_seconds: t.reshard_seconds,
            resume_seconds: t.resume_seconds,
            total_seconds: t.total_seconds,
        }
    }
}

impl From<&pb::GrowthEvent> for GrowthView {
    fn from(g: &pb::GrowthEvent) -> Self {
        GrowthView {
            generation: g.generation,
            at_step: g.at_step,
            tokens: g.tokens,
            operator: g.operator.clone(),
            factor: g.factor,
            optimizer: optimizer_label(g.optimizer()),
            from_layers: g.from_layers,
            to_layers: g.to_layers,
            phase: g.phase().label(),
            timings: g
                .timings
                .as_ref()
                .map(TimingsView::from)
                .unwrap_or_default(),
            error: g.error.clone(),
            val_loss_after: g.val_loss_after,
            dp_after: g.dp_after,
            tp_after: g.tp_after,
        }
    }
}

impl From<&pb::CheckpointInfo> for CheckpointView {
    fn from(c: &pb::CheckpointInfo) -> Self {
        CheckpointView {
            step: c.step,
            tokens: c.tokens,
            generation: c.generation,
            layers: c.layers,
            reason: c.reason.clone(),
            committed_at: c.committed_at,
            dir: c.dir.clone(),
            unusable: c.unusable.clone(),
        }
    }
}

impl From<&pb::JobStatus> for StatusView {
    fn from(s: &pb::JobStatus) -> Self {
        let w = s.workers.unwrap_or_default();
        StatusView {
            job_id: s.job_id.clone(),
            phase: s.phase().label(),
            message: s.message.clone(),
            generation: s.generation,
            epoch: s.epoch,
            step: s.step,
            max_steps: s.max_steps,
            tokens: s.tokens,
            data_cursor: s.data_cursor,
            layers: s.layers,
            parameters: s.parameters,
            layout: s.layout.as_ref().map(LayoutView::from),
            train_loss: s.train_loss.filter(|v| v.is_finite()),
            val_loss: s.val_loss.filter(|v| v.is_finite()),
            tokens_per_second: s.tokens_per_second,
            mfu: s.mfu,
            growth: s
                .growth
                .as_ref()
                .filter(|g| g.phase() != pb::GrowthPhase::Unspecified)
                .map(GrowthView::from),
            last_growth_timings: s.last_growth_timings.as_ref().map(TimingsView::from),
            growth_history: s.growth_history.iter().map(GrowthView::from).collect(),
            checkpoints: s.checkpoints.iter().map(CheckpointView::from).collect(),
            workers: WorkersSummaryView {
                expected: w.expected,
                active: w.active,
                idle: w.idle,
                lost: w.lost,
                exited: w.exited,
            },
            loss_anomalies: s.loss_anomalies,
            rollbacks: s.rollbacks,
            next_growth_stage: s.next_growth_stage,
            fenced_messages: s.fenced_messages,
            checkpoint_failures: s.checkpoint_failures,
            checkpoint_error: s.checkpoint_error.clone(),
            evictions: s.evictions,
            slow_ranks: s.slow_ranks.clone(),
            backend: BackendView {
                dp: s.dp_backend.clone(),
                tp: s.tp_backend.clone(),
            },
            retry: (!s.retry.is_empty()).then(|| RetryView {
                what: s.retry.clone(),
                in_seconds: s.retry_in_seconds,
            }),
        }
    }
}

impl From<&pb::WorkerInfo> for WorkerView {
    fn from(w: &pb::WorkerInfo) -> Self {
        WorkerView {
            worker_id: w.worker_id.clone(),
            host: w.host.clone(),
            pid: w.pid,
            device: w.device.clone(),
            state: worker_state_label(w.state()),
            rank: u32::try_from(w.rank).ok(),
            epoch: w.epoch,
            last_step: w.last_step,
            last_seen_seconds_ago: w.last_seen_seconds_ago,
            ring_address: w.ring_address.clone(),
            progress_phase: w.progress_phase.clone(),
            progress_seconds: w.progress_seconds,
            slowness: w.slowness,
        }
    }
}

impl From<&pb::GetLossResponse> for LossView {
    fn from(r: &pb::GetLossResponse) -> Self {
        LossView {
            points: r
                .points
                .iter()
                .map(|p| LossPointView {
                    step: p.step,
                    tokens: p.tokens,
                    generation: p.generation,
                    train_loss: p.train_loss.filter(|v| v.is_finite()),
                    val_loss: p.val_loss.filter(|v| v.is_finite()),
                })
                .collect(),
            growth_events: r.growth_events.iter().map(GrowthView::from).collect(),
            anomalies: r
                .anomalies
                .iter()
                .map(|a| AnomalyView {
                    step: a.step,
                    kind: a.kind.clone(),
                    loss: a.loss,
                    ema: a.ema,
                })
                .collect(),
            ema: r.ema.filter(|v| v.is_finite()),
        }
    }
}

impl From<&pb::GrowResponse> for GrowView {
    fn from(r: &pb::GrowResponse) -> Self {
        GrowView {
            generation: r.generation,
            at_step: r.at_step,
            from_layers: r.from_layers,
            to_layers: r.to_layers,
            layout: r.layout.as_ref().map(LayoutView::from),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Tables
// ------------------------------------------------------------------------------------------

/// Columns padded to their widest cell, two spaces apart, header in capitals.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let pad = widths[i] - c.chars().count();
                l.push_str(c);
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `key   value` lines, keys padded.
pub fn key_values(rows: &[(&str, String)]) -> String {
    let w = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<w$}  {v}");
    }
    out
}

fn loss(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into())
}

fn seconds(s: f64) -> String {
    if s >= 100.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

/// "12s ago" from a Unix time.
fn age(unix: f64) -> String {
    if unix <= 0.0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(unix);
    let d = (now - unix).max(0.0);
    if d < 120.0 {
        format!("{d:.0}s ago")
    } else if d < 7200.0 {
        format!("{:.0}m ago", d / 60.0)
    } else if d < 172800.0 {
        format!("{:.0}h ago", d / 3600.0)
    } else {
        format!("{:.0}d ago", d / 86400.0)
    }
}

fn growth_line(g: &GrowthView) -> String {
    let mut s = format!(
        "gen {} at step {}: {} → {} layers ({} ×{}, optimizer {}) {}",
        g.generation,
        g.at_step,
        g.from_layers,
        g.to_layers,
        g.operator,
        g.factor,
        g.optimizer,
        g.phase
    );
    if g.timings.total_seconds > 0.0 {
        let t = &g.timings;
        let _ = write!(
            s,
            " in {} (checkpoint {}, stack {}, reshard {}, resume {})",
            seconds(t.total_seconds),
            seconds(t.checkpoint_seconds),
            seconds(t.stack_seconds),
            seconds(t.reshard_seconds),
            seconds(t.resume_seconds)
        );
    }
    if g.tp_after > 0 {
        let _ = write!(s, "; then dp {} × tp {}", g.dp_after, g.tp_after);
    }
    if let Some(v) = g.val_loss_after {
        let _ = write!(s, "; val loss right after {v:.4}");
    }
    if !g.error.is_empty() {
        let _ = write!(s, ": {}", g.error);
    }
    s
}

fn layout_line(l: &Option<LayoutView>) -> String {
    match l {
        None => "-".into(),
        Some(l) => {
            let mut s = format!("dp {} × tp {}", l.dp, l.tp);
            if l.memory_per_rank_bytes > 0 {
                let _ = write!(s, ", {} per rank", bytes(l.memory_per_rank_bytes));
                if l.budget_bytes > 0 {
                    let _ = write!(s, " of {}", bytes(l.budget_bytes));
                }
            }
            if !l.explanation.is_empty() {
                let _ = write!(s, " ({})", l.explanation);
            }
            s
        }
    }
}

fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024f64.powi(3) {
        format!("{:.1} GiB", b / 1024f64.powi(3))
    } else if b >= 1024f64.powi(2) {
        format!("{:.1} MiB", b / 1024f64.powi(2))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

fn growth_now(s: &StatusView) -> String {
    match &s.growth {
        Some(g) => format!(
            "{} ×{} → gen {} at step {}: {}",
            g.operator, g.factor, g.generation, g.at_step, g.phase
        ),
        None => "-".into(),
    }
}

pub fn status_table(s: &StatusView) -> String {
    let mut rows = vec![
        (
            "job",
            if s.job_id.is_empty() {
                "-".into()
            } else {
                s.job_id.clone()
            },
        ),
        (
            "phase",
            format!(
                "{} (generation {}, epoch {})",
                s.phase, s.generation, s.epoch
            ),
        ),
    ];
    if !s.message.is_empty() {
        rows.push(("message", s.message.clone()));
    }
    rows.extend([
        ("step", format!("{} / {}", s.step, s.max_steps)),
        ("tokens", fmt_count(s.tokens as f64)),
        (
            "model",
            format!(
                "{} layers, {} parameters",
                s.layers,
                fmt_count(s.parameters as f64)
            ),
        ),
        ("layout", layout_line(&s.layout)),
        (
            "backend",
            if s.backend.dp.is_empty() {
                "not chosen yet (no epoch)".into()
            } else {
                format!("dp {}, tp {}", s.backend.dp, s.backend.tp)
            },
        ),
        (
            "loss",
            format!("train {}  val {}", loss(s.train_loss), loss(s.val_loss)),
        ),
        (
            "throughput",
            format!(
                "{} tokens/s, MFU {:.1}%",
                fmt_count(s.tokens_per_second),
                s.mfu * 100.0
            ),
        ),
        (
            "workers",
            format!(
                "{} active / {} expected ({} idle, {} lost, {} exited)",
                s.workers.active,
                s.workers.expected,
                s.workers.idle,
                s.workers.lost,
                s.workers.exited
            ),
        ),
        ("growth", growth_now(s)),
    ]);
    for (i, g) in s.growth_history.iter().enumerate() {
        rows.push((if i == 0 { "growths" } else { "" }, growth_line(g)));
    }
    rows.push((
        "checkpoints",
        match s.checkpoints.last() {
            Some(c) => format!(
                "{} (newest step {} at {})",
                s.checkpoints.len(),
                c.step,
                c.dir
            ),
            None => "none".into(),
        },
    ));
    if s.checkpoint_failures > 0 {
        rows.push((
            "ckpt failures",
            if s.checkpoint_error.is_empty() {
                format!("{} (none since the last commit)", s.checkpoint_failures)
            } else {
                format!("{}, last: {}", s.checkpoint_failures, s.checkpoint_error)
            },
        ));
    }
    if let Some(r) = &s.retry {
        let what = match r.what.as_str() {
            "growth" => "growth stage".to_string(),
            w => format!("{w} checkpoint"),
        };
        rows.push((
            "next retry",
            format!(
                "{what} in {:.1} s (backoff after a failed checkpoint)",
                r.in_seconds
            ),
        ));
    }
    rows.push((
        "anomalies",
        format!(
            "{} loss anomalies, {} rollbacks, {} evictions",
            s.loss_anomalies, s.rollbacks, s.evictions
        ),
    ));
    if !s.slow_ranks.is_empty() {
        let ranks: Vec<String> = s.slow_ranks.iter().map(|r| r.to_string()).collect();
        rows.push(("slow ranks", ranks.join(", ")));
    }
    key_values(&rows)
}

/// The compact block `watch` redraws (one line per field group).
pub fn watch_block(s: &StatusView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job {}  phase {}  generation {}  layers {}",
        if s.job_id.is_empty() { "-" } else { &s.job_id },
        s.phase,
        s.generation,
        s.layers
    );
    let _ = writeln!(
        out,
        "step {}/{}  tokens {}  loss {} (val {})  {} tokens/s",
        s.step,
        s.max_steps,
        fmt_count(s.tokens as f64),
        loss(s.train_loss),
        loss(s.val_loss),
        fmt_count(s.tokens_per_second)
    );
    let _ = writeln!(
        out,
        "workers {}/{} active ({} lost)  growth {}",
        s.workers.active,
        s.workers.expected,
        s.workers.lost,
        growth_now(s)
    );
    if !s.message.is_empty() {
        let _ = writeln!(out, "{}", s.message);
    }
    out
}

/// One line per update (when stdout is not a terminal).
pub fn watch_line(s: &StatusView) -> String {
    let mut l = format!(
        "phase={} generation={} layers={} step={}/{} tokens={} loss={} val_loss={} tokens_per_s={:.0} workers={}/{}",
        s.phase,
        s.generation,
        s.layers,
        s.step,
        s.max_steps,
        s.tokens,
        loss(s.train_loss),
        loss(s.val_loss),
        s.tokens_per_second,
        s.workers.active,
        s.workers.expected
    );
    match &s.growth {
        Some(g) => {
            let _ = write!(l, " growth={}", g.phase);
        }
        None => l.push_str(" growth=-"),
    }
    l.push('\n');
    l
}

pub fn workers_table(ws: &[WorkerView]) -> String {
    if ws.is_empty() {
        return "no workers registered\n".into();
    }
    let rows: Vec<Vec<String>> = ws
        .iter()
        .map(|w| {
            vec![
                w.worker_id.clone(),
                w.host.clone(),
                w.pid.to_string(),
                w.device.clone(),
                w.state.to_string(),
                w.rank.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                w.epoch.to_string(),
                w.last_step.to_string(),
                format!("{}s ago", w.last_seen_seconds_ago.round()),
                if w.progress_phase.is_empty() {
                    "-".into()
                } else {
                    format!("{} {}s", w.progress_phase, w.progress_seconds.round())
                },
                if w.slowness > 0.0 {
                    format!("{:.2}x", w.slowness)
                } else {
                    "-".into()
                },
                w.ring_address.clone(),
            ]
        })
        .collect();
    table(
        &[
            "WORKER", "HOST", "PID", "DEVICE", "STATE", "RANK", "EPOCH", "STEP", "SEEN", "DOING",
            "PACE", "RING",
        ],
        &rows,
    )
}

pub fn checkpoints_table(cs: &[CheckpointView]) -> String {
    if cs.is_empty() {
        return "no committed checkpoints\n".into();
    }
    let rows: Vec<Vec<String>> = cs
        .iter()
        .map(|c| {
            vec![
                c.step.to_string(),
                fmt_count(c.tokens as f64),
                c.generation.to_string(),
                c.layers.to_string(),
                if c.unusable.is_empty() {
                    c.reason.clone()
                } else {
                    format!("{} — UNUSABLE: {}", c.reason, c.unusable)
                },
                age(c.committed_at),
                c.dir.clone(),
            ]
        })
        .collect();
    table(
        &[
            "STEP",
            "TOKENS",
            "GEN",
            "LAYERS",
            "REASON",
            "COMMITTED",
            "DIR",
        ],
        &rows,
    )
}

pub fn loss_table(l: &LossView) -> String {
    if l.points.is_empty() {
        return "no loss reported yet\n".into();
    }
    let rows: Vec<Vec<String>> = l
        .points
        .iter()
        .map(|p| {
            vec![
                p.step.to_string(),
                fmt_count(p.tokens as f64),
                p.generation.to_string(),
                loss(p.train_loss),
                loss(p.val_loss),
            ]
        })
        .collect();
    let mut out = table(&["STEP", "TOKENS", "GEN", "TRAIN", "VAL"], &rows);
    for g in &l.growth_events {
        let _ = writeln!(out, "growth: {}", growth_line(g));
    }
    for a in &l.anomalies {
        let _ = writeln!(
            out,
            "anomaly: step {} {} (loss {:.4}, ema {:.4})",
            a.step, a.kind, a.loss, a.ema
        );
    }
    out
}

pub fn submit_table(v: &SubmitView) -> String {
    let mut out = format!("submitted job {}\n", v.job_id);
    if let Some(s) = &v.status {
        out.push_str(&status_table(s));
    }
    out
}

pub fn grow_table(v: &GrowView) -> String {
    format!(
        "growth requested: generation {} at step {}, {} → {} layers, layout {}\n",
        v.generation,
        v.at_step,
        v.from_layers,
        v.to_layers,
        layout_line(&v.layout)
    )
}

pub fn command_table(v: &CommandView) -> String {
    format!("{} requested (command {})\n", v.action, v.command_id)
}

pub fn plot_table(v: &PlotView) -> String {
    format!(
        "wrote {} ({} points, {} growth events)\n",
        v.plot, v.points, v.growth_events
    )
}

pub fn plan_table(p: &PlanView) -> String {
    let pct = |d: f64| 100.0 * d / p.budget_tokens;
    let range = if p.in_range {
        "yes: the paper's fit applies".to_string()
    } else {
        "NO: outside the range the paper's fit was made on; its d is not used, the fallback rule below is".to_string()
    };
    let factor = if p.factor == trellis_core::growth::RECOMMENDED_FACTOR {
        format!("{} (the paper's recommendation)", p.factor)
    } else {
        format!(
            "{} (the paper recommends {})",
            p.factor,
            trellis_core::growth::RECOMMENDED_FACTOR
        )
    };
    key_values(&[
        ("target parameters N", fmt_count(p.params)),
        ("token budget D", format!("{} tokens", fmt_count(p.budget_tokens))),
        ("compute C = 6·N·D", format!("{} FLOPs", fmt_sci(p.flops))),
        ("in fitted range", range),
        (
            "formula d",
            format!("{} tokens ({:.2}% of D)", fmt_count(p.formula_tokens), pct(p.formula_tokens)),
        ),
        (
            "recommended d",
            format!(
                "{} tokens ({:.2}% of D)",
                fmt_count(p.recommended_tokens),
                pct(p.recommended_tokens)
            ),
        ),
        ("rule", p.rule.clone()),
        ("growth factor g", factor),
        (
            "plan",
            format!(
                "train a 1/{g}-depth model for {} tokens, then grow it ×{g} and train on to {} tokens",
                fmt_count(p.recommended_tokens),
                fmt_count(p.budget_tokens),
                g = p.factor
            ),
        ),
    ])
}

fn files_lines(out: &mut String, files: &[FileView]) {
    for f in files {
        let _ = writeln!(out, "  {}  ({})", f.path, bytes(f.bytes));
    }
}

pub fn offline_grow_table(v: &OfflineGrowView) -> String {
    let mut out = format!(
        "grew {} → {}: {} → {} layers ({} → {} parameters), operator {} ×{}, optimizer {}\nwrote:\n",
        v.input,
        v.output,
        v.from_layers,
        v.to_layers,
        fmt_count(v.from_parameters as f64),
        fmt_count(v.to_parameters as f64),
        v.operator,
        v.factor,
        v.optimizer
    );
    files_lines(&mut out, &v.files);
    out
}

pub fn export_table(v: &ExportView) -> String {
    let mut out = format!(
        "exported {} → {} as Hugging Face LlamaForCausalLM: {} layers, {} parameters\nwrote:\n",
        v.input,
        v.output,
        v.layers,
        fmt_count(v.parameters as f64)
    );
    files_lines(&mut out, &v.files);
    out
}

pub fn import_table(v: &ImportView) -> String {
    let mut out = format!(
        "imported {} → {} (step 0, fp32 from {}): {} layers, {} parameters{}{}\n",
        v.input,
        v.output,
        v.source_dtypes.join("+"),
        v.layers,
        fmt_count(v.parameters as f64),
        if v.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        },
        if v.tokenizer {
            ""
        } else {
            "; no tokenizer.json: give the job's [data] tokenizer"
        }
    );
    if !v.skipped.is_empty() {
        out.push_str(&format!("not imported: {}\n", v.skipped.join(", ")));
    }
    out.push_str("wrote:\n");
    files_lines(&mut out, &v.files);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x\n");
    }
}
