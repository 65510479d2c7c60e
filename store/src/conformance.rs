//! The conformance suite (feature `testing`): every [`StateStore`] must pass it. Each case
//! panics with a message on failure and uses only keys under its namespace `ns`, so several
//! runs can share one etcd.
//!
//! ```ignore
//! trellis_store::conformance::run_all(store, "/conformance/embedded/").await;
//! ```
use crate::{keys, Compare, Error, Op, StateStore};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_core::ids::{JobId, Step};

/// Lease TTL used by the suite (etcd's minimum is about 2 s).
pub const TTL: u64 = 2;
/// Extra time allowed past a TTL for expiry to be noticed (busy CI machines).
pub const SLACK: Duration = Duration::from_secs(8);

/// Every case: kv, txn, then leases and election concurrently.
pub async fn run_all(store: Arc<dyn StateStore>, ns: &str) {
    kv(store.as_ref(), &format!("{ns}kv/")).await;
    txn(store.as_ref(), &format!("{ns}txn/")).await;
    let (lns, ens) = (format!("{ns}lease/"), format!("{ns}election/"));
    tokio::join!(leases(store.as_ref(), &lns), election(store.clone(), &ens));
    fenced_store(store.clone(), &format!("{ns}fenced-store/")).await;
}

/// [`crate::FencedStore`]: the leader's writes apply; once another candidate leads, every write
/// of the deposed leader is refused with `Error::Fenced` and changes nothing.
pub async fn fenced_store(s: Arc<dyn StateStore>, ns: &str) {
    let e = format!("{ns}leader");
    let state = format!("{ns}state");
    let a = s.campaign(&e, "a", TTL).await.unwrap();
    let fa = crate::FencedStore::new(s.clone(), &a);
    let rev = fa.put(&state, b"a1".to_vec()).await.unwrap();
    assert!(rev > 0);
    assert_eq!(s.get(&state).await.unwrap().unwrap().value, b"a1");
    // A failing compare of the caller's own is a plain `false`, not a fencing error.
    let other = Compare::ModRevision {
        key: state.clone(),
        revision: 0,
    };
    let put = |v: &[u8]| Op::Put {
        key: state.clone(),
        value: v.to_vec(),
    };
    assert!(!fa.txn(vec![other], vec![put(b"x")]).await.unwrap());
    // a's lease goes (as when it expires under a frozen leader); b wins and writes.
    s.revoke(a.lease()).await.unwrap();
    let b = s.campaign(&e, "b", TTL).await.unwrap();
    s.put(&state, b"b1".to_vec()).await.unwrap();
    for r in [
        fa.put(&state, b"a2".to_vec()).await.map(|_| ()),
        fa.delete(&state).await,
        fa.txn(vec![], vec![put(b"a3")]).await.map(|_| ()),
    ] {
        match r {
            Err(Error::Fenced(m)) => assert!(m.contains("no longer leads"), "{m}"),
            other => panic!("a deposed leader's write must be fenced: {other:?}"),
        }
    }
    assert_eq!(s.get(&state).await.unwrap().unwrap().value, b"b1");
    drop(a);
    b.resign().await.unwrap();
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    loop {
        if f().await {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// get / put / list / delete.
pub async fn kv(s: &dyn StateStore, ns: &str) {
    let a = format!("{ns}a");
    assert_eq!(s.get(&a).await.unwrap(), None, "missing key");
    let r1 = s.put(&a, b"one".to_vec()).await.unwrap();
    assert!(r1 > 0, "revision must be positive");
    let v = s.get(&a).await.unwrap().expect("put key is readable");
    assert_eq!(v.value, b"one");
    assert_eq!(v.mod_revision, r1, "get returns the put's revision");
    let r2 = s.put(&a, vec![0xff, 0, 0xfe]).await.unwrap();
    assert!(r2 > r1, "revisions increase");
    let v = s.get(&a).await.unwrap().unwrap();
    assert_eq!(v.value, vec![0xff, 0, 0xfe], "binary value round trip");
    assert_eq!(v.mod_revision, r2);

    let dir = format!("{ns}dir/");
    for k in ["c", "a", "b"] {
        s.put(&format!("{dir}{k}"), k.as_bytes().to_vec())
            .await
            .unwrap();
    }
    s.put(&format!("{ns}dirx"), Vec::new()).await.unwrap();
    assert_eq!(
        s.get(&format!("{ns}dirx")).await.unwrap().unwrap().value,
        Vec::<u8>::new(),
        "empty value"
    );
    let listed: Vec<(String, Vec<u8>)> = s
        .list(&dir)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.value))
        .collect();
    let want: Vec<(String, Vec<u8>)> = ["a", "b", "c"]
        .iter()
        .map(|k| (format!("{dir}{k}"), k.as_bytes().to_vec()))
        .collect();
    assert_eq!(listed, want, "list: sorted, only the prefix");
    assert!(s.list(&format!("{ns}nothing/")).await.unwrap().is_empty());

    // Checkpoint keys list in numeric order.
    let job = JobId(
        ns.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect(),
    );
    for step in [100u64, 9, 10] {
        s.put(&keys::checkpoint(&job, Step(step)), b"x".to_vec())
            .await
            .unwrap();
    }
    let steps: Vec<u64> = s
        .list(&keys::checkpoints_prefix(&job))
        .await
        .unwrap()
        .iter()
        .filter_map(|(k, _)| keys::parse_checkpoint(&job, k).map(|s| s.0))
        .collect();
    assert_eq!(steps, vec![9, 10, 100], "checkpoint keys sort numerically");
    for (k, _) in s.list(&keys::job_prefix(&job)).await.unwrap() {
        s.delete(&k).await.unwrap();
    }

    s.delete(&a).await.unwrap();
    assert_eq!(s.get(&a).await.unwrap(), None, "deleted");
    s.delete(&a).await.unwrap();
    s.delete(&format!("{ns}never")).await.unwrap();
}

/// Atomic txn with mod-revision compares.
pub async fn txn(s: &dyn StateStore, ns: &str) {
    let (x, y, z) = (format!("{ns}x"), format!("{ns}y"), format!("{ns}z"));
    let absent = |k: &str| Compare::ModRevision {
        key: k.to_string(),
        revision: 0,
    };
    let put = |k: &str, v: &[u8]| Op::Put {
        key: k.to_string(),
        value: v.to_vec(),
    };

    // Create two keys together.
    assert!(s
        .txn(vec![absent(&x)], vec![put(&x, b"x1"), put(&y, b"y1")])
        .await
        .unwrap());
    let vx = s.get(&x).await.unwrap().unwrap();
    let vy = s.get(&y).await.unwrap().unwrap();
    assert_eq!(
        (vx.value.as_slice(), vy.value.as_slice()),
        (&b"x1"[..], &b"y1"[..])
    );
    assert_eq!(vx.mod_revision, vy.mod_revision, "one txn, one revision");

    // The compare fails: nothing is applied.
    assert!(!s
        .txn(vec![absent(&x)], vec![put(&y, b"y2"), put(&z, b"z2")])
        .await
        .unwrap());
    assert_eq!(
        s.get(&y).await.unwrap().unwrap(),
        vy,
        "failed txn changed y"
    );
    assert_eq!(s.get(&z).await.unwrap(), None, "failed txn created z");

    // Several compares, one stale: nothing applied.
    let cur = |k: &str, r: i64| Compare::ModRevision {
        key: k.to_string(),
        revision: r,
    };
    assert!(!s
        .txn(
            vec![cur(&x, vx.mod_revision), cur(&y, vy.mod_revision - 1)],
            vec![Op::Delete { key: x.clone() }]
        )
        .await
        .unwrap());
    assert!(s.get(&x).await.unwrap().is_some(), "failed txn deleted x");

    // All compares hold: put + delete applied together.
    assert!(s
        .txn(
            vec![
                cur(&x, vx.mod_revision),
                cur(&y, vy.mod_revision),
                absent(&z)
            ],
            vec![Op::Delete { key: x.clone() }, put(&z, b"z3")]
        )
        .await
        .unwrap());
    assert_eq!(s.get(&x).await.unwrap(), None);
    let vz = s.get(&z).await.unwrap().unwrap();
    assert_eq!(vz.value, b"z3");
    assert!(vz.mod_revision > vy.mod_revision);

    // A plain put in between makes the old revision stale.
    s.put(&z, b"z4".to_vec()).await.unwrap();
    assert!(!s
        .txn(vec![cur(&z, vz.mod_revision)], vec![put(&z, b"z5")])
        .await
        .unwrap());
    assert_eq!(s.get(&z).await.unwrap().unwrap().value, b"z4");

    // Empty compares always succeed.
    assert!(s
        .txn(
            vec![],
            vec![Op::Delete { key: y.clone() }, Op::Delete { key: z.clone() }]
        )
        .await
        .unwrap());
    assert!(s.list(ns).await.unwrap().is_empty());
}

/// Lease expiry, keep-alive, revoke.
pub async fn leases(s: &dyn StateStore, ns: &str) {
    let (k1, k2) = (format!("{ns}dies"), format!("{ns}lives"));
    let l1 = s.grant_lease(TTL).await.unwrap();
    let l2 = s.grant_lease(TTL).await.unwrap();
    assert_ne!(l1, l2);
    s.put_with_lease(&k1, b"1".to_vec(), l1).await.unwrap();
    s.put_with_lease(&k2, b"2".to_vec(), l2).await.unwrap();
    assert!(s.get(&k1).await.unwrap().is_some());

    // l2 kept alive, l1 not: k1 goes within TTL + slack, k2 stays.
    let t0 = Instant::now();
    let within = Duration::from_secs(TTL) + SLACK;
    loop {
        s.keep_alive(l2).await.unwrap();
        if s.get(&k1).await.unwrap().is_none() {
            break;
        }
        assert!(
            t0.elapsed() < within,
            "lease key not expired within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone_after = t0.elapsed();
    assert!(
        gone_after >= Duration::from_millis(TTL * 1000 / 2),
        "lease key expired too early ({gone_after:?} for a {TTL} s TTL)"
    );
    // Keep l2 alive for two more TTLs.
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(2 * TTL) {
        s.keep_alive(l2).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        s.get(&k2).await.unwrap().is_some(),
        "kept-alive key vanished"
    );

    assert!(
        matches!(s.keep_alive(l1).await, Err(Error::LeaseNotFound(_))),
        "keep_alive of an expired lease must be LeaseNotFound"
    );
    assert!(
        matches!(
            s.put_with_lease(&k1, b"x".to_vec(), l1).await,
            Err(Error::LeaseNotFound(_))
        ),
        "put_with_lease on an expired lease must be LeaseNotFound"
    );

    // Revoke deletes at once; revoking again is fine.
    s.revoke(l2).await.unwrap();
    assert_eq!(
        s.get(&k2).await.unwrap(),
        None,
        "revoke deletes the lease's keys"
    );
    s.revoke(l2).await.unwrap();

    // A lease put inside a txn dies with the lease.
    let l3 = s.grant_lease(TTL).await.unwrap();
    assert!(s
        .txn(
            vec![],
            vec![Op::PutWithLease {
                key: k1.clone(),
                value: b"t".to_vec(),
                lease: l3
            }]
        )
        .await
        .unwrap());
    s.revoke(l3).await.unwrap();
    assert_eq!(s.get(&k1).await.unwrap(), None);
}

/// Leader election: the second candidate leads only after the first resigns or dies.
pub async fn election(s: Arc<dyn StateStore>, ns: &str) {
    let e = format!("{ns}leader");
    let a = s.campaign(&e, "a", TTL).await.unwrap();
    assert!(a.is_leader());
    assert_eq!(s.leader(&e).await.unwrap().as_deref(), Some("a"));

    // Fencing: a txn guarded by the leader revision applies while a leads.
    let fenced = format!("{ns}fenced");
    let guard = || Compare::ModRevision {
        key: a.key().to_string(),
        revision: a.revision(),
    };
    assert!(s
        .txn(
            vec![guard()],
            vec![Op::Put {
                key: fenced.clone(),
                value: b"a".to_vec()
            }]
        )
        .await
        .unwrap());

    // b waits while a leads (a keeps its lease alive for longer than the TTL).
    let s2 = s.clone();
    let e2 = e.clone();
    let mut b = tokio::spawn(async move { s2.campaign(&e2, "b", TTL).await });
    tokio::time::sleep(Duration::from_secs(TTL) + Duration::from_secs(1)).await;
    assert!(!b.is_finished(), "b became leader while a still leads");
    assert!(a.is_leader(), "a lost leadership while alive");
    a.resign().await.unwrap();
    let b = tokio::time::timeout(SLACK, &mut b)
        .await
        .expect("b not elected after a resigned")
        .unwrap()
        .unwrap();
    assert!(b.is_leader());
    assert_eq!(s.leader(&e).await.unwrap().as_deref(), Some("b"));

    // The old leader's fence no longer holds.
    let stale = Compare::ModRevision {
        key: e.clone(),
        revision: b.revision() - 1,
    };
    assert!(!s.txn(vec![stale], vec![]).await.unwrap());

    // c waits; b dies without resigning (keep-alives stop): c leads after b's lease expires.
    let s3 = s.clone();
    let e3 = e.clone();
    let mut c = tokio::spawn(async move { s3.campaign(&e3, "c", TTL).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!c.is_finished(), "c became leader while b leads");
    drop(b);
    let t0 = Instant::now();
    let c = tokio::time::timeout(Duration::from_secs(TTL) + SLACK, &mut c)
        .await
        .expect("c not elected after b died")
        .unwrap()
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(TTL * 1000 / 2),
        "c elected {took:?} after b died: b's lease should have held for about {TTL} s"
    );
    assert_eq!(s.leader(&e).await.unwrap().as_deref(), Some("c"));

    // Losing the lease is noticed.
    s.revoke(c.lease()).await.unwrap();
    tokio::time::timeout(SLACK, c.lost())
        .await
        .expect("leadership loss not noticed");
    assert!(!c.is_leader());
    assert_eq!(s.leader(&e).await.unwrap(), None);
    s.delete(&fenced).await.unwrap();
    // The election is open again.
    let d = s.campaign(&e, "d", TTL).await.unwrap();
    d.resign().await.unwrap();
    wait_until("election key deleted on resign", SLACK, || async {
        s.leader(&e).await.unwrap().is_none()
    })
    .await;
}
