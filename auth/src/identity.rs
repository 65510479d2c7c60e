//! Who a client certificate names, and which RPCs each role may call.
//!
//! Parsing here does **not** verify the certificate: call it only on certificates that the TLS
//! layer has already verified against the job's CA (tonic's `Request::peer_certs`, as
//! [`crate::AuthLayer`] does).
use crate::{Error, Result};
use std::fmt;
use tonic::transport::CertificateDer;

/// The URI scheme of Trellis identities in certificates.
pub const SCHEME: &str = "trellis://";

/// The kind and name of a certificate's holder.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A worker process; the name is its worker id.
    Worker(String),
    /// A person or tool with role operator.
    Operator(String),
    /// A person or tool with role viewer.
    Viewer(String),
}

/// A verified client's identity, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub kind: Kind,
}

/// What a method needs. `Operator` includes everything `Viewer` may do; `Worker` is separate
/// (a worker certificate may only open worker sessions, and people cannot open them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Viewer,
    Operator,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Methods of `trellis.v1.ControlService` a viewer may call: they only read.
const VIEWER_METHODS: &[&str] = &[
    "GetStatus",
    "ListWorkers",
    "GetLoss",
    "Watch",
    "ListCheckpoints",
    "Plan",
];

/// The role a gRPC method (`/package.Service/Method`, as in the HTTP/2 path) needs, or `None`
/// when any verified identity may call it (health checks, reflection).
///
/// - viewer: status, workers, loss, watch, checkpoint list, plan;
/// - operator: all of the viewer's, and submit, grow, pause, resume, checkpoint save;
/// - worker: `WorkerService` (the worker session).
///
/// Fails closed: any other method of `ControlService`, and any unknown service, needs operator.
pub fn required_role(method: &str) -> Option<Role> {
    let mut parts = method.trim_start_matches('/').splitn(2, '/');
    let (service, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => None,
        "trellis.v1.WorkerService" => Some(Role::Worker),
        "trellis.v1.ControlService" if VIEWER_METHODS.contains(&name) => Some(Role::Viewer),
        _ => Some(Role::Operator),
    }
}

/// Whether `name` can be a worker id or a person's/tool's name in a certificate (and in a
/// file name): 1–128 characters of `A–Z a–z 0–9 . _ - @`, not starting with `.` or `-`.
pub fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(Error::Identity(format!(
            "{what} {name:?} is not a valid name: use 1-128 characters of A-Z a-z 0-9 . _ - @, \
             not starting with . or -"
        )))
    }
}

impl Identity {
    pub fn worker(id: impl Into<String>) -> Identity {
        Identity {
            kind: Kind::Worker(id.into()),
        }
    }
    pub fn operator(name: impl Into<String>) -> Identity {
        Identity {
            kind: Kind::Operator(name.into()),
        }
    }
    pub fn viewer(name: impl Into<String>) -> Identity {
        Identity {
            kind: Kind::Viewer(name.into()),
        }
    }

    /// The identity named by a TLS peer's certificate chain (leaf first, as rustls gives it).
    pub fn from_peer_certs(certs: &[CertificateDer<'_>]) -> Result<Identity> {
        let leaf = certs
            .first()
            .ok_or_else(|| Error::Identity("the client sent no certificate".into()))?;
        Identity::from_cert_der(leaf)
    }

    /// The identity named by the first certificate of a PEM file's contents (e.g. a worker
    /// reading its own `--tls-cert` to learn its id).
    pub fn from_cert_pem(pem: &[u8]) -> Result<Identity> {
        use rustls_pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem)
            .map_err(|e| Error::Identity(format!("no PEM certificate: {e}")))?;
        Identity::from_cert_der(&der)
    }

    /// The identity named by one DER certificate: its single `trellis://` URI SAN.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::Identity(format!("cannot parse the certificate: {e}")))?;
        let subject = cert.subject().to_string();
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| {
                Error::Identity(format!(
                    "certificate {subject}: bad subject alternative names: {e}"
                ))
            })?
            .map(|ext| ext.value.general_names.clone())
            .unwrap_or_default();
        let uris: Vec<&str> = sans
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) if u.starts_with(SCHEME) => Some(*u),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [uri] => Identity::from_uri(uri),
            [] => Err(Error::Identity(format!(
                "certificate {subject} names no Trellis identity (a URI SAN \
                 trellis://worker/<id>, trellis://operator/<name> or trellis://viewer/<name>); \
                 issue one with `coordctl certs`"
            ))),
            _ => Err(Error::Identity(format!(
                "certificate {subject} names {} Trellis identities ({}); a certificate must name \
                 exactly one",
                uris.len(),
                uris.join(", ")
            ))),
        }
    }

    /// Parse `trellis://worker/<id>`, `trellis://operator/<name>` or `trellis://viewer/<name>`.
    pub fn from_uri(uri: &str) -> Result<Identity> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| Error::Identity(format!("{uri:?} is not a {SCHEME} identity")))?;
        let (kind, name) = rest.split_once('/').unwrap_or((rest, ""));
        let id = match kind {
            "worker" => Identity::worker(name),
            "operator" => Identity::operator(name),
            "viewer" => Identity::viewer(name),
            _ => {
                return Err(Error::Identity(format!(
                    "{uri:?} is not a client identity: expected trellis://worker/<id>, \
                     trellis://operator/<name> or trellis://viewer/<name>"
                )))
            }
        };
        check_name(&format!("the {kind} in {uri:?}"), name)?;
        Ok(id)
    }

    /// The URI SAN that names this identity.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}", self.role(), self.name())
    }

    /// The worker id, or the person's/tool's name.
    pub fn name(&self) -> &str {
        match &self.kind {
            Kind::Worker(n) | Kind::Operator(n) | Kind::Viewer(n) => n,
        }
    }

    /// The worker id, for a worker certificate.
    pub fn worker_id(&self) -> Option<&str> {
        match &self.kind {
            Kind::Worker(id) => Some(id),
            _ => None,
        }
    }

    pub fn role(&self) -> Role {
        match self.kind {
            Kind::Worker(_) => Role::Worker,
            Kind::Operator(_) => Role::Operator,
            Kind::Viewer(_) => Role::Viewer,
        }
    }

    /// Whether this identity has `needed` (`None`: any identity does).
    pub fn has(&self, needed: Option<Role>) -> bool {
        match (needed, self.role()) {
            (None, _) => true,
            (Some(Role::Viewer), Role::Viewer | Role::Operator) => true,
            (Some(n), r) => n == r,
        }
    }

    /// `Ok` if this identity may call `method` (`/package.Service/Method`), else
    /// `PERMISSION_DENIED` naming the role it needs.
    pub fn authorize(&self, method: &str) -> std::result::Result<(), tonic::Status> {
        let needed = required_role(method);
        if self.has(needed) {
            return Ok(());
        }
        let needed = needed.map_or("an identity", Role::as_str);
        let call = method.trim_start_matches('/');
        let call = call.rsplit_once('.').map_or(call, |(_, c)| c);
        Err(tonic::Status::permission_denied(format!(
            "{call} needs role {needed}, but this client is {self}; use a certificate with \
             role {needed} (`coordctl certs`)"
        )))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.role(), self.name())
    }
}
