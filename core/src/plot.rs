//! PNG loss plots (no libtorch, used by the worker and by `coordctl loss --plot`).
//!
//! Text is drawn with DejaVu Sans (Bitstream Vera licence, `assets/DejaVuSans-LICENSE.txt`),
//! compiled into the binary and registered with plotters' `ab_glyph` backend on first use, so
//! plots look the same on every machine and need no system fonts.
use crate::{Error, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::OnceLock;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The default plot size in pixels (width, height).
pub const PLOT_SIZE: (u32, u32) = (1200, 700);

/// One line of a plot.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// (x, y) points, x ascending.
    pub points: Vec<(f64, f64)>,
}

fn register_fonts() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        for family in ["sans-serif", "serif", "monospace"] {
            for style in [FontStyle::Normal, FontStyle::Bold] {
                plotters::style::register_font(family, style, FONT)
                    .map_err(|_| "the bundled DejaVu Sans font is invalid".to_string())?;
            }
        }
        Ok(())
    })
    .clone()
    .map_err(Error::Plot)
}

const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];
const MARKER_COLOR: RGBColor = RGBColor(90, 90, 90);

fn perr<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Plot(format!("cannot draw {}: {e}", path.display()))
}

/// Write a PNG of `series` (y = loss, x = `x_label`, e.g. "tokens") with vertical markers at
/// each `(x, label)` (growth events), at [`PLOT_SIZE`].
pub fn loss_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[Series],
    markers: &[(f64, String)],
) -> Result<()> {
    loss_plot_sized(path, PLOT_SIZE, title, x_label, "loss", series, markers)
}

/// [`loss_plot`] with an explicit size and y-axis label. Linear axes; non-finite points are
/// skipped. The file is written to a temp name next to `path` and renamed into place.
pub fn loss_plot_sized(
    path: &Path,
    size: (u32, u32),
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    markers: &[(f64, String)],
) -> Result<()> {
    if size.0 < 200 || size.1 < 150 {
        return Err(Error::Plot(format!(
            "plot size {size:?} is too small; use at least 200×150"
        )));
    }
    let clean: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| {
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            (s.name.as_str(), pts)
        })
        .collect();
    let all: Vec<(f64, f64)> = clean.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if all.is_empty() {
        return Err(Error::Plot(format!(
            "nothing to plot for {}: no series has a finite point yet; train a few steps first",
            path.display()
        )));
    }
    register_fonts()?;
    let markers: Vec<&(f64, String)> = markers.iter().filter(|(x, _)| x.is_finite()).collect();
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    for (x, _) in &markers {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
    }
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| {
        (a.min(*y), b.max(*y))
    });
    if x1 - x0 <= 0.0 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let pad = if y1 - y0 > 0.0 {
        0.05 * (y1 - y0)
    } else {
        0.05 * y0.abs().max(1.0)
    };
    y0 -= pad;
    y1 += 2.0 * pad; // room for marker labels at the top

    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext != "png" {
        return Err(Error::Plot(format!(
            "plot file {} must end in .png",
            path.display()
        )));
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plot.png".into());
    let tmp = path.with_file_name(format!(".{file_name}.tmp.png"));
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(perr(path))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 28).into_font())
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(75)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(perr(path))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .axis_desc_style(("sans-serif", 20))
            .label_style(("sans-serif", 16))
            .x_label_formatter(&|v| short_number(*v))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(perr(path))?;

        for (i, (name, pts)) in clean.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(perr(path))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
        }
        for (k, (x, label)) in markers.iter().enumerate() {
            let style = MARKER_COLOR.stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(*x, y0), (*x, y1)],
                    10,
                    6,
                    style,
                ))
                .map_err(perr(path))?;
            // Stagger labels so that nearby markers do not overlap.
            let y_text = y1 - (y1 - y0) * (0.01 + 0.045 * (k % 3) as f64);
            chart
                .draw_series(std::iter::once(Text::new(
                    format!(" {label}"),
                    (*x, y_text),
                    ("sans-serif", 16).into_font().color(&MARKER_COLOR),
                )))
                .map_err(perr(path))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 18))
            .draw()
            .map_err(perr(path))?;
        root.present().map_err(perr(path))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("cannot move the plot into {}", path.display()), e)
    })
}

/// `12500000` → `12.5M`, for tick labels.
fn short_number(v: f64) -> String {
    let a = v.abs();
    let (d, s) = if a >= 1e12 {
        (1e12, "T")
    } else if a >= 1e9 {
        (1e9, "B")
    } else if a >= 1e6 {
        (1e6, "M")
    } else if a >= 1e4 {
        (1e3, "K")
    } else {
        return if v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        };
    };
    let x = v / d;
    let t = format!("{x:.2}");
    let t = t.trim_end_matches('0').trim_end_matches('.');
    format!("{t}{s}")
}
