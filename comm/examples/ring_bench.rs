//! All-reduce bandwidth of the TCP ring on loopback, and what the per-message MAC costs:
//! `cargo run --release -p trellis-comm --example ring_bench [-- WORLD MIB ITERS REPEATS]`
//! (default world 2, 64 MiB, 5 iterations, 3 repeats).
//!
//! Each repeat forms two rings in turn, one with message MACs off (the unauthenticated wire
//! format) and one with them on (keyed BLAKE3 per message, the default); the figure of each is
//! the median over repeats, and the ratio is on / off. It then times a scatter (rank 0 sends
//! each other rank its own MIB MiB, what a peers reshard does) the same way, and compares the
//! two MACs the ring could use on one core: HMAC-SHA256 and keyed BLAKE3 over the same 64 MiB.
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::TcpListener;
use std::time::{Duration, Instant};
use trellis_comm::ring::derive_key;
use trellis_comm::{Collective, RingOptions, TcpRing};

/// Seconds per all-reduce of `n` f32 (`scatter`: per scatter from rank 0 of `n` f32 to every
/// other rank) on a ring of `world` threads (the slowest rank's mean).
fn run(world: usize, n: usize, iters: usize, message_mac: bool, scatter: bool) -> f64 {
    let ls: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().expect("addr")).collect();
    let key = derive_key("ring_bench");
    let hs: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let opts = RingOptions {
                    message_mac,
                    ..RingOptions::new(Duration::from_secs(60))
                };
                let mut ring = TcpRing::with_options(r, world, l, addrs, &key, opts).expect("ring");
                let mut buf = vec![r as f32 + 1.0; n];
                let src = vec![2.0f32; n];
                let mut mine = vec![0f32; if r == 0 { 0 } else { n }];
                let runs: Vec<&[f32]> = vec![&src];
                let pieces: Vec<&[&[f32]]> = (0..world)
                    .map(|to| if to == 0 { &[][..] } else { runs.as_slice() })
                    .collect();
                let mut op = |ring: &mut TcpRing| {
                    if scatter {
                        let send: &[&[&[f32]]] = if r == 0 { &pieces } else { &[] };
                        ring.scatter(0, send, &mut mine).expect("scatter")
                    } else {
                        ring.all_reduce_sum(&mut buf).expect("all_reduce")
                    }
                };
                op(&mut ring); // warm-up
                ring.barrier().expect("barrier");
                let t0 = Instant::now();
                for _ in 0..iters {
                    op(&mut ring);
                }
                t0.elapsed() / iters as u32
            })
        })
        .collect();
    let per: Vec<Duration> = hs.into_iter().map(|h| h.join().expect("rank")).collect();
    per.into_iter().max().unwrap_or_default().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("usage: ring_bench [WORLD MIB ITERS REPEATS]")
        })
        .collect();
    let world = args.first().copied().unwrap_or(2);
    let mib = args.get(1).copied().unwrap_or(64);
    let iters = args.get(2).copied().unwrap_or(5);
    let repeats = args.get(3).copied().unwrap_or(3).max(1);
    let n = mib * (1 << 20) / 4;

    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        off.push(run(world, n, iters, false, false));
        on.push(run(world, n, iters, true, false));
    }
    let (t_off, t_on) = (median(off), median(on));
    let bytes = (n * 4) as f64;
    let bus = bytes * 2.0 * (world - 1) as f64 / world as f64;
    for (name, t) in [
        ("message MACs off", t_off),
        ("keyed BLAKE3 per message", t_on),
    ] {
        println!(
            "ring all_reduce_sum, {name}: world {world}, {mib} MiB: {:.1} ms/iter, algbw {:.2} GB/s, busbw {:.2} GB/s",
            t * 1e3,
            bytes / t / 1e9,
            bus / t / 1e9
        );
    }
    println!(
        "time ratio MAC on / off: {:.3} (median of {repeats} alternating repeats)",
        t_on / t_off
    );

    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        off.push(run(world, n, iters, false, true));
        on.push(run(world, n, iters, true, true));
    }
    let (s_off, s_on) = (median(off), median(on));
    for (name, t) in [
        ("message MACs off", s_off),
        ("keyed BLAKE3 per message", s_on),
    ] {
        println!(
            "ring scatter from rank 0, {name}: world {world}, {mib} MiB to each other rank: {:.1} ms/iter, {:.2} GB/s per receiving rank",
            t * 1e3,
            bytes / t / 1e9
        );
    }
    println!("scatter time ratio MAC on / off: {:.3}", s_on / s_off);

    // The MACs on one core, over the same 64 MiB (best of 3 each).
    let data = vec![0x5au8; 64 << 20];
    let key = derive_key("x");
    let best = |f: &dyn Fn() -> u8| {
        (0..3)
            .map(|_| {
                let t0 = Instant::now();
                std::hint::black_box(f());
                t0.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let hmac = best(&|| {
        let mut m = Hmac::<Sha256>::new_from_slice(&key).expect("key");
        m.update(&data);
        m.finalize().into_bytes()[0]
    });
    let b3 = best(&|| {
        blake3::Hasher::new_keyed(&key)
            .update(&data)
            .finalize()
            .as_bytes()[0]
    });
    let gbs = |t: f64| data.len() as f64 / t / 1e9;
    println!(
        "one core, 64 MiB: HMAC-SHA256 {:.2} GB/s, keyed BLAKE3 {:.2} GB/s, ratio {:.2}",
        gbs(hmac),
        gbs(b3),
        hmac / b3
    );
}
