//! The conformance suite against both stores, plus the embedded store's own guarantees
//! (persistence, SIGKILL durability, one process per directory).
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_store::testing::EtcdServer;
use trellis_store::{conformance, EmbeddedStore, Error, StateStore, StoreSpec};

/// Child-process modes of this test binary (re-executed with `TRELLIS_STORE_CHILD` set).
const CHILD: &str = "TRELLIS_STORE_CHILD";

fn child_main() -> bool {
    let Ok(mode) = std::env::var(CHILD) else {
        return false;
    };
    let dir = std::env::var("TRELLIS_STORE_DIR").expect("TRELLIS_STORE_DIR");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match mode.as_str() {
            // Write keys forever, printing each acknowledged one.
            "writer" => {
                let s = EmbeddedStore::open(&dir).await.unwrap();
                let out = std::io::stdout();
                for i in 0u64.. {
                    s.put(&format!("/k/{i:08}"), i.to_le_bytes().to_vec())
                        .await
                        .unwrap();
                    let mut o = out.lock();
                    writeln!(o, "acked {i}").unwrap();
                    o.flush().unwrap();
                }
            }
            // Try to open a directory another process holds.
            "opener" => match EmbeddedStore::open(&dir).await {
                Ok(_) => println!("opened"),
                Err(e) => println!("refused: {e}"),
            },
            m => panic!("unknown child mode {m}"),
        }
    });
    true
}

fn child(mode: &str, dir: &std::path::Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD, mode)
        .env("TRELLIS_STORE_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

/// Entry point for the child modes; a no-op in a normal test run.
#[test]
fn child_entry() {
    if child_main() {
        std::process::exit(0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let spec = StoreSpec::parse(&format!("file:{}", dir.path().join("state").display())).unwrap();
    let store = spec.open().await.unwrap();
    assert!(store.describe().starts_with("file:"));
    conformance::run_all(store, "/conformance/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_conformance() {
    let etcd = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let store = StoreSpec::parse(&etcd.spec())
        .unwrap()
        .open()
        .await
        .unwrap();
    assert!(store.describe().starts_with("etcd:"));
    conformance::run_all(store, "/conformance/").await;
}

#[tokio::test]
async fn etcd_connect_error_names_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let err = match StoreSpec::parse(&format!("etcd:{url}"))
        .unwrap()
        .open()
        .await
    {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("etcd is running"), "{err}");
}

#[tokio::test]
async fn embedded_persists_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (rev, lease);
    {
        let s = EmbeddedStore::open(dir.path()).await.unwrap();
        s.put("/a", b"1".to_vec()).await.unwrap();
        s.put("/b", b"2".to_vec()).await.unwrap();
        s.delete("/b").await.unwrap();
        assert!(s
            .txn(
                vec![trellis_store::Compare::ModRevision {
                    key: "/c".into(),
                    revision: 0
                }],
                vec![trellis_store::Op::Put {
                    key: "/c".into(),
                    value: b"3".to_vec()
                }]
            )
            .await
            .unwrap());
        lease = s.grant_lease(60).await.unwrap();
        s.put_with_lease("/l", b"leased".to_vec(), lease)
            .await
            .unwrap();
        rev = s.put("/a", b"11".to_vec()).await.unwrap();
    }
    let s = EmbeddedStore::open(dir.path()).await.unwrap();
    let a = s.get("/a").await.unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.mod_revision), (&b"11"[..], rev));
    assert_eq!(s.get("/b").await.unwrap(), None);
    assert_eq!(s.get("/c").await.unwrap().unwrap().value, b"3");
    // The lease survived (with a fresh TTL) and still owns its key.
    s.keep_alive(lease).await.unwrap();
    assert!(s.get("/l").await.unwrap().is_some());
    s.revoke(lease).await.unwrap();
    assert_eq!(s.get("/l").await.unwrap(), None);
    // Revisions keep increasing after a reopen; new leases get new ids.
    assert!(s.put("/d", vec![]).await.unwrap() > rev);
    assert_ne!(s.grant_lease(5).await.unwrap(), lease);
    drop(s);
    // And once more, after the compaction done at open.
    let s = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(s.get("/a").await.unwrap().unwrap().mod_revision, rev);
    assert_eq!(s.list("/").await.unwrap().len(), 3);
}

#[tokio::test]
async fn embedded_refuses_second_opener_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path()).await.unwrap();
    let err = match EmbeddedStore::open(dir.path()).await {
        Ok(_) => panic!("second open of the same dir succeeded"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("different directory"), "{msg}");
    drop(s);
    // Released on drop.
    EmbeddedStore::open(dir.path()).await.unwrap();
}

#[tokio::test]
async fn embedded_refuses_second_process() {
    let dir = tempfile::tempdir().unwrap();
    let _s = EmbeddedStore::open(dir.path()).await.unwrap();
    let out = child("opener", dir.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("refused: "), "child output: {text}");
    assert!(text.contains("already in use"), "child output: {text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
}

#[tokio::test]
async fn embedded_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = child("writer", dir.path()).spawn().unwrap();
    let mut lines = BufReader::new(w.stdout.take().unwrap()).lines();
    let mut acked = None;
    let t0 = Instant::now();
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("acked ") {
            acked = Some(n.parse::<u64>().unwrap());
            if acked >= Some(200) || t0.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
    }
    w.kill().unwrap(); // SIGKILL, in the middle of the write stream
    w.wait().unwrap();
    // Acks written to the pipe before the kill that we have not read yet also count.
    for line in lines.map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("acked ") {
            acked = Some(n.parse::<u64>().unwrap());
        }
    }
    let acked = acked.expect("the writer acknowledged nothing");
    let s: Arc<dyn StateStore> = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
    let all = s.list("/k/").await.unwrap();
    assert!(
        all.len() as u64 > acked,
        "acknowledged {} writes, found {}",
        acked + 1,
        all.len()
    );
    for (i, (k, v)) in all.iter().enumerate() {
        assert_eq!(k, &format!("/k/{i:08}"));
        assert_eq!(v.value, (i as u64).to_le_bytes());
    }
}
