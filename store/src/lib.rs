//! Coordinator state (docs/design.md §7): the [`StateStore`] trait, an embedded single-node store
//! persisted to a local directory ([`EmbeddedStore`], `--store file:DIR`) and etcd v3
//! ([`EtcdStore`], `--store etcd:URL[,URL…]`). Keys are built only in [`keys`].
//!
//! Semantics follow etcd v3 so both implementations pass one conformance suite:
//! - every write gets a new, store-wide, monotonically increasing revision; a key's
//!   `mod_revision` is the revision of its last write (all ops of one txn share one revision);
//! - [`StateStore::txn`] is atomic: all compares hold and every op is applied, or nothing is;
//!   `Compare::ModRevision { revision: 0 }` means "the key is absent";
//! - a key written with a lease is deleted when the lease expires or is revoked;
//! - [`StateStore::campaign`] blocks until the candidate holds the election key; the returned
//!   [`Leadership`] keeps its lease alive and reports when leadership is lost.
//!
//! Fencing: put `Compare::ModRevision { key: leadership.key(), revision: leadership.revision() }`
//! into a txn to make it apply only while this candidate still leads.

use std::sync::Arc;
use std::time::Duration;

pub mod embedded;
pub mod etcd;
pub mod keys;

mod election;

#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "testing")]
pub mod testing;

pub use election::{FencedStore, Leadership};
pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store: {what} {}: {source}; check that the directory exists, is writable and the disk is not full", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store: {} is already in use (lock file {}/LOCK is held by {holder}); stop the other coordinator using it, or point --store file:DIR at a different directory", dir.display(), dir.display())]
    Locked {
        dir: std::path::PathBuf,
        holder: String,
    },
    #[error("store: {} is corrupt: {detail}; restore the directory from a backup or move it away to start empty", path.display())]
    Corrupt {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("store: cannot reach etcd at {urls}: {detail}; check that etcd is running and listening on that URL")]
    Connect { urls: String, detail: String },
    #[error("store: etcd at {urls}: {source}")]
    Etcd {
        urls: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("store: lease {0} not found (expired or revoked); grant a new lease")]
    LeaseNotFound(LeaseId),
    #[error("store: invalid store spec {spec:?}: {detail}; use file:DIR (embedded store) or etcd:URL[,URL...] (e.g. etcd:http://127.0.0.1:2379)")]
    Spec { spec: String, detail: String },
    #[error("store: invalid argument: {0}")]
    Invalid(String),
    #[error("store: the store has been closed")]
    Closed,
    /// A write by a coordinator that is no longer the leader ([`FencedStore`]).
    #[error("store: write refused: {0}")]
    Fenced(String),
}
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A value with the revision of its last modification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A lease: keys attached to it are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A txn guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's mod revision equals `revision`; `revision == 0` means the key is absent.
    ModRevision { key: String, revision: i64 },
}

/// A txn operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// Put attached to a lease (the key dies with the lease).
    PutWithLease {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    /// Deleting an absent key is not an error.
    Delete {
        key: String,
    },
}

/// Coordinator state. Object safe; share it as `Arc<dyn StateStore>`.
#[async_trait::async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Human-readable description for logs (`file:/var/lib/trellis`, `etcd:http://…`).
    fn describe(&self) -> String;

    async fn get(&self, key: &str) -> Result<Option<Versioned>>;
    /// Every key starting with `prefix`, sorted by key (byte order).
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>>;
    /// Returns the new revision (the key's new mod revision).
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64>;
    /// Deleting an absent key is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Atomic: if every compare holds, apply every op (in order) and return `true`; otherwise
    /// apply nothing and return `false`. Portable limits (etcd's defaults): at most 128 ops,
    /// no key touched twice in one op list, requests under 1.5 MiB.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool>;

    /// A lease that expires `ttl_secs` after its last keep-alive (etcd may round small TTLs up
    /// to its minimum, about 2 s).
    async fn grant_lease(&self, ttl_secs: u64) -> Result<LeaseId>;
    /// Refresh the lease's TTL. `Error::LeaseNotFound` if it has expired or was revoked.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// Revoke the lease and delete its keys now. Revoking an unknown lease is not an error.
    async fn revoke(&self, lease: LeaseId) -> Result<()>;
    /// Returns the new revision. `Error::LeaseNotFound` if the lease is gone.
    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<i64>;

    /// Block until `candidate` leads `election` (the election key, e.g. [`keys::leader`]).
    /// The returned [`Leadership`] keeps its lease (`ttl_secs`) alive in the background; when
    /// the holder dies, its lease expires and the next candidate wins within about `ttl_secs`.
    async fn campaign(&self, election: &str, candidate: &str, ttl_secs: u64) -> Result<Leadership>;
    /// The current leader's candidate id, if any.
    async fn leader(&self, election: &str) -> Result<Option<String>> {
        Ok(self
            .get(election)
            .await?
            .map(|v| String::from_utf8_lossy(&v.value).into_owned()))
    }
}

/// TLS to etcd: tonic's client config (the CA that signed etcd's server certificate, and a
/// client certificate when etcd requires one).
pub type EtcdTls = etcd_client::TlsOptions;

/// Where the state lives: parsed from the coordinator's `--store` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// `file:DIR`: the embedded store in DIR (created if missing).
    File(std::path::PathBuf),
    /// `etcd:URL[,URL…]`: an etcd v3 cluster.
    Etcd(Vec<String>),
}

impl StoreSpec {
    pub fn parse(spec: &str) -> Result<StoreSpec> {
        let bad = |detail: &str| Error::Spec {
            spec: spec.to_string(),
            detail: detail.to_string(),
        };
        if let Some(dir) = spec.strip_prefix("file:") {
            if dir.is_empty() {
                return Err(bad("the directory is empty"));
            }
            Ok(StoreSpec::File(dir.into()))
        } else if let Some(urls) = spec.strip_prefix("etcd:") {
            let urls: Vec<String> = urls
                .split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect();
            if urls.is_empty() {
                return Err(bad("no etcd URL given"));
            }
            for u in &urls {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(bad(&format!(
                        "etcd URL {u:?} must start with http:// or https://"
                    )));
                }
            }
            Ok(StoreSpec::Etcd(urls))
        } else {
            Err(bad("unknown scheme"))
        }
    }

    /// Open the store. Must be called inside a tokio runtime (leases use tokio timers).
    pub async fn open(&self) -> Result<Arc<dyn StateStore>> {
        self.open_with(None).await
    }

    /// [`StoreSpec::open`], with TLS to etcd (`https://` URLs; ignored by the embedded store).
    pub async fn open_with(&self, etcd_tls: Option<EtcdTls>) -> Result<Arc<dyn StateStore>> {
        Ok(match self {
            StoreSpec::File(dir) => Arc::new(EmbeddedStore::open(dir).await?),
            StoreSpec::Etcd(urls) => Arc::new(EtcdStore::connect(urls.clone(), etcd_tls).await?),
        })
    }
}

impl std::fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::File(d) => write!(f, "file:{}", d.display()),
            StoreSpec::Etcd(u) => write!(f, "etcd:{}", u.join(",")),
        }
    }
}

impl std::str::FromStr for StoreSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        StoreSpec::parse(s)
    }
}

/// How long a connect / single request to etcd may take before it is reported as an error.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        assert_eq!(
            StoreSpec::parse("file:/tmp/x").unwrap(),
            StoreSpec::File("/tmp/x".into())
        );
        assert_eq!(
            StoreSpec::parse("etcd:http://a:1, http://b:2").unwrap(),
            StoreSpec::Etcd(vec!["http://a:1".into(), "http://b:2".into()])
        );
        for bad in ["", "file:", "etcd:", "etcd:a:1", "redis://x", "/tmp/x"] {
            let e = StoreSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("file:DIR"), "{bad}: {e}");
        }
    }
}
