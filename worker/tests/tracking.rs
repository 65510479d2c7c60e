//! A standalone run (in process, libtorch on CPU) trains from a weighted mixture of a jsonl.zst
//! shard set and a parquet file, grows, stops, resumes bit-exactly, and leaves `metrics.jsonl`
//! plus TensorBoard event files that TensorBoard's own reader (`EventAccumulator`, the
//! `tensorboard` Python package) reads: every step once, growth events included.
mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use trellis_worker::standalone::{run_job, RunOptions};

fn tensorboard_read(dir: &Path) -> Value {
    trellis_telemetry::tracker::read_with_tensorboard(&python(), dir).unwrap()
}

fn series(v: &Value, tag: &str) -> Vec<(u64, f64)> {
    v["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalar {tag}: {v}"))
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

#[test]
fn standalone_run_from_a_jsonl_zst_and_parquet_mixture_resumes_and_tracks() {
    let d = tempfile::tempdir().unwrap();
    let (train, _) = small_corpus();
    // The mixture of the issue: a jsonl.zst shard set (zstandard) and a parquet file (pyarrow),
    // both holding tinyshakespeare paragraphs, weighted 2 : 1.
    let script = r#"
import json, os, sys
import pyarrow as pa, pyarrow.parquet as pq, zstandard
text, out = open(sys.argv[1], encoding="utf-8").read(), sys.argv[2]
paras = [p + "\n" for p in text.split("\n\n") if p.strip()]
half = len(paras) // 2
os.makedirs(os.path.join(out, "shards"), exist_ok=True)
for i in range(2):
    lines = "".join(json.dumps({"text": p}) + "\n" for p in paras[:half][i::2])
    with open(os.path.join(out, "shards", f"s{i}.jsonl.zst"), "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
pq.write_table(pa.table({"body": paras[half:]}), os.path.join(out, "books.parquet"), row_group_size=100)
"#;
    run_python(
        script,
        &[train.to_str().unwrap(), d.path().to_str().unwrap()],
    );
    let toml = test_job_toml(
        "track",
        6,
        &format!(
            "[[growth]]\nat_step = 3\nfactor = 2\noperator = \"stack\"\nwarmup_steps = 1\n\
             [[data.sources]]\npath = \"{}\"\nweight = 2\n\
             [[data.sources]]\npath = \"{}\"\nweight = 1\ntext_field = \"body\"\n",
            d.path().join("shards/*.jsonl.zst").display(),
            d.path().join("books.parquet").display()
        ),
    )
    .replace(&format!("train = \"{}\"\n", train.display()), "")
    .replace("eval_interval = 0", "eval_interval = 2")
    .replace(
        "trellis-worker-data-cache",
        &format!("trellis-worker-data-cache-track-{}", std::process::id()),
    );
    let spec = trellis_core::job::JobSpec::from_toml(&toml, Path::new("."), "track").unwrap();
    assert_eq!(spec.data.sources.len(), 2);
    let out = d.path().join("out");
    let first = run_job(&spec, &out, &RunOptions { stop_at: Some(4) }, &mut |_| {}).unwrap();
    assert_eq!(first.steps, 4);
    let summary = run_job(&spec, &out, &RunOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(summary.resumed_from_step, Some(4));
    assert_eq!(summary.steps, 6);
    // The resumed run read the same mixture stream: its losses are bit-identical to an
    // uninterrupted run's.
    let full = d.path().join("full");
    run_job(&spec, &full, &RunOptions::default(), &mut |_| {}).unwrap();
    let losses = |dir: &Path| -> Vec<u64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["kind"] == "train")
            .map(|l| l["loss"].as_f64().unwrap().to_bits())
            .collect()
    };
    assert_eq!(losses(&out).len(), 6);
    assert_eq!(
        losses(&out),
        losses(&full),
        "the resumed run read other data"
    );

    let v = tensorboard_read(&out);
    let steps = |tag: &str| series(&v, tag).iter().map(|p| p.0).collect::<Vec<_>>();
    assert_eq!(
        steps("train/loss"),
        (1..=6).collect::<Vec<_>>(),
        "each step once"
    );
    for tag in [
        "train/lr",
        "train/tokens_per_second",
        "train/mfu",
        "train/grad_norm",
    ] {
        assert_eq!(steps(tag).len(), 6, "{tag}");
        assert!(series(&v, tag).iter().all(|p| p.1 > 0.0), "{tag}: {v}");
    }
    let (before, after) = (summary.layers_before as f64, summary.layers_after as f64);
    assert_eq!(after, 2.0 * before);
    let layers = series(&v, "train/layers");
    assert_eq!(
        layers[..3].iter().map(|p| p.1).collect::<Vec<_>>(),
        vec![before; 3]
    );
    assert_eq!(
        layers[3..].iter().map(|p| p.1).collect::<Vec<_>>(),
        vec![after; 3]
    );
    let generation = series(&v, "train/generation");
    assert_eq!((generation[2].1, generation[3].1), (0.0, 1.0));
    assert_eq!(series(&v, "growth/to_layers"), vec![(3, after)]);
    assert_eq!(series(&v, "growth/from_layers"), vec![(3, before)]);
    let growth_text = v["text"]["growth"][0][1].as_str().unwrap();
    assert!(growth_text.contains("operator=stack"), "{growth_text}");
    assert_eq!(steps("val/loss"), vec![2, 4, 6]);

    // metrics.jsonl holds the same train losses as TensorBoard (f32 there).
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train_lines: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "train").collect();
    assert_eq!(train_lines.len(), 6);
    for (l, (step, loss)) in train_lines.iter().zip(series(&v, "train/loss")) {
        assert_eq!(l["step"].as_u64().unwrap(), step);
        assert!((l["loss"].as_f64().unwrap() - loss).abs() < 1e-5);
    }
    assert_eq!(
        lines.iter().filter(|l| l["kind"] == "growth").count(),
        1,
        "{lines:?}"
    );
}
