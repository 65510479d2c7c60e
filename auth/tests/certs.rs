//! Issuing certificates into real files and reading the identities back.
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use trellis_auth::{certs, required_role, Error, Identity, Role};
use x509_parser::extensions::GeneralName;

fn der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

fn sans(path: &Path) -> Vec<String> {
    let d = der(path);
    let (_, c) = x509_parser::parse_x509_certificate(&d).unwrap();
    let ext = c.subject_alternative_name().unwrap().unwrap();
    ext.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(s) => format!("dns:{s}"),
            GeneralName::URI(s) => format!("uri:{s}"),
            GeneralName::IPAddress(b) => match b.len() {
                4 => format!(
                    "ip:{}",
                    std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap())
                ),
                _ => format!(
                    "ip:{}",
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap())
                ),
            },
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn init_writes_the_named_files_and_identities() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("certs");
    let hosts = vec!["coord.example.org".to_string(), "10.1.2.3".to_string()];
    let files = certs::init(&dir, &hosts).unwrap();
    let mut names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ca.crt",
            "ca.key",
            "coordinator.crt",
            "coordinator.key",
            "operator.crt",
            "operator.key",
            "viewer.crt",
            "viewer.key"
        ]
    );
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        let key = f.extension().unwrap() == "key";
        assert_eq!(mode, if key { 0o600 } else { 0o644 }, "{}", f.display());
        let text = std::fs::read_to_string(f).unwrap();
        let tag = if key {
            "PRIVATE KEY-----"
        } else {
            "BEGIN CERTIFICATE-----"
        };
        assert!(text.contains(tag), "{}: {text}", f.display());
    }
    let s = sans(&dir.join("coordinator.crt"));
    for want in [
        "uri:trellis://coordinator",
        "dns:localhost",
        "ip:127.0.0.1",
        "ip:::1",
        "dns:coord.example.org",
        "ip:10.1.2.3",
    ] {
        assert!(s.contains(&want.to_string()), "{want} not in {s:?}");
    }
    let id = |f: &str| Identity::from_cert_der(&der(&dir.join(f)));
    assert_eq!(id("operator.crt").unwrap(), Identity::operator("operator"));
    assert_eq!(id("viewer.crt").unwrap(), Identity::viewer("viewer"));
    let e = id("coordinator.crt").unwrap_err().to_string();
    assert!(e.contains("not a client identity"), "{e}");
    let e = id("ca.crt").unwrap_err().to_string();
    assert!(e.contains("names no Trellis identity"), "{e}");
}

#[test]
fn worker_certificate_is_signed_by_the_ca_in_dir() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    certs::init(dir, &[]).unwrap();
    let files = certs::worker("node-7.local-991", dir).unwrap();
    assert_eq!(
        files,
        vec![
            dir.join("worker-node-7.local-991.crt"),
            dir.join("worker-node-7.local-991.key")
        ]
    );
    let leaf = der(&files[0]);
    assert_eq!(
        Identity::from_cert_der(&leaf).unwrap(),
        Identity::worker("node-7.local-991")
    );
    assert_eq!(
        sans(&files[0]),
        vec!["uri:trellis://worker/node-7.local-991".to_string()]
    );
    // The worker certificate verifies against ca.crt's key and names it as issuer.
    let ca = der(&dir.join("ca.crt"));
    let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
    let (_, w) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(w.issuer(), ca.subject());
    w.verify_signature(Some(ca.public_key()))
        .expect("worker certificate not signed by ca.key");
    assert!(!w.is_ca());
    // Never overwritten.
    let e = certs::worker("node-7.local-991", dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn etcd_certificates_name_its_hosts_and_are_signed_by_the_ca() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    certs::init(dir, &[]).unwrap();
    let hosts = vec!["*.etcd.ns.svc".to_string(), "etcd.ns.svc".to_string()];
    let files = certs::etcd(dir, &hosts).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "etcd-server.crt",
            "etcd-server.key",
            "etcd-client.crt",
            "etcd-client.key"
        ]
    );
    let s = sans(&dir.join("etcd-server.crt"));
    for want in [
        "dns:localhost",
        "ip:127.0.0.1",
        "dns:*.etcd.ns.svc",
        "dns:etcd.ns.svc",
    ] {
        assert!(s.contains(&want.to_string()), "{want} not in {s:?}");
    }
    let ca = der(&dir.join("ca.crt"));
    let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
    for f in ["etcd-server.crt", "etcd-client.crt"] {
        let d = der(&dir.join(f));
        let (_, c) = x509_parser::parse_x509_certificate(&d).unwrap();
        c.verify_signature(Some(ca.public_key()))
            .unwrap_or_else(|e| panic!("{f} not signed by ca.key: {e:?}"));
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth, "{f}: clientAuth");
        assert_eq!(eku.server_auth, f == "etcd-server.crt", "{f}: serverAuth");
    }
    let e = certs::etcd(dir, &[]).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn refusals_are_one_clear_line() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let e = certs::worker("w1", dir).unwrap_err().to_string();
    assert!(
        e.contains("ca.crt") && e.contains("coordctl certs init"),
        "{e}"
    );
    certs::init(dir, &[]).unwrap();
    let e = certs::init(dir, &[]).unwrap_err().to_string();
    assert!(e.contains("ca.crt already exists"), "{e}");
    for bad in ["", "../w", "a/b", "-w", "w 1", &"x".repeat(129)] {
        let e = certs::worker(bad, dir).unwrap_err();
        assert!(matches!(e, Error::Identity(_)), "{bad:?}: {e}");
        assert!(!e.to_string().contains('\n'));
    }
    let t2 = tempfile::tempdir().unwrap();
    let e = certs::init(t2.path(), &["bad host".to_string()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"bad host\""), "{e}");
    // A CA key from another init does not pass for this ca.crt.
    let t3 = tempfile::tempdir().unwrap();
    certs::init(t3.path(), &[]).unwrap();
    std::fs::copy(t3.path().join("ca.key"), dir.join("ca.key")).unwrap();
    let e = certs::worker("w2", dir).unwrap_err().to_string();
    assert!(e.contains("is not the key of"), "{e}");
}

#[test]
fn identity_uris() {
    assert_eq!(
        Identity::from_uri("trellis://worker/h-1").unwrap(),
        Identity::worker("h-1")
    );
    assert_eq!(
        Identity::operator("alice").uri(),
        "trellis://operator/alice"
    );
    for bad in [
        "trellis://admin/alice",
        "trellis://viewer/",
        "trellis://viewer/a/b",
        "https://worker/w",
        "trellis://coordinator",
    ] {
        assert!(Identity::from_uri(bad).is_err(), "{bad}");
    }
}

#[test]
fn policy_table() {
    use Role::*;
    let c = |m: &str| required_role(&format!("/trellis.v1.ControlService/{m}"));
    for m in [
        "GetStatus",
        "ListWorkers",
        "GetLoss",
        "Watch",
        "ListCheckpoints",
        "Plan",
    ] {
        assert_eq!(c(m), Some(Viewer), "{m}");
    }
    for m in [
        "SubmitJob",
        "Grow",
        "Pause",
        "Resume",
        "SaveCheckpoint",
        "SomethingNew",
    ] {
        assert_eq!(c(m), Some(Operator), "{m}");
    }
    assert_eq!(
        required_role("/trellis.v1.WorkerService/Session"),
        Some(Worker)
    );
    assert_eq!(required_role("/grpc.health.v1.Health/Check"), None);
    assert_eq!(required_role("/other.Service/Do"), Some(Operator));

    let (v, o, w) = (
        Identity::viewer("v"),
        Identity::operator("o"),
        Identity::worker("w"),
    );
    let grow = "/trellis.v1.ControlService/Grow";
    let status = "/trellis.v1.ControlService/GetStatus";
    let session = "/trellis.v1.WorkerService/Session";
    assert!(o.authorize(grow).is_ok() && o.authorize(status).is_ok());
    assert!(o.authorize(session).is_err());
    assert!(v.authorize(status).is_ok());
    let s = v.authorize(grow).unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert!(
        s.message().contains("Grow needs role operator"),
        "{}",
        s.message()
    );
    assert!(w.authorize(session).is_ok());
    assert!(w.authorize(status).is_err() && w.authorize(grow).is_err());
    for id in [&v, &o, &w] {
        assert!(id.authorize("/grpc.health.v1.Health/Check").is_ok());
    }
}
