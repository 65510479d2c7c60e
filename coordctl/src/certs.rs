//! `coordctl certs`: a job's CA and certificates, written offline by `trellis-auth` (rcgen; no
//! openssl, no coordinator). File names and the identities in the certificates: see the
//! `trellis_auth` crate docs.
use crate::output::{self, Format};
use crate::Failure;
use clap::Subcommand;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Write a new CA (ca.crt, ca.key), the coordinator's certificate (coordinator.crt/.key)
    /// and an operator and a viewer client certificate (operator.crt/.key, viewer.crt/.key)
    /// into DIR. Never overwrites.
    Init {
        /// Directory for the PEM files (created if missing).
        dir: PathBuf,
        /// A host name or IP address clients reach the coordinator at (repeat for more);
        /// localhost, 127.0.0.1 and ::1 are always in the certificate.
        #[arg(long = "host", value_name = "H")]
        hosts: Vec<String>,
    },
    /// Write etcd's server certificate (etcd-server.crt/.key: serverAuth + clientAuth) and the
    /// coordinator's client certificate towards etcd (etcd-client.crt/.key) into DIR, signed
    /// by the CA there, for etcd with client TLS (--client-cert-auth). Never overwrites.
    Etcd {
        /// The directory of `certs init`.
        dir: PathBuf,
        /// A host name or IP address the coordinator reaches etcd at (repeat for more; `*.`
        /// allowed first, e.g. `*.etcd.NS.svc`); localhost and 127.0.0.1 are always in it.
        #[arg(long = "host", value_name = "H")]
        hosts: Vec<String>,
    },
    /// Write worker ID's client certificate (worker-ID.crt/.key) into DIR, signed by the CA
    /// there (ca.crt, ca.key from `certs init`).
    Worker {
        /// The worker id the certificate names (the worker may only register as this id).
        id: String,
        /// The directory of `certs init`.
        dir: PathBuf,
    },
}

#[derive(Debug, Serialize)]
struct CertsView {
    dir: String,
    files: Vec<String>,
}

fn table(v: &CertsView) -> String {
    let mut out = format!("wrote {} files in {}:\n", v.files.len(), v.dir);
    for f in &v.files {
        out.push_str(&format!("  {f}\n"));
    }
    out
}

pub fn run(format: Format, cmd: &CertsCmd) -> anyhow::Result<()> {
    let (dir, files) = match cmd {
        CertsCmd::Init { dir, hosts } => (dir, trellis_auth::certs::init(dir, hosts)),
        CertsCmd::Worker { id, dir } => (dir, trellis_auth::certs::worker(id, dir)),
        CertsCmd::Etcd { dir, hosts } => (dir, trellis_auth::certs::etcd(dir, hosts)),
    };
    let files = files.map_err(|e| Failure::invalid(e.to_string()))?;
    let name = |p: &Path| {
        p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    let v = CertsView {
        dir: dir.display().to_string(),
        files: files.iter().map(|p| name(p)).collect(),
    };
    crate::emit(&match format {
        Format::Json => output::json(&v),
        Format::Table => table(&v),
    })
}
