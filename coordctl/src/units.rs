//! Human counts on the command line (`6.74e9`, `7B`, `2T`, `125M`) and back.

/// Parse a positive count: a plain or scientific number, optionally with a suffix
/// K (1e3), M (1e6), B or G (1e9), T (1e12), case-insensitive. `_` separators are allowed.
pub fn parse_count(s: &str) -> Result<f64, String> {
    let t = s.trim().replace('_', "");
    let bad = || format!("'{s}' is not a count; write it like 6.74e9, 7B, 2T or 125M");
    let (number, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1e3,
                'M' => 1e6,
                'B' | 'G' => 1e9,
                'T' => 1e12,
                _ => return Err(bad()),
            };
            (&t[..t.len() - 1], mult)
        }
        Some(_) => (t.as_str(), 1.0),
        None => return Err(bad()),
    };
    let v: f64 = number.trim().parse().map_err(|_| bad())?;
    let v = v * mult;
    if !v.is_finite() {
        return Err(bad());
    }
    if v <= 0.0 {
        return Err(format!("'{s}' must be positive"));
    }
    Ok(v)
}

/// A count with a K/M/B/T suffix and about four significant digits: `6.74B`, `11.11B`, `2T`.
pub fn fmt_count(v: f64) -> String {
    let (scaled, suffix) = if v.abs() >= 1e12 {
        (v / 1e12, "T")
    } else if v.abs() >= 1e9 {
        (v / 1e9, "B")
    } else if v.abs() >= 1e6 {
        (v / 1e6, "M")
    } else if v.abs() >= 1e4 {
        (v / 1e3, "K")
    } else {
        (v, "")
    };
    let digits = if scaled.abs() >= 100.0 {
        1
    } else if scaled.abs() >= 10.0 {
        2
    } else {
        3
    };
    let mut s = format!("{scaled:.digits$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s}{suffix}")
}

/// Scientific notation with three significant digits: `8.09e22`.
pub fn fmt_sci(v: f64) -> String {
    format!("{v:.2e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes_and_scientific() {
        assert_eq!(parse_count("6.74e9").unwrap(), 6.74e9);
        assert_eq!(parse_count("7B").unwrap(), 7e9);
        assert_eq!(parse_count("2T").unwrap(), 2e12);
        assert_eq!(parse_count("125M").unwrap(), 125e6);
        assert_eq!(parse_count("2.5b").unwrap(), 2.5e9);
        assert_eq!(parse_count("1_000").unwrap(), 1000.0);
        assert_eq!(parse_count("4k").unwrap(), 4000.0);
    }

    #[test]
    fn refuses_garbage() {
        for s in ["", "B", "7X", "abc", "-5", "0", "1e999", "nan"] {
            assert!(parse_count(s).is_err(), "{s}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_count(6.74e9), "6.74B");
        assert_eq!(fmt_count(11.108e9), "11.11B");
        assert_eq!(fmt_count(2e12), "2T");
        assert_eq!(fmt_count(125e6), "125M");
        assert_eq!(fmt_count(512.0), "512");
        assert_eq!(fmt_count(2048.0), "2048");
        assert_eq!(fmt_count(30720.0), "30.72K");
        assert_eq!(fmt_sci(8.088e22), "8.09e22");
    }
}
