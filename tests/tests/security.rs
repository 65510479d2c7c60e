//! Issue #11 end to end over real processes on loopback: a `trellis-coordinator` with mTLS and
//! allowed roots, two `trellis-worker`s with their own certificates training a real DP=2 job,
//! `coordctl` with operator / viewer / foreign / no certificates, an independent client
//! (Python `grpcio`), and a raw worker session claiming another worker's id. Certificates are
//! made by `coordctl certs`.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use trellis_proto::v1 as pb;
use trellis_tests::{banner_field, bin, json, repo, run, wait_line, Proc};

const LONG: Duration = Duration::from_secs(120);

fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("trellis-e2e-data-cache")
}

/// A tiny DP=2 job that runs for long enough to be poked at (the test ends it).
fn spec(train: &Path, ckpt: &Path) -> String {
    let corpus = repo().join("corpus/tiny");
    format!(
        r#"[job]
name = "secure"
seed = 7
[model]
preset = "tiny"
[data]
train = "{train}"
valid = "{valid}"
vocab_size = 512
seq_len = 32
cache_dir = "{cache}"
[train]
global_batch = 4
max_steps = 100000
lr = 2e-3
warmup_steps = 5
eval_interval = 0
threads = 1
[checkpoint]
dir = "{ckpt}"
interval = 20
keep = 2
[parallel]
dp = 2
tp = 1
"#,
        train = train.display(),
        valid = corpus.join("valid.txt").display(),
        cache = cache_dir().display(),
        ckpt = ckpt.display(),
    )
}

fn stderr_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// `coordctl --endpoint EP [--ca ca --cert C --key K] ARGS`.
fn coordctl(ep: &str, tls: &[&Path], args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("coordctl"));
    cmd.args(["--endpoint", ep]);
    for (flag, p) in ["--ca", "--cert", "--key"].iter().zip(tls) {
        cmd.arg(flag).arg(p);
    }
    run(cmd.args(args), Duration::from_secs(60))
}

/// One line on stderr, and the exit code.
fn refused(out: &Output, code: i32) -> String {
    let line = stderr_line(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit code; stdout {} stderr {line}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(line.lines().count(), 1, "one line: {line}");
    line
}

fn python() -> PathBuf {
    std::env::var("TRELLIS_PYTHON")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("TRELLIS_VENV").map(|v| PathBuf::from(v).join("bin/python")))
        .unwrap_or_else(|_| PathBuf::from("/root/.cache/trellis/venv-torch2.11.0/bin/python"))
}

/// An independent gRPC client (Python grpcio, its own TLS stack): calls `method` of
/// ControlService with an empty request; prints `OK <response bytes>` or `ERR <code> <details>`.
const GRPCIO: &str = r#"
import sys, grpc
target, ca, cert, key, method = sys.argv[1:6]
read = lambda p: open(p, "rb").read() if p else None
creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
ch = grpc.secure_channel(target, creds)
call = ch.unary_unary("/trellis.v1.ControlService/" + method,
                      request_serializer=lambda b: b, response_deserializer=lambda b: b)
try:
    r = call(b"", timeout=20)
    print("OK", r.hex())
except grpc.RpcError as e:
    print("ERR", e.code().name, e.details().replace("\n", " "))
"#;

fn grpcio(target: &str, ca: &Path, pair: Option<(&Path, &Path)>, method: &str) -> String {
    let (cert, key) = pair.map_or((String::new(), String::new()), |(c, k)| {
        (c.display().to_string(), k.display().to_string())
    });
    let out = run(
        Command::new(python()).arg("-c").arg(GRPCIO).args([
            target,
            &ca.display().to_string(),
            &cert,
            &key,
            method,
        ]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "python grpcio: {}", stderr_line(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The three paths of a certificate set, as `coordctl` takes them.
fn p(a: &[PathBuf; 3]) -> [&Path; 3] {
    [a[0].as_path(), a[1].as_path(), a[2].as_path()]
}

struct Procs(Vec<Proc>);

impl Drop for Procs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.0 {
                eprintln!(
                    "----- {} ({}) -----\n{}",
                    p.name,
                    p.log.display(),
                    p.tail(40)
                );
            }
        }
    }
}

#[test]
fn mtls_roles_worker_identities_and_confined_paths() {
    let tmp = tempfile::Builder::new()
        .prefix("trellis-e2e-security-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let (certs, other) = (dir.join("certs"), dir.join("other-ca"));
    for args in [
        vec!["certs", "init", certs.to_str().unwrap()],
        vec!["certs", "worker", "w0", certs.to_str().unwrap()],
        vec!["certs", "worker", "w1", certs.to_str().unwrap()],
        vec!["certs", "worker", "intruder", certs.to_str().unwrap()],
        vec!["certs", "init", other.to_str().unwrap()],
    ] {
        let out = run(Command::new(bin("coordctl")).args(&args), LONG);
        assert!(out.status.success(), "{args:?}: {}", stderr_line(&out));
    }
    let f = |d: &Path, name: &str| d.join(name);
    let ca = f(&certs, "ca.crt");
    let operator = [
        ca.as_path(),
        &f(&certs, "operator.crt"),
        &f(&certs, "operator.key"),
    ]
    .map(Path::to_path_buf);
    let viewer = [
        ca.as_path(),
        &f(&certs, "viewer.crt"),
        &f(&certs, "viewer.key"),
    ]
    .map(Path::to_path_buf);
    let foreign = [
        ca.as_path(),
        &f(&other, "operator.crt"),
        &f(&other, "operator.key"),
    ]
    .map(Path::to_path_buf);

    std::fs::create_dir_all(cache_dir()).unwrap();
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut procs = Procs(Vec::new());

    // Plaintext on a non-loopback address is refused without --insecure.
    let out = run(
        Command::new(bin("trellis-coordinator"))
            .args(["--listen", "0.0.0.0:0", "--metrics-listen", ""])
            .arg("--store")
            .arg(format!("file:{}", dir.join("store-plain").display())),
        LONG,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr_line(&out));
    let e = stderr_line(&out);
    assert!(e.contains("--insecure") && e.contains("--tls-cert"), "{e}");

    // The coordinator: mTLS, and job spec paths confined to the corpus, the cache and ckpt/.
    let mut cmd = Command::new(bin("trellis-coordinator"));
    cmd.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(format!("file:{}", dir.join("store").display()))
        .args(["--heartbeat-ttl-secs", "5"])
        .arg("--tls-cert")
        .arg(f(&certs, "coordinator.crt"))
        .arg("--tls-key")
        .arg(f(&certs, "coordinator.key"))
        .arg("--client-ca")
        .arg(&ca)
        .arg("--allowed-root")
        .arg(repo().join("corpus"))
        .arg("--allowed-root")
        .arg(cache_dir())
        .arg("--allowed-root")
        .arg(&ckpt);
    let (c, rx) = Proc::spawn("coordinator", &mut cmd, &dir.join("coordinator.log"));
    procs.0.push(c);
    let line = wait_line(&rx, "trellis-coordinator listening", LONG);
    let addr = banner_field(&line, "grpc").unwrap();
    let ep = format!("https://{addr}");

    // (d) A spec path outside the allowed roots: refused at submit, one line naming it.
    let bad = dir.join("outside.toml");
    std::fs::write(&bad, spec(Path::new("/etc/passwd"), &ckpt)).unwrap();
    let out = coordctl(
        &ep,
        &p(&operator),
        &["job", "submit", bad.to_str().unwrap()],
    );
    let e = refused(&out, 1);
    assert!(
        e.contains("/etc/passwd") && e.contains("allowed roots") && e.contains("data.train"),
        "{e}"
    );
    assert!(
        e.contains(&ckpt.display().to_string()),
        "names the roots: {e}"
    );

    // The operator submits the real job; two workers with their own certificates train it.
    let good = dir.join("job.toml");
    std::fs::write(&good, spec(&repo().join("corpus/tiny/train.txt"), &ckpt)).unwrap();
    let out = coordctl(
        &ep,
        &p(&operator),
        &["job", "submit", good.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "operator submit: {}",
        stderr_line(&out)
    );
    for id in ["w0", "w1"] {
        let mut cmd = Command::new(bin("trellis-worker"));
        cmd.args(["--coordinator", &ep, "--device", "cpu"])
            .arg("--tls-cert")
            .arg(f(&certs, &format!("worker-{id}.crt")))
            .arg("--tls-key")
            .arg(f(&certs, &format!("worker-{id}.key")))
            .arg("--ca")
            .arg(&ca);
        let (w, _rx) = Proc::spawn(id, &mut cmd, &dir.join(format!("{id}.log")));
        procs.0.push(w);
    }
    let status = |cert: &[PathBuf; 3]| -> Option<Value> {
        let out = coordctl(&ep, &p(cert), &["--output", "json", "status"]);
        out.status.success().then(|| json(&out))
    };
    let wait = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(s) = status(&viewer) {
                if pred(&s) {
                    return s;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}: {s}"
                );
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // Training under mTLS, past a checkpoint (its commit dir passed the coordinator's check).
    let s0 = wait("DP=2 training past a checkpoint", &|s| {
        s["phase"] == "training"
            && s["step"].as_u64().unwrap() >= 25
            && !s["checkpoints"].as_array().unwrap().is_empty()
    });
    assert_eq!(s0["workers"]["active"], 2, "{s0}");
    let workers = coordctl(&ep, &p(&viewer), &["--output", "json", "workers"]);
    assert!(workers.status.success(), "{}", stderr_line(&workers));
    let ids: Vec<String> = json(&workers)
        .as_array()
        .expect("a JSON array of workers")
        .iter()
        .map(|w| w["worker_id"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ["w0", "w1"], "worker ids are the certificates'");

    // (a) coordctl: no client certificate, another CA's, a viewer growing: refused.
    let out = coordctl(&ep, &[ca.as_path()], &["status"]);
    let e = refused(&out, 1);
    assert!(e.contains("TLS handshake"), "{e}");
    let out = coordctl(&ep, &p(&foreign), &["status"]);
    let e = refused(&out, 1);
    assert!(e.contains("TLS handshake"), "{e}");
    let out = coordctl(&ep, &p(&viewer), &["grow", "--factor", "2"]);
    let e = refused(&out, 1);
    assert!(
        e.contains("Grow needs role operator") && e.contains("viewer"),
        "{e}"
    );
    let out = coordctl(&ep, &p(&viewer), &["pause"]);
    assert!(refused(&out, 1).contains("needs role operator"));

    // (b) The same with an independent client (grpcio).
    let target = addr.clone();
    let r = grpcio(&target, &ca, None, "GetStatus");
    assert!(r.starts_with("ERR UNAVAILABLE"), "no certificate: {r}");
    let r = grpcio(
        &target,
        &ca,
        Some((&f(&other, "viewer.crt"), &f(&other, "viewer.key"))),
        "GetStatus",
    );
    assert!(r.starts_with("ERR UNAVAILABLE"), "another CA: {r}");
    let vpair = (f(&certs, "viewer.crt"), f(&certs, "viewer.key"));
    let r = grpcio(&target, &ca, Some((&vpair.0, &vpair.1)), "GetStatus");
    let hex_name: String = "secure".bytes().map(|b| format!("{b:02x}")).collect();
    assert!(
        r.starts_with("OK ") && r.contains(&hex_name),
        "viewer GetStatus: {r}"
    );
    let r = grpcio(&target, &ca, Some((&vpair.0, &vpair.1)), "Grow");
    assert!(
        r.starts_with("ERR PERMISSION_DENIED") && r.contains("needs role operator"),
        "viewer Grow: {r}"
    );

    // (c) A raw worker session: certificate "intruder" claiming w0 (a running worker) and w9.
    let rt = tokio::runtime::Runtime::new().unwrap();
    for claimed in ["w0", "w9"] {
        let status = rt.block_on(async {
            let tls = trellis_auth::tls::client_tls(
                &ca,
                &f(&certs, "worker-intruder.crt"),
                &f(&certs, "worker-intruder.key"),
            )
            .unwrap();
            let ch = tonic::transport::Endpoint::from_shared(ep.clone())
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = pb::worker_service_client::WorkerServiceClient::new(ch);
            let hello = pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
                    worker_id: claimed.into(),
                    host: "0".into(),
                    pid: 1,
                    device: "cpu".into(),
                    ring_address: "127.0.0.1:1".into(),
                    tp_ring_address: "127.0.0.1:2".into(),
                    ..Default::default()
                })),
            };
            client
                .session(tokio_stream::iter(vec![hello]))
                .await
                .map(|_| ())
                .expect_err("a session as another worker id was accepted")
        });
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        let m = status.message();
        assert!(
            m.contains(&format!("{claimed:?}")) && m.contains("\"intruder\""),
            "names both ids: {m}"
        );
    }

    // A real worker process whose certificate is "intruder" but which claims w0: refused at
    // once, and it exits instead of retrying.
    let out = run(
        Command::new(bin("trellis-worker"))
            .args([
                "--coordinator",
                &ep,
                "--device",
                "cpu",
                "--give-up-after",
                "30",
            ])
            .arg("--tls-cert")
            .arg(f(&certs, "worker-intruder.crt"))
            .arg("--tls-key")
            .arg(f(&certs, "worker-intruder.key"))
            .arg("--ca")
            .arg(&ca)
            .env("TRELLIS_WORKER_ID", "w0"),
        LONG,
    );
    assert!(!out.status.success(), "the impostor worker ran");
    let e = stderr_line(&out);
    assert!(
        e.contains("rejected") && e.contains("\"w0\"") && e.contains("\"intruder\""),
        "{e}"
    );

    // The operator's certificate works (pause, resume); the job was never disturbed by the
    // refusals (no rollback, no new epoch, no growth, both workers still active) and trains on.
    let out = coordctl(&ep, &p(&operator), &["pause"]);
    assert!(
        out.status.success(),
        "operator pause: {}",
        stderr_line(&out)
    );
    wait("paused by the operator", &|s| s["phase"] == "paused");
    let out = coordctl(&ep, &p(&operator), &["resume"]);
    assert!(
        out.status.success(),
        "operator resume: {}",
        stderr_line(&out)
    );
    let s1 = wait("training on after the refusals", &|s| {
        s["step"].as_u64().unwrap() >= s0["step"].as_u64().unwrap() + 20
    });
    for k in ["epoch", "generation", "layers", "rollbacks"] {
        assert_eq!(s1[k], s0[k], "{k} changed: {s1}");
    }
    assert_eq!(s1["phase"], "training", "{s1}");
    assert_eq!(s1["workers"]["active"], 2, "{s1}");
    assert!(s1["growth_history"].as_array().unwrap().is_empty(), "{s1}");
    eprintln!(
        "security e2e: DP=2 under mTLS at step {} (epoch {}, 0 rollbacks) after every refusal",
        s1["step"], s1["epoch"]
    );
}
