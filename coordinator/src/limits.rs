//! Bounds on what clients can make the coordinator hold (docs/security.md#limits): the size of a
//! gRPC message, the number of registered workers, the number of concurrent `Watch` streams.
//! Each is a config key and a flag; a request past one is refused with `RESOURCE_EXHAUSTED` and
//! one line naming the limit, its flag and its config key, and the coordinator serves on.
use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits of one coordinator, from its config.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest gRPC message decoded or encoded, bytes.
    pub max_message_bytes: usize,
    /// Most concurrent `Watch` streams.
    pub max_watch_streams: usize,
    watch: Arc<Semaphore>,
}

impl Limits {
    /// Validated limits (each at least 1; messages at least 64 KiB).
    pub fn new(cfg: &CoordinatorConfig) -> Result<Limits> {
        let bad = |what: &str| Err(Error::InvalidArgument(what.to_string()));
        if cfg.max_message_bytes < 64 << 10 {
            return bad("max_message_bytes (--max-message-bytes) must be at least 65536");
        }
        if cfg.max_workers == 0 {
            return bad("max_workers (--max-workers) must be at least 1");
        }
        if cfg.max_watch_streams == 0 {
            return bad("max_watch_streams (--max-watch-streams) must be at least 1");
        }
        Ok(Limits {
            max_message_bytes: cfg.max_message_bytes,
            max_watch_streams: cfg.max_watch_streams,
            watch: Arc::new(Semaphore::new(cfg.max_watch_streams)),
        })
    }

    /// A slot for one `Watch` stream, held as long as the stream lives; `RESOURCE_EXHAUSTED`
    /// when all are taken.
    pub fn watch_slot(&self) -> Result<OwnedSemaphorePermit, tonic::Status> {
        self.watch.clone().try_acquire_owned().map_err(|_| {
            tonic::Status::resource_exhausted(format!(
                "{n} Watch streams are already open, the coordinator's limit \
                 (--max-watch-streams, max_watch_streams in the config file); close one, poll \
                 with GetStatus, or raise the limit",
                n = self.max_watch_streams
            ))
        })
    }
}

/// The refusal of a new worker id when the registry is full of live workers.
pub fn too_many_workers(max: usize) -> Error {
    Error::ResourceExhausted(format!(
        "worker session refused: the coordinator already has {max} registered workers, all \
         connected or holding a rank, its limit (--max-workers, max_workers in the config \
         file); stop a worker or raise the limit"
    ))
}

/// tonic refuses an over-long request with `OUT_OF_RANGE` "decoded message length too large";
/// this layer turns that into `RESOURCE_EXHAUSTED` naming the limit's flag and config key.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimitLayer {
    pub max_message_bytes: usize,
}

impl<S> tower_layer::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;
    fn layer(&self, inner: S) -> MessageLimit<S> {
        MessageLimit {
            inner,
            limit: self.max_message_bytes,
        }
    }
}

/// The service [`MessageLimitLayer`] wraps around the server's services.
#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    limit: usize,
}

/// The clearer status for tonic's decode-limit error, if `headers` carry one.
fn rewrite(headers: &http::HeaderMap, limit: usize) -> Option<tonic::Status> {
    let s = tonic::Status::from_header_map(headers)?;
    let m = s.message();
    if s.code() != tonic::Code::OutOfRange || !m.contains("decoded message length too large") {
        return None;
    }
    let found = m
        .split("found ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or("?");
    Some(tonic::Status::resource_exhausted(format!(
        "request message of {found} bytes is over the coordinator's limit of {limit} bytes \
         (--max-message-bytes, max_message_bytes in the config file); send less or raise the \
         limit"
    )))
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = std::result::Result<T, E>> + Send>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for MessageLimit<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move {
            let mut resp = fut.await?;
            if let Some(status) = rewrite(resp.headers(), limit) {
                let h = resp.headers_mut();
                for k in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                    h.remove(k);
                }
                let _ = status.add_header(h);
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonic_decode_limit_becomes_resource_exhausted_naming_the_flag() {
        let mut h = http::HeaderMap::new();
        tonic::Status::out_of_range(
            "Error, decoded message length too large: found 70000 bytes, the limit is: 65536 bytes",
        )
        .add_header(&mut h)
        .unwrap();
        let s = rewrite(&h, 65536).unwrap();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(
            s.message().contains("70000 bytes")
                && s.message().contains("--max-message-bytes")
                && s.message().contains("max_message_bytes"),
            "{}",
            s.message()
        );
        let mut other = http::HeaderMap::new();
        tonic::Status::out_of_range("step out of range")
            .add_header(&mut other)
            .unwrap();
        assert!(rewrite(&other, 65536).is_none());
    }

    #[test]
    fn limits_are_validated() {
        let cfg = CoordinatorConfig {
            max_watch_streams: 0,
            ..Default::default()
        };
        let e = Limits::new(&cfg).unwrap_err().to_string();
        assert!(e.contains("--max-watch-streams"), "{e}");
        let l = Limits::new(&CoordinatorConfig {
            max_watch_streams: 1,
            ..Default::default()
        })
        .unwrap();
        let slot = l.watch_slot().unwrap();
        let e = l.watch_slot().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        drop(slot);
        let _again = l.watch_slot().unwrap();
    }
}
