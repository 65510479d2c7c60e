//! The paper's growth-timing guideline (docs/design.md §1):
//! `log10(d) = 0.88·log10(N) + 163.27 / log10(C) − 5.74`, `C = 6·N·D`.
//! Fitted on 410M–7B targets at ~1e20–1e22 FLOPs: outside that it is refused, with a stated
//! fallback rule, never extrapolated silently.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guideline {
    /// Target parameters N.
    pub params: f64,
    /// Token budget D.
    pub budget_tokens: f64,
    /// C = 6 N D.
    pub flops: f64,
    /// The formula's d (tokens to train the small model), even when out of range.
    pub formula_tokens: f64,
    /// Whether (N, C) lies in the fitted range.
    pub in_range: bool,
    /// The d to use: the formula's when in range, else the fallback.
    pub recommended_tokens: f64,
    /// One line saying which rule gave `recommended_tokens` and why.
    pub rule: String,
    /// Growth factor g (the paper recommends 4).
    pub factor: usize,
}

/// Lower edge of the fitted parameter range (the paper's smallest target, 410M, with margin).
pub const MIN_PARAMS: f64 = 4.0e8;
/// Upper edge of the fitted parameter range: the paper's largest target, 7B, plus 5%.
pub const MAX_PARAMS: f64 = 7.0e9 * 1.05;
/// Lower edge of the accepted compute range.
pub const MIN_FLOPS: f64 = 1.0e20;
/// Upper edge of the accepted compute range. The fit's runs lie at ~1e20–1e22 FLOPs; we accept
/// up to 1e23 so that the paper's own headline use (a 7B target at 2T tokens, C ≈ 8.4e22) is in
/// range. Beyond that — Llama2-13B/70B, Llama3-8B at 15T — the formula is an extrapolation.
pub const MAX_FLOPS: f64 = 1.0e23;
/// The fallback when the formula does not apply: train the small model for this fraction of
/// the token budget (the middle-to-upper end of the 5–10% rule of thumb).
pub const FALLBACK_FRACTION: f64 = 0.10;

/// The formula's `d` in tokens for `N` target parameters and `C` FLOPs (no range check).
pub fn formula_tokens(params: f64, flops: f64) -> f64 {
    10f64.powf(0.88 * params.log10() + 163.27 / flops.log10() - 5.74)
}

fn si(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        format!("{x}")
    } else if a >= 1e12 {
        format!("{:.2}T", x / 1e12)
    } else if a >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e3 {
        format!("{:.2}K", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// The growth-timing guideline for a target of `params` parameters trained on `budget_tokens`
/// tokens with growth factor `factor`.
///
/// In range means `N ∈ [MIN_PARAMS, MAX_PARAMS]`, `C = 6·N·D ∈ [MIN_FLOPS, MAX_FLOPS]` and the
/// formula's `d < D`. Out of range the formula's value is still reported (`formula_tokens`) but
/// `recommended_tokens` is [`FALLBACK_FRACTION`] of the budget, and `rule` says why.
/// Non-finite or non-positive inputs never panic: they are out of range with the fallback.
pub fn guideline(params: f64, budget_tokens: f64, factor: usize) -> Guideline {
    let flops = 6.0 * params * budget_tokens;
    let valid =
        params.is_finite() && params > 0.0 && budget_tokens.is_finite() && budget_tokens > 0.0;
    let formula = if valid {
        formula_tokens(params, flops)
    } else {
        f64::NAN
    };
    let fallback = if budget_tokens.is_finite() && budget_tokens > 0.0 {
        (FALLBACK_FRACTION * budget_tokens).round()
    } else {
        0.0
    };
    let mut reasons = Vec::new();
    if !valid {
        reasons.push("parameters and token budget must be positive numbers".to_string());
    } else {
        if params < MIN_PARAMS {
            reasons.push(format!(
                "N = {} is below the fitted {}",
                si(params),
                si(MIN_PARAMS)
            ));
        }
        if params > MAX_PARAMS {
            reasons.push(format!(
                "N = {} is above the fitted {}",
                si(params),
                si(MAX_PARAMS)
            ));
        }
        if flops < MIN_FLOPS {
            reasons.push(format!("C = {flops:.2e} FLOPs is below {MIN_FLOPS:.0e}"));
        }
        if flops > MAX_FLOPS {
            reasons.push(format!("C = {flops:.2e} FLOPs is above {MAX_FLOPS:.0e}"));
        }
        if formula.is_nan() || formula >= budget_tokens {
            reasons.push(format!(
                "the formula's d = {} is not below the budget D = {}",
                si(formula),
                si(budget_tokens)
            ));
        }
    }
    let in_range = reasons.is_empty();
    let (recommended_tokens, rule) = if in_range {
        (
            formula.round(),
            format!(
                "paper formula log10(d) = 0.88·log10(N) + 163.27/log10(C) − 5.74 (N = {}, C = {flops:.2e} inside the fitted range): grow after d = {} tokens",
                si(params),
                si(formula)
            ),
        )
    } else {
        (
            fallback,
            format!(
                "outside the formula's fitted range ({}): fallback rule d = {:.0}% of the budget = {} tokens",
                reasons.join("; "),
                FALLBACK_FRACTION * 100.0,
                si(fallback)
            ),
        )
    };
    Guideline {
        params,
        budget_tokens,
        flops,
        formula_tokens: formula,
        in_range,
        recommended_tokens,
        rule,
        factor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a / b - 1.0).abs() < tol
    }

    /// The paper's check values use the models' nominal sizes (7B, 13B, 70B, 8B); with the exact
    /// parameter counts (6.74e9 …) the 7B value comes out 2% lower (10.88B).
    #[test]
    fn check_values_reproduce() {
        for (n, d, want) in [
            (7e9, 2e12, 11.11e9),
            (13e9, 2e12, 15.84e9),
            (70e9, 2e12, 42.48e9),
            (8e9, 15e12, 6.58e9),
        ] {
            let g = guideline(n, d, 4);
            assert!(
                close(g.formula_tokens, want, 0.005),
                "N={n} D={d}: {} vs {want}",
                g.formula_tokens
            );
        }
    }

    #[test]
    fn seven_b_at_2t_is_in_range_and_uses_formula() {
        let g = guideline(7e9, 2e12, 4);
        assert!(g.in_range, "{}", g.rule);
        assert_eq!(g.recommended_tokens, g.formula_tokens.round());
        assert!(g.rule.starts_with("paper formula"), "{}", g.rule);
        assert_eq!(g.factor, 4);
    }

    #[test]
    fn larger_models_are_extrapolations_with_fallback() {
        for (n, d) in [(13e9, 2e12), (70e9, 2e12), (8e9, 15e12)] {
            let g = guideline(n, d, 4);
            assert!(!g.in_range, "N={n}");
            assert_eq!(g.recommended_tokens, (0.1 * d).round());
            assert!(
                g.rule.contains("outside") && g.rule.contains("10%"),
                "{}",
                g.rule
            );
        }
    }

    #[test]
    fn small_model_out_of_range_when_d_exceeds_budget() {
        let g = guideline(125e6, 2.5e9, 4);
        assert!(g.formula_tokens > g.budget_tokens, "{}", g.formula_tokens);
        assert!(!g.in_range);
        assert_eq!(g.recommended_tokens, 2.5e8);
        assert!(g.rule.contains("not below the budget"), "{}", g.rule);
        assert!(g.rule.contains("below the fitted"), "{}", g.rule);
        assert!(!g.rule.contains('\n'));
    }

    #[test]
    fn in_range_mid_case() {
        // 3B target at 300B tokens: C = 5.4e21, d ≈ 12.96B.
        let g = guideline(3e9, 300e9, 4);
        assert!(g.in_range, "{}", g.rule);
        assert!(
            close(g.recommended_tokens, 12.96e9, 0.005),
            "{}",
            g.recommended_tokens
        );
    }

    #[test]
    fn d_at_or_above_budget_is_out_of_range_even_inside_n_and_c() {
        // 1B at 20B tokens: N and C (1.2e20) inside, but the formula says d ≈ 20.5B > D.
        let g = guideline(1e9, 20e9, 4);
        assert!(!g.in_range);
        assert!(
            g.rule.contains("not below the budget") && !g.rule.contains("fitted 4"),
            "{}",
            g.rule
        );
        assert_eq!(g.recommended_tokens, 2e9);
    }

    #[test]
    fn bad_inputs_do_not_panic() {
        for (n, d) in [
            (0.0, 1e9),
            (-1.0, 1e9),
            (1e9, 0.0),
            (f64::NAN, 1e9),
            (1e9, f64::INFINITY),
        ] {
            let g = guideline(n, d, 4);
            assert!(!g.in_range);
            assert!(g.recommended_tokens.is_finite());
        }
    }
}
