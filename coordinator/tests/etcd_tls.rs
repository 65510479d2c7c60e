//! The coordinator's etcd client over TLS (`--etcd-ca/--etcd-cert/--etcd-key`) against a real
//! etcd that requires client certificates (`--client-cert-auth`). The certificates come from
//! `trellis_auth::certs` (`coordctl certs init` + `certs etcd`).
mod common;
use common::*;
use trellis_coordinator::security::etcd_tls;
use trellis_coordinator::server::start;
use trellis_coordinator::CoordinatorConfig;
use trellis_proto::v1 as pb;
use trellis_store::testing::{EtcdServer, EtcdServerTls};
use trellis_store::StoreSpec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_keeps_its_state_in_an_etcd_that_requires_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    trellis_auth::certs::init(&certs, &[]).unwrap();
    trellis_auth::certs::etcd(&certs, &[]).unwrap();
    let other = dir.path().join("other-ca");
    trellis_auth::certs::init(&other, &[]).unwrap();
    let f = |d: &std::path::Path, n: &str| d.join(n);
    let etcd = EtcdServer::start_tls(EtcdServerTls {
        cert: f(&certs, "etcd-server.crt"),
        key: f(&certs, "etcd-server.key"),
        client_ca: Some(f(&certs, "ca.crt")),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(etcd.client_url().starts_with("https://"));
    let spec = StoreSpec::parse(&etcd.spec()).unwrap();
    let cfg = CoordinatorConfig {
        store: etcd.spec(),
        etcd_ca: Some(f(&certs, "ca.crt")),
        etcd_cert: Some(f(&certs, "etcd-client.crt")),
        etcd_key: Some(f(&certs, "etcd-client.key")),
        verify_checkpoints: false,
        checkpoint_root: Some(dir.path().join("ckpt")),
        ..config()
    };

    // With the CA and a client certificate: the coordinator opens its state in etcd, a job is
    // submitted, and a new coordinator (a new etcd client) recovers it.
    let store = spec
        .open_with(etcd_tls(&cfg, &spec).unwrap())
        .await
        .unwrap();
    let co = start(&cfg, store).await.unwrap();
    let mut c = control(co.grpc_addr).await;
    submit(&mut c, &spec_text()).await;
    co.stop().await;
    let store = spec
        .open_with(etcd_tls(&cfg, &spec).unwrap())
        .await
        .unwrap();
    let co = start(&cfg, store).await.unwrap();
    let mut c = control(co.grpc_addr).await;
    let s = c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.job_id, "tls",
        "the job was recovered from etcd over TLS: {s:?}"
    );
    co.stop().await;

    // Without a client certificate, or trusting another CA: etcd cannot be used; one error
    // naming the etcd URL.
    for (what, cfg) in [
        (
            "no client certificate",
            CoordinatorConfig {
                etcd_cert: None,
                etcd_key: None,
                ..cfg.clone()
            },
        ),
        (
            "another CA",
            CoordinatorConfig {
                etcd_ca: Some(f(&other, "ca.crt")),
                ..cfg.clone()
            },
        ),
    ] {
        let tls = etcd_tls(&cfg, &spec).unwrap();
        let e = match spec.open_with(tls).await {
            Ok(_) => panic!("{what}: connected to etcd"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(etcd.client_url()), "{what}: {e}");
        assert!(!e.contains('\n'), "{what}: one line: {e}");
    }
    // An https:// store without --etcd-ca is refused before any connection.
    let e = etcd_tls(&config(), &spec).unwrap_err().to_string();
    assert!(e.contains("--etcd-ca"), "{e}");
}

fn spec_text() -> String {
    spec("tls", 1, 10, 0, "")
}
