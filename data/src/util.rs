//! File helpers: hashing, atomic writes, existence checks, a cooperative lock.
use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::text::io_err;
use crate::{Error, Result};

thread_local! {
    static TRAININGS: Cell<u64> = const { Cell::new(0) };
    static TOKENIZATIONS: Cell<u64> = const { Cell::new(0) };
    static BYTES_READ: Cell<u64> = const { Cell::new(0) };
    static BYTES_SAMPLED: Cell<u64> = const { Cell::new(0) };
}

/// Count `n` corpus bytes read in full (hashing, tokenizing, training) on this thread.
pub(crate) fn note_bytes_read(n: u64) {
    BYTES_READ.with(|c| c.set(c.get() + n));
}
/// Count `n` bytes read to fingerprint a file (sampled, not the whole content).
pub(crate) fn note_bytes_sampled(n: u64) {
    BYTES_SAMPLED.with(|c| c.set(c.get() + n));
}

/// Corpus bytes this thread has read: `(in full, sampled for fingerprints)`. Reading a corpus
/// in full (to hash, tokenize or train on it) counts in the first; an unchanged corpus on a
/// second start only adds fingerprint samples to the second.
pub fn read_counters() -> (u64, u64) {
    (BYTES_READ.with(Cell::get), BYTES_SAMPLED.with(Cell::get))
}

pub(crate) fn note_training() {
    TRAININGS.with(|c| c.set(c.get() + 1));
}
pub(crate) fn note_tokenization() {
    TOKENIZATIONS.with(|c| c.set(c.get() + 1));
}

/// How many tokenizer trainings and corpus tokenizations this thread has run (for tests and
/// diagnostics: a cache hit runs neither).
pub fn work_counters() -> (u64, u64) {
    (TRAININGS.with(Cell::get), TOKENIZATIONS.with(Cell::get))
}

/// Fail with a clear message unless `path` is an existing regular file.
pub(crate) fn require_file(path: &Path, what: &str) -> Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Error::Invalid(format!(
            "{what} {} is not a regular file",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound {
            what: what.to_string(),
            path: path.to_path_buf(),
        }),
        Err(source) => Err(Error::Io {
            context: format!("cannot access {what} {}", path.display()),
            source,
        }),
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 of a file's bytes, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A unique temporary name next to `path` (same directory, so `rename` is atomic).
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut s = path.as_os_str().to_owned();
    s.push(format!(
        ".tmp.{}.{}.{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    PathBuf::from(s)
}

/// Rename `tmp` onto `dest`; on failure remove `tmp`.
pub(crate) fn publish(tmp: &Path, dest: &Path) -> Result<()> {
    fs::rename(tmp, dest).map_err(|source| {
        let _ = fs::remove_file(tmp);
        Error::Io {
            context: format!("cannot rename {} to {}", tmp.display(), dest.display()),
            source,
        }
    })
}

/// Write `bytes` to `path` through a temporary file and a rename: readers never see a
/// partial file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(source) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io {
            context: format!("cannot write {}", path.display()),
            source,
        });
    }
    publish(&tmp, path)
}

/// A lock file telling other processes that `path` is being made, so they wait for it
/// instead of redoing the work. It is only an optimisation: every result is published by an
/// atomic rename, so a stale or broken lock can cost duplicate work but never a wrong file.
pub(crate) struct BuildLock {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    beat: Option<std::thread::JoinHandle<()>>,
}

/// A lock untouched for this long belongs to a dead process.
const LOCK_STALE: Duration = Duration::from_secs(30);
const LOCK_BEAT: Duration = Duration::from_secs(2);

impl BuildLock {
    /// Take the lock for making `target`, or wait while another live process holds it. Returns
    /// `None` if `done()` became true while waiting (the other process finished).
    pub(crate) fn acquire(target: &Path, done: impl Fn() -> bool) -> Option<BuildLock> {
        let mut s = target.as_os_str().to_owned();
        s.push(".lock");
        let path = PathBuf::from(s);
        let mut announced = false;
        loop {
            if done() {
                return None;
            }
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    return Some(BuildLock::start(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok());
                    match age {
                        Some(a) if a > LOCK_STALE => {
                            let _ = fs::remove_file(&path);
                            continue;
                        }
                        None if !path.exists() => continue,
                        _ => {}
                    }
                    if !announced {
                        eprintln!(
                            "trellis-data: waiting for another process making {}",
                            target.display()
                        );
                        announced = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                // Cannot create lock files here: just do the work unlocked.
                Err(_) => {
                    return Some(BuildLock {
                        path: PathBuf::new(),
                        stop: Arc::new(AtomicBool::new(true)),
                        beat: None,
                    })
                }
            }
        }
    }

    fn start(path: PathBuf) -> BuildLock {
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (path.clone(), stop.clone());
        let beat = std::thread::spawn(move || {
            let mut since = Duration::ZERO;
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                since += Duration::from_millis(100);
                if since >= LOCK_BEAT {
                    since = Duration::ZERO;
                    if let Ok(f) = OpenOptions::new().write(true).open(&p) {
                        let _ = f.set_modified(SystemTime::now());
                    }
                }
            }
        });
        BuildLock {
            path,
            stop,
            beat: Some(beat),
        }
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(b) = self.beat.take() {
            let _ = b.join();
            let _ = fs::remove_file(&self.path);
        }
    }
}
