//! The embedded store (`--store file:DIR`): single node, in process, persisted to DIR.
//!
//! Files in DIR:
//! - `LOCK`: held with an exclusive `flock` while the store is open (one process per DIR);
//! - `state.log`: an append-only log of framed records (`u32 len | u64 FNV-1a | payload`).
//!   Every write appends one record and `fdatasync`s before it is acknowledged, then is applied
//!   in memory. On open the log is replayed and rewritten as a compact snapshot (temp file,
//!   fsync, rename, fsync DIR). The log is compacted the same way when it grows past four times
//!   its last snapshot.
//!
//! Faults fail closed. An append that fails (disk full, I/O error) is cut off the log again and
//! the write fails; nothing is applied. If even the cut fails, every later write fails until a
//! cut succeeds. At replay, a torn record at the very end (a crash in the middle of an append:
//! never acknowledged) is dropped with a warning; a damaged record with valid records after it
//! is a hard error naming its byte offset: acknowledged state is never silently skipped.
//!
//! Leases survive a restart with a fresh TTL (as in etcd after a leader change).
use crate::{election, Compare, Error, Leadership, LeaseId, Op, Result, StateStore, Versioned};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LOG: &str = "state.log";
const LOCK: &str = "LOCK";
const MIN_COMPACT_BYTES: u64 = 16 << 20;
const MAX_RECORD: usize = 1 << 30;
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// The embedded store. Dropping it closes the files and releases the directory lock at once;
/// leaderships obtained from it are then lost.
pub struct EmbeddedStore {
    handle: Arc<Handle>,
    ticker: tokio::task::JoinHandle<()>,
}

/// The shared core; also a `StateStore` (what leaderships hold), but only `EmbeddedStore`'s
/// drop closes it.
struct Handle {
    dir: PathBuf,
    state: Mutex<Option<State>>,
}

struct Entry {
    value: Vec<u8>,
    mod_rev: i64,
    lease: i64,
}

struct Lease {
    ttl: u64,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct State {
    kv: BTreeMap<String, Entry>,
    leases: HashMap<i64, Lease>,
    rev: i64,
    next_lease: i64,
    log: File,
    log_path: PathBuf,
    log_bytes: u64,
    compact_at: u64,
    /// A failed append could not be cut off the log: every write fails until it is.
    broken: bool,
    _lock: File,
}

enum WOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Del {
        key: String,
    },
}

enum Record {
    Batch { rev: i64, ops: Vec<WOp> },
    LeaseGrant { id: i64, ttl: u64 },
    LeaseEnd { id: i64, rev: i64 },
    Entry { key: String, entry: Entry },
    Counters { rev: i64, next_lease: i64 },
}

// ---------------------------------------------------------------- encoding

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Record::Batch { rev, ops } => {
                p.push(1);
                p.extend_from_slice(&rev.to_le_bytes());
                p.extend_from_slice(&(ops.len() as u32).to_le_bytes());
                for op in ops {
                    match op {
                        WOp::Put { key, value, lease } => {
                            p.push(1);
                            put_bytes(&mut p, key.as_bytes());
                            put_bytes(&mut p, value);
                            p.extend_from_slice(&lease.to_le_bytes());
                        }
                        WOp::Del { key } => {
                            p.push(2);
                            put_bytes(&mut p, key.as_bytes());
                        }
                    }
                }
            }
            Record::LeaseGrant { id, ttl } => {
                p.push(2);
                p.extend_from_slice(&id.to_le_bytes());
                p.extend_from_slice(&ttl.to_le_bytes());
            }
            Record::LeaseEnd { id, rev } => {
                p.push(3);
                p.extend_from_slice(&id.to_le_bytes());
                p.extend_from_slice(&rev.to_le_bytes());
            }
            Record::Entry { key, entry } => {
                p.push(4);
                put_bytes(&mut p, key.as_bytes());
                put_bytes(&mut p, &entry.value);
                p.extend_from_slice(&entry.mod_rev.to_le_bytes());
                p.extend_from_slice(&entry.lease.to_le_bytes());
            }
            Record::Counters { rev, next_lease } => {
                p.push(5);
                p.extend_from_slice(&rev.to_le_bytes());
                p.extend_from_slice(&next_lease.to_le_bytes());
            }
        }
        let mut frame = Vec::with_capacity(p.len() + 12);
        frame.extend_from_slice(&(p.len() as u32).to_le_bytes());
        frame.extend_from_slice(&fnv1a(&p).to_le_bytes());
        frame.extend_from_slice(&p);
        frame
    }

    fn decode(p: &[u8]) -> std::result::Result<Record, String> {
        let mut r = Reader { p, at: 0 };
        let rec = match r.u8()? {
            1 => {
                let rev = r.i64()?;
                let n = r.u32()? as usize;
                let mut ops = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    ops.push(match r.u8()? {
                        1 => WOp::Put {
                            key: r.string()?,
                            value: r.bytes()?.to_vec(),
                            lease: r.i64()?,
                        },
                        2 => WOp::Del { key: r.string()? },
                        t => return Err(format!("unknown op tag {t}")),
                    });
                }
                Record::Batch { rev, ops }
            }
            2 => Record::LeaseGrant {
                id: r.i64()?,
                ttl: r.u64()?,
            },
            3 => Record::LeaseEnd {
                id: r.i64()?,
                rev: r.i64()?,
            },
            4 => Record::Entry {
                key: r.string()?,
                entry: Entry {
                    value: r.bytes()?.to_vec(),
                    mod_rev: r.i64()?,
                    lease: r.i64()?,
                },
            },
            5 => Record::Counters {
                rev: r.i64()?,
                next_lease: r.i64()?,
            },
            t => return Err(format!("unknown record tag {t}")),
        };
        if r.at != p.len() {
            return Err("trailing bytes in record".into());
        }
        Ok(rec)
    }
}

struct Reader<'a> {
    p: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.p.len() - self.at < n {
            return Err("record truncated".into());
        }
        let s = &self.p[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn i64(&mut self) -> std::result::Result<i64, String> {
        Ok(self.u64()? as i64)
    }
    fn bytes(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "key is not UTF-8".to_string())
    }
}

// ---------------------------------------------------------------- state

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("open lock file", &path))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is shared.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_string(),
                h => h.to_string(),
            };
            return Err(Error::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        return Err(Error::Io {
            what: "lock",
            path,
            source: err,
        });
    }
    let note = format!("pid {}\n", std::process::id());
    f.set_len(0)
        .and_then(|_| f.write_all(note.as_bytes()))
        .map_err(io("write lock file", &path))?;
    Ok(f)
}

impl State {
    fn apply(&mut self, rec: Record, now: Instant) {
        match rec {
            Record::Batch { rev, ops } => {
                for op in ops {
                    match op {
                        WOp::Put { key, value, lease } => {
                            self.detach(&key);
                            if lease != 0 {
                                if let Some(l) = self.leases.get_mut(&lease) {
                                    l.keys.insert(key.clone());
                                }
                            }
                            self.kv.insert(
                                key,
                                Entry {
                                    value,
                                    mod_rev: rev,
                                    lease,
                                },
                            );
                        }
                        WOp::Del { key } => {
                            self.detach(&key);
                            self.kv.remove(&key);
                        }
                    }
                }
                self.rev = self.rev.max(rev);
            }
            Record::LeaseGrant { id, ttl } => {
                self.leases.insert(
                    id,
                    Lease {
                        ttl,
                        deadline: now + Duration::from_secs(ttl),
                        keys: BTreeSet::new(),
                    },
                );
                self.next_lease = self.next_lease.max(id + 1);
            }
            Record::LeaseEnd { id, rev } => {
                if let Some(l) = self.leases.remove(&id) {
                    for k in l.keys {
                        self.kv.remove(&k);
                    }
                }
                self.rev = self.rev.max(rev);
            }
            Record::Entry { key, entry } => {
                if entry.lease != 0 {
                    if let Some(l) = self.leases.get_mut(&entry.lease) {
                        l.keys.insert(key.clone());
                    }
                }
                self.kv.insert(key, entry);
            }
            Record::Counters { rev, next_lease } => {
                self.rev = self.rev.max(rev);
                self.next_lease = self.next_lease.max(next_lease);
            }
        }
    }

    fn detach(&mut self, key: &str) {
        if let Some(old) = self.kv.get(key) {
            if old.lease != 0 {
                if let Some(l) = self.leases.get_mut(&old.lease) {
                    l.keys.remove(key);
                }
            }
        }
    }

    /// Durably append, then apply. Fails closed: an append that fails (ENOSPC, EIO) is cut off
    /// the log again (truncated to the last acknowledged length) and nothing is applied; if the
    /// cut itself fails, the store refuses every write until a later write's cut succeeds, so
    /// nothing is ever acknowledged after a record that may be half on disk.
    fn commit(&mut self, rec: Record) -> Result<()> {
        self.repair()?;
        let frame = rec.encode();
        if let Err(e) = self
            .log
            .write_all(&frame)
            .and_then(|_| self.log.sync_data())
        {
            if let Err(cut) = self.cut() {
                tracing::error!(path = %self.log_path.display(), error = %cut, "store log cannot be cut back after a failed append; refusing writes until it can");
                self.broken = true;
            }
            return Err(Error::Io {
                what: "append to",
                path: self.log_path.clone(),
                source: e,
            });
        }
        self.log_bytes += frame.len() as u64;
        self.apply(rec, Instant::now());
        if self.log_bytes > self.compact_at {
            if let Err(e) = self.compact() {
                // The log itself is intact; compaction is retried at the next write.
                tracing::warn!(error = %e, "store compaction failed");
            }
        }
        Ok(())
    }

    /// Truncate the log to its last acknowledged length and make that durable.
    fn cut(&mut self) -> std::io::Result<()> {
        self.log.set_len(self.log_bytes)?;
        self.log.sync_all()
    }

    /// After a failed cut: try again before any new write; refuse the write while it fails.
    fn repair(&mut self) -> Result<()> {
        if !self.broken {
            return Ok(());
        }
        self.cut().map_err(|e| Error::Io {
            what: "cut back the unacknowledged tail of",
            path: self.log_path.clone(),
            source: e,
        })?;
        tracing::info!(path = %self.log_path.display(), "store log cut back to its last acknowledged record; writes accepted again");
        self.broken = false;
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = Record::Counters {
            rev: self.rev,
            next_lease: self.next_lease,
        }
        .encode();
        for (id, l) in &self.leases {
            out.extend(
                Record::LeaseGrant {
                    id: *id,
                    ttl: l.ttl,
                }
                .encode(),
            );
        }
        for (k, e) in &self.kv {
            out.extend(
                Record::Entry {
                    key: k.clone(),
                    entry: Entry {
                        value: e.value.clone(),
                        mod_rev: e.mod_rev,
                        lease: e.lease,
                    },
                }
                .encode(),
            );
        }
        out
    }

    /// Rewrite the log as a snapshot: temp file, fsync, rename, fsync dir.
    fn compact(&mut self) -> Result<()> {
        let dir = self
            .log_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let (log, bytes) = write_snapshot(&dir, &self.snapshot())?;
        self.log = log;
        self.log_bytes = bytes;
        self.compact_at = MIN_COMPACT_BYTES.max(bytes.saturating_mul(4));
        Ok(())
    }

    fn rev_after(&self, changes: bool) -> i64 {
        if changes {
            self.rev + 1
        } else {
            self.rev
        }
    }

    fn check_lease(&self, lease: i64) -> Result<()> {
        if self.leases.contains_key(&lease) {
            Ok(())
        } else {
            Err(Error::LeaseNotFound(LeaseId(lease)))
        }
    }

    fn expire(&mut self, now: Instant) -> Result<()> {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.end_lease(id)?;
        }
        Ok(())
    }

    fn end_lease(&mut self, id: i64) -> Result<()> {
        let Some(l) = self.leases.get(&id) else {
            return Ok(());
        };
        let rev = self.rev_after(!l.keys.is_empty());
        self.commit(Record::LeaseEnd { id, rev })
    }
}

/// Write `snapshot` to `DIR/state.log` atomically; returns the log opened for append.
fn write_snapshot(dir: &Path, snapshot: &[u8]) -> Result<(File, u64)> {
    let tmp = dir.join(format!("{LOG}.tmp"));
    let path = dir.join(LOG);
    {
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        if let Err(e) = f.write_all(snapshot).and_then(|_| f.sync_all()) {
            // Give the space back (a full disk is the usual cause).
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Io {
                what: "write",
                path: tmp,
                source: e,
            });
        }
    }
    std::fs::rename(&tmp, &path).map_err(io("rename snapshot to", &path))?;
    fsync_dir(dir)?;
    let log = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io("open", &path))?;
    Ok((log, snapshot.len() as u64))
}

/// The payload of a whole, checksum-valid frame starting at byte `at` of `data`.
fn frame_at(data: &[u8], at: usize) -> Option<&[u8]> {
    let rest = data.get(at..)?;
    if rest.len() < 12 {
        return None;
    }
    let len = u32::from_le_bytes(rest[..4].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(rest[4..12].try_into().ok()?);
    if len > MAX_RECORD || rest.len() < 12 + len {
        return None;
    }
    let payload = &rest[12..12 + len];
    (fnv1a(payload) == sum).then_some(payload)
}

fn load(dir: &Path, lock: File) -> Result<State> {
    let path = dir.join(LOG);
    let mut data = Vec::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_end(&mut data).map_err(io("read", &path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::Io {
                what: "open",
                path,
                source: e,
            })
        }
    }
    let now = Instant::now();
    // A placeholder log handle until the snapshot is written below.
    let placeholder = lock.try_clone().map_err(io("open", &path))?;
    let mut st = State {
        kv: BTreeMap::new(),
        leases: HashMap::new(),
        rev: 0,
        next_lease: 1,
        log: placeholder,
        log_path: path.clone(),
        log_bytes: 0,
        compact_at: MIN_COMPACT_BYTES,
        broken: false,
        _lock: lock,
    };
    let mut at = 0usize;
    while at < data.len() {
        let Some(payload) = frame_at(&data, at) else {
            // Only a torn tail (a crash in the middle of an unacknowledged append) may be cut;
            // a bad record with good records after it is damage to acknowledged state.
            if let Some(next) = (at + 1..data.len()).find(|&i| frame_at(&data, i).is_some()) {
                return Err(Error::Corrupt {
                    path,
                    detail: format!(
                        "the record at byte {at} is damaged (bad length or checksum) and valid \
                         records follow it at byte {next}"
                    ),
                });
            }
            break;
        };
        let rec = Record::decode(payload).map_err(|detail| Error::Corrupt {
            path: path.clone(),
            detail: format!("record at byte {at}: {detail}"),
        })?;
        let len = payload.len();
        st.apply(rec, now);
        at += 12 + len;
    }
    if at < data.len() {
        tracing::warn!(
            path = %path.display(),
            dropped_bytes = data.len() - at,
            "store log ends in a torn record (a crash during a write); dropping it"
        );
    }
    let (log, bytes) = write_snapshot(dir, &st.snapshot())?;
    st.log = log;
    st.log_bytes = bytes;
    st.compact_at = MIN_COMPACT_BYTES.max(bytes.saturating_mul(4));
    Ok(st)
}

// ---------------------------------------------------------------- the store

impl EmbeddedStore {
    /// Open (creating if needed) the store in `dir`. Fails with `Error::Locked` if another
    /// process (or another `EmbeddedStore` in this process) has it open. Call inside a tokio
    /// runtime: lease expiry runs on a tokio task.
    pub async fn open(dir: impl AsRef<Path>) -> Result<EmbeddedStore> {
        let dir = dir.as_ref().to_path_buf();
        let d = dir.clone();
        let state = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&d).map_err(io("create directory", &d))?;
            let lock = lock_dir(&d)?;
            load(&d, lock)
        })
        .await
        .map_err(|e| Error::Invalid(format!("store open task failed: {e}")))??;
        tracing::info!(dir = %dir.display(), keys = state.kv.len(), revision = state.rev, "embedded store opened");
        let handle = Arc::new(Handle {
            dir,
            state: Mutex::new(Some(state)),
        });
        let weak = Arc::downgrade(&handle);
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(EXPIRY_TICK).await;
                let Some(h) = weak.upgrade() else { break };
                let res =
                    tokio::task::spawn_blocking(move || h.with(|st| st.expire(Instant::now())))
                        .await;
                match res {
                    Ok(Ok(())) => {}
                    Ok(Err(Error::Closed)) => break,
                    Ok(Err(e)) => tracing::warn!(error = %e, "lease expiry failed; retrying"),
                    Err(e) => tracing::warn!(error = %e, "lease expiry task failed"),
                }
            }
        });
        Ok(EmbeddedStore { handle, ticker })
    }

    pub fn dir(&self) -> &Path {
        &self.handle.dir
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.ticker.abort();
        let mut g = self.handle.state.lock().unwrap_or_else(|p| p.into_inner());
        // Dropping the state closes the log and releases the flock now.
        *g = None;
    }
}

impl Handle {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> Result<R>) -> Result<R> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(st) => f(st),
            None => Err(Error::Closed),
        }
    }
}

async fn run<R: Send + 'static>(
    h: &Arc<Handle>,
    f: impl FnOnce(&mut State) -> Result<R> + Send + 'static,
) -> Result<R> {
    let h = h.clone();
    tokio::task::spawn_blocking(move || h.with(f))
        .await
        .map_err(|e| Error::Invalid(format!("store task failed: {e}")))?
}

fn versioned(e: &Entry) -> Versioned {
    Versioned {
        value: e.value.clone(),
        mod_revision: e.mod_rev,
    }
}

/// A clonable view of the store (what leaderships hold); it does not keep the directory
/// lock: only `EmbeddedStore`'s drop closes the store.
#[derive(Clone)]
struct Shared(Arc<Handle>);

#[async_trait::async_trait]
impl StateStore for Shared {
    fn describe(&self) -> String {
        format!("file:{}", self.0.dir.display())
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let key = key.to_string();
        run(&self.0, move |st| Ok(st.kv.get(&key).map(versioned))).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        let prefix = prefix.to_string();
        run(&self.0, move |st| {
            Ok(st
                .kv
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, e)| (k.clone(), versioned(e)))
                .collect())
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64> {
        let key = key.to_string();
        run(&self.0, move |st| {
            let rev = st.rev + 1;
            st.commit(Record::Batch {
                rev,
                ops: vec![WOp::Put {
                    key,
                    value,
                    lease: 0,
                }],
            })?;
            Ok(rev)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        run(&self.0, move |st| {
            if !st.kv.contains_key(&key) {
                return Ok(());
            }
            let rev = st.rev + 1;
            st.commit(Record::Batch {
                rev,
                ops: vec![WOp::Del { key }],
            })
        })
        .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool> {
        run(&self.0, move |st| {
            for c in &compares {
                match c {
                    Compare::ModRevision { key, revision } => {
                        let have = st.kv.get(key).map_or(0, |e| e.mod_rev);
                        if have != *revision {
                            return Ok(false);
                        }
                    }
                }
            }
            let mut wops = Vec::with_capacity(ops.len());
            for op in ops {
                wops.push(match op {
                    Op::Put { key, value } => WOp::Put {
                        key,
                        value,
                        lease: 0,
                    },
                    Op::PutWithLease { key, value, lease } => {
                        st.check_lease(lease.0)?;
                        WOp::Put {
                            key,
                            value,
                            lease: lease.0,
                        }
                    }
                    Op::Delete { key } => WOp::Del { key },
                });
            }
            let changes = wops.iter().any(|op| match op {
                WOp::Put { .. } => true,
                WOp::Del { key } => st.kv.contains_key(key),
            });
            if changes {
                let rev = st.rev + 1;
                st.commit(Record::Batch { rev, ops: wops })?;
            }
            Ok(true)
        })
        .await
    }

    async fn grant_lease(&self, ttl_secs: u64) -> Result<LeaseId> {
        if ttl_secs == 0 {
            return Err(Error::Invalid("a lease TTL must be at least 1 s".into()));
        }
        run(&self.0, move |st| {
            let id = st.next_lease;
            st.commit(Record::LeaseGrant { id, ttl: ttl_secs })?;
            Ok(LeaseId(id))
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        run(&self.0, move |st| {
            let now = Instant::now();
            match st.leases.get_mut(&lease.0) {
                Some(l) if l.deadline > now => {
                    l.deadline = now + Duration::from_secs(l.ttl);
                    Ok(())
                }
                // Past its deadline but not yet collected by the ticker: it is dead.
                _ => Err(Error::LeaseNotFound(lease)),
            }
        })
        .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        run(&self.0, move |st| st.end_lease(lease.0)).await
    }

    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<i64> {
        let key = key.to_string();
        run(&self.0, move |st| {
            st.check_lease(lease.0)?;
            let rev = st.rev + 1;
            st.commit(Record::Batch {
                rev,
                ops: vec![WOp::Put {
                    key,
                    value,
                    lease: lease.0,
                }],
            })?;
            Ok(rev)
        })
        .await
    }

    async fn campaign(&self, election: &str, candidate: &str, ttl_secs: u64) -> Result<Leadership> {
        election::campaign(Arc::new(self.clone()), election, candidate, ttl_secs).await
    }
}

#[async_trait::async_trait]
impl StateStore for EmbeddedStore {
    fn describe(&self) -> String {
        Shared(self.handle.clone()).describe()
    }
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        Shared(self.handle.clone()).get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        Shared(self.handle.clone()).list(prefix).await
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64> {
        Shared(self.handle.clone()).put(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        Shared(self.handle.clone()).delete(key).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool> {
        Shared(self.handle.clone()).txn(compares, ops).await
    }
    async fn grant_lease(&self, ttl_secs: u64) -> Result<LeaseId> {
        Shared(self.handle.clone()).grant_lease(ttl_secs).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        Shared(self.handle.clone()).keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        Shared(self.handle.clone()).revoke(lease).await
    }
    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<i64> {
        Shared(self.handle.clone())
            .put_with_lease(key, value, lease)
            .await
    }
    async fn campaign(&self, election: &str, candidate: &str, ttl_secs: u64) -> Result<Leadership> {
        Shared(self.handle.clone())
            .campaign(election, candidate, ttl_secs)
            .await
    }
}
