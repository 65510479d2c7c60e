//! Resharding time, TP = 1 → TP = 2, for a ≥ 100M-parameter model on CPU: the checkpoint path
//! (each new rank reads its slices of a committed checkpoint) vs the peers path (the old rank
//! sends its slices over the new TP group, a `TcpRing` on 127.0.0.1). Ranks are threads.
//!
//! ```text
//! source scripts/env.sh
//! cargo run --release -p trellis-worker --example reshard_bench -- [hidden layers ffn vocab repeats]
//! ```
//! Defaults: hidden 768, 12 layers, FFN 3072, 12 heads (4 KV heads), vocab 4096 → 113M
//! parameters (weights + two Adam moments: 1.36 GB of state). Prints one JSON line per run and
//! the medians.
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_comm::{Collective, Solo, TcpRing};
use trellis_core::job::JobSpec;
use trellis_worker::parallel::{reshard, Groups};
use trellis_worker::Trainer;

fn spec(dir: &Path, hidden: usize, layers: usize, ffn: usize, vocab: usize) -> JobSpec {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let toml = format!(
        r#"
[job]
name = "reshard-bench"
seed = 1
[model]
preset = "tiny"
hidden_size = {hidden}
intermediate_size = {ffn}
num_hidden_layers = {layers}
num_attention_heads = 12
num_key_value_heads = 4
[data]
train = "{train}"
valid = "{valid}"
vocab_size = {vocab}
seq_len = 64
cache_dir = "{cache}"
[train]
global_batch = 2
micro_batch = 2
max_steps = 10
eval_sequences = 2
threads = 1
[checkpoint]
interval = 0
keep = 2
"#,
        train = repo.join("corpus/tiny/train.txt").display(),
        valid = repo.join("corpus/tiny/valid.txt").display(),
        cache = dir.join("data").display(),
    );
    JobSpec::from_toml(&toml, Path::new("."), "bench").unwrap()
}

fn tp_pair() -> Vec<(TcpListener, Vec<SocketAddr>)> {
    let ls: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let a: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    ls.into_iter().map(|l| (l, a.clone())).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (hidden, layers, ffn, vocab, repeats) = (
        arg(0, 768),
        arg(1, 12),
        arg(2, 3072),
        arg(3, 4096),
        arg(4, 3),
    );
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().to_path_buf();
    let spec = spec(&out, hidden, layers, ffn, vocab);

    let t0 = Instant::now();
    let mut old = Trainer::new(&spec, &out, 0, 1, Box::new(Solo)).unwrap();
    let params = old.model().num_parameters();
    eprintln!(
        "model: {params} parameters ({:.1}M), vocab {}; built in {:.1}s",
        params as f64 / 1e6,
        old.config().vocab_size,
        t0.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    let ck = old.save_checkpoint(&out.join("ck"), 2).unwrap();
    let write_s = t0.elapsed().as_secs_f64();
    println!("{{\"op\":\"checkpoint_write_tp1\",\"seconds\":{write_s:.3}}}");

    // Two new TP = 2 ranks (threads), each with its fresh trainer; rank 0 also gets the old one.
    let old = Arc::new(Mutex::new(Some(old)));
    let hs: Vec<_> = tp_pair()
        .into_iter()
        .enumerate()
        .map(|(r, (l, addrs))| {
            let (spec, out, ck, old) = (spec.clone(), out.clone(), ck.clone(), old.clone());
            std::thread::spawn(move || {
                let mut ring = TcpRing::new(
                    r,
                    2,
                    l,
                    addrs,
                    &trellis_comm::ring::derive_key("reshard_bench"),
                    Duration::from_secs(600),
                )
                .unwrap();
                ring.barrier().unwrap();
                let groups = Groups {
                    dp: Box::new(Solo),
                    tp: Box::new(ring),
                };
                let mut new = Trainer::with_groups(&spec, &out, 0, 1, groups).unwrap();
                let mine = if r == 0 {
                    old.lock().unwrap().take()
                } else {
                    None
                };
                let (mut ckpt, mut peers) = (Vec::new(), Vec::new());
                for _ in 0..repeats {
                    new.tp_comm_mut().barrier().unwrap();
                    let rep = reshard::from_checkpoint(&mut new, &ck).unwrap();
                    new.tp_comm_mut().barrier().unwrap();
                    ckpt.push(rep.seconds);
                    let rep = reshard::from_peers(&mut new, mine.as_ref(), 1, &[0]).unwrap();
                    new.tp_comm_mut().barrier().unwrap();
                    peers.push(rep.seconds);
                }
                let loss = new.evaluate().unwrap();
                (ckpt, peers, loss, new.model().num_parameters())
            })
        })
        .collect();
    let res: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    // A reshard is done when its slowest rank is.
    let per_run = |k: usize| -> Vec<f64> {
        (0..repeats)
            .map(|i| {
                res.iter()
                    .map(|r| if k == 0 { r.0[i] } else { r.1[i] })
                    .fold(0.0, f64::max)
            })
            .collect()
    };
    let (c, p) = (per_run(0), per_run(1));
    for i in 0..repeats {
        println!(
            "{{\"run\":{i},\"checkpoint_seconds\":{:.3},\"peers_seconds\":{:.3}}}",
            c[i], p[i]
        );
    }
    println!(
        "{{\"params\":{params},\"tp_from\":1,\"tp_to\":2,\"checkpoint_median_s\":{:.3},\"peers_median_s\":{:.3},\"eval_loss_tp2\":[{:.6},{:.6}],\"local_params\":[{},{}]}}",
        median(c),
        median(p),
        res[0].2,
        res[1].2,
        res[0].3,
        res[1].3
    );
}
