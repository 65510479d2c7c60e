//! Learning-rate schedule: linear warmup, then cosine from `peak_lr` to `min_lr` over
//! `[start_step, end_step)` ([`ScheduleState`], saved in every checkpoint).
use trellis_core::checkpoint::ScheduleState;

/// The LR of the optimizer step with (global, 0-based) index `step`.
///
/// Warmup: `peak · (k+1)/warmup` for `k = step − start < warmup`; then cosine from peak to min
/// over the remaining steps; `min_lr` from `end_step` on (and before `start_step`, which never
/// happens in a consistent state).
pub fn lr_at(s: &ScheduleState, step: u64) -> f64 {
    if step < s.start_step {
        return s.min_lr;
    }
    let k = step - s.start_step;
    if k < s.warmup_steps {
        return s.peak_lr * (k + 1) as f64 / s.warmup_steps as f64;
    }
    let span = s.end_step.saturating_sub(s.start_step + s.warmup_steps);
    if span == 0 {
        return s.peak_lr;
    }
    let progress = ((k - s.warmup_steps) as f64 / span as f64).min(1.0);
    s.min_lr + 0.5 * (s.peak_lr - s.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched() -> ScheduleState {
        ScheduleState {
            start_step: 100,
            end_step: 200,
            peak_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
        }
    }

    #[test]
    fn warmup_is_linear_and_reaches_peak() {
        let s = sched();
        assert!((lr_at(&s, 100) - 1e-4).abs() < 1e-15);
        assert!((lr_at(&s, 104) - 5e-4).abs() < 1e-15);
        assert!((lr_at(&s, 109) - 1e-3).abs() < 1e-15);
        assert!((lr_at(&s, 110) - 1e-3).abs() < 1e-15);
    }

    #[test]
    fn cosine_ends_at_min_and_is_monotone() {
        let s = sched();
        let mut last = f64::INFINITY;
        for step in 110..200 {
            let lr = lr_at(&s, step);
            assert!(lr <= last + 1e-18 && lr >= s.min_lr, "step {step}: {lr}");
            last = lr;
        }
        assert!((lr_at(&s, 155) - 5.5e-4).abs() < 1e-12);
        assert_eq!(lr_at(&s, 200), s.min_lr);
        assert_eq!(lr_at(&s, 10_000), s.min_lr);
    }
}
