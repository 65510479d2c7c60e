//! PNG loss plots (no libtorch, used by the worker and by `coordctl loss --plot`).
use crate::Result;
use std::path::Path;

/// One line of a plot.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// (x, y) points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// Write a PNG of `series` (y = loss, x = `x_label`, e.g. "tokens") with vertical markers at
/// each `(x, label)` (growth events).
pub fn loss_plot(path: &Path, title: &str, x_label: &str, series: &[Series], markers: &[(f64, String)]) -> Result<()> {
    todo!("H1 {path:?} {title} {x_label} {} {}", series.len(), markers.len())
}
