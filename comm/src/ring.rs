//! A TCP ring over CPU ranks (docs/design.md §4).
//!
//! Rank `r` listens on `peers[r]`, connects to `peers[(r + 1) % world]` ("next") and accepts
//! one connection from `(r - 1) % world` ("prev"). Data flows one way on each connection: a
//! rank only sends to next and only receives from prev.
//!
//! # Authentication
//!
//! Every group has a secret ring key (at least [`MIN_KEY_LEN`] bytes, e.g. [`derive_key`] of a
//! random per-epoch token delivered over the coordinator's mTLS session). The handshake is a
//! challenge–response over both sides' random nonces, ranks and world, HMAC-SHA256 with the
//! key: neither side ever sends the key, a peer of another group (or without the key) is
//! refused, and each side proves it holds the key to the other. Each connection then derives
//! its own message key from the key and both nonces, and every message on it (each collective's
//! header and each chunk of data) is followed by a keyed-BLAKE3 tag over the message counter,
//! its length and its bytes: a message altered, replayed, reordered or injected in transit
//! fails with [`Error::Auth`] naming the peer, before the collective returns. (Keyed BLAKE3 is
//! a MAC; it replaced HMAC-SHA256 per message, which made the all-reduce benchmark 5x slower:
//! docs/benchmarks.md.)
//!
//! The acceptor runs each incoming handshake on its own thread with a short timeout
//! ([`RingOptions::handshake_timeout`]): a connection that sends nothing, or garbage, does not
//! delay the group's formation.
//!
//! # Collectives
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
//! `timeout` gives `Error::Timeout`; a closed or reset peer gives `Error::Peer`. After any
//! error the buffer's contents are unspecified (a tampered chunk may already have been added).
//!
//! Data travels in native byte order: every rank of a group must share one architecture.
use crate::{runs_len, Collective, Error, Result, Runs};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: u32 = 0x5452_4c53; // "TRLS"
const VERSION: u32 = 2;
const SCRATCH: usize = 1 << 20;
const NONCE_LEN: usize = 32;
/// An HMAC-SHA256 (handshake) or keyed BLAKE3 (message) tag.
const TAG_LEN: usize = 32;
/// magic, version, rank, world, flags, nonce.
const HELLO_LEN: usize = 20 + NONCE_LEN;
/// magic, status, version, rank, world, flags, nonce, tag.
const REPLY_LEN: usize = 24 + NONCE_LEN + TAG_LEN;
/// The connector's tag.
const FINISH_LEN: usize = TAG_LEN;
const HEADER_LEN: usize = 32;
/// Handshakes the acceptor runs at once; more connections are closed unread.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// The shortest ring key [`TcpRing::new`] accepts.
pub const MIN_KEY_LEN: usize = 16;
/// The default bound on one incoming connection's handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A 32-byte ring key from a group's token material (e.g. `"{token}/{kind}/{index}"`):
/// SHA-256 with a domain-separation prefix. Secret only if the token is.
pub fn derive_key(material: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"trellis ring key v1\0")
        .chain_update(material.as_bytes())
        .finalize()
        .into()
}

/// How a ring waits and what it authenticates.
#[derive(Debug, Clone, Copy)]
pub struct RingOptions {
    /// Bounds the formation and every later wait on a peer.
    pub timeout: Duration,
    /// Bounds each incoming connection's handshake; an idle or slow connection is dropped
    /// after it without delaying the others.
    pub handshake_timeout: Duration,
    /// Tag every message (keyed BLAKE3). On by default; off only to measure its cost or on a
    /// fabric that is trusted end to end (the handshake is authenticated either way).
    pub message_mac: bool,
}

impl RingOptions {
    pub fn new(timeout: Duration) -> RingOptions {
        RingOptions {
            timeout,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT.min(timeout),
            message_mac: true,
        }
    }
}

const OP_SUM: u32 = 1;
const OP_BROADCAST: u32 = 2;
const OP_BARRIER: u32 = 3;
const OP_MAX: u32 = 4;
const OP_MIN: u32 = 5;
const OP_SCATTER: u32 = 6;

fn op_name(op: u32) -> &'static str {
    match op {
        OP_SUM => "all_reduce_sum",
        OP_BROADCAST => "broadcast",
        OP_BARRIER => "barrier",
        OP_MAX => "all_reduce_max_u64",
        OP_MIN => "all_reduce_min_u64",
        OP_SCATTER => "scatter",
        _ => "unknown",
    }
}

struct Link {
    stream: TcpStream,
    peer: usize,
    addr: SocketAddr,
    /// Keyed with this connection's message key; `None` when message MACs are off.
    mac: Option<blake3::Hasher>,
    /// Messages sent (to next) or received (from prev) on this connection so far.
    count: u64,
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

    /// A MAC over the next message's counter and length, to be fed its bytes.
    fn start_message(&self, len: usize) -> Option<blake3::Hasher> {
        self.mac.clone().map(|mut m| {
            m.update(&self.count.to_le_bytes());
            m.update(&(len as u64).to_le_bytes());
            m
        })
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
    /// Two segments a scatter relays (receive one while forwarding the other) or, on its root,
    /// gathers from several runs; allocated on first use.
    relay: Vec<u8>,
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

/// Bytes `range` of `runs` back to back: borrowed when inside one run, else gathered into
/// `buf` (at least as long as the range).
fn runs_bytes<'a>(
    runs: &[&'a [f32]],
    range: std::ops::Range<usize>,
    buf: &'a mut [u8],
) -> &'a [u8] {
    let len = range.len();
    // The first run that reaches past range.start, and where it starts.
    let mut start = 0;
    let mut k = 0;
    while k < runs.len() && start + 4 * runs[k].len() <= range.start {
        start += 4 * runs[k].len();
        k += 1;
    }
    if k == runs.len() {
        return &[];
    }
    let first = f32_bytes(runs[k]);
    let lo = range.start - start;
    if lo + len <= first.len() {
        return &first[lo..lo + len];
    }
    let mut filled = first.len() - lo;
    buf[..filled].copy_from_slice(&first[lo..]);
    for r in &runs[k + 1..] {
        let r = f32_bytes(r);
        let n = r.len().min(len - filled);
        buf[filled..filled + n].copy_from_slice(&r[..n]);
        filled += n;
        if filled == len {
            break;
        }
    }
    &buf[..len]
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
    /// listen address (relayed by the coordinator), `key` the group's secret ring key (same on
    /// every rank, different for every new group; at least [`MIN_KEY_LEN`] bytes), `timeout`
    /// bounds both the formation and every later wait on a peer. Messages are authenticated;
    /// see [`TcpRing::with_options`] for the other settings.
    pub fn new(
        rank: usize,
        world: usize,
        listener: TcpListener,
        peers: Vec<SocketAddr>,
        key: &[u8],
        timeout: Duration,
    ) -> Result<TcpRing> {
        TcpRing::with_options(rank, world, listener, peers, key, RingOptions::new(timeout))
    }

    /// Bound every later wait on a peer by `timeout` (the formation used the one it was given).
    /// The coordinator derives it from the measured step time: a rank waiting on a hung peer
    /// fails its step after it, well before the coordinator's progress timeout.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        if timeout.is_zero() {
            return Err(Error::Protocol("the ring timeout must be positive".into()));
        }
        self.timeout = timeout;
        if let Some((next, prev)) = &self.links {
            for l in [next, prev] {
                set_timeouts(&l.stream, timeout).map_err(|e| {
                    Error::Protocol(format!("cannot set the ring timeout on {}: {e}", l.addr))
                })?;
            }
        }
        Ok(())
    }

    /// [`TcpRing::new`] with explicit [`RingOptions`].
    pub fn with_options(
        rank: usize,
        world: usize,
        listener: TcpListener,
        peers: Vec<SocketAddr>,
        key: &[u8],
        opts: RingOptions,
    ) -> Result<TcpRing> {
        if world == 0 || rank >= world || peers.len() != world {
            return Err(Error::Protocol(format!(
                "bad ring parameters: rank {rank}, world {world}, {} peer addresses; \
                 need 0 <= rank < world and one address per rank",
                peers.len()
            )));
        }
        let timeout = opts.timeout;
        if timeout.is_zero() || opts.handshake_timeout.is_zero() {
            return Err(Error::Protocol(
                "the ring timeout and handshake timeout must be positive".into(),
            ));
        }
        if key.len() < MIN_KEY_LEN {
            return Err(Error::Protocol(format!(
                "the ring key has {} bytes; it needs at least {MIN_KEY_LEN} (derive it with \
                 trellis_comm::ring::derive_key from a random token)",
                key.len()
            )));
        }
        let mut ring = TcpRing {
            rank,
            world,
            timeout,
            links: None,
            seq: 0,
            scratch: Vec::new(),
            relay: Vec::new(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let shake = Shake {
            rank,
            world,
            key: Arc::from(key),
            deadline,
            opts,
        };
        let (next, prev) = std::thread::scope(|s| {
            let acc = s.spawn(|| accept_prev(&listener, &shake, prev_rank));
            let next = connect_next(peers[next_rank], &shake, next_rank);
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

    /// Send `send` to next while receiving `recv.len()` bytes from prev; each non-empty side
    /// is one message, followed on the wire by its tag when message MACs are on.
    fn exchange(&mut self, send: &[u8], mut recv: Sink<'_>) -> Result<()> {
        let rank = self.rank;
        let Some((next, prev)) = &mut self.links else {
            return Ok(());
        };
        let recv_len = recv.len();
        let mut tx_mac = if send.is_empty() {
            None
        } else {
            next.start_message(send.len())
        };
        let mut rx_mac = if recv_len == 0 {
            None
        } else {
            prev.start_message(recv_len)
        };
        let tagged = |m: &Option<blake3::Hasher>| if m.is_some() { TAG_LEN } else { 0 };
        let (send_total, recv_total) = (send.len() + tagged(&tx_mac), recv_len + tagged(&rx_mac));
        let mut tx_tag = [0u8; TAG_LEN];
        let mut rx_tag = [0u8; TAG_LEN];
        let (mut sent, mut got) = (0usize, 0usize);
        let mut pending = 0usize; // bytes in scratch not yet reduced (Add)
        let mut reduced = 0usize; // f32s reduced so far (Add)
        let wait_ms = self.timeout.as_millis().min(i32::MAX as u128) as i32;
        let scratch = &mut self.scratch;
        while sent < send_total || got < recv_total {
            let mut fds = [
                libc::pollfd {
                    fd: if sent < send_total {
                        next.stream.as_raw_fd()
                    } else {
                        -1
                    },
                    events: libc::POLLOUT,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if got < recv_total {
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
                let chunk = if sent < send.len() {
                    &send[sent..send.len().min(sent + SCRATCH)]
                } else {
                    &tx_tag[sent - send.len()..]
                };
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
                    let n = n as usize;
                    if sent < send.len() {
                        if let Some(m) = tx_mac.as_mut() {
                            m.update(&chunk[..n]);
                        }
                        if sent + n == send.len() {
                            if let Some(m) = tx_mac.take() {
                                tx_tag = *m.finalize().as_bytes();
                            }
                        }
                    }
                    sent += n;
                }
            }
            if fds[1].revents != 0 {
                let res = if got >= recv_len {
                    (&prev.stream).read(&mut rx_tag[got - recv_len..])
                } else {
                    match &mut recv {
                        Sink::Bytes(b) => (&prev.stream).read(&mut b[got..]),
                        Sink::Add(_) => {
                            let room = (SCRATCH - pending).min(recv_len - got);
                            (&prev.stream).read(&mut scratch[pending..pending + room])
                        }
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
                    Ok(n) if got >= recv_len => got += n,
                    Ok(n) => {
                        match &mut recv {
                            Sink::Bytes(b) => {
                                if let Some(m) = rx_mac.as_mut() {
                                    m.update(&b[got..got + n]);
                                }
                            }
                            Sink::Add(dst) => {
                                if let Some(m) = rx_mac.as_mut() {
                                    m.update(&scratch[pending..pending + n]);
                                }
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
                        got += n;
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
        if let Some(m) = rx_mac {
            // blake3::Hash compares in constant time.
            if m.finalize() != blake3::Hash::from_bytes(rx_tag) {
                return Err(Error::Auth {
                    peer: prev.peer,
                    addr: prev.addr.to_string(),
                    what: format!(
                        "sent rank {rank} message #{} ({recv_len} bytes) that fails its MAC \
                         check: it was altered, replayed or reordered in transit, or does not \
                         come from a member of this group; the collective is abandoned",
                        prev.count
                    ),
                });
            }
        }
        if !send.is_empty() {
            next.count += 1;
        }
        if recv_len > 0 {
            prev.count += 1;
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

/// What one side of a handshake needs.
#[derive(Clone)]
struct Shake {
    rank: usize,
    world: usize,
    key: Arc<[u8]>,
    deadline: Instant,
    opts: RingOptions,
}

const LABEL_ACCEPTOR: &[u8] = b"trellis ring v2 acceptor\0";
const LABEL_CONNECTOR: &[u8] = b"trellis ring v2 connector\0";
const LABEL_MESSAGES: &[u8] = b"trellis ring v2 messages\0";
/// `flags` bit: every message carries a tag.
const FLAG_MESSAGE_MAC: u32 = 1;

/// Both nonces and the connection's parameters: what every handshake tag covers.
struct Transcript {
    nc: [u8; NONCE_LEN],
    ns: [u8; NONCE_LEN],
    /// The connector's rank (it sends), the acceptor's (it receives).
    from: usize,
    to: usize,
    world: usize,
    flags: u32,
}

impl Transcript {
    fn mac(&self, key: &[u8], label: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
        m.update(label);
        m.update(&self.nc);
        m.update(&self.ns);
        for x in [
            self.from as u32,
            self.to as u32,
            self.world as u32,
            self.flags,
        ] {
            m.update(&x.to_le_bytes());
        }
        m
    }

    fn tag(&self, key: &[u8], label: &[u8]) -> [u8; TAG_LEN] {
        self.mac(key, label).finalize().into_bytes().into()
    }

    /// The MAC keyed for this connection's messages (its key never leaves either side).
    fn messages(&self, key: &[u8]) -> Option<blake3::Hasher> {
        (self.flags & FLAG_MESSAGE_MAC != 0)
            .then(|| blake3::Hasher::new_keyed(&self.tag(key, LABEL_MESSAGES)))
    }
}

impl Shake {
    fn flags(&self) -> u32 {
        if self.opts.message_mac {
            FLAG_MESSAGE_MAC
        } else {
            0
        }
    }
}

/// Fresh random bytes from the kernel.
fn nonce() -> Result<[u8; NONCE_LEN]> {
    let mut b = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < NONCE_LEN {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), NONCE_LEN - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Protocol(format!(
                "cannot draw a handshake nonce (getrandom): {e}"
            )));
        }
        filled += n as usize;
    }
    Ok(b)
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn put_u32s(b: &mut [u8], xs: &[u32]) {
    for (i, x) in xs.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes());
    }
}

fn connect_next(addr: SocketAddr, sh: &Shake, next_rank: usize) -> Result<Link> {
    let (rank, world, timeout) = (sh.rank, sh.world, sh.opts.timeout);
    let link_err = |what, source| Error::Peer {
        peer: next_rank,
        addr: addr.to_string(),
        what,
        source,
    };
    let stream = loop {
        let left = sh.deadline.saturating_duration_since(Instant::now());
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
    // The next rank may not be accepting yet (its listener is bound early): wait for its
    // reply until the formation deadline, not just the handshake timeout.
    let left = sh
        .deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    set_timeouts(&stream, left).map_err(|e| link_err("configure", e))?;
    let flags = sh.flags();
    let nc = nonce()?;
    let mut hello = [0u8; HELLO_LEN];
    put_u32s(
        &mut hello,
        &[MAGIC, VERSION, rank as u32, world as u32, flags],
    );
    hello[20..].copy_from_slice(&nc);
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
    let (magic, status, version, their_rank, their_world, their_flags) = (
        u32_at(&reply, 0),
        u32_at(&reply, 4),
        u32_at(&reply, 8),
        u32_at(&reply, 12) as usize,
        u32_at(&reply, 16) as usize,
        u32_at(&reply, 20),
    );
    if magic != MAGIC {
        return Err(Error::Protocol(format!(
            "rank {rank}: {addr} (rank {next_rank}) is not a Trellis ring peer"
        )));
    }
    if version != VERSION {
        return Err(Error::Protocol(format!(
            "rank {rank}: the process at {addr} (rank {next_rank}) speaks ring protocol \
             v{version}, this rank v{VERSION}; run the same Trellis version on every rank"
        )));
    }
    if their_flags != flags {
        return Err(Error::Protocol(format!(
            "rank {rank}: message MACs are {} here but {} on rank {next_rank} ({addr}); every \
             rank of a group must use the same ring options",
            if flags != 0 { "on" } else { "off" },
            if their_flags != 0 { "on" } else { "off" },
        )));
    }
    if status != 0 || their_rank != next_rank || their_world != world {
        return Err(Error::Protocol(format!(
            "rank {rank}: the process at {addr} (expected rank {next_rank} of {world}) is rank \
             {their_rank} of {their_world}{}; it is probably left over from an old group: \
             restart it or relay fresh addresses",
            if status != 0 {
                ", and it rejected us"
            } else {
                ""
            }
        )));
    }
    let mut ns = [0u8; NONCE_LEN];
    ns.copy_from_slice(&reply[24..24 + NONCE_LEN]);
    let t = Transcript {
        nc,
        ns,
        from: rank,
        to: next_rank,
        world,
        flags,
    };
    if t.mac(&sh.key, LABEL_ACCEPTOR)
        .verify_slice(&reply[24 + NONCE_LEN..])
        .is_err()
    {
        return Err(Error::Auth {
            peer: next_rank,
            addr: addr.to_string(),
            what: format!(
                "failed rank {rank}'s ring key check: it holds a different ring key, so one of \
                 the two is left over from an old group (restart it or relay fresh addresses) \
                 or is not a rank of this job"
            ),
        });
    }
    (&stream)
        .write_all(&t.tag(&sh.key, LABEL_CONNECTOR))
        .map_err(|e| link_err("handshake send", e))?;
    set_timeouts(&stream, timeout).map_err(|e| link_err("configure", e))?;
    Ok(Link {
        stream,
        peer: next_rank,
        addr,
        mac: t.messages(&sh.key),
        count: 0,
    })
}

/// The acceptor's side of one connection's handshake: `Some` if it is prev with the key.
fn handshake_accepted(
    stream: TcpStream,
    addr: SocketAddr,
    sh: &Shake,
    prev_rank: usize,
) -> std::io::Result<Option<Link>> {
    let (rank, world) = (sh.rank, sh.world);
    stream.set_nonblocking(false)?;
    set_timeouts(&stream, sh.opts.handshake_timeout)?;
    let mut hello = [0u8; HELLO_LEN];
    (&stream).read_exact(&mut hello)?;
    let (magic, version, their_rank, their_world, their_flags) = (
        u32_at(&hello, 0),
        u32_at(&hello, 4),
        u32_at(&hello, 8) as usize,
        u32_at(&hello, 12) as usize,
        u32_at(&hello, 16),
    );
    if magic != MAGIC {
        tracing::warn!(rank, from = %addr, "dropped a connection to the ring port that is not a Trellis ring peer");
        return Ok(None);
    }
    let flags = sh.flags();
    let ok = version == VERSION
        && their_rank == prev_rank
        && their_world == world
        && their_flags == flags;
    let mut nc = [0u8; NONCE_LEN];
    nc.copy_from_slice(&hello[20..]);
    let ns = nonce().map_err(|e| std::io::Error::other(e.to_string()))?;
    let t = Transcript {
        nc,
        ns,
        from: prev_rank,
        to: rank,
        world,
        flags,
    };
    let mut reply = [0u8; REPLY_LEN];
    put_u32s(
        &mut reply,
        &[
            MAGIC,
            if ok { 0 } else { 1 },
            VERSION,
            rank as u32,
            world as u32,
            flags,
        ],
    );
    reply[24..24 + NONCE_LEN].copy_from_slice(&ns);
    if ok {
        reply[24 + NONCE_LEN..].copy_from_slice(&t.tag(&sh.key, LABEL_ACCEPTOR));
    }
    (&stream).write_all(&reply)?;
    if !ok {
        tracing::warn!(
            rank,
            from = %addr,
            their_rank,
            their_world,
            their_version = version,
            their_flags,
            "rejected a ring peer from another group"
        );
        return Ok(None);
    }
    let mut finish = [0u8; FINISH_LEN];
    (&stream).read_exact(&mut finish)?;
    if t.mac(&sh.key, LABEL_CONNECTOR)
        .verify_slice(&finish)
        .is_err()
    {
        tracing::warn!(
            rank,
            from = %addr,
            claimed_rank = prev_rank,
            "rejected a ring connection without this group's ring key"
        );
        return Ok(None);
    }
    set_timeouts(&stream, sh.opts.timeout)?;
    Ok(Some(Link {
        mac: t.messages(&sh.key),
        stream,
        peer: prev_rank,
        addr,
        count: 0,
    }))
}

/// Accept connections until one completes the handshake as prev; every handshake runs on its
/// own thread, so idle or slow connections cannot hold up the right one.
fn accept_prev(listener: &TcpListener, sh: &Shake, prev_rank: usize) -> Result<Link> {
    let rank = sh.rank;
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
    let (tx, rx) = mpsc::channel::<Link>();
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        if let Ok(link) = rx.try_recv() {
            return Ok(link);
        }
        let left = sh.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(sh.opts.timeout));
        }
        let (stream, addr) = match listener.accept() {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                if let Ok(link) = rx.recv_timeout(left.min(Duration::from_millis(5))) {
                    return Ok(link);
                }
                continue;
            }
            Err(e) => return Err(lerr("accept", e)),
        };
        if pending.load(Ordering::Acquire) >= MAX_PENDING_HANDSHAKES {
            tracing::warn!(rank, from = %addr, "too many ring handshakes at once; dropped a connection");
            continue;
        }
        pending.fetch_add(1, Ordering::AcqRel);
        let (sh, tx, count) = (sh.clone(), tx.clone(), pending.clone());
        let spawned = std::thread::Builder::new()
            .name("ring-handshake".into())
            .spawn(move || {
                match handshake_accepted(stream, addr, &sh, prev_rank) {
                    Ok(Some(link)) => {
                        let _ = tx.send(link);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(rank = sh.rank, from = %addr, error = %e, "bad ring handshake")
                    }
                }
                count.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            pending.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(rank, from = %addr, error = %e, "cannot start a ring handshake thread");
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
        let len = bytes.len();
        // Segments of SCRATCH bytes; each is one message on every link, so sender and
        // receiver agree on the message boundaries their MACs cover.
        let segs = len.div_ceil(SCRATCH);
        let seg = |k: usize| (k * SCRATCH).min(len)..((k + 1) * SCRATCH).min(len);
        if dist == 0 {
            for k in 0..segs {
                self.exchange(&bytes[seg(k)], Sink::Bytes(&mut []))?;
            }
        } else if dist == w - 1 {
            for k in 0..segs {
                self.exchange(&[], Sink::Bytes(&mut bytes[seg(k)]))?;
            }
        } else {
            // Pipelined: forward segment k-1 while receiving segment k.
            for k in 0..=segs {
                let rx_start = (k * SCRATCH).min(len);
                let rx_end = ((k + 1) * SCRATCH).min(len);
                let tx_start = (k.saturating_sub(1) * SCRATCH).min(len);
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

    /// Root sends the pieces round the ring farthest rank first, each cut into segments of
    /// [`SCRATCH`] bytes (one message, with its MAC, per segment and link). A rank receives the
    /// pieces of the ranks after it and its own (straight into `mine`) and forwards the others
    /// while receiving the next segment; so a piece crosses only the links between root and
    /// its rank, and no rank holds more than two segments of another's data.
    fn scatter(&mut self, root: usize, pieces: &[Runs<'_>], mine: &mut [f32]) -> Result<()> {
        let (w, me) = (self.world, self.rank);
        crate::check_scatter(root, w, me, pieces, mine.len())?;
        if w == 1 {
            crate::copy_runs(pieces[0], mine);
            return Ok(());
        }
        let prev_root = self.header(OP_SCATTER, 0, root as u64)?;
        if prev_root != root as u64 {
            return Err(Error::Protocol(format!(
                "rank {me} scatters from rank {root} but rank {} from rank {prev_root}; every \
                 rank must call the same collectives with the same root",
                (me + w - 1) % w
            )));
        }
        let dist = (me + w - root) % w;
        // The piece lengths in bytes by distance from root (0: root's own, never sent), passed
        // down the ring.
        let mut table = vec![0u8; 8 * w];
        if dist == 0 {
            for (d, t) in table.chunks_exact_mut(8).enumerate() {
                let bytes = 4 * runs_len(pieces[(root + d) % w]) as u64;
                t.copy_from_slice(&bytes.to_le_bytes());
            }
            self.exchange(&table, Sink::Bytes(&mut []))?;
        } else {
            self.exchange(&[], Sink::Bytes(&mut table))?;
            if dist < w - 1 {
                self.exchange(&table, Sink::Bytes(&mut []))?;
            }
        }
        let len = |d: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&table[8 * d..8 * d + 8]);
            u64::from_le_bytes(b) as usize
        };
        if dist > 0 && len(dist) != 4 * mine.len() {
            return Err(crate::scatter_len_mismatch(
                me,
                root,
                len(dist) / 4,
                mine.len(),
            ));
        }
        // (distance, byte range within that piece), farthest piece first: what rank `d`
        // receives is the prefix with distance >= d, what it forwards the prefix with > d.
        let segs: Vec<(usize, std::ops::Range<usize>)> = (1..w)
            .rev()
            .flat_map(|d| {
                let n = len(d);
                (0..n.div_ceil(SCRATCH)).map(move |k| (d, k * SCRATCH..((k + 1) * SCRATCH).min(n)))
            })
            .collect();
        let mut relay = std::mem::take(&mut self.relay);
        if dist == 0 {
            // A segment inside one run goes from the caller's memory; one across runs is
            // gathered into a relay half first (cache-sized, reused).
            let mut res = Ok(());
            for (d, r) in &segs {
                let piece = pieces[(root + d) % w];
                if piece.len() > 1 && relay.len() < 2 * SCRATCH {
                    relay = vec![0u8; 2 * SCRATCH];
                }
                res = self.exchange(
                    runs_bytes(piece, r.clone(), &mut relay),
                    Sink::Bytes(&mut []),
                );
                if res.is_err() {
                    break;
                }
            }
            self.relay = relay;
            res?;
            crate::copy_runs(pieces[root], mine);
        } else {
            let fwd = segs.iter().take_while(|(d, _)| *d > dist).count();
            let inbound = segs.iter().take_while(|(d, _)| *d >= dist).count();
            if fwd > 0 && relay.len() < 2 * SCRATCH {
                relay = vec![0u8; 2 * SCRATCH];
            }
            let mine = f32_bytes_mut(mine);
            let mut res = Ok(());
            // Step i receives inbound segment i and forwards segment i - 1: relayed segments
            // alternate between the two halves of `relay`.
            for i in 0..=inbound {
                let half = SCRATCH.min(relay.len());
                let (even, odd) = relay.split_at_mut(half);
                let (rx_half, tx_half) = if i % 2 == 0 { (even, odd) } else { (odd, even) };
                let tx: &[u8] = match i.checked_sub(1) {
                    Some(j) if j < fwd => &tx_half[..segs[j].1.len()],
                    _ => &[],
                };
                let rx: &mut [u8] = if i < fwd {
                    &mut rx_half[..segs[i].1.len()]
                } else if i < inbound {
                    &mut mine[segs[i].1.clone()]
                } else {
                    &mut []
                };
                if tx.is_empty() && rx.is_empty() {
                    continue;
                }
                res = self.exchange(tx, Sink::Bytes(rx));
                if res.is_err() {
                    break;
                }
            }
            self.relay = relay;
            res?;
        }
        self.seq += 1;
        Ok(())
    }
}
