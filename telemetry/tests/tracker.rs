//! The tracker's files read back by the real readers: TensorBoard's own `EventAccumulator`
//! (the `tensorboard` Python package, through `TRELLIS_PYTHON`) and JSON.
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use trellis_telemetry::tracker::line_step;
use trellis_telemetry::Tracker;

fn python() -> PathBuf {
    match std::env::var_os("TRELLIS_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "set TRELLIS_PYTHON to a python with the tensorboard package \
             (e.g. /root/.cache/trellis/venv-torch2.11.0/bin/python; scripts/setup.sh installs it)"
        ),
    }
}

/// Scalars `{tag: [[step, value]]}` and texts `{tag: [[step, text]]}` as TensorBoard reads `dir`.
pub fn tensorboard_read(dir: &Path) -> Value {
    trellis_telemetry::tracker::read_with_tensorboard(&python(), dir).unwrap()
}

fn steps(v: &Value, tag: &str) -> Vec<u64> {
    v["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalar {tag} in {v}"))
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect()
}

#[test]
fn tensorboard_reads_scalars_texts_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, kept) = Tracker::open(dir.path(), 0, |_| true).unwrap();
    assert!(kept.is_empty());
    for step in 1..=10u64 {
        let loss = 5.0 - step as f64 * 0.25;
        t.event(
            "train",
            step,
            json!({"loss": loss, "lr": 1e-3, "layers": 2}),
        )
        .unwrap();
    }
    t.event("val", 4, json!({"loss": 3.5})).unwrap();
    t.event(
        "growth",
        6,
        json!({"from_layers": 2, "to_layers": 4, "operator": "stack", "timings": {"total_seconds": 0.5}}),
    )
    .unwrap();
    t.scalar("custom/thing", 3, 7.0).unwrap();
    drop(t);

    let v = tensorboard_read(dir.path());
    assert_eq!(steps(&v, "train/loss"), (1..=10).collect::<Vec<_>>());
    let loss3 = v["scalars"]["train/loss"][2][1].as_f64().unwrap();
    assert!((loss3 - 4.25).abs() < 1e-6, "{loss3}");
    assert_eq!(v["scalars"]["growth/to_layers"], json!([[6, 4.0]]));
    assert_eq!(
        v["scalars"]["growth/timings/total_seconds"],
        json!([[6, 0.5]])
    );
    assert_eq!(v["scalars"]["val/loss"], json!([[4, 3.5]]));
    assert_eq!(v["scalars"]["custom/thing"], json!([[3, 7.0]]));
    let text = v["text"]["growth"][0][1].as_str().unwrap();
    assert!(text.contains("operator=stack"), "{text}");

    // A restart from a checkpoint at step 5: metrics.jsonl keeps steps ≤ 5, TensorBoard drops the
    // old file's points from step 6 on, and the new run's steps appear once.
    let (mut t, kept) = Tracker::open(dir.path(), 6, |l| line_step(l) <= 5).unwrap();
    assert_eq!(kept.len(), 6, "{kept:?}"); // train 1..=5 and val 4
    for step in 6..=8u64 {
        t.event("train", step, json!({"loss": 1.0, "lr": 1e-4, "layers": 4}))
            .unwrap();
    }
    drop(t);
    let v = tensorboard_read(dir.path());
    assert_eq!(steps(&v, "train/loss"), (1..=8).collect::<Vec<_>>());
    assert_eq!(v["scalars"]["train/loss"][7][1], json!(1.0));
    assert_eq!(v["scalars"]["growth/to_layers"], json!([]), "purged: {v}");
    let lines: Vec<Value> = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train: Vec<u64> = lines
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(line_step)
        .collect();
    assert_eq!(train, (1..=8).collect::<Vec<_>>());
    assert_eq!(lines[0]["loss"], json!(4.75));
    let files = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .count();
    assert_eq!(files, 2);
}
