use trellis_core::plot::{loss_plot, loss_plot_sized, Series, PLOT_SIZE};

fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

fn curve(shift: f64, n: usize) -> Vec<(f64, f64)> {
    (0..n)
        .map(|i| {
            let x = i as f64 * 4096.0;
            (x, 8.0 * (-(i as f64) / 60.0).exp() + 2.5 + shift)
        })
        .collect()
}

#[test]
fn writes_a_non_blank_png_of_the_expected_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.png");
    let mut grown = curve(-0.2, 300);
    grown[150].1 += 1.5; // the loss jump at growth
    let series = vec![
        Series {
            name: "baseline (8 layers)".into(),
            points: curve(0.0, 300),
        },
        Series {
            name: "G_stack 2→8".into(),
            points: grown,
        },
        Series {
            name: "val".into(),
            points: vec![(0.0, f64::NAN), (409600.0, 4.0), (819200.0, 3.2)],
        },
    ];
    let markers = vec![(150.0 * 4096.0, "grow ×4 (gen 1)".to_string())];
    loss_plot(
        &path,
        "Trellis demo: loss vs tokens",
        "tokens",
        &series,
        &markers,
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(png_size(&bytes), PLOT_SIZE);
    // A blank white 1200×700 PNG compresses to a few KB; a plot with text and lines is larger.
    assert!(
        bytes.len() > 20_000,
        "suspiciously small PNG: {} bytes",
        bytes.len()
    );
    assert!(!dir.path().join(".loss.png.tmp.png").exists());

    let small = dir.path().join("small.png");
    loss_plot_sized(&small, (400, 300), "t", "steps", "loss", &series[..1], &[]).unwrap();
    assert_eq!(png_size(&std::fs::read(&small).unwrap()), (400, 300));
    if let Ok(keep) = std::env::var("TRELLIS_KEEP_PLOT") {
        std::fs::copy(&path, keep).unwrap();
    }
}

#[test]
fn refuses_empty_input_and_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.png");
    let e = loss_plot(&p, "t", "tokens", &[], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing to plot"), "{e}");
    let nan = vec![Series {
        name: "a".into(),
        points: vec![(0.0, f64::NAN)],
    }];
    assert!(loss_plot(&p, "t", "tokens", &nan, &[]).is_err());
    let one = vec![Series {
        name: "a".into(),
        points: vec![(1.0, 3.0)],
    }];
    loss_plot(&p, "t", "tokens", &one, &[]).unwrap(); // a single point still plots
    assert!(loss_plot(&dir.path().join("x.jpg"), "t", "tokens", &one, &[]).is_err());
}
