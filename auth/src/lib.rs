//! Authentication for Trellis' gRPC ports, with no libtorch: certificates, mTLS configs and the
//! role policy.
//!
//! - [`certs`]: a job's CA and its certificates, issued with `rcgen` (no openssl):
//!   [`certs::init`] writes the CA, the coordinator's server certificate and an operator and a
//!   viewer client certificate; [`certs::worker`] a worker's client certificate.
//! - [`tls`]: tonic `ServerTlsConfig` (requires a client certificate signed by the CA) and
//!   `ClientTlsConfig` (CA + client identity), rustls with the `ring` provider.
//! - [`identity`]: who a verified client certificate names ([`Identity`]) and what it may call
//!   ([`required_role`]); [`AuthLayer`] enforces it in front of every service of a tonic server.
//!
//! # Identities in certificates
//!
//! A certificate names exactly one identity in a URI subject alternative name; the common name
//! repeats the name for people reading the certificate but is never trusted:
//!
//! | certificate | URI SAN | CN | extended key usage |
//! |---|---|---|---|
//! | worker | `trellis://worker/<id>` | `<id>` | clientAuth |
//! | operator | `trellis://operator/<name>` | `<name>` | clientAuth |
//! | viewer | `trellis://viewer/<name>` | `<name>` | clientAuth |
//! | coordinator | `trellis://coordinator` (+ DNS/IP SANs of its hosts) | `trellis-coordinator` | serverAuth |
//!
//! Names and worker ids are 1–128 characters of `A–Z a–z 0–9 . _ - @`, so they need no escaping
//! in a URI or a file name.

pub mod certs;
pub mod identity;
pub mod layer;
pub mod tls;

pub use identity::{required_role, Identity, Kind, Role};
pub use layer::{identity as request_identity, AuthLayer};

/// The one error type of `trellis-auth`: what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Issuing or reading a certificate or key failed.
    #[error("certificates: {0}")]
    Cert(String),
    /// A certificate does not name a usable Trellis identity.
    #[error("certificate identity: {0}")]
    Identity(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
