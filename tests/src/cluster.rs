//! A test's processes: a coordinator (or several), `trellis-worker`s and `coordctl`, all on
//! loopback and, by default, with mTLS on (issue #11): one CA and its certificates per test
//! (made with `trellis_auth::certs`), the coordinator with `--tls-cert/--tls-key/--client-ca`
//! and `--allowed-root`s (the corpus, the shared data cache, the test's directory), each worker
//! with its own worker certificate (its id `worker-N`), and `coordctl` and the tests' own gRPC
//! clients with the operator's. [`Cluster::plaintext`] starts everything without TLS instead.
//!
//! ```ignore
//! let mut cl = Cluster::new("grow");
//! let (_, c) = cl.start_job(&spec_text, &[]);
//! cl.worker(&c.endpoint, &[]);
//! wait_status(&c.endpoint, "training", LONG, |s| phase(s) == "training");
//! let out = coordctl(&c.endpoint, &["grow", "--factor", "2"]);
//! ```
use crate::{banner_field, bin, json, repo, run, wait_line, Proc};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The default bound of every wait for a process or a job state.
pub const LONG: Duration = Duration::from_secs(120);

/// The data cache every e2e job shares (`$TMPDIR/trellis-e2e-data-cache`), so the tokenizer is
/// trained once per machine; created if missing (it is an allowed root of TLS coordinators).
pub fn cache_dir() -> PathBuf {
    let d = std::env::temp_dir().join("trellis-e2e-data-cache");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One test's certificate directory: a CA, the coordinator's, operator's and viewer's
/// certificates (`trellis_auth::certs::init`), and worker certificates issued on demand.
#[derive(Debug, Clone)]
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// A new CA and its certificates in `dir` (created).
    pub fn init(dir: &Path) -> Certs {
        trellis_auth::certs::init(dir, &[])
            .unwrap_or_else(|e| panic!("certificates in {}: {e}", dir.display()));
        Certs {
            dir: dir.to_path_buf(),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join(trellis_auth::certs::CA_CERT)
    }

    /// `(certificate, key)` of `stem` (`coordinator`, `operator`, `viewer`, `worker-ID`).
    pub fn pair(&self, stem: &str) -> (PathBuf, PathBuf) {
        trellis_auth::certs::pair(&self.dir, stem)
    }

    /// Worker `id`'s certificate and key, issued by the CA the first time.
    pub fn worker(&self, id: &str) -> (PathBuf, PathBuf) {
        let (c, k) = self.pair(&trellis_auth::certs::worker_stem(id));
        if !c.exists() {
            trellis_auth::certs::worker(id, &self.dir)
                .unwrap_or_else(|e| panic!("worker certificate {id}: {e}"));
        }
        (c, k)
    }

    /// What a client presents with the certificate `stem` (`operator`, `viewer`, `worker-ID`).
    pub fn client(&self, stem: &str) -> ClientCerts {
        let (cert, key) = self.pair(stem);
        ClientCerts {
            ca: self.ca(),
            cert,
            key,
        }
    }
}

/// A client's mTLS files: the CA it trusts and the certificate and key it presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ClientCerts {
    /// tonic's client TLS config for these files.
    pub fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        trellis_auth::tls::client_tls(&self.ca, &self.cert, &self.key).unwrap()
    }
}

/// How a client reaches a coordinator: the URL (`https://…` with TLS, `http://…` without; a
/// comma-separated list for workers given several coordinators) and the certificate to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub tls: Option<ClientCerts>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl Endpoint {
    /// A plaintext endpoint (`http://ADDR`).
    pub fn plain(addr: &str) -> Endpoint {
        Endpoint {
            url: format!("http://{addr}"),
            tls: None,
        }
    }

    /// `ADDR` (`host:port`) with TLS as `tls` says.
    pub fn at(addr: &str, tls: Option<ClientCerts>) -> Endpoint {
        let scheme = if tls.is_some() { "https" } else { "http" };
        Endpoint {
            url: format!("{scheme}://{addr}"),
            tls,
        }
    }

    /// Several coordinators (for workers: `URL,URL`), with this endpoint's certificate.
    pub fn with_addrs(&self, addrs: &[&str]) -> Endpoint {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Endpoint {
            url: addrs
                .iter()
                .map(|a| format!("{scheme}://{a}"))
                .collect::<Vec<_>>()
                .join(","),
            tls: self.tls.clone(),
        }
    }

    /// The same coordinator, showing another certificate (e.g. the viewer's).
    pub fn as_client(&self, tls: ClientCerts) -> Endpoint {
        Endpoint {
            url: self.url.clone(),
            tls: Some(tls),
        }
    }

    /// `coordctl --endpoint URL [--ca … --cert … --key …]`, ready for more arguments.
    pub fn coordctl(&self) -> Command {
        let mut cmd = Command::new(bin("coordctl"));
        cmd.args(["--endpoint", &self.url]);
        if let Some(t) = &self.tls {
            cmd.arg("--ca")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.cert)
                .arg("--key")
                .arg(&t.key);
        }
        cmd
    }

    /// A gRPC channel to the coordinator (TLS with this endpoint's certificate when set).
    pub async fn channel(&self) -> tonic::transport::Channel {
        let mut ep = tonic::transport::Endpoint::from_shared(self.url.clone()).unwrap();
        if let Some(t) = &self.tls {
            ep = ep.tls_config(t.tonic()).unwrap();
        }
        ep.connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e:?}", self.url))
    }
}

/// A started coordinator: its index in [`Cluster::procs`], how clients reach it, and its
/// plaintext `/metrics` address.
pub struct Coord {
    pub idx: usize,
    pub endpoint: Endpoint,
    pub metrics: String,
}

/// The processes of one test; on a failing test, prints every log's tail.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub procs: Vec<Proc>,
    /// `None` for a plaintext cluster.
    pub certs: Option<Certs>,
    next_worker: usize,
}

impl Cluster {
    /// A test directory `trellis-e2e-NAME-*` and a new CA in its `certs/`: everything started
    /// from here runs with mTLS.
    pub fn new(name: &str) -> Cluster {
        let mut cl = Cluster::plaintext(name);
        cl.certs = Some(Certs::init(&cl.path("certs")));
        cl
    }

    /// A test directory, without certificates: coordinators, workers and clients in plaintext
    /// on loopback.
    pub fn plaintext(name: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix(&format!("trellis-e2e-{name}-"))
            .tempdir()
            .unwrap();
        Cluster {
            dir,
            procs: Vec::new(),
            certs: None,
            next_worker: 0,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn write_job(&self, file: &str, text: &str) -> PathBuf {
        let p = self.path(file);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// The operator's certificate (None in plaintext).
    pub fn operator(&self) -> Option<ClientCerts> {
        self.certs.as_ref().map(|c| c.client("operator"))
    }

    /// How a client reaches `addr` (`host:port`) with the operator's certificate.
    pub fn endpoint(&self, addr: &str) -> Endpoint {
        Endpoint::at(addr, self.operator())
    }

    /// The TLS and allowed-root flags of a coordinator of this cluster (none in plaintext):
    /// spec paths may use the corpus, the shared data cache and the test's directory.
    pub fn coordinator_security_args(&self) -> Vec<String> {
        let Some(certs) = &self.certs else {
            return Vec::new();
        };
        let (cert, key) = certs.pair("coordinator");
        let mut args = vec![
            "--tls-cert".to_string(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
            "--client-ca".into(),
            certs.ca().display().to_string(),
        ];
        for root in [
            repo().join("corpus"),
            cache_dir(),
            self.dir.path().canonicalize().unwrap(),
        ] {
            args.push("--allowed-root".into());
            args.push(root.display().to_string());
        }
        args
    }

    /// Write `job.toml` and start "coordinator" with it on the embedded store `store/`.
    pub fn start_job(&mut self, spec_text: &str, extra: &[&str]) -> (PathBuf, Coord) {
        let job = self.write_job("job.toml", spec_text);
        let store = format!("file:{}", self.path("store").display());
        let c = self.coordinator("coordinator", 0, &store, Some(&job), extra);
        (job, c)
    }

    /// Start a coordinator on `127.0.0.1:PORT` (0: any); returns its stdout lines (the banner
    /// comes once it serves). Heartbeat TTL 3 s; `extra` flags last.
    pub fn spawn_coordinator(
        &mut self,
        name: &str,
        port: u16,
        store: &str,
        job: Option<&Path>,
        extra: &[&str],
    ) -> (usize, mpsc::Receiver<String>) {
        let mut cmd = Command::new(bin("trellis-coordinator"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0", "--store", store])
            .args(["--heartbeat-ttl-secs", "3"])
            .args(self.coordinator_security_args())
            .args(extra)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
        if let Some(j) = job {
            cmd.arg("--job").arg(j);
        }
        let log = self.path(&format!("{name}.log"));
        let (p, rx) = Proc::spawn(name, &mut cmd, &log);
        self.procs.push(p);
        (self.procs.len() - 1, rx)
    }

    pub fn coordinator(
        &mut self,
        name: &str,
        port: u16,
        store: &str,
        job: Option<&Path>,
        extra: &[&str],
    ) -> Coord {
        let (idx, rx) = self.spawn_coordinator(name, port, store, job, extra);
        self.serving(idx, &rx)
    }

    /// Wait for coordinator `idx`'s banner.
    pub fn serving(&mut self, idx: usize, rx: &mpsc::Receiver<String>) -> Coord {
        let line = wait_line(rx, "trellis-coordinator listening", LONG);
        Coord {
            idx,
            endpoint: self.endpoint(&banner_field(&line, "grpc").unwrap()),
            metrics: banner_field(&line, "metrics").unwrap(),
        }
    }

    /// Start worker process N (`worker-N`, its certificate's id with TLS) against `endpoint`'s
    /// URL(s), with `env`; its per-step sample ids go to `samples-N.jsonl`. Returns its index
    /// in `procs`.
    pub fn worker(&mut self, endpoint: &Endpoint, env: &[(&str, String)]) -> usize {
        let i = self.next_worker;
        self.next_worker += 1;
        let mut cmd = Command::new(bin("trellis-worker"));
        cmd.args(["--coordinator", &endpoint.url, "--device", "cpu"])
            .env(
                "TRELLIS_SAMPLE_LOG",
                self.path(&format!("samples-{i}.jsonl")),
            )
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
        if let Some(certs) = &self.certs {
            let (cert, key) = certs.worker(&format!("worker-{i}"));
            cmd.arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key)
                .arg("--ca")
                .arg(certs.ca());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = self.path(&format!("worker-{i}.log"));
        let (p, _rx) = Proc::spawn(&format!("worker-{i}"), &mut cmd, &log);
        self.procs.push(p);
        self.procs.len() - 1
    }

    /// The sample log of worker process N (see [`Cluster::worker`]).
    pub fn sample_log(&self, worker: usize) -> Vec<Value> {
        std::fs::read_to_string(self.path(&format!("samples-{worker}.jsonl")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.procs {
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

/// `coordctl` against `endpoint` (with its certificate), 60 s at most.
pub fn coordctl(endpoint: &Endpoint, args: &[&str]) -> Output {
    run(endpoint.coordctl().args(args), Duration::from_secs(60))
}

/// `coordctl status` as JSON, or None when it failed.
pub fn status(endpoint: &Endpoint) -> Option<Value> {
    let out = coordctl(endpoint, &["--output", "json", "status"]);
    out.status.success().then(|| json(&out))
}

/// Poll `coordctl status` until `pred` holds; panics with the last status after `timeout`.
pub fn wait_status(
    endpoint: &Endpoint,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(s) = status(endpoint) {
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; last status: {}",
                last.map(|s| serde_json::to_string_pretty(&s).unwrap())
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A status's `phase`.
pub fn phase(s: &Value) -> &str {
    s["phase"].as_str().unwrap_or("")
}

/// A JSON number that must be a u64.
#[track_caller]
pub fn u(v: &Value) -> u64 {
    match v.as_u64() {
        Some(x) => x,
        None => panic!("not a u64: {v}"),
    }
}

/// A process's stderr, trimmed.
pub fn stderr_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// `coordctl` refused: the documented exit code and exactly one line on stderr holding
/// `needle`; returns the line.
#[track_caller]
pub fn refused(out: &Output, code: i32, needle: &str) -> String {
    let err = stderr_line(out);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    err
}

/// The tiny fp32 job the e2e tests train (absolute paths, the repo's tiny corpus, the shared
/// data cache). Fields a test does not set keep [`TinyJob::new`]'s values.
pub struct TinyJob<'a> {
    pub name: &'a str,
    pub dp: usize,
    pub max_steps: u64,
    pub global_batch: u64,
    /// 0: no evaluation.
    pub eval_interval: u64,
    pub eval_sequences: Option<u64>,
    pub ckpt: &'a Path,
    pub interval: u64,
    pub keep: usize,
    /// TOML appended verbatim (e.g. `[[growth]]` stages).
    pub extra: &'a str,
}

impl<'a> TinyJob<'a> {
    pub fn new(name: &'a str, ckpt: &'a Path) -> TinyJob<'a> {
        TinyJob {
            name,
            dp: 1,
            max_steps: 100,
            global_batch: 4,
            eval_interval: 0,
            eval_sequences: None,
            ckpt,
            interval: 10,
            keep: 3,
            extra: "",
        }
    }

    pub fn toml(&self) -> String {
        let corpus = repo().join("corpus/tiny");
        let eval_sequences = self
            .eval_sequences
            .map(|n| format!("eval_sequences = {n}\n"))
            .unwrap_or_default();
        format!(
            r#"[job]
name = "{name}"
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
precision = "fp32"
global_batch = {global_batch}
max_steps = {max_steps}
lr = 2e-3
min_lr = 2e-4
warmup_steps = 5
eval_interval = {eval_interval}
{eval_sequences}threads = 1

[checkpoint]
dir = "{ckpt}"
interval = {interval}
keep = {keep}

[parallel]
dp = {dp}
tp = 1
{extra}
"#,
            name = self.name,
            train = corpus.join("train.txt").display(),
            valid = corpus.join("valid.txt").display(),
            cache = cache_dir().display(),
            global_batch = self.global_batch,
            max_steps = self.max_steps,
            eval_interval = self.eval_interval,
            ckpt = self.ckpt.display(),
            interval = self.interval,
            keep = self.keep,
            dp = self.dp,
            extra = self.extra,
        )
    }
}
