//! A job's certificate authority and the certificates it issues (PEM files, ECDSA P-256),
//! made with `rcgen`: no openssl.
//!
//! Files in the certificate directory (keys are written with mode 0600, and nothing is ever
//! overwritten):
//!
//! | file | what |
//! |---|---|
//! | `ca.crt`, `ca.key` | the CA; keep `ca.key` where only the person issuing certificates can read it |
//! | `coordinator.crt`, `.key` | the coordinator's server certificate: `localhost`, `127.0.0.1`, `::1` and every `--host` |
//! | `operator.crt`, `.key` | a client certificate with role operator (name `operator`) |
//! | `viewer.crt`, `.key` | a client certificate with role viewer (name `viewer`) |
//! | `worker-ID.crt`, `.key` | worker `ID`'s client certificate |
//! | `etcd-server.crt`, `.key` | etcd's client-port certificate (`etcd`): its hosts |
//! | `etcd-client.crt`, `.key` | the coordinator's client certificate towards etcd (`etcd`) |
//!
//! Validity: the CA 10 years, every other certificate 1 year, both from one hour ago (clock
//! skew between machines).
use crate::identity::{check_name, Identity};
use crate::{Error, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const COORDINATOR: &str = "coordinator";
pub const OPERATOR: &str = "operator";
pub const VIEWER: &str = "viewer";
/// etcd's server certificate (`certs etcd`).
pub const ETCD_SERVER: &str = "etcd-server";
/// The coordinator's client certificate towards etcd (`certs etcd`).
pub const ETCD_CLIENT: &str = "etcd-client";
/// The coordinator certificate's URI SAN (it is not a client identity).
pub const COORDINATOR_URI: &str = "trellis://coordinator";

const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 365;

/// `DIR/NAME.crt` and `DIR/NAME.key`.
pub fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// The file stem of worker `id`'s certificate: `worker-ID`.
pub fn worker_stem(id: &str) -> String {
    format!("worker-{id}")
}

fn cert_err(what: &str, e: rcgen::Error) -> Error {
    Error::Cert(format!("{what}: {e}"))
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let at = |t: i64| OffsetDateTime::from_unix_timestamp(t).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    p.not_before = at(now - 3600);
    p.not_after = at(now + days * 86_400);
}

fn subject(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Trellis");
    dn.push(DnType::CommonName, cn);
    dn
}

fn uri_san(uri: String) -> Result<SanType> {
    Ok(SanType::URI(uri.try_into().map_err(|e| {
        Error::Cert(format!("URI SAN is not ASCII: {e}"))
    })?))
}

/// A host for the coordinator certificate: an IP address, or a DNS name (`*.` allowed first).
fn host_san(host: &str) -> Result<SanType> {
    let h = host.trim();
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bare = h.strip_prefix("*.").unwrap_or(h);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(Error::Cert(format!(
            "--host {host:?} is neither an IP address nor a DNS name (letters, digits, '-', \
             dots; '*.' allowed first)"
        )));
    }
    Ok(SanType::DnsName(h.to_string().try_into().map_err(|e| {
        Error::Cert(format!("--host {host:?}: {e}"))
    })?))
}

fn refuse_existing(paths: &[&Path]) -> Result<()> {
    for p in paths {
        if p.exists() {
            return Err(Error::Cert(format!(
                "{} already exists; certificates are never overwritten: use another directory \
                 or delete the old files first",
                p.display()
            )));
        }
    }
    Ok(())
}

/// Write `contents` to a new file (`create_new`), mode `mode`.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

/// A key and a certificate for it, signed by `issuer`.
fn issue(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject(cn);
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, LEAF_DAYS);
    let key = KeyPair::generate().map_err(|e| cert_err("cannot generate a key", e))?;
    let cert = p
        .signed_by(&key, issuer)
        .map_err(|e| cert_err(&format!("cannot sign the certificate for {cn}"), e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_pair(dir: &Path, stem: &str, (cert, key): (String, String)) -> Result<[PathBuf; 2]> {
    let (c, k) = pair(dir, stem);
    write_new(&k, &key, 0o600)?;
    write_new(&c, &cert, 0o644)?;
    Ok([c, k])
}

fn client_cert(issuer: &Issuer<'_, KeyPair>, id: &Identity) -> Result<(String, String)> {
    issue(
        issuer,
        id.name(),
        vec![uri_san(id.uri())?],
        ExtendedKeyUsagePurpose::ClientAuth,
    )
}

/// Create `dir` (if needed) and write a new CA, the coordinator's certificate (SANs:
/// `localhost`, `127.0.0.1`, `::1` and every entry of `hosts`), and an operator and a viewer
/// certificate. Refuses if any of these files exists. Returns the files written.
pub fn init(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>> {
    let mut sans = vec![uri_san(COORDINATOR_URI.into())?];
    for h in ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .chain(hosts.iter().map(String::as_str))
    {
        let san = host_san(h)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    let (ca_crt, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let stems = [COORDINATOR, OPERATOR, VIEWER].map(|s| pair(dir, s));
    let mut all: Vec<&Path> = vec![&ca_crt, &ca_key];
    for (c, k) in &stems {
        all.extend([c.as_path(), k.as_path()]);
    }
    refuse_existing(&all)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;

    let mut p = CertificateParams::default();
    p.distinguished_name = subject("Trellis CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, CA_DAYS);
    let key = KeyPair::generate().map_err(|e| cert_err("cannot generate the CA key", e))?;
    let ca = p
        .self_signed(&key)
        .map_err(|e| cert_err("cannot self-sign the CA", e))?;
    write_new(&ca_key, &key.serialize_pem(), 0o600)?;
    write_new(&ca_crt, &ca.pem(), 0o644)?;
    let issuer = Issuer::new(p, key);

    let mut files = vec![ca_crt, ca_key];
    let server = issue(
        &issuer,
        "trellis-coordinator",
        sans,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    files.extend(write_pair(dir, COORDINATOR, server)?);
    for id in [Identity::operator(OPERATOR), Identity::viewer(VIEWER)] {
        files.extend(write_pair(dir, id.name(), client_cert(&issuer, &id)?)?);
    }
    Ok(files)
}

/// Load the CA in `dir` (`ca.crt`, `ca.key`) as an issuer.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| {
            Error::io(
                format!(
                    "cannot read {} (run `coordctl certs init {}` first)",
                    p.display(),
                    dir.display()
                ),
                e,
            )
        })
    };
    let (crt, key) = (read(CA_CERT)?, read(CA_KEY)?);
    let key = KeyPair::from_pem(&key).map_err(|e| {
        cert_err(
            &format!("{} is not a private key", dir.join(CA_KEY).display()),
            e,
        )
    })?;
    // The issuer is built from the certificate's own subject and key id, so what we sign chains
    // to exactly this ca.crt; check that ca.key is its key.
    let der = CertificateDer::from_pem_slice(crt.as_bytes()).map_err(|e| {
        Error::Cert(format!(
            "{} holds no PEM certificate: {e}",
            dir.join(CA_CERT).display()
        ))
    })?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Error::Cert(format!("cannot parse {}: {e}", dir.join(CA_CERT).display())))?;
    if !x509.is_ca() {
        return Err(Error::Cert(format!(
            "{} is not a CA certificate",
            dir.join(CA_CERT).display()
        )));
    }
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(Error::Cert(format!(
            "{} is not the key of {}; the CA files are from different runs of `coordctl certs \
             init`",
            dir.join(CA_KEY).display(),
            dir.join(CA_CERT).display()
        )));
    }
    Issuer::from_ca_cert_der(&der, key).map_err(|e| {
        cert_err(
            &format!("cannot use {} as an issuer", dir.join(CA_CERT).display()),
            e,
        )
    })
}

/// Write etcd's certificates in `dir`, signed by the CA there: `etcd-server.crt/.key` (etcd's
/// client-port certificate: serverAuth and clientAuth — etcd's gateway dials itself with it —,
/// DNS/IP SANs `localhost`, `127.0.0.1` and every entry of `hosts`) and `etcd-client.crt/.key`
/// (the coordinator's clientAuth certificate towards etcd; etcd ignores its URI SAN). Refuses
/// if any of these files exists. Returns the files written.
pub fn etcd(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>> {
    let stems = [ETCD_SERVER, ETCD_CLIENT].map(|s| pair(dir, s));
    let all: Vec<&Path> = stems
        .iter()
        .flat_map(|(c, k)| [c.as_path(), k.as_path()])
        .collect();
    refuse_existing(&all)?;
    let issuer = load_ca(dir)?;
    let mut sans = Vec::new();
    for h in ["localhost", "127.0.0.1"]
        .into_iter()
        .chain(hosts.iter().map(String::as_str))
    {
        let san = host_san(h)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    let mut p = CertificateParams::default();
    p.distinguished_name = subject("trellis-etcd");
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, LEAF_DAYS);
    let key = KeyPair::generate().map_err(|e| cert_err("cannot generate a key", e))?;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(|e| cert_err("cannot sign etcd's certificate", e))?;
    let mut files = write_pair(dir, ETCD_SERVER, (cert.pem(), key.serialize_pem()))?.to_vec();
    let client = issue(
        &issuer,
        "trellis-coordinator",
        vec![uri_san(COORDINATOR_URI.into())?],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    files.extend(write_pair(dir, ETCD_CLIENT, client)?);
    Ok(files)
}

/// Write `worker-ID.crt` / `.key` in `dir`, signed by the CA there. Returns the files written.
pub fn worker(id: &str, dir: &Path) -> Result<Vec<PathBuf>> {
    check_name("worker id", id)?;
    let stem = worker_stem(id);
    let (c, k) = pair(dir, &stem);
    refuse_existing(&[&c, &k])?;
    let issuer = load_ca(dir)?;
    let pem = client_cert(&issuer, &Identity::worker(id))?;
    Ok(write_pair(dir, &stem, pem)?.to_vec())
}
