//! The coordinator's `ControlService`: connect, then one function per RPC. Every gRPC failure
//! becomes a [`Failure`] here, with its exit code (1 refused, including a refused TLS handshake
//! and PERMISSION_DENIED, 3 unreachable / retryable).
use crate::Failure;
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use trellis_proto as pb;
use trellis_proto::control_service_client::ControlServiceClient;

pub struct Client {
    inner: ControlServiceClient<Channel>,
    url: String,
    timeout: Duration,
}

/// `host:port` without a scheme means `http://host:port`; `https://` needs `tls` (mTLS with
/// `--ca`, `--cert`, `--key`), and `tls` needs `https://`.
pub fn normalize_endpoint(url: &str, tls: bool) -> Result<String, Failure> {
    let url = url.trim();
    let url = if url.contains("://") {
        url.to_string()
    } else if tls {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    };
    let example = if tls {
        "https://127.0.0.1:50051"
    } else {
        "http://127.0.0.1:50051"
    };
    match (url.split_once("://").map(|(s, _)| s), tls) {
        (Some("http"), false) | (Some("https"), true) => {}
        (Some("https"), false) => {
            return Err(Failure::invalid(format!(
                "--endpoint {url} is TLS: give the job's CA and a client certificate with --ca, \
                 --cert and --key (or TRELLIS_CA, TRELLIS_CERT, TRELLIS_KEY; `coordctl certs init`)"
            )))
        }
        (Some("http"), true) => {
            return Err(Failure::invalid(format!(
                "--endpoint {url} is plaintext but --ca/--cert/--key are set: use https://{}",
                url.trim_start_matches("http://")
            )))
        }
        _ => {
            return Err(Failure::invalid(format!(
                "--endpoint '{url}' is not an http:// or https:// URL; use e.g. {example}"
            )))
        }
    }
    Endpoint::from_shared(url.clone()).map_err(|e| {
        Failure::invalid(format!(
            "--endpoint '{url}' is not a valid URL ({e}); use e.g. {example}"
        ))
    })?;
    Ok(url)
}

/// A TLS handshake the coordinator (or this client) refused: no, or an untrusted, certificate.
/// Exit 1 (refused), not 3: retrying with the same certificate cannot succeed (see also
/// [`Client::check_tls`]).
fn tls_refusal(url: &str, cause: &str) -> Option<Failure> {
    let tls = url.starts_with("https://")
        && [
            "alert",
            "certificate",
            "handshake",
            "tls",
            "operation was canceled",
        ]
        .iter()
        .any(|w| cause.contains(w));
    tls.then(|| {
        Failure::refused(format!(
            "the TLS handshake with the coordinator at {url} failed or was refused ({cause}); \
             use --ca, --cert and --key issued by this job's CA (`coordctl certs`)"
        ))
    })
}

/// The innermost cause of an error, short and lowercase ("connection refused").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let s = cur.to_string();
    let s = match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    };
    s.to_lowercase()
}

fn unreachable_message(url: &str, cause: &str) -> String {
    format!(
        "cannot reach the coordinator at {url} ({cause}); is trellis-coordinator running? set --endpoint or TRELLIS_ENDPOINT"
    )
}

impl Client {
    pub async fn connect(
        url: &str,
        timeout: Duration,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Client, Failure> {
        let url = normalize_endpoint(url, tls.is_some())?;
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Failure::invalid(format!("--endpoint '{url}': {e}")))?
            .connect_timeout(timeout.min(Duration::from_secs(10)));
        if let Some(t) = tls {
            endpoint = endpoint
                .tls_config(t)
                .map_err(|e| Failure::invalid(format!("--ca/--cert/--key: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            let cause = root_cause(&e);
            tls_refusal(&url, &cause)
                .unwrap_or_else(|| Failure::unreachable(unreachable_message(&url, &cause)))
        })?;
        let mut client = Client {
            inner: ControlServiceClient::new(channel),
            url,
            timeout,
        };
        if client.url.starts_with("https://") {
            client.check_tls().await?;
        }
        Ok(client)
    }

    /// With TLS 1.3 the client finishes its side of the handshake before the server checks
    /// the client's certificate, so a refused certificate surfaces only as the first call
    /// failing in transport (broken pipe, cancelled, reset), not as a gRPC status. Make that
    /// first call here (a status read): a transport failure right after connecting is the
    /// refused handshake (exit 1); any answer from the coordinator, even a refusal, is fine.
    async fn check_tls(&mut self) -> Result<(), Failure> {
        let req = self.request(pb::GetStatusRequest::default());
        match self.inner.get_status(req).await {
            Err(s) if std::error::Error::source(&s).is_some() => {
                let cause = root_cause(&s);
                Err(Failure::refused(format!(
                    "the TLS handshake with the coordinator at {} failed or was refused ({cause}); \
                     use --ca, --cert and --key issued by this job's CA (`coordctl certs`)",
                    self.url
                )))
            }
            _ => Ok(()),
        }
    }

    /// A request with the timeout and, when this coordctl exports traces, the W3C
    /// `traceparent` of its command span (the coordinator's spans become its children).
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        for (k, v) in trellis_telemetry::inject(&tracing::Span::current()) {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
                v.parse(),
            ) {
                r.metadata_mut().insert(k, v);
            }
        }
        r
    }

    /// Map a gRPC status to an exit code and one actionable line. `what` names the request.
    fn fail(&self, what: &str, s: Status) -> Failure {
        let msg = s.message().trim().replace('\n', " ");
        match s.code() {
            Code::Unavailable => {
                let cause = if msg.is_empty() { "unavailable".to_string() } else { msg };
                let cause = match std::error::Error::source(&s) {
                    Some(_) => format!("{cause}: {}", root_cause(&s)),
                    None => cause,
                };
                tls_refusal(&self.url, &cause.to_lowercase())
                    .unwrap_or_else(|| Failure::unreachable(unreachable_message(&self.url, &cause)))
            }
            Code::DeadlineExceeded | Code::Cancelled if s.code() == Code::DeadlineExceeded || msg.to_lowercase().contains("timeout") => Failure::unreachable(format!(
                "{what}: no answer from the coordinator at {} within {}s; retry, or raise --timeout",
                self.url,
                self.timeout.as_secs_f64()
            )),
            Code::Cancelled => Failure::unreachable(format!(
                "{what}: the call to {} was cancelled ({msg}); retry",
                self.url
            )),
            Code::Unknown if std::error::Error::source(&s).is_some() => {
                let cause = root_cause(&s);
                tls_refusal(&self.url, &cause)
                    .unwrap_or_else(|| Failure::unreachable(unreachable_message(&self.url, &cause)))
            }
            Code::Unimplemented => Failure::refused(format!(
                "{what}: the coordinator at {} does not implement it ({msg}); is it the same Trellis version as coordctl?",
                self.url
            )),
            code => {
                let msg = if msg.is_empty() {
                    format!("{code:?} (no message)")
                } else {
                    msg
                };
                Failure::refused(format!("the coordinator refused {what}: {msg}"))
            }
        }
    }

    pub async fn submit_job(
        &mut self,
        spec_toml: String,
        base_dir: String,
    ) -> Result<pb::SubmitJobResponse, Failure> {
        let req = self.request(pb::SubmitJobRequest {
            spec_toml,
            base_dir,
        });
        let r = self.inner.submit_job(req).await;
        r.map(|r| r.into_inner())
            .map_err(|s| self.fail("job submit", s))
    }

    pub async fn get_status(&mut self) -> Result<pb::JobStatus, Failure> {
        let req = self.request(pb::GetStatusRequest::default());
        let r = self.inner.get_status(req).await;
        r.map(|r| r.into_inner())
            .map_err(|s| self.fail("status", s))
    }

    pub async fn list_workers(&mut self) -> Result<pb::ListWorkersResponse, Failure> {
        let req = self.request(pb::ListWorkersRequest::default());
        let r = self.inner.list_workers(req).await;
        r.map(|r| r.into_inner())
            .map_err(|s| self.fail("workers", s))
    }

    pub async fn grow(&mut self, msg: pb::GrowRequest) -> Result<pb::GrowResponse, Failure> {
        let req = self.request(msg);
        let r = self.inner.grow(req).await;
        r.map(|r| r.into_inner()).map_err(|s| self.fail("grow", s))
    }

    pub async fn pause(&mut self) -> Result<pb::PauseResponse, Failure> {
        let req = self.request(pb::PauseRequest::default());
        let r = self.inner.pause(req).await;
        r.map(|r| r.into_inner()).map_err(|s| self.fail("pause", s))
    }

    pub async fn resume(&mut self) -> Result<pb::ResumeResponse, Failure> {
        let req = self.request(pb::ResumeRequest::default());
        let r = self.inner.resume(req).await;
        r.map(|r| r.into_inner())
            .map_err(|s| self.fail("resume", s))
    }

    pub async fn save_checkpoint(&mut self) -> Result<pb::SaveCheckpointResponse, Failure> {
        let req = self.request(pb::SaveCheckpointRequest::default());
        let r = self.inner.save_checkpoint(req).await;
        r.map(|r| r.into_inner())
            .map_err(|s| self.fail("checkpoint save", s))
    }

    pub async fn list_checkpoints(&mut self) -> Result<pb::ListCheckpointsResponse, Failure> {
        let req = self.request(pb::ListCheckpointsRequest::default());
        let r = self.inner.list_checkpoints(req).await;
        r.map(|r| r.into_inner())
            .map_err(|s| self.fail("checkpoint list", s))
    }

    pub async fn get_loss(&mut self, max_points: u32) -> Result<pb::GetLossResponse, Failure> {
        let req = self.request(pb::GetLossRequest {
            job_id: String::new(),
            max_points,
        });
        let r = self.inner.get_loss(req).await;
        r.map(|r| r.into_inner()).map_err(|s| self.fail("loss", s))
    }

    /// The server-side guideline (the CLI's `plan` computes it locally; kept for parity checks).
    #[allow(dead_code)]
    pub async fn plan(&mut self, msg: pb::PlanRequest) -> Result<pb::PlanResponse, Failure> {
        let req = self.request(msg);
        let r = self.inner.plan(req).await;
        r.map(|r| r.into_inner()).map_err(|s| self.fail("plan", s))
    }

    /// Open the status stream (no deadline: it lives until the job ends or Ctrl-C).
    pub async fn watch(&mut self) -> Result<tonic::Streaming<pb::JobStatus>, Failure> {
        let r = self.inner.watch(pb::WatchRequest::default()).await;
        r.map(|r| r.into_inner()).map_err(|s| self.fail("watch", s))
    }

    /// A failure while reading the watch stream.
    pub fn stream_failure(&self, s: Status) -> Failure {
        self.fail("watch", s)
    }
}
