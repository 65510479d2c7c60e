//! A tower layer for a tonic server with mTLS: every request's client identity comes from its
//! verified certificate and must have the role its method needs ([`crate::required_role`]),
//! else the call ends with `UNAUTHENTICATED` (no usable identity) or `PERMISSION_DENIED`
//! (naming the role needed) before any service sees it. Allowed requests carry the
//! [`Identity`] in their extensions: read it in a handler with [`identity`]. Add it only to a
//! server with TLS ([`crate::tls::server_tls`]): without a client certificate every call is
//! `UNAUTHENTICATED`.
//!
//! ```text
//! Server::builder()
//!     .tls_config(trellis_auth::tls::server_tls(cert, key, ca)?)?
//!     .layer(trellis_auth::AuthLayer)
//!     .add_service(…)
//! ```
use crate::Identity;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthLayer;

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner }
    }
}

/// The service [`AuthLayer`] wraps around each of the server's services.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
}

/// The client identity of `req`, if it may call the method in the request's path.
pub fn check<B>(req: &http::Request<B>) -> Result<Identity, tonic::Status> {
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
        .ok_or_else(|| {
            tonic::Status::unauthenticated(
                "no client certificate: connect over TLS with a certificate issued by this \
                 job's CA (`coordctl certs`)",
            )
        })?;
    let id = Identity::from_peer_certs(&certs)
        .map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
    id.authorize(req.uri().path())?;
    Ok(id)
}

/// The identity [`AuthLayer`] attached to a request (`None` on a server without the layer).
pub fn identity<T>(req: &tonic::Request<T>) -> Option<&Identity> {
    req.extensions().get::<Identity>()
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for Authorize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match check(&req) {
            Ok(id) => {
                tracing::debug!(method = req.uri().path(), client = %id, "authorized");
                req.extensions_mut().insert(id);
                let fut = self.inner.call(req);
                Box::pin(async move { Ok(fut.await?.map(tonic::body::Body::new)) })
            }
            Err(status) => {
                tracing::info!(
                    method = req.uri().path(),
                    code = ?status.code(),
                    reason = status.message(),
                    "refused a call"
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
