//! TcpRing on 127.0.0.1, one thread per rank.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use trellis_comm::ring::derive_key;
use trellis_comm::{Collective, Error, RingOptions, TcpRing};

const TIMEOUT: Duration = Duration::from_secs(30);

fn key(token: &str) -> [u8; 32] {
    derive_key(token)
}

fn listeners(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

/// Form a ring of `world` threads and run `f(rank, ring)` on each; results by rank.
fn with_ring<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, TcpRing) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let (ls, addrs) = listeners(world);
    let hs: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let (addrs, f) = (addrs.clone(), f.clone());
            std::thread::spawn(move || {
                let ring = TcpRing::new(r, world, l, addrs, &key("feed"), timeout).unwrap();
                assert_eq!((ring.rank(), ring.world()), (r, world));
                f(r, ring)
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

fn data(rank: usize, n: usize, salt: u64) -> Vec<f32> {
    // A cheap deterministic generator with values of mixed magnitude and sign.
    let mut x = (rank as u64 + 1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(salt);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x % 2_000_001) as f32 / 1000.0 - 1000.0) * if x & 1 == 0 { 1.0 } else { 1e-3 }
        })
        .collect()
}

fn check_sum(world: usize, lens: &[usize]) {
    let lens = lens.to_vec();
    let results = with_ring(world, TIMEOUT, move |r, mut ring| {
        let mut out = Vec::new();
        for (i, &n) in lens.iter().enumerate() {
            let mut buf = data(r, n, i as u64);
            ring.all_reduce_sum(&mut buf).unwrap();
            out.push(buf);
        }
        out
    });
    for (i, got0) in results[0].iter().enumerate() {
        let n = got0.len();
        for (r, res) in results.iter().enumerate() {
            let a: Vec<u32> = res[i].iter().map(|x| x.to_bits()).collect();
            let b: Vec<u32> = got0.iter().map(|x| x.to_bits()).collect();
            assert!(
                a == b,
                "world {world} len {n}: rank {r} differs from rank 0"
            );
        }
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, n, i as u64)).collect();
        for (j, &g) in got0.iter().enumerate() {
            let exact: f64 = inputs.iter().map(|v| v[j] as f64).sum();
            let scale: f64 = inputs.iter().map(|v| (v[j] as f64).abs()).sum();
            assert!(
                (g as f64 - exact).abs() <= 1e-6 * scale + 1e-30,
                "world {world} len {n} [{j}]: {g} vs {exact}"
            );
        }
    }
}

const LENS: &[usize] = &[0, 1, 2, 3, 4, 5, 7, 64, 1001, 300_007];

#[test]
fn all_reduce_world_1() {
    check_sum(1, LENS);
}
#[test]
fn all_reduce_world_2() {
    check_sum(2, LENS);
}
#[test]
fn all_reduce_world_3() {
    check_sum(3, LENS);
}
#[test]
fn all_reduce_world_4() {
    check_sum(4, LENS);
}

#[test]
fn all_reduce_large_streams_and_is_deterministic() {
    // 16 MiB per rank: far beyond socket buffers and the 1 MiB scratch.
    let n = 4 << 20;
    let run = || {
        with_ring(3, TIMEOUT, move |r, mut ring| {
            let mut buf = data(r, n, 7);
            ring.all_reduce_sum(&mut buf).unwrap();
            buf.iter()
                .fold(0u64, |h, x| h.rotate_left(5) ^ x.to_bits() as u64)
        })
    };
    let a = run();
    assert!(a.iter().all(|h| *h == a[0]), "ranks differ: {a:?}");
    assert_eq!(run(), a, "not deterministic run to run");
}

#[test]
fn broadcast_every_root() {
    for world in 1..=4 {
        let res = with_ring(world, TIMEOUT, move |r, mut ring| {
            let mut out = Vec::new();
            for root in 0..world {
                for n in [0usize, 3, 300_001] {
                    let mut buf = data(r, n, root as u64);
                    ring.broadcast(&mut buf, root).unwrap();
                    out.push((root, buf));
                }
            }
            assert!(matches!(
                ring.broadcast(&mut [1.0], world),
                Err(Error::Protocol(_))
            ));
            out
        });
        for res_r in &res {
            for (root, buf) in res_r {
                let want = data(*root, buf.len(), *root as u64);
                assert!(
                    buf.iter()
                        .map(|x| x.to_bits())
                        .eq(want.iter().map(|x| x.to_bits())),
                    "world {world} root {root} len {}",
                    buf.len()
                );
            }
        }
    }
}

/// The length of rank `r`'s piece from `root` in the scatter tests: empty, small and larger than
/// one 1 MiB segment, so every relay path (empty pieces, several segments) is taken.
fn piece_len(root: usize, r: usize) -> usize {
    [0usize, 5, 300_001, 1][(root + 2 * r) % 4]
}

/// Run scatters from every root on `world` ranks of `ring_of(ring)`; check each rank got
/// exactly its piece, bit for bit.
fn check_scatter<C: Collective + 'static>(world: usize, ring_of: fn(TcpRing) -> C) {
    let res = with_ring(world, TIMEOUT, move |r, ring| {
        let mut ring = ring_of(ring);
        let mut out = Vec::new();
        for root in 0..world {
            let pieces: Vec<Vec<f32>> = (0..world)
                .map(|to| data(to, piece_len(root, to), root as u64))
                .collect();
            // Each piece as runs of uneven lengths (an empty one included), as a strided
            // slice would be.
            let runs: Vec<Vec<&[f32]>> = pieces
                .iter()
                .map(|p| {
                    let (a, rest) = p.split_at(p.len() / 3);
                    let (b, c) = rest.split_at(rest.len().min(7));
                    vec![a, &[][..], b, c]
                })
                .collect();
            let refs: Vec<&[&[f32]]> = runs.iter().map(|p| p.as_slice()).collect();
            let mut mine = vec![f32::NAN; piece_len(root, r)];
            let send: &[&[&[f32]]] = if r == root { &refs } else { &[] };
            ring.scatter(root, send, &mut mine).unwrap();
            out.push(mine);
        }
        assert!(matches!(
            ring.scatter(world, &[], &mut []),
            Err(Error::Protocol(_))
        ));
        out
    });
    for (r, got) in res.iter().enumerate() {
        for (root, mine) in got.iter().enumerate() {
            let want = data(r, piece_len(root, r), root as u64);
            assert!(
                mine.iter()
                    .map(|x| x.to_bits())
                    .eq(want.iter().map(|x| x.to_bits())),
                "world {world}: rank {r}'s piece from root {root} ({} values) is wrong",
                want.len()
            );
        }
    }
}

#[test]
fn scatter_sends_every_rank_its_piece() {
    for world in 1..=4 {
        check_scatter(world, |ring| ring);
    }
}

/// A collective that keeps the trait's default `scatter` (one broadcast per piece).
struct DefaultScatter(TcpRing);

impl Collective for DefaultScatter {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> trellis_comm::Result<()> {
        self.0.all_reduce_sum(buf)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> trellis_comm::Result<()> {
        self.0.broadcast(buf, root)
    }
    fn barrier(&mut self) -> trellis_comm::Result<()> {
        self.0.barrier()
    }
    fn all_reduce_max_u64(&mut self, v: u64) -> trellis_comm::Result<u64> {
        self.0.all_reduce_max_u64(v)
    }
    fn all_reduce_min_u64(&mut self, v: u64) -> trellis_comm::Result<u64> {
        self.0.all_reduce_min_u64(v)
    }
}

#[test]
fn default_scatter_sends_every_rank_its_piece() {
    for world in [1, 3] {
        check_scatter(world, DefaultScatter);
    }
}

#[test]
fn scatter_into_a_buffer_of_the_wrong_size_is_a_protocol_error() {
    let res = with_ring(2, TIMEOUT, move |r, mut ring| {
        let pieces = [&[&[1.0f32][..]][..], &[&[2.0; 10][..]][..]];
        if r == 0 {
            ring.scatter(0, &pieces, &mut [0.0]).map(|_| String::new())
        } else {
            let mut mine = [0f32; 9];
            ring.scatter(0, &[], &mut mine).map(|_| String::new())
        }
    });
    // The root finishes or sees rank 1 leave; it does not hang.
    if let Err(e) = &res[0] {
        assert!(matches!(e, Error::Peer { peer: 1, .. }), "{e}");
    }
    let e = res[1].as_ref().unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("10 values") && msg.contains("holds 9"),
        "{msg}"
    );
}

#[test]
fn barrier_and_u64_reductions() {
    for world in 1..=4 {
        let res = with_ring(world, TIMEOUT, move |r, mut ring| {
            ring.barrier().unwrap();
            let v = 10 + (r as u64 * 7) % 5;
            let mx = ring.all_reduce_max_u64(v).unwrap();
            let mn = ring.all_reduce_min_u64(v).unwrap();
            ring.barrier().unwrap();
            let big = ring
                .all_reduce_max_u64(if r == 0 { u64::MAX } else { 0 })
                .unwrap();
            (mx, mn, big)
        });
        let vals: Vec<u64> = (0..world).map(|r| 10 + (r as u64 * 7) % 5).collect();
        let want = (
            *vals.iter().max().unwrap(),
            *vals.iter().min().unwrap(),
            u64::MAX,
        );
        assert!(res.iter().all(|x| *x == want), "world {world}: {res:?}");
    }
}

#[test]
fn barrier_waits_for_the_last_rank() {
    let t0 = Instant::now();
    let res = with_ring(3, TIMEOUT, move |r, mut ring| {
        if r == 2 {
            std::thread::sleep(Duration::from_millis(500));
        }
        ring.barrier().unwrap();
        Instant::now()
    });
    for t in res {
        assert!(t.duration_since(t0) >= Duration::from_millis(500));
    }
}

#[test]
fn mismatched_collectives_are_a_protocol_error() {
    let res = with_ring(2, TIMEOUT, move |r, mut ring| {
        if r == 0 {
            ring.barrier()
        } else {
            ring.all_reduce_sum(&mut [1.0, 2.0])
        }
    });
    for r in res {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
        assert!(e.to_string().contains("same collectives"), "{e}");
    }
}

#[test]
fn stale_peer_of_an_old_group_is_rejected() {
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let a0 = addrs.clone();
    let rank0 = std::thread::spawn(move || {
        let mut ring = TcpRing::new(0, 2, l0, a0, &key("group-2"), TIMEOUT)?;
        ring.all_reduce_max_u64(5)
    });
    // A rank 1 of the old group (another key) reaches rank 0 first and is turned away...
    let stale_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let stale_peers = vec![addrs[0], stale_l.local_addr().unwrap()];
    let stale = TcpRing::new(
        1,
        2,
        stale_l,
        stale_peers,
        &key("group-1"),
        Duration::from_secs(2),
    );
    let e = stale.unwrap_err();
    assert!(matches!(e, Error::Auth { peer: 0, .. }), "{e}");
    assert!(e.to_string().contains("old group"), "{e}");
    // ...and the ring still forms with the right one.
    let mut ring1 = TcpRing::new(1, 2, l1, addrs, &key("group-2"), TIMEOUT).unwrap();
    assert_eq!(ring1.all_reduce_max_u64(3).unwrap(), 5);
    assert_eq!(rank0.join().unwrap().unwrap(), 5);
}

#[test]
fn bad_parameters() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    let e = TcpRing::new(2, 2, l, vec![a, a], &key("k"), TIMEOUT).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e}");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let e = TcpRing::new(0, 2, l, vec![a, a], b"too short", TIMEOUT).unwrap_err();
    assert!(e.to_string().contains("at least 16"), "{e}");
}

#[test]
fn dead_peer_is_an_error_not_a_hang() {
    // Rank 2 exits (its sockets close) while the others all-reduce.
    let timeout = Duration::from_secs(3);
    let t0 = Instant::now();
    let res = with_ring(3, timeout, move |r, mut ring| {
        if r == 2 {
            drop(ring);
            return None;
        }
        let mut buf = vec![1.0f32; 1 << 20];
        Some(ring.all_reduce_sum(&mut buf))
    });
    for r in res.into_iter().flatten() {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Peer { .. } | Error::Timeout(_)), "{e}");
    }
    assert!(t0.elapsed() < Duration::from_secs(20));
}

#[test]
fn hung_peer_times_out() {
    // Rank 1 is alive but never calls the collective.
    let timeout = Duration::from_secs(1);
    let res = with_ring(2, timeout, move |r, mut ring| {
        if r == 1 {
            std::thread::sleep(Duration::from_secs(4));
            drop(ring);
            return None;
        }
        let t0 = Instant::now();
        let e = ring.all_reduce_sum(&mut vec![1.0f32; 1000]).unwrap_err();
        Some((e, t0.elapsed()))
    });
    let (e, took) = res.into_iter().flatten().next().unwrap();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn formation_times_out_without_peers() {
    let (mut ls, addrs) = listeners(2);
    let l0 = ls.remove(0);
    drop(ls); // rank 1 never comes
    let t0 = Instant::now();
    let e = TcpRing::new(0, 2, l0, addrs, &key("k"), Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

// ------------------------------------------------------------------------------------------
// Authentication: ring key, message MACs, concurrent handshakes
// ------------------------------------------------------------------------------------------

/// Bytes the connector sends before its first message: hello (magic, version, rank, world,
/// flags, 32-byte nonce) and its 32-byte handshake tag.
const HANDSHAKE_OUT: usize = 20 + 32 + 32;
/// A header message (32 bytes) and its tag.
const HEADER_MSG: usize = 32 + 32;

/// A one-connection TCP proxy in front of `upstream`: bytes going upstream pass through
/// `edit(offset, chunk)` first. Returns the proxy's address.
fn proxy(
    upstream: SocketAddr,
    mut edit: impl FnMut(usize, &mut [u8]) + Send + 'static,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut down, _) = l.accept().unwrap();
        let mut up = TcpStream::connect(upstream).unwrap();
        let (mut down2, mut up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut up2, &mut down2);
            let _ = down2.shutdown(std::net::Shutdown::Write);
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0;
        loop {
            let n = match down.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            edit(off, &mut buf[..n]);
            if up.write_all(&buf[..n]).is_err() {
                break;
            }
            off += n;
        }
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    addr
}

/// Ranks 0 and 1 where everything rank 0 sends to rank 1 goes through `edit`; each runs `f`.
fn two_ranks_via_proxy<T: Send + 'static>(
    edit: impl FnMut(usize, &mut [u8]) + Send + 'static,
    f: impl Fn(usize, &mut TcpRing) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let (ls, addrs) = listeners(2);
    let via = proxy(addrs[1], edit);
    let peers = [vec![addrs[0], via], addrs.clone()];
    let hs: Vec<_> = ls
        .into_iter()
        .zip(peers)
        .enumerate()
        .map(|(r, (l, p))| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut ring =
                    TcpRing::new(r, 2, l, p, &key("proxied"), Duration::from_secs(5)).unwrap();
                f(r, &mut ring)
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn untouched_proxy_changes_nothing() {
    let res = two_ranks_via_proxy(
        |_, _| {},
        |r, ring| {
            let mut buf = data(r, 300_007, 3);
            ring.all_reduce_sum(&mut buf).unwrap();
            ring.broadcast(&mut buf, 1).unwrap();
            buf.iter().map(|x| x.to_bits() as u64).sum::<u64>()
        },
    );
    assert_eq!(res[0], res[1]);
}

#[test]
fn tampered_gradient_message_is_rejected_and_names_the_peer() {
    // Flip one bit inside the first chunk of gradient data rank 0 sends.
    let at = HANDSHAKE_OUT + HEADER_MSG + 5000;
    let res = two_ranks_via_proxy(
        move |off, chunk| {
            if (off..off + chunk.len()).contains(&at) {
                chunk[at - off] ^= 0x04;
            }
        },
        |r, ring| {
            let mut buf = data(r, 1 << 18, 1);
            ring.all_reduce_sum(&mut buf)
        },
    );
    let e = res[1].as_ref().unwrap_err();
    match e {
        Error::Auth { peer, .. } => assert_eq!(*peer, 0, "{e}"),
        _ => panic!("rank 1 did not reject the tampered message: {e}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("peer 0") && msg.contains("MAC"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    // Rank 0 does not get a result either: rank 1 abandoned the collective.
    assert!(
        res[0].is_err(),
        "rank 0 finished an all-reduce its peer rejected"
    );
}

#[test]
fn tampered_scatter_piece_is_rejected() {
    // Flip one bit inside the piece rank 0 scatters to rank 1 (after the header and the table).
    let at = HANDSHAKE_OUT + HEADER_MSG + (16 + 32) + 5000;
    let res = two_ranks_via_proxy(
        move |off, chunk| {
            if (off..off + chunk.len()).contains(&at) {
                chunk[at - off] ^= 0x10;
            }
        },
        |r, ring| {
            let piece = data(1, 1 << 18, 2);
            let mut mine = vec![0f32; if r == 0 { 0 } else { piece.len() }];
            let pieces = [&[][..], &[piece.as_slice()][..]];
            ring.scatter(0, if r == 0 { &pieces } else { &[] }, &mut mine)
        },
    );
    let e = res[1].as_ref().unwrap_err();
    match e {
        Error::Auth { peer, .. } => assert_eq!(*peer, 0, "{e}"),
        _ => panic!("rank 1 accepted a tampered scatter piece: {e}"),
    }
}

#[test]
fn replayed_message_is_rejected() {
    // Rank 0's second header message is replaced by a copy of its first (validly tagged).
    let mut seen = Vec::new();
    let (first, second) = (HANDSHAKE_OUT, HANDSHAKE_OUT + HEADER_MSG);
    let res = two_ranks_via_proxy(
        move |off, chunk| {
            for (i, b) in chunk.iter_mut().enumerate() {
                let p = off + i;
                if p < second {
                    seen.push(*b);
                } else if p < second + HEADER_MSG {
                    *b = seen[first + (p - second)];
                }
            }
        },
        |_, ring| {
            ring.barrier()?;
            ring.barrier()
        },
    );
    let e = res[1].as_ref().unwrap_err();
    assert!(matches!(e, Error::Auth { peer: 0, .. }), "{e}");
    assert!(e.to_string().contains("message #1"), "{e}");
}

#[test]
fn wrong_key_is_refused_both_ways() {
    // A process with another key listens where rank 0 expects rank 1: rank 0 refuses it.
    let (mut ls, addrs) = listeners(2);
    let impostor_l = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let a = addrs.clone();
    let impostor = std::thread::spawn(move || {
        TcpRing::new(
            1,
            2,
            impostor_l,
            a,
            &key("not the key"),
            Duration::from_secs(3),
        )
    });
    let t0 = Instant::now();
    let e = TcpRing::new(0, 2, l0, addrs, &key("the key"), Duration::from_secs(3)).unwrap_err();
    assert!(matches!(e, Error::Auth { peer: 1, .. }), "{e}");
    assert!(e.to_string().contains("ring key"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    // And the impostor, connecting to rank 0, is refused by rank 0's key check too.
    let e = impostor.join().unwrap().unwrap_err();
    assert!(
        matches!(e, Error::Auth { peer: 0, .. } | Error::Timeout(_)),
        "{e}"
    );
}

#[test]
fn message_mac_options_must_agree() {
    let (ls, addrs) = listeners(2);
    let hs: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let opts = RingOptions {
                    message_mac: r == 0,
                    ..RingOptions::new(Duration::from_secs(3))
                };
                TcpRing::with_options(r, 2, l, addrs, &key("k"), opts)
            })
        })
        .collect();
    for h in hs {
        let e = h.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("same ring options"), "{e}");
    }
}

#[test]
fn macs_off_still_sums() {
    // The unauthenticated wire format (kept to measure the MAC's cost) still works.
    let (ls, addrs) = listeners(3);
    let hs: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let opts = RingOptions {
                    message_mac: false,
                    ..RingOptions::new(TIMEOUT)
                };
                let mut ring = TcpRing::with_options(r, 3, l, addrs, &key("k"), opts).unwrap();
                let mut buf = vec![r as f32 + 1.0; 100_003];
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            })
        })
        .collect();
    for h in hs {
        assert!(h.join().unwrap().iter().all(|&x| x == 6.0));
    }
}

#[test]
fn idle_connections_do_not_delay_formation() {
    let (ls, addrs) = listeners(3);
    // Before any rank starts, every ring port has two connections that never send a byte
    // and one that sends garbage; they are first in the accept queue.
    let mut squatters = Vec::new();
    for a in &addrs {
        squatters.push(TcpStream::connect(a).unwrap());
        squatters.push(TcpStream::connect(a).unwrap());
        let mut g = TcpStream::connect(a).unwrap();
        g.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        squatters.push(g);
    }
    // A handshake timeout far above the formation time we accept: only running the
    // handshakes concurrently can form the ring in time.
    let opts = RingOptions {
        handshake_timeout: Duration::from_secs(20),
        ..RingOptions::new(TIMEOUT)
    };
    let t0 = Instant::now();
    let hs: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let mut ring = TcpRing::with_options(r, 3, l, addrs, &key("k"), opts).unwrap();
                let formed = t0.elapsed();
                (formed, ring.all_reduce_max_u64(r as u64).unwrap())
            })
        })
        .collect();
    for h in hs {
        let (formed, max) = h.join().unwrap();
        assert_eq!(max, 2);
        assert!(
            formed < Duration::from_secs(3),
            "formation took {formed:?} behind idle connections"
        );
    }
    drop(squatters);
}
