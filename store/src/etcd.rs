//! etcd v3 (`--store etcd:URL[,URL…]`) through `etcd-client`.
use crate::{
    election, Compare, Error, Leadership, LeaseId, Op, Result, StateStore, Versioned, ETCD_TIMEOUT,
};
use etcd_client::{
    Client, Compare as ECompare, CompareOp, ConnectOptions, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp,
};
use std::sync::Arc;

/// An etcd v3 cluster. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    urls: String,
}

fn lease_missing(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

impl EtcdStore {
    /// Connect and check that the cluster answers (within [`ETCD_TIMEOUT`]); over TLS when
    /// `tls` is given (`https://` URLs).
    pub async fn connect(urls: Vec<String>, tls: Option<crate::EtcdTls>) -> Result<EtcdStore> {
        let joined = urls.join(",");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(ETCD_TIMEOUT)
            .with_timeout(ETCD_TIMEOUT)
            .with_keep_alive(std::time::Duration::from_secs(5), ETCD_TIMEOUT);
        if let Some(t) = tls {
            opts = opts.with_tls(t);
        }
        let connect = async {
            let mut client = Client::connect(&urls, Some(opts)).await?;
            client.status().await?;
            Ok::<Client, etcd_client::Error>(client)
        };
        let client = match tokio::time::timeout(ETCD_TIMEOUT * 2, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Error::Connect {
                    urls: joined,
                    detail: e.to_string(),
                })
            }
            Err(_) => {
                return Err(Error::Connect {
                    urls: joined,
                    detail: format!("no answer within {:?}", ETCD_TIMEOUT * 2),
                })
            }
        };
        tracing::info!(urls = %joined, "connected to etcd");
        Ok(EtcdStore {
            client,
            urls: joined,
        })
    }

    fn err(&self, e: etcd_client::Error) -> Error {
        Error::Etcd {
            urls: self.urls.clone(),
            source: e,
        }
    }

    fn c(&self) -> Client {
        self.client.clone()
    }

    /// The underlying client (e.g. for watches).
    pub fn client(&self) -> Client {
        self.c()
    }
}

fn revision_of(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map_or(0, |h| h.revision())
}

#[async_trait::async_trait]
impl StateStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd:{}", self.urls)
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let resp = self.c().get(key, None).await.map_err(|e| self.err(e))?;
        Ok(resp.kvs().first().map(|kv| Versioned {
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let resp = self
            .c()
            .get(prefix, Some(opts))
            .await
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let key = String::from_utf8(kv.key().to_vec())
                .map_err(|_| Error::Invalid(format!("etcd key under {prefix:?} is not UTF-8")))?;
            out.push((
                key,
                Versioned {
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                },
            ));
        }
        Ok(out)
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64> {
        let resp = self
            .c()
            .put(key, value, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(revision_of(resp.header()))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.c().delete(key, None).await.map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool> {
        let mut leases = Vec::new();
        let cmps: Vec<ECompare> = compares
            .into_iter()
            .map(|c| match c {
                Compare::ModRevision { key, revision } => {
                    ECompare::mod_revision(key, CompareOp::Equal, revision)
                }
            })
            .collect();
        let tops: Vec<TxnOp> = ops
            .into_iter()
            .map(|o| match o {
                Op::Put { key, value } => TxnOp::put(key, value, None),
                Op::PutWithLease { key, value, lease } => {
                    leases.push(lease);
                    TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease.0)))
                }
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let txn = Txn::new().when(cmps).and_then(tops);
        match self.c().txn(txn).await {
            Ok(resp) => Ok(resp.succeeded()),
            Err(e) if lease_missing(&e) && !leases.is_empty() => {
                Err(Error::LeaseNotFound(leases[0]))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    async fn grant_lease(&self, ttl_secs: u64) -> Result<LeaseId> {
        if ttl_secs == 0 {
            return Err(Error::Invalid("a lease TTL must be at least 1 s".into()));
        }
        let resp = self
            .c()
            .lease_grant(ttl_secs as i64, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        // Opening the keep-alive stream sends one keep-alive and waits for its answer (TTL 0
        // means the lease is gone); the stream is then dropped.
        match self.c().lease_keep_alive(lease.0).await {
            Ok(_) => Ok(()),
            Err(e) if lease_missing(&e) => Err(Error::LeaseNotFound(lease)),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        match self.c().lease_revoke(lease.0).await {
            Ok(_) => Ok(()),
            Err(e) if lease_missing(&e) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<i64> {
        match self
            .c()
            .put(key, value, Some(PutOptions::new().with_lease(lease.0)))
            .await
        {
            Ok(resp) => Ok(revision_of(resp.header())),
            Err(e) if lease_missing(&e) => Err(Error::LeaseNotFound(lease)),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn campaign(&self, election: &str, candidate: &str, ttl_secs: u64) -> Result<Leadership> {
        election::campaign(Arc::new(self.clone()), election, candidate, ttl_secs).await
    }
}
