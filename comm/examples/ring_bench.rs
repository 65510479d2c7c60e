//! All-reduce bandwidth of the TCP ring on loopback:
//! `cargo run --release -p trellis-comm --example ring_bench [-- WORLD MIB ITERS]`
//! (default world 2, 64 MiB, 5 iterations).
use std::net::TcpListener;
use std::time::{Duration, Instant};
use trellis_comm::{Collective, TcpRing};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: ring_bench [WORLD MIB ITERS]"))
        .collect();
    let world = args.first().copied().unwrap_or(2);
    let mib = args.get(1).copied().unwrap_or(64);
    let iters = args.get(2).copied().unwrap_or(5);
    let n = mib * (1 << 20) / 4;
    let ls: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().expect("addr")).collect();
    let hs: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let mut ring =
                    TcpRing::new(r, world, l, addrs, 1, Duration::from_secs(60)).expect("ring");
                let mut buf = vec![r as f32 + 1.0; n];
                ring.all_reduce_sum(&mut buf).expect("warm-up");
                ring.barrier().expect("barrier");
                let t0 = Instant::now();
                for _ in 0..iters {
                    ring.all_reduce_sum(&mut buf).expect("all_reduce");
                }
                t0.elapsed() / iters as u32
            })
        })
        .collect();
    let per: Vec<Duration> = hs.into_iter().map(|h| h.join().expect("rank")).collect();
    let t = per.into_iter().max().unwrap_or_default().as_secs_f64();
    let bytes = (n * 4) as f64;
    let bus = bytes * 2.0 * (world - 1) as f64 / world as f64;
    println!(
        "ring all_reduce_sum: world {world}, {mib} MiB: {:.1} ms/iter, algbw {:.2} GB/s, busbw {:.2} GB/s",
        t * 1e3,
        bytes / t / 1e9,
        bus / t / 1e9
    );
}
