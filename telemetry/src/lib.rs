//! Logs and traces for every Trellis process (coordinator, worker, agent, tools), and the
//! experiment [`Tracker`] (`metrics.jsonl` + TensorBoard event files).
//!
//! [`init`] installs one global `tracing` subscriber:
//!
//! * a fmt layer on stderr, text or JSON (`--log-format json` / `TRELLIS_LOG_FORMAT=json`),
//!   filtered by `RUST_LOG` (default `info`);
//! * when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//!   `OTEL_EXPORTER_OTLP_ENDPOINT`, or [`Options::otlp_endpoint`]), an OpenTelemetry layer that
//!   exports spans over OTLP/gRPC (tonic), filtered by `TRELLIS_TRACE_FILTER` (default `info`).
//!
//! The returned [`Telemetry`] guard flushes and shuts the exporter down on drop, so a short-lived
//! process exports its spans before it exits: keep it alive for the whole `main`.
//!
//! The exporter runs on a small runtime of its own (one thread), so [`init`] can be called from
//! a plain `fn main`, from inside a Tokio runtime, or from a test, before or after the
//! application's runtime exists.
//!
//! Propagation is W3C Trace Context (`traceparent` / `tracestate`): [`inject`] turns a span into
//! a string map that travels inside protocol messages (`Command.trace_context`) or gRPC metadata,
//! [`set_parent`] makes a new span a child of what [`inject`] produced on the other side. Without
//! an OTLP layer both are no-ops (empty maps, no parents), so callers never branch on it.
//!
//! Fixed span / log field names across the project: `job_id`, `worker_id`, `rank`, `step`,
//! `generation` (see [`fields`]).
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use std::collections::HashMap;
use std::time::Duration;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use opentelemetry::Context;
pub use tracker::Tracker;

pub mod tracker;

/// The fixed field names of spans and log events (docs/design.md §8).
pub mod fields {
    pub const JOB_ID: &str = "job_id";
    pub const WORKER_ID: &str = "worker_id";
    pub const RANK: &str = "rank";
    pub const STEP: &str = "step";
    pub const GENERATION: &str = "generation";
}

/// Targets whose spans never go to the OTLP layer: the exporter's own transport (exporting
/// its own spans would feed back) and the SDK's internal logs.
const OTEL_NOISE: &str =
    "h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--log-format {0:?}: use text or json")]
    LogFormat(String),
    #[error("filter {var}={value:?}: {detail}")]
    Filter {
        var: &'static str,
        value: String,
        detail: String,
    },
    #[error("OTLP exporter for {endpoint}: {detail}; check OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://otel-collector:4317)")]
    Exporter { endpoint: String, detail: String },
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
    #[error("tracking: cannot write {}: {source}", path.display())]
    Tracking {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim() {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(Error::LogFormat(other.to_string())),
        }
    }
}

/// What [`init_with`] installs.
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` of the exported spans (`OTEL_SERVICE_NAME` wins when set).
    pub service_name: String,
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`. `None`: from
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`; neither set = no
    /// span export (logs only).
    pub otlp_endpoint: Option<String>,
    /// The fmt filter when `RUST_LOG` is unset.
    pub default_log_filter: String,
    /// The OTLP filter when `TRELLIS_TRACE_FILTER` is unset.
    pub default_trace_filter: String,
    /// How long finished spans wait in the batch before export. `None`: the SDK's default
    /// (5 s, or `OTEL_BSP_SCHEDULE_DELAY` in milliseconds).
    pub batch_delay: Option<Duration>,
    /// Write logs through the test harness's capture instead of stderr.
    pub test_writer: bool,
}

impl Options {
    pub fn new(service_name: &str) -> Options {
        Options {
            service_name: service_name.to_string(),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            default_log_filter: "info".into(),
            default_trace_filter: "info".into(),
            batch_delay: None,
            test_writer: false,
        }
    }
}

/// The OTLP endpoint from the standard environment variables, if any.
pub fn endpoint_from_env() -> Option<String> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .filter_map(|v| std::env::var(v).ok())
    .map(|v| v.trim().to_string())
    .find(|v| !v.is_empty())
}

/// Install logging (+ span export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set). `log_format`:
/// `text` (or empty) or `json`. Keep the guard until the process ends.
pub fn init(service_name: &str, log_format: &str) -> Result<Telemetry, Error> {
    init_with(Options {
        log_format: log_format.parse()?,
        ..Options::new(service_name)
    })
}

/// [`init`] with every knob.
pub fn init_with(opts: Options) -> Result<Telemetry, Error> {
    let log_filter = filter("RUST_LOG", &opts.default_log_filter, "")?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match (opts.log_format, opts.test_writer) {
        (LogFormat::Text, false) => fmt.with_filter(log_filter).boxed(),
        (LogFormat::Text, true) => fmt.with_test_writer().with_filter(log_filter).boxed(),
        (LogFormat::Json, test) => {
            let fmt = fmt
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .flatten_event(true);
            if test {
                fmt.with_test_writer().with_filter(log_filter).boxed()
            } else {
                fmt.with_filter(log_filter).boxed()
            }
        }
    };
    let mut layers = vec![fmt];
    let mut export = None;
    if let Some(endpoint) = opts.otlp_endpoint.clone().or_else(endpoint_from_env) {
        let trace_filter = filter(
            "TRELLIS_TRACE_FILTER",
            &opts.default_trace_filter,
            OTEL_NOISE,
        )?;
        let exporter_err = |detail: String| Error::Exporter {
            endpoint: endpoint.clone(),
            detail,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("trellis-otlp")
            .enable_all()
            .build()
            .map_err(|e| exporter_err(format!("cannot start its runtime: {e}")))?;
        let exporter = {
            let _rt = rt.enter();
            use opentelemetry_otlp::WithExportConfig;
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| exporter_err(e.to_string()))?
        };
        let mut batch = BatchConfigBuilder::default();
        if let Some(d) = opts.batch_delay {
            batch = batch.with_scheduled_delay(d);
        }
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch.build())
            .build();
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
            resource = resource.with_service_name(opts.service_name.clone());
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer(opts.service_name.clone());
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(trace_filter)
                .boxed(),
        );
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
        export = Some(Export {
            provider,
            rt: Some(rt),
            endpoint,
        });
    }
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| Error::AlreadyInstalled(e.to_string()))?;
    if let Some(e) = &export {
        tracing::info!(endpoint = %e.endpoint, service = %opts.service_name, "exporting spans over OTLP/gRPC");
    }
    Ok(Telemetry { export })
}

fn filter(var: &'static str, default: &str, extra: &str) -> Result<EnvFilter, Error> {
    let base = std::env::var(var)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string());
    let text = if extra.is_empty() {
        base.clone()
    } else {
        format!("{base},{extra}")
    };
    EnvFilter::builder()
        .parse(&text)
        .map_err(|e| Error::Filter {
            var,
            value: base,
            detail: e.to_string(),
        })
}

struct Export {
    provider: SdkTracerProvider,
    rt: Option<tokio::runtime::Runtime>,
    endpoint: String,
}

/// The guard [`init`] returns: flushes and shuts the span exporter down on drop.
pub struct Telemetry {
    export: Option<Export>,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint was configured).
    pub fn exporting(&self) -> bool {
        self.export.is_some()
    }

    /// Export every finished span now (blocks until the exporter answered or timed out).
    pub fn force_flush(&self) {
        if let Some(e) = &self.export {
            if let Err(err) = e.provider.force_flush() {
                tracing::warn!(endpoint = %e.endpoint, "OTLP span flush failed: {err}");
            }
        }
    }

    /// Flush and stop the exporter (also done on drop).
    pub fn shutdown(&mut self) {
        if let Some(mut e) = self.export.take() {
            if let Err(err) = e.provider.shutdown() {
                tracing::warn!(endpoint = %e.endpoint, "OTLP exporter shutdown: {err}");
            }
            if let Some(rt) = e.rt.take() {
                rt.shutdown_background();
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ------------------------------------------------------------------------------------ propagation

struct MapInjector<'a>(&'a mut HashMap<String, String>);
impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct MapExtractor<'a>(&'a HashMap<String, String>);
impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);
impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);
impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The W3C trace context (`traceparent`, `tracestate`) of `span`, as a string map for a
/// protocol message. Empty when the span is disabled or nothing exports spans.
pub fn inject(span: &Span) -> HashMap<String, String> {
    inject_context(&span.context())
}

/// [`inject`] for an OpenTelemetry context.
pub fn inject_context(cx: &Context) -> HashMap<String, String> {
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut MapInjector(&mut map));
    map
}

/// The remote parent that [`inject`] produced on the other side (an empty context for an empty
/// or malformed map).
pub fn extract(carrier: &HashMap<String, String>) -> Context {
    TraceContextPropagator::new().extract(&MapExtractor(carrier))
}

/// Make `span` (created, not yet entered) a child of the remote context in `carrier`. A no-op
/// for an empty carrier, a disabled span or without an OTLP layer.
pub fn set_parent(span: &Span, carrier: &HashMap<String, String>) {
    if carrier.is_empty() {
        return;
    }
    let _ = span.set_parent(extract(carrier));
}

/// The remote parent carried in HTTP/2 (gRPC) request headers.
pub fn extract_headers(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Whether the request headers carry a W3C `traceparent`.
pub fn has_traceparent(headers: &http::HeaderMap) -> bool {
    headers.contains_key("traceparent")
}

/// Put the current span's trace context into outgoing HTTP/2 (gRPC) headers.
pub fn inject_headers(headers: &mut http::HeaderMap) {
    TraceContextPropagator::new()
        .inject_context(&Span::current().context(), &mut HeaderInjector(headers));
}

/// A tonic client interceptor that sends the current span's context as `traceparent` metadata:
/// `ControlServiceClient::with_interceptor(channel, trellis_telemetry::grpc_client_interceptor)`.
pub fn grpc_client_interceptor(
    mut req: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    let mut map = HashMap::new();
    TraceContextPropagator::new()
        .inject_context(&Span::current().context(), &mut MapInjector(&mut map));
    for (k, v) in map {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            v.parse(),
        ) {
            req.metadata_mut().insert(k, v);
        }
    }
    Ok(req)
}

/// A server span for one gRPC request (`otel.name` = `Service/Method`), a child of the caller's
/// `traceparent` when it sent one. For tonic's `Server::builder().trace_fn(..)`.
pub fn grpc_server_span(req: &http::Request<()>) -> Span {
    let path = req.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc.request",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    if has_traceparent(req.headers()) {
        let _ = span.set_parent(extract_headers(req.headers()));
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        let e = "yaml".parse::<LogFormat>().unwrap_err().to_string();
        assert!(e.contains("text or json"), "{e}");
    }

    #[test]
    fn carrier_round_trip() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let map = HashMap::from([("traceparent".to_string(), tp.to_string())]);
        let cx = extract(&map);
        assert_eq!(
            inject_context(&cx).get("traceparent").map(String::as_str),
            Some(tp)
        );
        // Nothing to propagate: empty maps.
        assert!(inject_context(&Context::new()).is_empty());
        assert!(inject(&Span::none()).is_empty());
    }
}

#[cfg(feature = "testing")]
pub mod testing;
