//! `coordctl`, the Trellis operator CLI (see the README's Commands). It never links libtorch: offline commands
//! use `trellis-core` only, online ones speak gRPC to the coordinator's `ControlService`.
//!
//! Exit codes, decided in one place ([`Failure`]): 0 ok, 1 the coordinator refused (including
//! PERMISSION_DENIED and a refused TLS handshake), 2 usage or invalid local input (checked
//! before any connection), 3 unreachable / retryable.
mod certs;
mod client;
mod output;
mod units;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use client::Client;
use output::Format;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use trellis_core::growth::{GrowthSpec, Operator, OptimizerPolicy};
use trellis_proto as pb;

// ------------------------------------------------------------------------------------------
// The error type that carries the exit code
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The coordinator refused (its message says why).
    Refused = 1,
    /// Bad flags or invalid local input.
    Invalid = 2,
    /// The coordinator cannot be reached, or the call may succeed if retried.
    Unreachable = 3,
}

/// An error with its exit code and one line for a person.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn refused(m: impl Into<String>) -> Self {
        Failure {
            code: Code::Refused,
            message: m.into(),
        }
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Failure {
            code: Code::Invalid,
            message: m.into(),
        }
    }
    pub fn unreachable(m: impl Into<String>) -> Self {
        Failure {
            code: Code::Unreachable,
            message: m.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The exit code of any error: a [`Failure`] says it; a `trellis-core` error is a problem with
/// local input (2); anything else is 1.
fn exit_code(e: &anyhow::Error) -> Code {
    if let Some(f) = e.downcast_ref::<Failure>() {
        f.code
    } else if e.downcast_ref::<trellis_core::Error>().is_some() {
        Code::Invalid
    } else {
        Code::Refused
    }
}

/// One line: the context chain joined by ": ", newlines folded.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ------------------------------------------------------------------------------------------
// Command line
// ------------------------------------------------------------------------------------------

#[derive(Parser, Debug)]
#[command(
    name = "coordctl",
    version,
    about = "Operate a Trellis coordinator: submit, watch, grow, checkpoint, export",
    after_help = "mTLS: --endpoint https://HOST:PORT --ca ca.crt --cert operator.crt --key operator.key \
(or TRELLIS_CA, TRELLIS_CERT, TRELLIS_KEY); a viewer certificate may only read (status, workers, \
loss, watch, checkpoint list, plan).\n\
Exit codes: 0 ok, 1 the coordinator refused (including PERMISSION_DENIED, a call the certificate's \
role may not make, RESOURCE_EXHAUSTED, a coordinator limit such as its --max-watch-streams, and a \
failed TLS handshake: no or untrusted certificate), 2 usage or invalid input, 3 unreachable (retry)."
)]
struct Cli {
    /// Coordinator gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    /// mTLS (with an https:// endpoint): the job's CA certificate (ca.crt).
    #[arg(long, global = true, env = "TRELLIS_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// mTLS: this client's certificate (operator.crt or viewer.crt; `coordctl certs init`).
    #[arg(long, global = true, env = "TRELLIS_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// mTLS: this client's private key.
    #[arg(long, global = true, env = "TRELLIS_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// Output format; `json` is stable for scripts (docs/coordctl.md).
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Format,
    /// Seconds to wait for each answer from the coordinator.
    #[arg(long, global = true, default_value = "30", value_parser = parse_timeout)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Jobs: `job submit JOB.toml`.
    #[command(subcommand)]
    Job(JobCmd),
    /// The job's phase, generation, step, loss, layout, growths and checkpoints.
    Status,
    /// Registered workers and their ranks.
    Workers,
    /// A live view of the job until it is done or failed (Ctrl-C to stop watching).
    Watch,
    /// Grow the model now (or at --at-step): checkpoint, stack, reshard, resume.
    Grow(GrowArgs),
    /// Pause training at the next step boundary.
    Pause,
    /// Resume a paused job.
    Resume,
    /// Loss history (table/JSON), or a PNG with --plot.
    Loss(LossArgs),
    /// Checkpoints: save, list, and offline grow / export.
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// The growth-timing guideline (how many tokens to train the small model), with its range.
    Plan(PlanArgs),
    /// Certificates for mTLS, offline: `certs init DIR`, `certs worker ID DIR`, `certs etcd DIR`.
    #[command(subcommand)]
    Certs(certs::CertsCmd),
}

#[derive(Subcommand, Debug)]
enum JobCmd {
    /// Validate a job spec locally and submit it.
    Submit {
        /// The job spec (TOML); relative paths in it resolve against its directory.
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
struct OperatorArgs {
    /// Depth multiplier, an integer ≥ 2 (the paper recommends 4).
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = parse_factor,
          required_unless_present = "stacking_list")]
    factor: Option<usize>,
    /// Growth operator: stack (G_stack), interpolate, middle, zero, random.
    #[arg(long, value_parser = parse_operator, conflicts_with = "stacking_list")]
    operator: Option<Operator>,
    /// Explicit source layers for the new model, e.g. 0,1,0,1 (its length is the new depth).
    #[arg(long, value_name = "LIST", value_delimiter = ',', num_args = 1..)]
    stacking_list: Option<Vec<usize>>,
    /// Optimizer at growth: reset (fresh AdamW, re-warmup; the paper) or carry (grown moments).
    #[arg(long, value_parser = parse_optimizer, default_value = "reset")]
    optimizer: OptimizerPolicy,
    /// For --operator random: mask the new layers in over this many steps.
    #[arg(long, value_name = "STEPS", default_value = "0")]
    mask_ramp_steps: u64,
}

impl OperatorArgs {
    fn spec(&self) -> GrowthSpec {
        let operator = match (&self.stacking_list, &self.operator) {
            (Some(layers), _) => Operator::StackingList {
                layers: layers.clone(),
            },
            (None, Some(Operator::Random { .. })) => Operator::Random {
                mask_ramp_steps: self.mask_ramp_steps,
            },
            (None, Some(op)) => op.clone(),
            (None, None) => Operator::Stack,
        };
        let factor = match (&self.stacking_list, self.factor) {
            (_, Some(f)) => f,
            (Some(l), None) => l.len(),
            (None, None) => trellis_core::growth::RECOMMENDED_FACTOR,
        };
        GrowthSpec {
            factor,
            operator,
            optimizer: self.optimizer,
        }
    }

    fn check(&self) -> Result<(), Failure> {
        if self.mask_ramp_steps > 0 && !matches!(self.operator, Some(Operator::Random { .. })) {
            return Err(Failure::invalid(
                "--mask-ramp-steps only applies to --operator random",
            ));
        }
        Ok(())
    }
}

#[derive(Args, Debug)]
struct GrowArgs {
    #[command(flatten)]
    op: OperatorArgs,
    /// Barrier step at whose end the growth happens (default: as soon as possible).
    #[arg(long, value_name = "S")]
    at_step: Option<u64>,
    /// Post-growth peak LR under --optimizer reset (default: the spec's, the paper's 3e-4).
    #[arg(long)]
    lr: Option<f64>,
    /// Post-growth final LR under --optimizer reset (default 3e-5).
    #[arg(long)]
    min_lr: Option<f64>,
    /// Re-warmup steps under --optimizer reset.
    #[arg(long)]
    warmup_steps: Option<u64>,
}

#[derive(Args, Debug)]
struct LossArgs {
    /// Write a PNG of train and val loss vs tokens with growth events marked.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Ask for at most this many points, thinned evenly (0 = all; the table defaults to 40).
    #[arg(long, value_name = "N")]
    max_points: Option<u32>,
}

#[derive(Subcommand, Debug)]
enum CheckpointCmd {
    /// Ask the coordinator for a checkpoint now.
    Save,
    /// Committed checkpoints.
    List,
    /// Grow a checkpoint offline (no server, no libtorch): IN_DIR → OUT_DIR.
    Grow {
        #[command(flatten)]
        op: OperatorArgs,
        /// Seed for freshly initialised tensors (operator random).
        #[arg(long, default_value = "1234")]
        seed: u64,
        /// A committed checkpoint directory (`…/step-N`).
        in_dir: PathBuf,
        /// Where to write the grown checkpoint (must not exist yet).
        out_dir: PathBuf,
    },
    /// Export a checkpoint as a Hugging Face LlamaForCausalLM directory (AutoModelForCausalLM
    /// and AutoTokenizer load it).
    Export {
        /// Output directory: config.json, model.safetensors (or shards + index),
        /// generation_config.json, and the tokenizer files when the checkpoint has a tokenizer.
        #[arg(long, value_name = "OUT_DIR", required = true)]
        hf: PathBuf,
        /// Weights dtype: fp32 (exact) or bf16 (rounded to nearest; checkpoints stay fp32).
        #[arg(long, default_value = "fp32", value_parser = parse_dtype)]
        dtype: trellis_core::offline::ExportDtype,
        /// Largest weights file before sharding (5GB, 500MB, 2GiB, bytes), as transformers.
        #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
        max_shard_size: u64,
        /// A committed checkpoint directory (`…/step-N`).
        in_dir: PathBuf,
    },
    /// Import a Hugging Face LlamaForCausalLM directory as a step-0 checkpoint (no server, no
    /// libtorch) that `[checkpoint] init_from` starts a job from.
    Import {
        /// The Hugging Face directory: config.json, model.safetensors or
        /// model.safetensors.index.json (bf16, fp16 or fp32), tokenizer files.
        #[arg(long, value_name = "IN_DIR", required = true)]
        hf: PathBuf,
        /// Where to write the checkpoint (must not exist yet, or be empty).
        out_dir: PathBuf,
    },
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// Target parameters N: 6.74e9, 7B, 125M, …
    #[arg(long, value_name = "N", value_parser = units::parse_count)]
    params: f64,
    /// Token budget D: 2e12, 2T, 300B, …
    #[arg(long, value_name = "D", value_parser = units::parse_count)]
    tokens: f64,
    /// Growth factor g (default: the paper's 4).
    #[arg(long, value_name = "G", allow_hyphen_values = true, value_parser = parse_factor)]
    factor: Option<usize>,
    /// Ask the coordinator (its Plan RPC) instead of computing locally.
    #[arg(long)]
    remote: bool,
}

/// `--factor`: the syntax is parsed here, the range judged by core's growth rules.
fn parse_factor(s: &str) -> Result<usize, String> {
    let t = s.trim();
    match t.parse::<i64>() {
        // Not representable as a factor at all; core's rule would say the same.
        Ok(n) if n < 0 => Err(format!(
            "growth factor must be an integer ≥ 2, got {n}; the paper recommends {}",
            trellis_core::growth::RECOMMENDED_FACTOR
        )),
        Ok(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            trellis_core::growth::check_factor(n)
                .map(|()| n)
                .map_err(|e| e.to_string())
        }
        Err(_) if t.parse::<f64>().is_ok() => {
            Err("the factor must be a whole number (2, 3, 4, …; the paper recommends 4)".into())
        }
        Err(_) => Err("the factor must be an integer of at least 2, e.g. 4".into()),
    }
}

fn parse_operator(s: &str) -> Result<Operator, String> {
    Operator::parse(s).map_err(|e| e.to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
    trellis_core::hf::parse_size(s).map_err(|e| e.to_string())
}

fn parse_dtype(s: &str) -> Result<trellis_core::offline::ExportDtype, String> {
    trellis_core::offline::ExportDtype::parse(s).map_err(|e| e.to_string())
}

fn parse_optimizer(s: &str) -> Result<OptimizerPolicy, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "reset" => Ok(OptimizerPolicy::Reset),
        "carry" => Ok(OptimizerPolicy::Carry),
        _ => Err("choose reset (fresh AdamW, the paper) or carry (grown Adam moments)".into()),
    }
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err("the timeout is a positive number of seconds, e.g. 30".into()),
    }
}

/// `coordctl checkpoint grow`: the subcommands named on the command line, for "see … --help".
fn subcommand_path() -> String {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut path = vec!["coordctl".to_string()];
    for arg in std::env::args().skip(1) {
        if arg.starts_with('-') {
            continue;
        }
        match cmd.find_subcommand(&arg).cloned() {
            Some(sub) => {
                path.push(sub.get_name().to_string());
                cmd = sub;
            }
            None => continue,
        }
    }
    path.join(" ")
}

/// clap's error, shortened to one line (what was wrong, then where to look).
fn clap_failure(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let text = e.render().to_string();
    let usage = subcommand_path();
    let what = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        format!("'{usage}' needs a subcommand")
    } else {
        let body: Vec<String> = text
            .lines()
            .take_while(|l| {
                !l.trim_start().starts_with("Usage:") && !l.starts_with("For more information")
            })
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| match l.strip_prefix("tip:") {
                Some(tip) => format!("({})", tip.trim()),
                None => l.to_string(),
            })
            .collect();
        let joined = body.join(" ");
        joined
            .strip_prefix("error:")
            .unwrap_or(&joined)
            .trim()
            .to_string()
    };
    eprintln!("error: {}; see '{usage} --help'", one_line(&what));
    ExitCode::from(Code::Invalid as u8)
}

// ------------------------------------------------------------------------------------------
// Running
// ------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return clap_failure(e),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(exit_code(&e) as u8)
        }
    }
}

/// Write rendered output once; a closed pipe (`coordctl status | head`) is not an error.
fn emit(s: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

fn render<T>(format: Format, v: &T, table: fn(&T) -> String) -> anyhow::Result<()>
where
    T: serde::Serialize,
{
    emit(&match format {
        Format::Json => output::json(v),
        Format::Table => table(v),
    })
}

/// `--ca`, `--cert`, `--key`: all three (mTLS), `--ca` alone (TLS without a client
/// certificate: a Trellis coordinator refuses the handshake), or none; files checked before
/// connecting.
fn client_tls(cli: &Cli) -> Result<Option<tonic::transport::ClientTlsConfig>, Failure> {
    match (&cli.ca, &cli.cert, &cli.key) {
        (None, None, None) => Ok(None),
        (Some(ca), Some(cert), Some(key)) => trellis_auth::tls::client_tls(ca, cert, key)
            .map(Some)
            .map_err(|e| Failure::invalid(e.to_string())),
        (Some(ca), None, None) => {
            let pem = std::fs::read(ca)
                .map_err(|e| Failure::invalid(format!("cannot read --ca {}: {e}", ca.display())))?;
            Ok(Some(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            ))
        }
        _ => Err(Failure::invalid(
            "mTLS needs --ca, --cert and --key together (or TRELLIS_CA, TRELLIS_CERT, TRELLIS_KEY)",
        )),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let format = cli.output;
    match &cli.command {
        Command::Plan(a) if !a.remote => return plan_local(format, a),
        Command::Checkpoint(CheckpointCmd::Grow {
            op,
            seed,
            in_dir,
            out_dir,
        }) => return offline_grow(format, op, *seed, in_dir, out_dir),
        Command::Checkpoint(CheckpointCmd::Export {
            hf,
            in_dir,
            dtype,
            max_shard_size,
        }) => {
            let opts = trellis_core::offline::ExportOptions {
                dtype: *dtype,
                max_shard_size: *max_shard_size,
            };
            return export(format, hf, in_dir, &opts);
        }
        Command::Checkpoint(CheckpointCmd::Import { hf, out_dir }) => {
            return import(format, hf, out_dir)
        }
        Command::Certs(c) => return certs::run(format, c),
        _ => {}
    }
    // Everything below talks to the coordinator: check local input first, then connect.
    let local = prepare(&cli.command)?;
    let tls = client_tls(&cli)?;
    let endpoint = client::normalize_endpoint(&cli.endpoint, tls.is_some())?;
    let timeout = Duration::from_secs_f64(cli.timeout);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // With OTEL_EXPORTER_OTLP_ENDPOINT set, the command is a client span (`coordctl <command>`)
    // whose context every request carries: `coordctl grow` roots the growth's trace.
    let mut telemetry = match trellis_telemetry::endpoint_from_env() {
        Some(_) => {
            let _guard = rt.enter();
            Some(
                trellis_telemetry::init_with(trellis_telemetry::Options {
                    default_log_filter: "off".into(),
                    ..trellis_telemetry::Options::new("coordctl")
                })
                .context("cannot start the OpenTelemetry exporter")?,
            )
        }
        None => None,
    };
    let span = tracing::info_span!(
        "coordctl",
        otel.name = %format!("coordctl {}", command_name(&cli.command)),
        otel.kind = "client",
        endpoint = %endpoint,
    );
    let r = rt.block_on(tracing::Instrument::instrument(
        async move {
            let mut c = Client::connect(&endpoint, timeout, tls).await?;
            remote(&mut c, format, &cli.command, local).await
        },
        span,
    ));
    if let Some(t) = telemetry.as_mut() {
        let _guard = rt.enter();
        t.shutdown();
    }
    r
}

/// The subcommand as typed (`grow`, `checkpoint save`, …), for the span name.
fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Job(_) => "job",
        Command::Status => "status",
        Command::Workers => "workers",
        Command::Watch => "watch",
        Command::Grow(..) => "grow",
        Command::Pause => "pause",
        Command::Resume => "resume",
        Command::Loss(..) => "loss",
        Command::Checkpoint(_) => "checkpoint",
        Command::Plan(_) => "plan",
        Command::Certs(_) => "certs",
    }
}

/// Local input an online command needs, read and validated before connecting.
enum Prepared {
    None,
    Submit { text: String, base_dir: String },
    Grow(pb::GrowRequest),
}

fn prepare(cmd: &Command) -> Result<Prepared, Failure> {
    Ok(match cmd {
        Command::Job(JobCmd::Submit { file }) => {
            if !file.is_file() {
                return Err(Failure::invalid(format!(
                    "job spec {} does not exist or is not a file; pass the path of a JOB.toml",
                    file.display()
                )));
            }
            trellis_core::job::JobSpec::from_file(file)
                .map_err(|e| Failure::invalid(e.to_string()))?;
            let text = std::fs::read_to_string(file).map_err(|e| {
                Failure::invalid(format!("cannot read job spec {}: {e}", file.display()))
            })?;
            let abs = std::path::absolute(file)
                .map_err(|e| Failure::invalid(format!("cannot resolve {}: {e}", file.display())))?;
            let base = abs.parent().unwrap_or(Path::new("/"));
            let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
            Prepared::Submit {
                text,
                base_dir: base.to_string_lossy().into_owned(),
            }
        }
        Command::Grow(g) => {
            g.op.check()?;
            for (name, v) in [("--lr", g.lr), ("--min-lr", g.min_lr)] {
                if let Some(v) = v {
                    if !(v.is_finite() && v > 0.0) {
                        return Err(Failure::invalid(format!(
                            "{name} must be a positive number, got {v}"
                        )));
                    }
                }
            }
            let spec = g.op.spec();
            let (operator, stacking_list, mask_ramp_steps) =
                trellis_proto::convert::operator_to_pb(&spec.operator);
            Prepared::Grow(pb::GrowRequest {
                job_id: String::new(),
                factor: spec.factor as u32,
                operator: operator as i32,
                stacking_list,
                optimizer: pb::OptimizerPolicy::from(spec.optimizer) as i32,
                mask_ramp_steps,
                at_step: g.at_step,
                lr: g.lr,
                min_lr: g.min_lr,
                warmup_steps: g.warmup_steps,
            })
        }
        Command::Loss(LossArgs { plot: Some(p), .. }) => {
            let parent = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(Failure::invalid(format!(
                    "--plot {}: directory {} does not exist; create it first",
                    p.display(),
                    parent.display()
                )));
            }
            Prepared::None
        }
        _ => Prepared::None,
    })
}

async fn remote(
    c: &mut Client,
    format: Format,
    cmd: &Command,
    local: Prepared,
) -> anyhow::Result<()> {
    match (cmd, local) {
        (Command::Job(JobCmd::Submit { .. }), Prepared::Submit { text, base_dir }) => {
            let r = c.submit_job(text, base_dir).await?;
            let v = output::SubmitView {
                job_id: r.job_id.clone(),
                status: r.status.as_ref().map(output::StatusView::from),
            };
            render(format, &v, output::submit_table)
        }
        (Command::Status, _) => {
            let s = c.get_status().await?;
            render(format, &output::StatusView::from(&s), output::status_table)
        }
        (Command::Workers, _) => {
            let r = c.list_workers().await?;
            let v: Vec<output::WorkerView> =
                r.workers.iter().map(output::WorkerView::from).collect();
            render(format, &v, |v| output::workers_table(v))
        }
        (Command::Grow(_), Prepared::Grow(req)) => {
            let r = c.grow(req).await?;
            render(format, &output::GrowView::from(&r), output::grow_table)
        }
        (Command::Pause, _) => {
            let r = c.pause().await?;
            let v = output::CommandView {
                action: "pause",
                command_id: r.command_id,
            };
            render(format, &v, output::command_table)
        }
        (Command::Resume, _) => {
            let r = c.resume().await?;
            let v = output::CommandView {
                action: "resume",
                command_id: r.command_id,
            };
            render(format, &v, output::command_table)
        }
        (Command::Checkpoint(CheckpointCmd::Save), _) => {
            let r = c.save_checkpoint().await?;
            let v = output::CommandView {
                action: "checkpoint",
                command_id: r.command_id,
            };
            render(format, &v, output::command_table)
        }
        (Command::Checkpoint(CheckpointCmd::List), _) => {
            let r = c.list_checkpoints().await?;
            let v: Vec<output::CheckpointView> = r
                .checkpoints
                .iter()
                .map(output::CheckpointView::from)
                .collect();
            render(format, &v, |v| output::checkpoints_table(v))
        }
        (Command::Loss(a), _) => loss(c, format, a).await,
        (Command::Plan(a), _) => {
            let r = c
                .plan(pb::PlanRequest {
                    params: a.params,
                    tokens: a.tokens,
                    factor: a.factor.unwrap_or(0) as u32,
                })
                .await?;
            let v = output::PlanView {
                params: r.params,
                budget_tokens: r.budget_tokens,
                flops: r.flops,
                formula_tokens: r.formula_tokens,
                in_range: r.in_range,
                recommended_tokens: r.recommended_tokens,
                rule: r.rule,
                factor: r.factor as usize,
            };
            render(format, &v, output::plan_table)
        }
        (Command::Watch, _) => watch(c, format).await,
        _ => unreachable!("offline commands return before connecting"),
    }
}

async fn loss(c: &mut Client, format: Format, a: &LossArgs) -> anyhow::Result<()> {
    let max_points = a.max_points.unwrap_or(match (&a.plot, format) {
        (None, Format::Table) => 40,
        _ => 0,
    });
    let r = c.get_loss(max_points).await?;
    let v = output::LossView::from(&r);
    let Some(path) = &a.plot else {
        return render(format, &v, output::loss_table);
    };
    let pick = |f: fn(&output::LossPointView) -> Option<f64>| -> Vec<(f64, f64)> {
        v.points
            .iter()
            .filter_map(|p| f(p).map(|y| (p.tokens as f64, y)))
            .collect()
    };
    let series = vec![
        trellis_core::plot::Series {
            name: "train loss".into(),
            points: pick(|p| p.train_loss),
        },
        trellis_core::plot::Series {
            name: "val loss".into(),
            points: pick(|p| p.val_loss),
        },
    ];
    let markers: Vec<(f64, String)> = v
        .growth_events
        .iter()
        .filter(|g| g.phase != "rolled_back")
        .map(|g| {
            (
                g.tokens as f64,
                format!(
                    "gen {}: {}→{} layers ({})",
                    g.generation, g.from_layers, g.to_layers, g.operator
                ),
            )
        })
        .collect();
    let status = c.get_status().await.ok();
    let title = match status.as_ref().map(|s| s.job_id.as_str()) {
        Some(j) if !j.is_empty() => format!("{j}: loss"),
        _ => "loss".to_string(),
    };
    trellis_core::plot::loss_plot(path, &title, "tokens", &series, &markers)
        .with_context(|| format!("cannot write the plot {}", path.display()))
        .map_err(|e| anyhow::Error::new(Failure::invalid(one_line(&format!("{e:#}")))))?;
    let pv = output::PlotView {
        plot: path.display().to_string(),
        points: v.points.len(),
        growth_events: markers.len(),
    };
    render(format, &pv, output::plot_table)
}

async fn watch(c: &mut Client, format: Format) -> anyhow::Result<()> {
    let mut stream = c.watch().await?;
    let tty = format == Format::Table && std::io::stdout().is_terminal();
    let mut drawn_lines = 0usize;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let next = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            m = stream.message() => m,
        };
        let s = match next {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(Failure::unreachable(
                    "the coordinator closed the watch stream before the job finished; run coordctl watch again",
                )
                .into())
            }
            Err(st) => return Err(c.stream_failure(st).into()),
        };
        let v = output::StatusView::from(&s);
        match (format, tty) {
            (Format::Json, _) => emit(&output::json_line(&v))?,
            (Format::Table, true) => {
                // Lines wider than the terminal would wrap and break the redraw: cut them.
                let width = std::env::var("COLUMNS")
                    .ok()
                    .and_then(|c| c.parse::<usize>().ok())
                    .unwrap_or(120);
                let block: String = output::watch_block(&v)
                    .lines()
                    .map(|l| {
                        l.chars()
                            .take(width.saturating_sub(1).max(20))
                            .collect::<String>()
                            + "\n"
                    })
                    .collect();
                let mut frame = String::new();
                if drawn_lines > 0 {
                    // Cursor up over the previous block, then clear to the end of the screen.
                    frame.push_str(&format!("\x1b[{drawn_lines}A\x1b[J"));
                }
                frame.push_str(&block);
                drawn_lines = block.lines().count();
                emit(&frame)?;
            }
            (Format::Table, false) => emit(&output::watch_line(&v))?,
        }
        match s.phase() {
            pb::JobPhase::Done => return Ok(()),
            pb::JobPhase::Failed => {
                let why = if v.message.is_empty() {
                    "no reason given".to_string()
                } else {
                    v.message.clone()
                };
                return Err(Failure::refused(format!(
                    "job {} failed: {why}; see coordctl status and the coordinator's log",
                    v.job_id
                ))
                .into());
            }
            _ => {}
        }
    }
}

// ------------------------------------------------------------------------------------------
// Offline commands
// ------------------------------------------------------------------------------------------

fn plan_local(format: Format, a: &PlanArgs) -> anyhow::Result<()> {
    let factor = a.factor.unwrap_or(trellis_core::growth::RECOMMENDED_FACTOR);
    let g = trellis_core::guideline::guideline(a.params, a.tokens, factor);
    let v = output::PlanView {
        params: g.params,
        budget_tokens: g.budget_tokens,
        flops: g.flops,
        formula_tokens: g.formula_tokens,
        in_range: g.in_range,
        recommended_tokens: g.recommended_tokens,
        rule: g.rule,
        factor: g.factor,
    };
    render(format, &v, output::plan_table)
}

fn files_in(dir: &Path) -> anyhow::Result<Vec<output::FileView>> {
    let mut files = Vec::new();
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in rd {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() {
            files.push(output::FileView {
                path: entry.path().display().to_string(),
                bytes: meta.len(),
            });
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

fn existing_dir(dir: &Path, what: &str) -> Result<(), Failure> {
    if !dir.is_dir() {
        return Err(Failure::invalid(format!(
            "{what} {} does not exist or is not a directory; pass a committed checkpoint directory (…/step-N)",
            dir.display()
        )));
    }
    Ok(())
}

/// The trainer state of a checkpoint the caller already verified (cheap: no hashing).
fn trainer_state(dir: &Path) -> anyhow::Result<trellis_core::checkpoint::TrainerState> {
    let p = dir.join(trellis_core::checkpoint::TRAINER_STATE);
    let text = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("invalid {}", p.display()))
}

fn offline_grow(
    format: Format,
    op: &OperatorArgs,
    seed: u64,
    input: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    op.check()?;
    existing_dir(input, "IN_DIR")?;
    let spec = op.spec();
    let plan = trellis_core::offline::grow_checkpoint(input, out, &spec, seed)?;
    let v = output::OfflineGrowView {
        input: input.display().to_string(),
        output: out.display().to_string(),
        operator: spec.operator.name().to_string(),
        factor: match spec.operator {
            Operator::StackingList { .. } => {
                plan.new.num_hidden_layers / plan.old.num_hidden_layers.max(1)
            }
            _ => spec.factor,
        },
        optimizer: match spec.optimizer {
            OptimizerPolicy::Reset => "reset",
            OptimizerPolicy::Carry => "carry",
        },
        from_layers: plan.old.num_hidden_layers,
        to_layers: plan.new.num_hidden_layers,
        from_parameters: plan.old.num_parameters(),
        to_parameters: plan.new.num_parameters(),
        files: files_in(out)?,
    };
    render(format, &v, output::offline_grow_table)
}

fn export(
    format: Format,
    hf: &Path,
    input: &Path,
    opts: &trellis_core::offline::ExportOptions,
) -> anyhow::Result<()> {
    existing_dir(input, "IN_DIR")?;
    trellis_core::offline::export_hf_with(input, hf, opts)?;
    let state = trainer_state(input)?;
    let v = output::ExportView {
        input: input.display().to_string(),
        output: hf.display().to_string(),
        layers: state.model.num_hidden_layers,
        parameters: state.model.num_parameters(),
        files: files_in(hf)?,
    };
    render(format, &v, output::export_table)
}

fn import(format: Format, hf: &Path, out: &Path) -> anyhow::Result<()> {
    let r = trellis_core::import::import_hf(hf, out)?;
    let v = output::ImportView {
        input: hf.display().to_string(),
        output: out.display().to_string(),
        layers: r.config.num_hidden_layers,
        parameters: r.parameters,
        source_dtypes: r.source_dtypes.into_iter().collect(),
        tie_word_embeddings: r.config.tie_word_embeddings,
        skipped: r.skipped,
        tokenizer: r.tokenizer,
        files: files_in(out)?,
    };
    render(format, &v, output::import_table)
}
