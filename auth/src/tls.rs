//! tonic (rustls, `ring` provider) TLS configs from PEM files, checked when they are loaded so
//! that a wrong path or a swapped file is one clear line at start-up rather than a failed
//! handshake later.
//!
//! - server: [`server_tls`] presents `--tls-cert`/`--tls-key` and **requires** a client
//!   certificate signed by `--client-ca` (no certificate or another CA: the handshake fails);
//!   pass it to `tonic::transport::Server::builder().tls_config(…)` and add [`crate::AuthLayer`].
//! - client: [`client_tls`] trusts only `--ca` and presents `--cert`/`--key`; pass it to
//!   `Endpoint::tls_config(…)` with an `https://` endpoint (the host name or IP in the endpoint
//!   must be one of the server certificate's SANs).
use crate::{Error, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// How long a client may take to complete the TLS handshake with a server.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(format!("cannot read {what} {}", path.display()), e))
}

/// PEM certificates (at least one) from `path`.
fn certificates(path: &Path, what: &str) -> Result<Certificate> {
    let pem = read(path, what)?;
    let n = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Cert(format!("{what} {}: {e}", path.display())))?
        .len();
    if n == 0 {
        return Err(Error::Cert(format!(
            "{what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(Certificate::from_pem(pem))
}

/// A certificate (chain) and its private key.
fn identity(cert: &Path, key: &Path, cert_flag: &str, key_flag: &str) -> Result<Identity> {
    let c = certificates(cert, cert_flag)?;
    let k = read(key, key_flag)?;
    PrivateKeyDer::from_pem_slice(&k).map_err(|e| {
        Error::Cert(format!(
            "{key_flag} {} holds no PEM private key: {e}",
            key.display()
        ))
    })?;
    Ok(Identity::from_pem(c.into_inner(), k))
}

/// The server side of mTLS: this certificate and key, and client certificates required and
/// verified against `client_ca`.
pub fn server_tls(cert: &Path, key: &Path, client_ca: &Path) -> Result<ServerTlsConfig> {
    Ok(ServerTlsConfig::new()
        .identity(identity(cert, key, "--tls-cert", "--tls-key")?)
        .client_ca_root(certificates(client_ca, "--client-ca")?)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// The client side of mTLS: trust only `ca`, present `cert` / `key`.
pub fn client_tls(ca: &Path, cert: &Path, key: &Path) -> Result<ClientTlsConfig> {
    client_tls_for(ca, Some((cert, key)), ["--ca", "--cert", "--key"])
}

/// A client config for another TLS server (etcd): trust only `ca`, and present `cert` / `key`
/// when given (servers that require client certificates). Errors name the files by `flags`
/// (CA, certificate, key).
pub fn client_tls_for(
    ca: &Path,
    pair: Option<(&Path, &Path)>,
    flags: [&str; 3],
) -> Result<ClientTlsConfig> {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(certificates(ca, flags[0])?)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some((cert, key)) = pair {
        c = c.identity(identity(cert, key, flags[1], flags[2])?);
    }
    Ok(c)
}
