//! Leader election on top of the [`StateStore`] primitives, shared by both implementations:
//! the election key is created (compare `mod_revision == 0`) with a lease owned by the
//! candidate; the holder keeps the lease alive; when it dies the lease expires, the key goes,
//! and a waiting candidate's create succeeds.
use crate::{Compare, Error, LeaseId, Op, Result, StateStore};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Held by the elected candidate. Keeps its lease alive in the background. Dropping it stops
/// the keep-alives (the lease, and with it the leadership, then expires after its TTL);
/// [`Leadership::resign`] hands over at once.
pub struct Leadership {
    key: String,
    candidate: String,
    lease: LeaseId,
    revision: i64,
    state: watch::Receiver<bool>,
    store: Arc<dyn StateStore>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("key", &self.key)
            .field("candidate", &self.candidate)
            .field("lease", &self.lease)
            .field("revision", &self.revision)
            .field("is_leader", &self.is_leader())
            .finish()
    }
}

impl Leadership {
    /// The election key.
    pub fn key(&self) -> &str {
        &self.key
    }
    pub fn candidate(&self) -> &str {
        &self.candidate
    }
    /// The lease backing the election key.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }
    /// The election key's mod revision while this candidate leads: use it in a
    /// `Compare::ModRevision` to fence writes against a newer leader.
    pub fn revision(&self) -> i64 {
        self.revision
    }
    /// False once leadership is known to be lost (never true again).
    pub fn is_leader(&self) -> bool {
        *self.state.borrow()
    }
    /// Resolves when leadership is lost (lease expired or revoked, key deleted or taken over,
    /// or the store unreachable for longer than about two thirds of the TTL).
    pub async fn lost(&self) {
        let mut rx = self.state.clone();
        let _ = rx.wait_for(|leading| !*leading).await;
    }
    /// Give up leadership now: delete the election key (if still ours) and revoke the lease.
    pub async fn resign(self) -> Result<()> {
        self.task.abort();
        let still_ours = self
            .store
            .txn(
                vec![Compare::ModRevision {
                    key: self.key.clone(),
                    revision: self.revision,
                }],
                vec![Op::Delete {
                    key: self.key.clone(),
                }],
            )
            .await?;
        if !still_ours {
            tracing::info!(key = %self.key, "resign: the election key was no longer ours");
        }
        self.store.revoke(self.lease).await
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tick(ttl_secs: u64) -> Duration {
    Duration::from_millis((ttl_secs.max(1) * 1000 / 4).max(100))
}

/// Campaign until `candidate` holds `key`.
pub(crate) async fn campaign(
    store: Arc<dyn StateStore>,
    key: &str,
    candidate: &str,
    ttl_secs: u64,
) -> Result<Leadership> {
    if key.is_empty() || candidate.is_empty() {
        return Err(Error::Invalid(
            "campaign needs a non-empty election key and candidate id".into(),
        ));
    }
    let ttl_secs = ttl_secs.max(1);
    let poll = tick(ttl_secs).min(Duration::from_millis(250));
    let mut lease = store.grant_lease(ttl_secs).await?;
    let mut last_keep_alive = Instant::now();
    loop {
        let won = store
            .txn(
                vec![Compare::ModRevision {
                    key: key.to_string(),
                    revision: 0,
                }],
                vec![Op::PutWithLease {
                    key: key.to_string(),
                    value: candidate.as_bytes().to_vec(),
                    lease,
                }],
            )
            .await;
        match won {
            Ok(true) => break,
            Ok(false) => {}
            Err(Error::LeaseNotFound(_)) => {
                lease = store.grant_lease(ttl_secs).await?;
                continue;
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(poll).await;
        // Keep our lease alive while waiting, so that winning needs no new grant.
        if last_keep_alive.elapsed() >= tick(ttl_secs) {
            match store.keep_alive(lease).await {
                Ok(()) => last_keep_alive = Instant::now(),
                Err(Error::LeaseNotFound(_)) => {
                    lease = store.grant_lease(ttl_secs).await?;
                    last_keep_alive = Instant::now();
                }
                Err(e) => return Err(e),
            }
        }
    }
    let revision = match store.get(key).await? {
        Some(v) if v.value == candidate.as_bytes() => v.mod_revision,
        _ => {
            return Err(Error::Invalid(format!(
                "election {key}: won, but the key changed at once; campaign again"
            )))
        }
    };
    tracing::info!(key, candidate, revision, "elected leader");
    let (tx, rx) = watch::channel(true);
    let task = tokio::spawn(keep_leading(
        store.clone(),
        key.to_string(),
        candidate.to_string(),
        lease,
        revision,
        ttl_secs,
        tx,
    ));
    Ok(Leadership {
        key: key.to_string(),
        candidate: candidate.to_string(),
        lease,
        revision,
        state: rx,
        store,
        task,
    })
}

async fn keep_leading(
    store: Arc<dyn StateStore>,
    key: String,
    candidate: String,
    lease: LeaseId,
    revision: i64,
    ttl_secs: u64,
    tx: watch::Sender<bool>,
) {
    let every = tick(ttl_secs);
    // Give up before the store could have let the lease expire (2/3 of the TTL without a
    // successful keep-alive), so two leaders never both believe they lead.
    let give_up = Duration::from_millis(ttl_secs * 1000 * 2 / 3);
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let attempt = async {
            store.keep_alive(lease).await?;
            let v = store.get(&key).await?;
            Ok::<bool, Error>(matches!(v, Some(v) if v.mod_revision == revision))
        };
        match tokio::time::timeout(every, attempt).await {
            Ok(Ok(true)) => last_ok = Instant::now(),
            Ok(Ok(false)) => {
                tracing::warn!(%key, %candidate, "leadership lost: the election key changed");
                break;
            }
            Ok(Err(Error::LeaseNotFound(_))) => {
                tracing::warn!(%key, %candidate, %lease, "leadership lost: lease expired");
                break;
            }
            Ok(Err(Error::Closed)) => {
                tracing::warn!(%key, %candidate, "leadership lost: the store was closed");
                break;
            }
            Ok(Err(e)) => {
                tracing::warn!(%key, %candidate, error = %e, "leadership keep-alive failed");
            }
            Err(_) => tracing::warn!(%key, %candidate, "leadership keep-alive timed out"),
        }
        if last_ok.elapsed() >= give_up {
            tracing::warn!(%key, %candidate, "leadership lost: store unreachable");
            break;
        }
    }
    let _ = tx.send(false);
}

/// A store whose every write is fenced by a leadership: each `put`/`delete`/`txn` runs as one
/// transaction that also requires the election key to still carry the leader's revision, so a
/// deposed leader (its lease expired or taken over, before it noticed) cannot overwrite the
/// new leader's state. A fenced-off write is [`Error::Fenced`]. Reads and leases pass through.
pub struct FencedStore {
    inner: Arc<dyn StateStore>,
    key: String,
    revision: i64,
}

impl FencedStore {
    pub fn new(inner: Arc<dyn StateStore>, leadership: &Leadership) -> FencedStore {
        FencedStore {
            inner,
            key: leadership.key().to_string(),
            revision: leadership.revision(),
        }
    }

    fn guard(&self) -> Compare {
        Compare::ModRevision {
            key: self.key.clone(),
            revision: self.revision,
        }
    }

    async fn fenced(&self, compares: Vec<Compare>, ops: Vec<Op>, what: &str) -> Result<bool> {
        let mut all = vec![self.guard()];
        all.extend(compares.iter().cloned());
        if self.inner.txn(all, ops.clone()).await? {
            return Ok(true);
        }
        // Which compare failed: the leadership's, or the caller's own?
        let ours = self.inner.get(&self.key).await?.map(|v| v.mod_revision);
        if ours != Some(self.revision) {
            return Err(Error::Fenced(format!(
                "{what}: this coordinator no longer leads (election key {} is at revision {}, it won at {}); another coordinator owns the state now",
                self.key,
                ours.map_or("none".to_string(), |r| r.to_string()),
                self.revision
            )));
        }
        Ok(false)
    }
}

#[async_trait::async_trait]
impl StateStore for FencedStore {
    fn describe(&self) -> String {
        format!("{} (writes fenced by {})", self.inner.describe(), self.key)
    }
    async fn get(&self, key: &str) -> Result<Option<crate::Versioned>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, crate::Versioned)>> {
        self.inner.list(prefix).await
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64> {
        let op = Op::Put {
            key: key.to_string(),
            value,
        };
        self.fenced(Vec::new(), vec![op], &format!("put {key}"))
            .await?;
        Ok(self.inner.get(key).await?.map_or(0, |v| v.mod_revision))
    }
    async fn delete(&self, key: &str) -> Result<()> {
        let op = Op::Delete {
            key: key.to_string(),
        };
        self.fenced(Vec::new(), vec![op], &format!("delete {key}"))
            .await?;
        Ok(())
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool> {
        self.fenced(compares, ops, "txn").await
    }
    async fn grant_lease(&self, ttl_secs: u64) -> Result<LeaseId> {
        self.inner.grant_lease(ttl_secs).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.inner.revoke(lease).await
    }
    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<i64> {
        let op = Op::PutWithLease {
            key: key.to_string(),
            value,
            lease,
        };
        self.fenced(Vec::new(), vec![op], &format!("put {key}"))
            .await?;
        Ok(self.inner.get(key).await?.map_or(0, |v| v.mod_revision))
    }
    async fn campaign(&self, election: &str, candidate: &str, ttl_secs: u64) -> Result<Leadership> {
        self.inner.campaign(election, candidate, ttl_secs).await
    }
}
