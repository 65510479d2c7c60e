//! The embedded store under real faults: a full volume (a small tmpfs, root only), a damaged
//! record in the middle of the log, a torn record at its end.
use std::io::Write;
use std::path::Path;
use trellis_store::{EmbeddedStore, Error, StateStore};

/// A tmpfs of `bytes` mounted on a fresh directory, unmounted on drop. `None` (with the reason
/// printed) when this process may not mount (not root, no tmpfs).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting a small tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: `mount -t tmpfs` failed (no CAP_SYS_ADMIN in this container?)");
            return None;
        }
        Some(Tmpfs { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Fill the volume holding `path` with one file until the disk is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0xa5u8; 4096];
    loop {
        if let Err(e) = f.write_all(&block) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
            break;
        }
    }
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_fails_writes_closed_and_recovers_when_room_returns() {
    let Some(fs) = Tmpfs::mount(1 << 20) else {
        return;
    };
    let dir = fs.path().join("state");
    let log = dir.join("state.log");
    let s = EmbeddedStore::open(&dir).await.unwrap();
    s.put("/a", b"before".to_vec()).await.unwrap();
    let len_before = std::fs::metadata(&log).unwrap().len();
    let filler = fs.path().join("filler");
    fill(&filler);

    // Writes fail with a clear error; nothing half-written stays in the log or in memory.
    for i in 0..3 {
        let e = s
            .put("/a", vec![b'x'; 64 << 10])
            .await
            .expect_err("a write to a full volume must fail");
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("disk is not full"), "{e}");
        assert_eq!(
            std::fs::metadata(&log).unwrap().len(),
            len_before,
            "attempt {i}: the failed append was not cut off the log"
        );
        assert_eq!(s.get("/a").await.unwrap().unwrap().value, b"before");
    }
    assert!(s.put("/b", vec![b'y'; 64 << 10]).await.is_err());
    assert_eq!(s.get("/b").await.unwrap(), None, "a failed write applied");

    // Room again: writes are accepted, and a reopen sees exactly what was acknowledged.
    std::fs::remove_file(&filler).unwrap();
    let rev = s.put("/a", b"after".to_vec()).await.unwrap();
    drop(s);
    let s = EmbeddedStore::open(&dir).await.unwrap();
    let a = s.get("/a").await.unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.mod_revision), (&b"after"[..], rev));
    assert_eq!(s.get("/b").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_at_open_is_a_clear_error_and_leaves_the_log_intact() {
    let Some(fs) = Tmpfs::mount(1 << 20) else {
        return;
    };
    let dir = fs.path().join("state");
    {
        let s = EmbeddedStore::open(&dir).await.unwrap();
        for i in 0..20 {
            s.put(&format!("/k/{i}"), vec![b'v'; 1000]).await.unwrap();
        }
    }
    let filler = fs.path().join("filler");
    fill(&filler);
    // The snapshot written at open does not fit: the open fails and the old log is untouched.
    let e = match EmbeddedStore::open(&dir).await {
        Ok(_) => panic!("open must fail when its snapshot does not fit"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("disk is not full"), "{e}");
    assert!(
        !dir.join("state.log.tmp").exists(),
        "the temp snapshot was left behind"
    );
    std::fs::remove_file(&filler).unwrap();
    let s = EmbeddedStore::open(&dir).await.unwrap();
    assert_eq!(s.list("/k/").await.unwrap().len(), 20);
}

async fn write_three(dir: &Path) -> u64 {
    let s = EmbeddedStore::open(dir).await.unwrap();
    let start = std::fs::metadata(dir.join("state.log")).unwrap().len();
    for k in ["/a", "/b", "/c"] {
        s.put(k, k.as_bytes().to_vec()).await.unwrap();
    }
    start
}

#[tokio::test]
async fn a_damaged_record_followed_by_valid_ones_is_a_hard_error_naming_its_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let first = write_three(&dir).await;
    // Flip one payload byte of the first appended record ("/a").
    let log = dir.join("state.log");
    let mut data = std::fs::read(&log).unwrap();
    let at = first as usize + 12 + 3;
    data[at] ^= 0x40;
    std::fs::write(&log, &data).unwrap();
    let e = match EmbeddedStore::open(&dir).await {
        Ok(_) => panic!("a damaged record with valid ones after it must not be skipped"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    assert!(msg.contains(&format!("byte {first}")), "{msg}");
    assert!(msg.contains("restore the directory from a backup"), "{msg}");
    // The log is left as it was, for the operator to inspect or restore.
    assert_eq!(std::fs::read(&log).unwrap(), data);
}

#[tokio::test]
async fn a_torn_record_at_the_end_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    write_three(&dir).await;
    // Cut the last record ("/c") in the middle, as a crash during its append would.
    let log = dir.join("state.log");
    let len = std::fs::metadata(&log).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let s = EmbeddedStore::open(&dir).await.unwrap();
    assert_eq!(s.get("/a").await.unwrap().unwrap().value, b"/a");
    assert_eq!(s.get("/b").await.unwrap().unwrap().value, b"/b");
    assert_eq!(
        s.get("/c").await.unwrap(),
        None,
        "the torn record was applied"
    );
    // And the store goes on.
    s.put("/c", b"again".to_vec()).await.unwrap();
}
