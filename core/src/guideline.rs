//! The paper's growth-timing guideline (DESIGN §1):
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

pub fn guideline(params: f64, budget_tokens: f64, factor: usize) -> Guideline {
    todo!("H1 {params} {budget_tokens} {factor}")
}
