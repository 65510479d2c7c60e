//! Prometheus metrics (docs/design.md §8). Names are stable and documented in `docs/metrics.md`; no step
//! numbers in labels.
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type GaugeF = Gauge<f64, AtomicU64>;
type Label = [(&'static str, &'static str); 1];

fn step_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

fn phase_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub train_loss: GaugeF,
    pub val_loss: GaugeF,
    pub loss_ema: GaugeF,
    pub tokens_total: Gauge,
    pub step: Gauge,
    pub tokens_per_second: GaugeF,
    pub mfu_ratio: GaugeF,
    pub step_seconds: Family<Label, Histogram, fn() -> Histogram>,
    pub model_layers: Gauge,
    pub model_parameters: Gauge,
    pub generation: Gauge,
    pub epoch: Gauge,
    pub growth_phase_seconds: Family<Label, Histogram, fn() -> Histogram>,
    pub growth_last_phase_seconds: Family<Label, GaugeF>,
    pub growths_total: Family<Label, Counter>,
    pub workers: Family<Label, Gauge>,
    pub checkpoint_seconds: Histogram,
    pub checkpoint_age_seconds: GaugeF,
    pub checkpoints_total: Counter,
    pub checkpoints_unusable_total: Counter,
    pub checkpoint_failures_total: Family<Label, Counter>,
    pub worker_evictions_total: Counter,
    pub slow_ranks: Gauge,
    pub loss_anomalies_total: Family<Label, Counter>,
    pub rollbacks_total: Counter,
    pub fenced_messages_total: Family<Label, Counter>,
    pub job_phase: Family<Label, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            train_loss: GaugeF::default(),
            val_loss: GaugeF::default(),
            loss_ema: GaugeF::default(),
            tokens_total: Gauge::default(),
            step: Gauge::default(),
            tokens_per_second: GaugeF::default(),
            mfu_ratio: GaugeF::default(),
            step_seconds: Family::new_with_constructor(step_histogram as fn() -> Histogram),
            model_layers: Gauge::default(),
            model_parameters: Gauge::default(),
            generation: Gauge::default(),
            epoch: Gauge::default(),
            growth_phase_seconds: Family::new_with_constructor(
                phase_histogram as fn() -> Histogram,
            ),
            growth_last_phase_seconds: Family::default(),
            growths_total: Family::default(),
            workers: Family::default(),
            checkpoint_seconds: phase_histogram(),
            checkpoint_age_seconds: GaugeF::default(),
            checkpoints_total: Counter::default(),
            checkpoints_unusable_total: Counter::default(),
            checkpoint_failures_total: Family::default(),
            worker_evictions_total: Counter::default(),
            slow_ranks: Gauge::default(),
            loss_anomalies_total: Family::default(),
            rollbacks_total: Counter::default(),
            fenced_messages_total: Family::default(),
            job_phase: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "trellis_train_loss",
            "Training loss of the last step (rank 0's report)",
            m.train_loss.clone(),
        );
        r.register(
            "trellis_val_loss",
            "Validation loss of the last evaluation",
            m.val_loss.clone(),
        );
        r.register(
            "trellis_train_loss_ema",
            "EMA of the training loss (the loss watcher's)",
            m.loss_ema.clone(),
        );
        r.register(
            "trellis_tokens",
            "Training tokens consumed by the job",
            m.tokens_total.clone(),
        );
        r.register(
            "trellis_step",
            "Optimizer steps completed (a gauge; never a label)",
            m.step.clone(),
        );
        r.register(
            "trellis_tokens_per_second",
            "Training throughput over all ranks",
            m.tokens_per_second.clone(),
        );
        r.register(
            "trellis_mfu_ratio",
            "Model FLOPs utilisation: FLOPs/token x tokens/s / (ranks x peak FLOP/s)",
            m.mfu_ratio.clone(),
        );
        r.register(
            "trellis_step_seconds",
            "Step time of rank 0 split by part (compute, comm, data, total)",
            m.step_seconds.clone(),
        );
        r.register(
            "trellis_model_layers",
            "Decoder layers of the current model",
            m.model_layers.clone(),
        );
        r.register(
            "trellis_model_parameters",
            "Parameters of the current model",
            m.model_parameters.clone(),
        );
        r.register(
            "trellis_generation",
            "Model-structure generation (+1 per growth)",
            m.generation.clone(),
        );
        r.register(
            "trellis_epoch",
            "Training-group epoch (+1 per (re)assignment of ranks)",
            m.epoch.clone(),
        );
        r.register(
            "trellis_growth_phase_seconds",
            "Duration of each growth phase",
            m.growth_phase_seconds.clone(),
        );
        r.register(
            "trellis_growth_last_phase_seconds",
            "Duration of each phase of the last growth",
            m.growth_last_phase_seconds.clone(),
        );
        r.register(
            "trellis_growths",
            "Growth transactions by outcome (done, rolled_back)",
            m.growths_total.clone(),
        );
        r.register(
            "trellis_workers",
            "Registered workers by state (active, idle, lost)",
            m.workers.clone(),
        );
        r.register(
            "trellis_checkpoint_seconds",
            "Time from checkpoint request to commit",
            m.checkpoint_seconds.clone(),
        );
        r.register(
            "trellis_checkpoint_age_seconds",
            "Seconds since the last committed checkpoint",
            m.checkpoint_age_seconds.clone(),
        );
        r.register(
            "trellis_checkpoints",
            "Checkpoints committed",
            m.checkpoints_total.clone(),
        );
        r.register(
            "trellis_checkpoints_unusable",
            "Committed checkpoints found unusable at a restart (missing files, hash mismatch) and set aside",
            m.checkpoints_unusable_total.clone(),
        );
        r.register(
            "trellis_checkpoint_failures",
            "Checkpoints aborted without a rollback, by reason (no_space, io, deadline): training went on",
            m.checkpoint_failures_total.clone(),
        );
        r.register(
            "trellis_worker_evictions",
            "Workers evicted because their training thread made no progress for the progress timeout",
            m.worker_evictions_total.clone(),
        );
        r.register(
            "trellis_slow_ranks",
            "Ranks whose last step took over 1.5x the group's median step time",
            m.slow_ranks.clone(),
        );
        r.register(
            "trellis_loss_anomalies",
            "Loss anomalies by kind (nan, inf, spike, plateau)",
            m.loss_anomalies_total.clone(),
        );
        r.register(
            "trellis_rollbacks",
            "Rollbacks to the last committed checkpoint",
            m.rollbacks_total.clone(),
        );
        r.register(
            "trellis_fenced_messages",
            "Worker messages rejected by fencing, by kind",
            m.fenced_messages_total.clone(),
        );
        r.register(
            "trellis_job_phase",
            "1 for the job's current phase",
            m.job_phase.clone(),
        );
        // Every known label value exists (at 0) from the start, so a dashboard query or an
        // `increase()` over these families returns data before the first event, not "no data".
        for kind in ["nan", "inf", "spike", "plateau"] {
            let _ = m.loss_anomalies_total.get_or_create(&[("kind", kind)]);
        }
        for reason in ["no_space", "io", "deadline"] {
            let _ = m
                .checkpoint_failures_total
                .get_or_create(&[("reason", reason)]);
        }
        for outcome in ["done", "rolled_back", "aborted"] {
            let _ = m.growths_total.get_or_create(&[("outcome", outcome)]);
        }
        for state in ["active", "idle", "lost"] {
            let _ = m.workers.get_or_create(&[("state", state)]);
        }
        Metrics { registry: r, ..m }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_counters_are_exported_at_zero_from_the_start() {
        let text = Metrics::new().encode();
        for line in [
            r#"trellis_loss_anomalies_total{kind="nan"} 0"#,
            r#"trellis_loss_anomalies_total{kind="inf"} 0"#,
            r#"trellis_loss_anomalies_total{kind="spike"} 0"#,
            r#"trellis_loss_anomalies_total{kind="plateau"} 0"#,
            r#"trellis_growths_total{outcome="done"} 0"#,
            r#"trellis_growths_total{outcome="rolled_back"} 0"#,
            r#"trellis_workers{state="active"} 0"#,
            r#"trellis_workers{state="idle"} 0"#,
            r#"trellis_workers{state="lost"} 0"#,
            "trellis_rollbacks_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
