//! A TCP ring over CPU ranks (DESIGN §4).
//!
//! Rank `r` listens on `peers[r]`, connects to `peers[(r + 1) % world]` ("next") and accepts
//! one connection from `(r - 1) % world` ("prev"). A handshake checks magic, version, rank,
//! world and the group token (e.g. derived from the job and generation), so a stale peer of an
//! old group is rejected (and the acceptor keeps waiting for the right one).
//!
//! Every collective starts with a small header exchange (op, sequence number, length) so that
//! ranks calling different collectives get `Error::Protocol` instead of garbage.
//!
//! `all_reduce_sum` is a ring reduce-scatter followed by an all-gather (each rank sends and
//! receives `2 (world-1)/world` of the buffer: bandwidth-optimal). Each chunk is summed in
//! one fixed order (starting at its owner and going round the ring) and then copied verbatim,
//! so the result is bit-identical on every rank and deterministic run to run (but not the
//! same association order as a sequential sum). Sends go straight from the caller's buffer;
//! receives are reduced through a fixed 1 MiB scratch buffer, so memory stays bounded for any
//! buffer size. Sends and receives are interleaved with `poll(2)` on non-blocking sockets, so
//! large chunks never deadlock on full socket buffers, and a peer that makes no progress for
//! `timeout` gives `Error::Timeout`; a closed or reset peer gives `Error::Peer`.
//!
//! Data travels in native byte order: every rank of a group must share one architecture.
use crate::{Collective, Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x5452_4c53; // "TRLS"
const VERSION: u32 = 1;
const SCRATCH: usize = 1 << 20;
const HELLO_LEN: usize = 24;
const REPLY_LEN: usize = 28;
const HEADER_LEN: usize = 32;

const OP_SUM: u32 = 1;
const OP_BROADCAST: u32 = 2;
const OP_BARRIER: u32 = 3;
const OP_MAX: u32 = 4;
const OP_MIN: u32 = 5;

fn op_name(op: u32) -> &'static str {
    match op {
        OP_SUM => "all_reduce_sum",
        OP_BROADCAST => "broadcast",
        OP_BARRIER => "barrier",
        OP_MAX => "all_reduce_max_u64",
        OP_MIN => "all_reduce_min_u64",
        _ => "unknown",
    }
}

struct Link {
    stream: TcpStream,
    peer: usize,
    addr: SocketAddr,
}

impl Link {
    fn err(&self, what: &'static str, source: std::io::Error) -> Error {
        Error::Peer {
            peer: self.peer,
            addr: self.addr.to_string(),
            what,
            source,
        }
    }
}

/// A process group of CPU ranks connected in a ring over TCP.
pub struct TcpRing {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// `None` for world 1.
    links: Option<(Link, Link)>,
    seq: u64,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for TcpRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRing")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("seq", &self.seq)
            .finish()
    }
}

enum Sink<'a> {
    /// Overwrite these bytes.
    Bytes(&'a mut [u8]),
    /// Add the received f32s into these.
    Add(&'a mut [f32]),
}

impl Sink<'_> {
    fn len(&self) -> usize {
        match self {
            Sink::Bytes(b) => b.len(),
            Sink::Add(f) => f.len() * 4,
        }
    }
}

fn f32_bytes(f: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding; u8 has alignment 1; the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(f.as_ptr().cast::<u8>(), std::mem::size_of_val(f)) }
}

fn f32_bytes_mut(f: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(f.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(f)) }
}

/// Chunk `i` of `n` elements split `world` ways.
fn chunk(n: usize, world: usize, i: usize) -> std::ops::Range<usize> {
    (i * n / world)..((i + 1) * n / world)
}

/// A shared view of `a` and a mutable view of `b` (disjoint ranges of `buf`).
fn split2(
    buf: &mut [f32],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&[f32], &mut [f32]) {
    debug_assert!(a.end <= b.start || b.end <= a.start);
    if a.start < b.start || (a.start == b.start && a.is_empty()) {
        let (l, r) = buf.split_at_mut(b.start);
        (&l[a], &mut r[..b.end - b.start])
    } else {
        let (l, r) = buf.split_at_mut(a.start);
        (&r[..a.end - a.start], &mut l[b])
    }
}

struct Header {
    op: u32,
    seq: u64,
    len: u64,
    value: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.op.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.value.to_le_bytes());
        b
    }
    fn decode(b: &[u8; HEADER_LEN]) -> Option<Header> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        (u32_at(0) == MAGIC).then(|| Header {
            op: u32_at(4),
            seq: u64_at(8),
            len: u64_at(16),
            value: u64_at(24),
        })
    }
}

fn set_timeouts(s: &TcpStream, t: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl TcpRing {
    /// Form the ring. `listener` is this rank's (already bound) listener, `peers[i]` rank i's
    /// listen address (relayed by the coordinator), `group_token` identifies the group (same
    /// on every rank, different for every new group), `timeout` bounds both the formation and
    /// every later wait on a peer.
    pub fn new(
        rank: usize,
        world: usize,
        listener: TcpListener,
        peers: Vec<SocketAddr>,
        group_token: u64,
        timeout: Duration,
    ) -> Result<TcpRing> {
        if world == 0 || rank >= world || peers.len() != world {
            return Err(Error::Protocol(format!(
                "bad ring parameters: rank {rank}, world {world}, {} peer addresses; \
                 need 0 <= rank < world and one address per rank",
                peers.len()
            )));
        }
        if timeout.is_zero() {
            return Err(Error::Protocol("the ring timeout must be positive".into()));
        }
        let mut ring = TcpRing {
            rank,
            world,
            timeout,
            links: None,
            seq: 0,
            scratch: Vec::new(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let (next, prev) = std::thread::scope(|s| {
            let acc = s.spawn(|| {
                accept_prev(
                    &listener,
                    rank,
                    world,
                    prev_rank,
                    group_token,
                    deadline,
                    timeout,
                )
            });
            let next = connect_next(
                peers[next_rank],
                rank,
                world,
                next_rank,
                group_token,
                deadline,
                timeout,
            );
            let prev = acc
                .join()
                .unwrap_or_else(|_| Err(Error::Protocol("ring accept thread panicked".into())));
            (next, prev)
        });
        let (next, prev) = (next?, prev?);
        for l in [&next, &prev] {
            l.stream
                .set_nonblocking(true)
                .map_err(|e| l.err("set non-blocking", e))?;
        }
        tracing::debug!(rank, world, "tcp ring formed");
        ring.links = Some((next, prev));
        ring.scratch = vec![0u8; SCRATCH];
        Ok(ring)
    }

    /// Send `send` to next while receiving `recv.len()` bytes from prev.
    fn exchange(&mut self, send: &[u8], mut recv: Sink<'_>) -> Result<()> {
        let Some((next, prev)) = &self.links else {
            return Ok(());
        };
        let recv_len = recv.len();
        let (mut sent, mut got) = (0usize, 0usize);
        let mut pending = 0usize; // bytes in scratch not yet reduced (Add)
        let mut reduced = 0usize; // f32s reduced so far (Add)
        let wait_ms = self.timeout.as_millis().min(i32::MAX as u128) as i32;
        let scratch = &mut self.scratch;
        while sent < send.len() || got < recv_len {
            let mut fds = [
                libc::pollfd {
                    fd: if sent < send.len() {
                        next.stream.as_raw_fd()
                    } else {
                        -1
                    },
                    events: libc::POLLOUT,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if got < recv_len {
                        prev.stream.as_raw_fd()
                    } else {
                        -1
                    },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait_ms) };
            if rc == 0 {
                return Err(Error::Timeout(self.timeout));
            }
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(next.err("poll", e));
            }
            if fds[0].revents != 0 {
                let end = send.len().min(sent + SCRATCH);
                let chunk = &send[sent..end];
                // SAFETY: `chunk` is valid for `chunk.len()` bytes; MSG_NOSIGNAL avoids SIGPIPE.
                let n = unsafe {
                    libc::send(
                        next.stream.as_raw_fd(),
                        chunk.as_ptr().cast(),
                        chunk.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) {
                        return Err(next.err("send", e));
                    }
                } else {
                    sent += n as usize;
                }
            }
            if fds[1].revents != 0 {
                let res = match &mut recv {
                    Sink::Bytes(b) => (&prev.stream).read(&mut b[got..]),
                    Sink::Add(_) => {
                        let room = (SCRATCH - pending).min(recv_len - got);
                        (&prev.stream).read(&mut scratch[pending..pending + room])
                    }
                };
                match res {
                    Ok(0) => {
                        return Err(prev.err(
                            "receive",
                            std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "connection closed by the peer",
                            ),
                        ))
                    }
                    Ok(n) => {
                        got += n;
                        if let Sink::Add(dst) = &mut recv {
                            pending += n;
                            let whole = pending / 4;
                            for (d, src) in dst[reduced..reduced + whole]
                                .iter_mut()
                                .zip(scratch[..whole * 4].chunks_exact(4))
                            {
                                *d += f32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
                            }
                            reduced += whole;
                            scratch.copy_within(whole * 4..pending, 0);
                            pending -= whole * 4;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(prev.err("receive", e)),
                }
            }
        }
        Ok(())
    }

    /// Exchange headers with both neighbours and check that prev runs the same collective.
    fn header(&mut self, op: u32, len: u64, value: u64) -> Result<u64> {
        let mine = Header {
            op,
            seq: self.seq,
            len,
            value,
        }
        .encode();
        let mut theirs = [0u8; HEADER_LEN];
        self.exchange(&mine, Sink::Bytes(&mut theirs))?;
        let prev = (self.rank + self.world - 1) % self.world;
        let h = Header::decode(&theirs).ok_or_else(|| {
            Error::Protocol(format!(
                "rank {}: garbage from rank {prev} (bad magic); the ring is out of step",
                self.rank
            ))
        })?;
        if h.op != op || h.seq != self.seq || h.len != len {
            return Err(Error::Protocol(format!(
                "rank {} is in {} #{} (len {len}) but rank {prev} is in {} #{} (len {}); \
                 every rank must call the same collectives in the same order with the same sizes",
                self.rank,
                op_name(op),
                self.seq,
                op_name(h.op),
                h.seq,
                h.len
            )));
        }
        Ok(h.value)
    }

    /// An idempotent u64 reduction: `world - 1` rounds of passing the running value on.
    fn reduce_u64(&mut self, op: u32, v: u64, f: fn(u64, u64) -> u64) -> Result<u64> {
        if self.world == 1 {
            return Ok(v);
        }
        let mut acc = v;
        for round in 0..self.world - 1 {
            let got = self.header(op, round as u64, acc)?;
            acc = f(acc, got);
        }
        self.seq += 1;
        Ok(acc)
    }
}

fn connect_next(
    addr: SocketAddr,
    rank: usize,
    world: usize,
    next_rank: usize,
    token: u64,
    deadline: Instant,
    timeout: Duration,
) -> Result<Link> {
    let link_err = |what, source| Error::Peer {
        peer: next_rank,
        addr: addr.to_string(),
        what,
        source,
    };
    let stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(timeout));
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(2))) {
            Ok(s) => break s,
            Err(e) if timed_out(&e) || e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(link_err("connect", e)),
        }
    };
    set_timeouts(&stream, timeout).map_err(|e| link_err("configure", e))?;
    let mut hello = [0u8; HELLO_LEN];
    hello[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    hello[4..8].copy_from_slice(&VERSION.to_le_bytes());
    hello[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    hello[12..16].copy_from_slice(&(world as u32).to_le_bytes());
    hello[16..24].copy_from_slice(&token.to_le_bytes());
    (&stream)
        .write_all(&hello)
        .map_err(|e| link_err("handshake send", e))?;
    let mut reply = [0u8; REPLY_LEN];
    (&stream).read_exact(&mut reply).map_err(|e| {
        if timed_out(&e) {
            Error::Timeout(timeout)
        } else {
            link_err("handshake receive", e)
        }
    })?;
    let u32_at =
        |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    let mut tb = [0u8; 8];
    tb.copy_from_slice(&reply[20..28]);
    let (magic, status, their_rank, their_world, their_token) = (
        u32_at(0),
        u32_at(4),
        u32_at(12) as usize,
        u32_at(16) as usize,
        u64::from_le_bytes(tb),
    );
    if magic != MAGIC {
        return Err(Error::Protocol(format!(
            "rank {rank}: {addr} (rank {next_rank}) is not a Trellis ring peer"
        )));
    }
    if status != 0 || their_rank != next_rank || their_world != world || their_token != token {
        return Err(Error::Protocol(format!(
            "rank {rank}: the process at {addr} (expected rank {next_rank} of {world}, group \
             {token:#x}) is rank {their_rank} of {their_world}, group {their_token:#x}{}; it is \
             probably left over from an old group: restart it or relay fresh addresses",
            if status != 0 {
                ", and it rejected us"
            } else {
                ""
            }
        )));
    }
    Ok(Link {
        stream,
        peer: next_rank,
        addr,
    })
}

fn accept_prev(
    listener: &TcpListener,
    rank: usize,
    world: usize,
    prev_rank: usize,
    token: u64,
    deadline: Instant,
    timeout: Duration,
) -> Result<Link> {
    let local = listener
        .local_addr()
        .map_err(|e| Error::Protocol(format!("rank {rank}: listener has no address: {e}")))?;
    let lerr = |what, source| Error::Peer {
        peer: prev_rank,
        addr: local.to_string(),
        what,
        source,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| lerr("listen", e))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(timeout));
        }
        let (stream, addr) = match listener.accept() {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(lerr("accept", e)),
        };
        // A broken or stale connection must not stop us waiting for the right peer.
        let checked = (|| -> std::io::Result<Option<TcpStream>> {
            stream.set_nonblocking(false)?;
            set_timeouts(&stream, left.min(timeout))?;
            let mut hello = [0u8; HELLO_LEN];
            (&stream).read_exact(&mut hello)?;
            let u32_at =
                |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]);
            let mut tb = [0u8; 8];
            tb.copy_from_slice(&hello[16..24]);
            let their_token = u64::from_le_bytes(tb);
            let ok = u32_at(0) == MAGIC
                && u32_at(4) == VERSION
                && u32_at(8) as usize == prev_rank
                && u32_at(12) as usize == world
                && their_token == token;
            let mut reply = [0u8; REPLY_LEN];
            reply[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            reply[4..8].copy_from_slice(&(if ok { 0u32 } else { 1 }).to_le_bytes());
            reply[8..12].copy_from_slice(&VERSION.to_le_bytes());
            reply[12..16].copy_from_slice(&(rank as u32).to_le_bytes());
            reply[16..20].copy_from_slice(&(world as u32).to_le_bytes());
            reply[20..28].copy_from_slice(&token.to_le_bytes());
            (&stream).write_all(&reply)?;
            if !ok {
                tracing::warn!(
                    rank,
                    from = %addr,
                    their_rank = u32_at(8),
                    their_world = u32_at(12),
                    their_token = format!("{their_token:#x}"),
                    "rejected a ring peer from another group"
                );
                return Ok(None);
            }
            set_timeouts(&stream, timeout)?;
            Ok(Some(stream))
        })();
        match checked {
            Ok(Some(stream)) => {
                return Ok(Link {
                    stream,
                    peer: prev_rank,
                    addr,
                })
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(rank, from = %addr, error = %e, "bad ring handshake"),
        }
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let (w, r, n) = (self.world, self.rank, buf.len());
        if w == 1 {
            return Ok(());
        }
        self.header(OP_SUM, n as u64, 0)?;
        if n > 0 {
            // Reduce-scatter: after step s, rank r has summed s + 2 contributions into chunk
            // (r - s - 1); at the end it owns the full sum of chunk (r + 1).
            for s in 0..w - 1 {
                let send = chunk(n, w, (r + w - s) % w);
                let recv = chunk(n, w, (r + 2 * w - s - 1) % w);
                let (tx, rx) = split2(buf, send, recv);
                self.exchange(f32_bytes(tx), Sink::Add(rx))?;
            }
            // All-gather: pass the finished chunks round, copied verbatim.
            for s in 0..w - 1 {
                let send = chunk(n, w, (r + 1 + w - s) % w);
                let recv = chunk(n, w, (r + w - s) % w);
                let (tx, rx) = split2(buf, send, recv);
                self.exchange(f32_bytes(tx), Sink::Bytes(f32_bytes_mut(rx)))?;
            }
        }
        self.seq += 1;
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let w = self.world;
        if root >= w {
            return Err(Error::Protocol(format!(
                "broadcast root {root} is not a rank of this world of {w}"
            )));
        }
        if w == 1 {
            return Ok(());
        }
        self.header(OP_BROADCAST, buf.len() as u64, root as u64)?;
        let dist = (self.rank + w - root) % w;
        let bytes = f32_bytes_mut(buf);
        if dist == 0 {
            self.exchange(bytes, Sink::Bytes(&mut []))?;
        } else if dist == w - 1 {
            self.exchange(&[], Sink::Bytes(bytes))?;
        } else {
            // Pipelined: forward segment k-1 while receiving segment k.
            let segs = bytes.len().div_ceil(SCRATCH);
            for k in 0..=segs {
                let rx_start = (k * SCRATCH).min(bytes.len());
                let rx_end = ((k + 1) * SCRATCH).min(bytes.len());
                let tx_start = (k.saturating_sub(1) * SCRATCH).min(bytes.len());
                let tx_end = if k == 0 { 0 } else { rx_start };
                let (head, tail) = bytes.split_at_mut(rx_start);
                let tx = &head[tx_start.min(tx_end)..tx_end];
                let rx = if k < segs {
                    &mut tail[..rx_end - rx_start]
                } else {
                    &mut tail[..0]
                };
                self.exchange(tx, Sink::Bytes(rx))?;
            }
        }
        self.seq += 1;
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.reduce_u64(OP_BARRIER, 0, u64::max).map(|_| ())
    }

    fn all_reduce_max_u64(&mut self, v: u64) -> Result<u64> {
        self.reduce_u64(OP_MAX, v, u64::max)
    }

    fn all_reduce_min_u64(&mut self, v: u64) -> Result<u64> {
        self.reduce_u64(OP_MIN, v, u64::min)
    }
}
