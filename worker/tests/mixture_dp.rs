//! A weighted mixture (jsonl.zst shards made by `zstandard` + a parquet file made by `pyarrow`)
//! through the real trainer: a run stopped at a checkpoint and restored at another DP degree
//! (two ranks, threads with an in-process collective) reads exactly the sample ids of the
//! uninterrupted single-rank run — none skipped, none repeated — and reaches the same losses.
mod common;
use common::local::Local;
use common::*;
use std::path::Path;
use trellis_comm::Solo;
use trellis_worker::Trainer;

#[test]
fn mixture_resumed_at_another_dp_degree_reads_the_same_samples() {
    let d = tempfile::tempdir().unwrap();
    let (train, _) = small_corpus();
    let script = r#"
import json, os, sys
import pyarrow as pa, pyarrow.parquet as pq, zstandard
text, out = open(sys.argv[1], encoding="utf-8").read(), sys.argv[2]
paras = [p + "\n" for p in text.split("\n\n") if p.strip()]
half = len(paras) // 2
os.makedirs(os.path.join(out, "shards"), exist_ok=True)
for i in range(3):
    lines = "".join(json.dumps({"text": p}) + "\n" for p in paras[:half][i::3])
    with open(os.path.join(out, "shards", f"s{i}.jsonl.zst"), "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
pq.write_table(pa.table({"content": paras[half:]}), os.path.join(out, "books.parquet"))
"#;
    run_python(
        script,
        &[train.to_str().unwrap(), d.path().to_str().unwrap()],
    );
    let toml = test_job_toml(
        "mixdp",
        20,
        &format!(
            "[[data.sources]]\npath = \"{}\"\nweight = 0.7\n\
             [[data.sources]]\npath = \"{}\"\nweight = 0.3\ntext_field = \"content\"\n",
            d.path().join("shards/*.jsonl.zst").display(),
            d.path().join("books.parquet").display()
        ),
    )
    .replace(&format!("train = \"{}\"\n", train.display()), "")
    .replace(
        "trellis-worker-data-cache",
        &format!("trellis-worker-data-cache-mixdp-{}", std::process::id()),
    );
    let spec = trellis_core::job::JobSpec::from_toml(&toml, Path::new("."), "mixdp").unwrap();
    let out = d.path().join("out");
    let gb = spec.train.global_batch as u64;

    // Uninterrupted, one rank: 6 steps.
    let mut single = Trainer::new(&spec, &out, 0, 1, Box::new(Solo)).unwrap();
    let reference: Vec<(f64, std::ops::Range<u64>)> = (0..6)
        .map(|_| {
            let r = single.step().unwrap();
            (r.loss, r.samples)
        })
        .collect();
    drop(single);

    // Interrupted: 3 steps at one rank, a checkpoint, then two ranks restore it and go on.
    let mut first = Trainer::new(&spec, &out, 0, 1, Box::new(Solo)).unwrap();
    for (want, _) in &reference[..3] {
        assert_eq!(first.step().unwrap().loss.to_bits(), want.to_bits());
    }
    let root = d.path().join("ckpt");
    let dir = first.save_checkpoint(&root, 3).unwrap();
    drop(first);
    let handles: Vec<_> = Local::group(2)
        .into_iter()
        .map(|c| {
            let (spec, out, dir) = (spec.clone(), out.clone(), dir.clone());
            std::thread::spawn(move || {
                let rank = c.rank;
                let mut t = Trainer::new(&spec, &out, rank, 2, Box::new(c)).unwrap();
                t.restore(&dir).unwrap();
                (0..3)
                    .map(|_| {
                        let r = t.step().unwrap();
                        (r.loss, r.samples)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let ranks: Vec<Vec<(f64, std::ops::Range<u64>)>> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut read: Vec<u64> = reference[..3].iter().flat_map(|(_, s)| s.clone()).collect();
    for step in 0..3 {
        for r in &ranks {
            read.extend(r[step].1.clone());
        }
        let want = reference[3 + step].0;
        for (rank, r) in ranks.iter().enumerate() {
            let got = r[step].0;
            assert!(
                (got - want).abs() < 1e-5,
                "step {}, rank {rank}: loss {got} vs uninterrupted {want}",
                4 + step
            );
        }
    }
    assert_eq!(
        read,
        (0..6 * gb).collect::<Vec<_>>(),
        "no sample skipped or repeated"
    );
}
