//! The loss watcher: history (thinned past a bound), EMA, anomaly detection (non-finite, spike,
//! plateau). Pure logic.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    pub step: u64,
    pub tokens: u64,
    pub train: Option<f64>,
    pub val: Option<f64>,
    pub generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    Nan,
    Inf,
    Spike,
    Plateau,
}

impl AnomalyKind {
    pub fn label(self) -> &'static str {
        match self {
            AnomalyKind::Nan => "nan",
            AnomalyKind::Inf => "inf",
            AnomalyKind::Spike => "spike",
            AnomalyKind::Plateau => "plateau",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    pub step: u64,
    pub kind: AnomalyKind,
    pub loss: f64,
    pub ema: f64,
}

#[derive(Debug, Clone)]
pub struct WatcherConfig {
    pub ema_alpha: f64,
    pub spike_sigma: f64,
    /// Steps of EMA history before spikes are judged.
    pub spike_warmup: u64,
    pub plateau_threshold: f64,
    pub plateau_window: u64,
    /// History is thinned (every other old point dropped) past this many points.
    pub max_points: usize,
}

impl Default for WatcherConfig {
    fn default() -> Self {
        WatcherConfig {
            ema_alpha: 0.05,
            spike_sigma: 4.0,
            spike_warmup: 20,
            plateau_threshold: 0.001,
            plateau_window: 200,
            max_points: 200_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LossWatcher {
    cfg: WatcherConfig,
    points: Vec<LossPoint>,
    ema: Option<f64>,
    /// EMA of the squared deviation from the EMA.
    var: f64,
    seen: u64,
    /// (step, ema) at the start of the current plateau window.
    window_start: Option<(u64, f64)>,
    pub anomalies: Vec<Anomaly>,
}

impl LossWatcher {
    pub fn new(cfg: WatcherConfig) -> Self {
        LossWatcher {
            cfg,
            points: Vec::new(),
            ema: None,
            var: 0.0,
            seen: 0,
            window_start: None,
            anomalies: Vec::new(),
        }
    }

    /// Change the plateau rule (a `trigger = "plateau"` growth stage may set its own). A change
    /// restarts the current plateau window.
    pub fn set_plateau(&mut self, window: u64, threshold: f64) {
        if self.cfg.plateau_window != window || self.cfg.plateau_threshold != threshold {
            self.cfg.plateau_window = window;
            self.cfg.plateau_threshold = threshold;
            self.window_start = None;
        }
    }

    pub fn ema(&self) -> Option<f64> {
        self.ema
    }

    pub fn points(&self) -> &[LossPoint] {
        &self.points
    }

    /// Put back a history read from the store (after a coordinator restart); the smoothing
    /// state starts afresh.
    pub fn restore_points(&mut self, points: Vec<LossPoint>) {
        self.points = points;
    }

    /// Forget the smoothing state (after growth the loss jumps by design; after a rollback the
    /// run continues from an earlier point).
    pub fn reset_smoothing(&mut self) {
        self.ema = None;
        self.var = 0.0;
        self.seen = 0;
        self.window_start = None;
    }

    /// Record one training loss; returns the anomaly it is, if any. A non-finite loss is never
    /// folded into the EMA.
    pub fn observe(
        &mut self,
        step: u64,
        tokens: u64,
        generation: u64,
        loss: f64,
    ) -> Option<Anomaly> {
        let finite = loss.is_finite();
        self.push(LossPoint {
            step,
            tokens,
            train: finite.then_some(loss),
            val: None,
            generation,
        });
        if !finite {
            let kind = if loss.is_nan() {
                AnomalyKind::Nan
            } else {
                AnomalyKind::Inf
            };
            return self.record(step, kind, loss);
        }
        let Some(ema) = self.ema else {
            self.ema = Some(loss);
            self.seen = 1;
            self.window_start = Some((step, loss));
            return None;
        };
        let dev = loss - ema;
        let sigma = self.var.sqrt();
        let spike =
            self.seen >= self.cfg.spike_warmup && sigma > 0.0 && dev > self.cfg.spike_sigma * sigma;
        let a = self.cfg.ema_alpha;
        let new_ema = ema + a * dev;
        self.var = (1.0 - a) * (self.var + a * dev * dev);
        self.ema = Some(new_ema);
        self.seen += 1;
        if spike {
            return self.record(step, AnomalyKind::Spike, loss);
        }
        if self.window_start.is_none() {
            self.window_start = Some((step, new_ema));
        }
        if self.cfg.plateau_window > 0 {
            if let Some((s0, e0)) = self.window_start {
                if step >= s0 + self.cfg.plateau_window {
                    let rel = (e0 - new_ema) / e0.abs().max(1e-12);
                    self.window_start = Some((step, new_ema));
                    if rel < self.cfg.plateau_threshold {
                        return self.record(step, AnomalyKind::Plateau, loss);
                    }
                }
            }
        }
        None
    }

    pub fn observe_val(&mut self, step: u64, tokens: u64, generation: u64, loss: f64) {
        if let Some(p) = self
            .points
            .iter_mut()
            .rev()
            .find(|p| p.step == step && p.generation == generation)
        {
            p.val = loss.is_finite().then_some(loss);
            return;
        }
        self.push(LossPoint {
            step,
            tokens,
            train: None,
            val: loss.is_finite().then_some(loss),
            generation,
        });
    }

    pub fn last_train(&self) -> Option<f64> {
        self.points.iter().rev().find_map(|p| p.train)
    }

    pub fn last_val(&self) -> Option<f64> {
        self.points.iter().rev().find_map(|p| p.val)
    }

    fn record(&mut self, step: u64, kind: AnomalyKind, loss: f64) -> Option<Anomaly> {
        let a = Anomaly {
            step,
            kind,
            loss,
            ema: self.ema.unwrap_or(f64::NAN),
        };
        if self.anomalies.len() >= 10_000 {
            self.anomalies.remove(0);
        }
        self.anomalies.push(a.clone());
        Some(a)
    }

    fn push(&mut self, p: LossPoint) {
        self.points.push(p);
        if self.points.len() > self.cfg.max_points {
            // Keep the newest half intact; thin the older half to every other point.
            let keep_from = self.points.len() / 2;
            let mut i = 0usize;
            self.points.retain(|_| {
                let keep = i >= keep_from || i % 2 == 0;
                i += 1;
                keep
            });
        }
    }

    /// At most `n` points (evenly thinned, always keeping the last); 0 = all.
    pub fn thinned(&self, n: usize) -> Vec<LossPoint> {
        if n == 0 || self.points.len() <= n {
            return self.points.clone();
        }
        let len = self.points.len();
        let mut out: Vec<LossPoint> = (0..n).map(|i| self.points[i * len / n].clone()).collect();
        if let Some(last) = self.points.last() {
            if out.last().map(|p| p.step) != Some(last.step) {
                *out.last_mut().unwrap() = last.clone();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watcher() -> LossWatcher {
        LossWatcher::new(WatcherConfig {
            spike_warmup: 5,
            plateau_window: 50,
            ..Default::default()
        })
    }

    #[test]
    fn nan_and_inf_are_anomalies_and_not_smoothed() {
        let mut w = watcher();
        assert!(w.observe(1, 10, 0, 5.0).is_none());
        assert_eq!(
            w.observe(2, 20, 0, f64::NAN).unwrap().kind,
            AnomalyKind::Nan
        );
        assert_eq!(
            w.observe(3, 30, 0, f64::INFINITY).unwrap().kind,
            AnomalyKind::Inf
        );
        assert_eq!(w.ema(), Some(5.0));
        assert_eq!(w.points().len(), 3);
        assert_eq!(w.points()[1].train, None);
    }

    #[test]
    fn spike_is_detected_after_warmup() {
        let mut w = watcher();
        for s in 1..=30 {
            let l = 5.0 - 0.01 * s as f64 + if s % 2 == 0 { 0.02 } else { -0.02 };
            assert!(w.observe(s, s * 10, 0, l).is_none(), "step {s}");
        }
        assert_eq!(w.observe(31, 310, 0, 9.0).unwrap().kind, AnomalyKind::Spike);
    }

    #[test]
    fn plateau_is_detected_when_ema_stops_improving() {
        let mut w = watcher();
        let mut kinds = vec![];
        for s in 1..=300u64 {
            let l = if s < 60 { 6.0 - 0.02 * s as f64 } else { 4.8 };
            if let Some(a) = w.observe(s, s, 0, l) {
                kinds.push((s, a.kind));
            }
        }
        assert!(
            kinds
                .iter()
                .any(|(s, k)| *k == AnomalyKind::Plateau && *s > 100),
            "{kinds:?}"
        );
        assert!(
            !kinds
                .iter()
                .any(|(s, k)| *k == AnomalyKind::Plateau && *s <= 60),
            "{kinds:?}"
        );
    }

    #[test]
    fn history_is_thinned_past_the_bound() {
        let mut w = LossWatcher::new(WatcherConfig {
            max_points: 1000,
            ..Default::default()
        });
        for s in 1..=10_000u64 {
            w.observe(s, s, 0, 3.0);
        }
        assert!(w.points().len() <= 1000);
        assert_eq!(w.points().last().unwrap().step, 10_000);
        assert_eq!(w.points()[0].step, 1);
        let t = w.thinned(100);
        assert_eq!(t.len(), 100);
        assert_eq!(t.last().unwrap().step, 10_000);
    }

    #[test]
    fn val_loss_attaches_to_its_step() {
        let mut w = watcher();
        w.observe(10, 100, 0, 4.0);
        w.observe_val(10, 100, 0, 4.5);
        assert_eq!(w.points().len(), 1);
        assert_eq!(w.last_val(), Some(4.5));
    }
}
