//! A real tonic server with mTLS on loopback (the health service behind [`AuthLayer`]) and real
//! clients with certificates from `trellis_auth::certs`.
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use trellis_auth::{certs, tls, AuthLayer, Identity};

struct Fixture {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    dir: std::path::PathBuf,
    other: std::path::PathBuf,
    port: u16,
    seen: Arc<Mutex<Vec<Identity>>>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

/// A CA with its certificates and a worker's, another CA, and a server using the first.
async fn start() -> Fixture {
    let d = tempfile::tempdir().unwrap();
    let o = tempfile::tempdir().unwrap();
    let (dir, other) = (d.path().join("certs"), o.path().join("certs"));
    certs::init(&dir, &[]).unwrap();
    certs::worker("host-a-1234", &dir).unwrap();
    certs::init(&other, &[]).unwrap();
    certs::worker("host-a-1234", &other).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (cert, key) = certs::pair(&dir, certs::COORDINATOR);
    let server_tls = tls::server_tls(&cert, &key, &dir.join(certs::CA_CERT)).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = {
        let seen = seen.clone();
        move |req: tonic::Request<()>| {
            let id = trellis_auth::request_identity(&req).cloned();
            seen.lock().unwrap().extend(id);
            Ok(req)
        }
    };
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let router = Server::builder()
        .tls_config(server_tls)
        .unwrap()
        .layer(AuthLayer)
        .layer(tonic::service::InterceptorLayer::new(record))
        .add_service(health);
    tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Fixture {
        _dirs: (d, o),
        dir,
        other,
        port,
        seen,
        _shutdown: tx,
    }
}

impl Fixture {
    /// A client trusting this job's CA with certificate `stem` from `dir`.
    fn client_tls(&self, dir: &Path, stem: &str) -> ClientTlsConfig {
        let (c, k) = certs::pair(dir, stem);
        tls::client_tls(&self.dir.join(certs::CA_CERT), &c, &k).unwrap()
    }

    async fn channel(&self, cfg: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .tls_config(cfg)
            .unwrap()
            .connect()
            .await
    }

    /// Connect and call health Check: the error as text if either fails.
    async fn health(&self, cfg: ClientTlsConfig) -> Result<(), String> {
        let ch = self.channel(cfg).await.map_err(|e| format!("{e:?}"))?;
        HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| format!("{s:?}"))
    }

    fn seen(&self) -> Vec<Identity> {
        self.seen.lock().unwrap().clone()
    }
}

/// A unary call to any method path (the server has only health: a call that passes the
/// policy ends UNIMPLEMENTED).
async fn call(ch: &Channel, path: &'static str) -> tonic::Status {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    g.unary(
        tonic::Request::new(HealthCheckRequest::default()),
        http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .expect_err("the test server has no such method")
}

const GROW: &str = "/trellis.v1.ControlService/Grow";
const STATUS: &str = "/trellis.v1.ControlService/GetStatus";
const SESSION: &str = "/trellis.v1.WorkerService/Session";

#[tokio::test]
async fn no_client_certificate_fails_the_handshake() {
    let f = start().await;
    let ca =
        tonic::transport::Certificate::from_pem(std::fs::read(f.dir.join(certs::CA_CERT)).unwrap());
    // Trusts the server, presents nothing.
    let r = f.health(ClientTlsConfig::new().ca_certificate(ca)).await;
    let e = r.expect_err("a client without a certificate was served");
    // The server ends the TLS handshake with an alert; no gRPC status comes from the service.
    assert!(e.contains("CertificateRequired"), "{e}");
    assert!(!e.contains("PermissionDenied"), "refused too late: {e}");
    assert!(f.seen().is_empty(), "a request reached the service");
}

#[tokio::test]
async fn certificate_from_another_ca_fails_the_handshake() {
    let f = start().await;
    for stem in [certs::OPERATOR, certs::VIEWER, "worker-host-a-1234"] {
        let e = f
            .health(f.client_tls(&f.other.clone(), stem))
            .await
            .expect_err("a certificate of another CA was served");
        assert!(
            !e.contains("PermissionDenied"),
            "{stem}: refused too late: {e}"
        );
        assert!(e.contains("alert"), "{stem}: not a TLS refusal: {e}");
    }
    assert!(f.seen().is_empty(), "a request reached the service");
    // And the same names from the right CA work.
    f.health(f.client_tls(&f.dir.clone(), certs::OPERATOR))
        .await
        .unwrap();
    assert_eq!(f.seen(), vec![Identity::operator("operator")]);
}

#[tokio::test]
async fn server_from_another_ca_is_not_trusted() {
    let f = start().await;
    let (c, k) = certs::pair(&f.dir, certs::OPERATOR);
    let cfg = tls::client_tls(&f.other.join(certs::CA_CERT), &c, &k).unwrap();
    let e = f.health(cfg).await.expect_err("trusted a foreign server");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}

#[tokio::test]
async fn viewer_identity_and_role() {
    let f = start().await;
    let cfg = f.client_tls(&f.dir.clone(), certs::VIEWER);
    f.health(cfg.clone()).await.unwrap();
    assert_eq!(f.seen(), vec![Identity::viewer("viewer")]);
    let ch = f.channel(cfg).await.unwrap();
    let s = call(&ch, GROW).await;
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("Grow needs role operator"), "{s:?}");
    assert!(s.message().contains("viewer \"viewer\""), "{s:?}");
    // A read is allowed (and then unimplemented by this test server).
    assert_eq!(call(&ch, STATUS).await.code(), tonic::Code::Unimplemented);
    assert_eq!(
        call(&ch, SESSION).await.code(),
        tonic::Code::PermissionDenied
    );
}

#[tokio::test]
async fn operator_identity_and_role() {
    let f = start().await;
    let cfg = f.client_tls(&f.dir.clone(), certs::OPERATOR);
    f.health(cfg.clone()).await.unwrap();
    assert_eq!(f.seen(), vec![Identity::operator("operator")]);
    let ch = f.channel(cfg).await.unwrap();
    assert_eq!(call(&ch, GROW).await.code(), tonic::Code::Unimplemented);
    assert_eq!(call(&ch, STATUS).await.code(), tonic::Code::Unimplemented);
    let s = call(&ch, SESSION).await;
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("needs role worker"), "{s:?}");
}

#[tokio::test]
async fn worker_identity_names_its_id() {
    let f = start().await;
    let cfg = f.client_tls(&f.dir.clone(), "worker-host-a-1234");
    f.health(cfg.clone()).await.unwrap();
    let seen = f.seen();
    assert_eq!(seen, vec![Identity::worker("host-a-1234")]);
    assert_eq!(seen[0].worker_id(), Some("host-a-1234"));
    let ch = f.channel(cfg).await.unwrap();
    assert_eq!(call(&ch, SESSION).await.code(), tonic::Code::Unimplemented);
    for path in [GROW, STATUS] {
        let s = call(&ch, path).await;
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{path}: {s:?}");
    }
}

#[tokio::test]
async fn mismatched_files_are_refused_when_loaded() {
    let t = tempfile::tempdir().unwrap();
    certs::init(t.path(), &[]).unwrap();
    let (crt, _) = certs::pair(t.path(), certs::COORDINATOR);
    let (_, other_key) = certs::pair(t.path(), certs::OPERATOR);
    let ca = t.path().join(certs::CA_CERT);
    // A key that is not the certificate's: the server refuses to start with it.
    let cfg = tls::server_tls(&crt, &other_key, &ca).unwrap();
    let e = Server::builder().tls_config(cfg).err();
    assert!(
        e.is_some(),
        "a server started with another certificate's key"
    );
    // Swapped files and missing files are named.
    let e = tls::server_tls(&other_key, &crt, &ca)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--tls-cert") && e.contains("operator.key"),
        "{e}"
    );
    let e = tls::client_tls(&t.path().join("nope.crt"), &crt, &other_key)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--ca") && e.contains("nope.crt"), "{e}");
}
