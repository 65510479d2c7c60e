//! Test harness (feature `testing`): a real, throwaway `etcd` server on free loopback ports.
//!
//! ```ignore
//! let etcd = trellis_store::testing::EtcdServer::start().expect("etcd");
//! let store = trellis_store::StoreSpec::parse(&etcd.spec())?.open().await?;
//! ```
//! The server (and its data dir) is killed and removed when the guard drops.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the harness waits for etcd to answer `/health` (2 busy cores: generous).
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// TLS on etcd's client port: its server certificate and key, and, when `client_ca` is set,
/// client certificates required (`--client-cert-auth`) and checked against it.
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

pub struct EtcdServer {
    child: Child,
    client_url: String,
    _data: tempfile::TempDir,
}

/// The etcd binary: `$TRELLIS_ETCD`, `/usr/bin/etcd`, or `etcd` on PATH.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TRELLIS_ETCD") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let usr = PathBuf::from("/usr/bin/etcd");
    if usr.is_file() {
        return Some(usr);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn healthy(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl EtcdServer {
    /// Start etcd on free loopback ports and wait until it is healthy. The error says what to
    /// do (install `etcd-server`, or what etcd printed).
    pub fn start() -> Result<EtcdServer, String> {
        Self::start_with(None)
    }

    /// [`EtcdServer::start`] with TLS on the client port (`https://127.0.0.1:PORT`); health is
    /// read from a plain-HTTP metrics port.
    pub fn start_tls(tls: EtcdServerTls) -> Result<EtcdServer, String> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdServerTls>) -> Result<EtcdServer, String> {
        let bin = etcd_binary().ok_or_else(|| {
            "etcd not found (looked at $TRELLIS_ETCD, /usr/bin/etcd and PATH); these tests need a \
             real etcd server: apt-get install etcd-server"
                .to_string()
        })?;
        let mut last = String::new();
        // A free port can be taken between probing and binding: retry a few times.
        for _ in 0..3 {
            match Self::try_start(&bin, tls.as_ref()) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn try_start(bin: &PathBuf, tls: Option<&EtcdServerTls>) -> Result<EtcdServer, String> {
        let data = tempfile::Builder::new()
            .prefix("trellis-etcd-")
            .tempdir()
            .map_err(|e| format!("create a temp dir for etcd: {e}"))?;
        let (cport, pport, mport) = (
            free_port().map_err(|e| e.to_string())?,
            free_port().map_err(|e| e.to_string())?,
            free_port().map_err(|e| e.to_string())?,
        );
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{cport}");
        // /health over plain HTTP: the client port itself with TLS off, a metrics port with it on.
        let health_port = if tls.is_some() { mport } else { cport };
        let peer_url = format!("http://127.0.0.1:{pport}");
        let log_path = data.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("etcd log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("etcd log: {e}"))?;
        let mut cmd = Command::new(bin);
        if let Some(t) = tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--listen-metrics-urls")
                .arg(format!("http://127.0.0.1:{mport}"));
            if let Some(ca) = &t.client_ca {
                cmd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(ca);
            }
        }
        let mut child = cmd
            .arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("default={peer_url}"))
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("start {}: {e}", bin.display()))?;
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        loop {
            if healthy(health_port) {
                return Ok(EtcdServer {
                    child,
                    client_url,
                    _data: data,
                });
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let out = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: String = out
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(format!(
                    "etcd ({}) {} on {client_url}; its log:\n{tail}",
                    bin.display(),
                    match exited {
                        Some(st) => format!("exited ({st})"),
                        None => format!("did not become healthy within {ETCD_START_TIMEOUT:?}"),
                    }
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS)
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// The coordinator's `--store` value for this server.
    pub fn spec(&self) -> String {
        format!("etcd:{}", self.client_url)
    }

    /// The server's process id (e.g. to SIGSTOP it: an etcd outage that keeps its data).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kill the server now (e.g. to test an unreachable store).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
