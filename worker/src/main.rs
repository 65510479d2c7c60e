//! `trellis-worker`: the Trellis training worker binary.
//!
//! ```text
//! trellis-worker train --job JOB.toml [--out DIR] [--stop-at STEP]
//! trellis-worker eval --checkpoint DIR --text FILE [--seq-len N] [--output json]
//! trellis-worker generate --checkpoint DIR --prompt TEXT [--max-tokens N] [--temperature T]
//!                         [--top-k K] [--seed S] [--no-kv-cache] [--output text|json]
//! trellis-worker bench --job JOB.toml [--steps N] [--warmup N] [--precision fp32|bf16|auto]
//!                      [--activation-checkpointing true|false]
//! trellis-worker --coordinator URL [--device cpu|cuda[:N]]     (managed by a coordinator)
//! trellis-worker --coordinator https://… --tls-cert F --tls-key F --ca F   (mTLS)
//! ```
//! Errors are one line on stderr; exit 2 for bad input (spec, checkpoint, refused growth),
//! 1 otherwise.
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use trellis_core::job::JobSpec;
use trellis_worker::standalone::{self, Event, RunOptions};
use trellis_worker::trainer::{parse_device, Trainer};

#[derive(Parser)]
#[command(name = "trellis-worker", version, about = "Trellis training worker")]
struct Cli {
    /// Managed mode: register with this coordinator and train as it commands. Several
    /// endpoints, comma-separated (a leader and its standby coordinators), are tried in turn.
    #[arg(long, global = false)]
    coordinator: Option<String>,
    /// Device for managed mode.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Managed mode: exit (code 3) when the coordinator has been unreachable this many seconds.
    #[arg(long, default_value_t = 600)]
    give_up_after: u64,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// Managed mode over mTLS (`--coordinator https://…`): all three or none.
#[derive(clap::Args)]
struct TlsArgs {
    /// This worker's certificate (`coordctl certs worker ID DIR`); it names the worker id.
    #[arg(long, requires_all = ["tls_key", "ca"])]
    tls_cert: Option<PathBuf>,
    /// This worker's private key.
    #[arg(long, requires_all = ["tls_cert", "ca"])]
    tls_key: Option<PathBuf>,
    /// The job's CA certificate (ca.crt), the only one trusted for the coordinator.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a whole job in this process (no coordinator); resumes from the latest checkpoint.
    Train {
        #[arg(long)]
        job: PathBuf,
        /// Output directory (default: runs/<job name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Stop after this many steps in total (the LR schedule still spans train.max_steps).
        #[arg(long)]
        stop_at: Option<u64>,
    },
    /// Mean next-token loss of a checkpoint on a text file, or (--job) the job's validation loss
    /// on exactly the windows its trainer evaluates (`data.valid`, `train.eval_sequences`), at TP 1.
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, required_unless_present = "job", conflicts_with = "job")]
        text: Option<PathBuf>,
        /// A job spec: evaluate as that job's trainer does (its validation windows).
        #[arg(long)]
        job: Option<PathBuf>,
        /// Window length (default: the model's max_position_embeddings).
        #[arg(long)]
        seq_len: Option<usize>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// `json` for a machine-readable line.
        #[arg(long, default_value = "text")]
        output: String,
    },
    /// Continue a prompt with a checkpoint's model (greedy at temperature 0, else seeded
    /// sampling), streaming the new text to stdout; stops at end-of-text or --max-tokens.
    Generate {
        /// A checkpoint (…/step-N), or a job's checkpoint directory (its latest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 = greedy; otherwise the softmax temperature (e.g. 0.8).
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        temperature: f64,
        /// Sample only among the K most likely tokens.
        #[arg(long)]
        top_k: Option<usize>,
        /// Seed of the sampler: the same seed gives the same text.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// CPU threads of libtorch. One token of a small model is too little work to split:
        /// 1 is fastest for the models trained here (and by far on a busy machine); raise it
        /// for large models on an idle machine.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Rerun the whole sequence for every new token instead of keeping a KV cache (slower;
        /// the reference the cache is tested against).
        #[arg(long)]
        no_kv_cache: bool,
        /// `json`: one line with the ids, the text and the speed instead of streamed text.
        #[arg(long, default_value = "text")]
        output: String,
    },
    /// Training throughput of a job's model: `warmup` steps, then `steps` timed steps.
    Bench {
        #[arg(long)]
        job: PathBuf,
        #[arg(long, default_value_t = 20)]
        steps: u64,
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override `[train] precision` (fp32, bf16, auto).
        #[arg(long)]
        precision: Option<String>,
        /// Override `[train] activation_checkpointing` (true, false).
        #[arg(long)]
        activation_checkpointing: Option<bool>,
    },
}

fn load_spec(path: &std::path::Path) -> Result<JobSpec> {
    Ok(JobSpec::from_file(path)?)
}

fn train(job: PathBuf, out: Option<PathBuf>, stop_at: Option<u64>) -> Result<()> {
    let spec = load_spec(&job)?;
    let out = out.unwrap_or_else(|| PathBuf::from("runs").join(&spec.job.name));
    let tty = std::io::stderr().is_terminal();
    let max = spec.train.max_steps.min(stop_at.unwrap_or(u64::MAX));
    let bar = ProgressBar::new(max);
    if tty {
        bar.set_style(
            ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let log_every = (max / 20).max(1);
    let mut last_val: Option<f64> = None;
    let mut observer = |e: Event| {
        let line = match &e {
            Event::Resumed { step, dir } => {
                Some(format!("resumed from {} (step {step})", dir.display()))
            }
            Event::Step(r) => {
                bar.set_position(r.step);
                bar.set_message(format!(
                    "tokens {} loss {:.4}{} {:.0} tok/s",
                    r.tokens,
                    r.loss,
                    last_val.map(|v| format!(" val {v:.4}")).unwrap_or_default(),
                    r.tokens_per_second
                ));
                (r.step % log_every == 0 || r.step == 1).then(|| {
                    format!(
                        "step {} tokens {} loss {:.4} lr {:.2e} grad_norm {:.3} {:.0} tok/s",
                        r.step, r.tokens, r.loss, r.lr, r.grad_norm, r.tokens_per_second
                    )
                })
            }
            Event::Validation { step, loss, .. } => {
                last_val = Some(*loss);
                Some(format!("step {step} validation loss {loss:.4}"))
            }
            Event::Growth {
                step,
                from_layers,
                to_layers,
                timings,
                ..
            } => Some(format!(
                "step {step} grew {from_layers} -> {to_layers} layers in {:.3}s",
                timings.total_seconds
            )),
            Event::Checkpoint { step, dir } => {
                Some(format!("step {step} checkpoint {}", dir.display()))
            }
        };
        if let Some(l) = line {
            if tty {
                bar.println(l);
            } else {
                eprintln!("{l}");
            }
        }
    };
    let summary = standalone::run_job(&spec, &out, &RunOptions { stop_at }, &mut observer)?;
    bar.finish_and_clear();
    eprintln!(
        "done: {} steps, {} tokens, train loss {}, val loss {}, {} -> {} layers, {}, {:.1}s; see {}",
        summary.steps,
        summary.tokens,
        summary
            .final_train_loss
            .map(|v| format!("{v:.4}"))
            .unwrap_or("-".into()),
        summary
            .final_val_loss
            .map(|v| format!("{v:.4}"))
            .unwrap_or("-".into()),
        summary.layers_before,
        summary.layers_after,
        parse_device(&spec.train.device).map_or_else(
            |_| "precision ?".to_string(),
            |d| {
                let (p, why) = trellis_worker::model::Precision::resolve(spec.train.precision, d);
                format!("{} ({why})", p.name())
            }
        ),
        summary.wall_seconds,
        out.join("summary.json").display()
    );
    Ok(())
}

fn eval(
    checkpoint: PathBuf,
    text: Option<PathBuf>,
    job: Option<PathBuf>,
    seq_len: Option<usize>,
    device: String,
    output: String,
) -> Result<()> {
    if let Some(job) = job {
        let mut spec = load_spec(&job)?;
        spec.train.device = device;
        let out = std::env::temp_dir().join(format!("trellis-eval-{}", std::process::id()));
        let solo = trellis_worker::parallel::Groups::dp_only(Box::new(trellis_comm::Solo));
        let mut t = Trainer::restored(&spec, &out, 0, 1, solo, &checkpoint)?;
        let loss = t.evaluate()?;
        let _ = std::fs::remove_dir_all(&out);
        let r = serde_json::json!({
            "checkpoint": checkpoint.display().to_string(),
            "job": spec.job.name,
            "loss": loss,
            "windows": spec.train.eval_sequences,
            "step": t.step_count(),
            "generation": t.generation(),
            "num_hidden_layers": t.config().num_hidden_layers,
        });
        match output.as_str() {
            "json" => println!("{r}"),
            _ => println!(
                "validation loss {loss:.6} of job {} — {} at step {}",
                spec.job.name,
                checkpoint.display(),
                t.step_count()
            ),
        }
        return Ok(());
    }
    let text = text.expect("clap requires --text without --job");
    let device = parse_device(&device)?;
    let r = trellis_worker::eval::eval_checkpoint(&checkpoint, &text, seq_len, device)?;
    match output.as_str() {
        "json" => println!("{}", serde_json::to_string(&r)?),
        "text" | "table" => println!(
            "loss {:.6} over {} tokens ({} windows of {}) — {} at step {}",
            r.loss, r.tokens, r.windows, r.seq_len, r.checkpoint, r.step
        ),
        other => {
            return Err(trellis_worker::Error::Invalid(format!(
                "--output {other}: use text or json"
            ))
            .into())
        }
    }
    Ok(())
}

fn generate(
    checkpoint: PathBuf,
    prompt: String,
    opts: trellis_worker::generate::Options,
    device: String,
    threads: usize,
    output: String,
) -> Result<()> {
    use std::io::Write;
    if threads == 0 {
        return Err(trellis_worker::Error::Invalid("--threads 0: use at least 1".into()).into());
    }
    tch::set_num_threads(threads as i32);
    let stream = match output.as_str() {
        "text" => true,
        "json" => false,
        other => {
            return Err(trellis_worker::Error::Invalid(format!(
                "--output {other}: use text or json"
            ))
            .into())
        }
    };
    let device = parse_device(&device)?;
    let mut out = std::io::stdout();
    let mut started = false;
    let g = trellis_worker::generate::generate(&checkpoint, &prompt, &opts, device, |piece| {
        if stream {
            if !started {
                let _ = write!(out, "{prompt}");
                started = true;
            }
            let _ = write!(out, "{piece}");
            let _ = out.flush();
        }
    })?;
    if stream {
        if !started {
            print!("{prompt}");
        }
        println!();
        eprintln!(
            "{} tokens in {:.2}s ({:.1} tokens/s), stopped at {}; {} at step {}, {} layers",
            g.ids.len(),
            g.seconds,
            g.tokens_per_second,
            match g.stop {
                trellis_worker::generate::Stop::Eos => "end of text",
                trellis_worker::generate::Stop::MaxTokens => "--max-tokens",
                trellis_worker::generate::Stop::Context => "the model's context length",
            },
            g.checkpoint,
            g.step,
            g.num_hidden_layers
        );
    } else {
        println!("{}", serde_json::to_string(&g)?);
    }
    Ok(())
}

fn bench(
    job: PathBuf,
    steps: u64,
    warmup: u64,
    out: Option<PathBuf>,
    precision: Option<String>,
    activation_checkpointing: Option<bool>,
) -> Result<()> {
    let mut spec = load_spec(&job)?;
    if let Some(p) = precision {
        spec.train.precision = serde_json::from_value(serde_json::Value::String(p.clone()))
            .map_err(|_| {
                trellis_worker::Error::Invalid(format!("--precision {p}: use fp32, bf16 or auto"))
            })?;
    }
    if let Some(a) = activation_checkpointing {
        spec.train.activation_checkpointing = a;
    }
    let out = out.unwrap_or_else(|| PathBuf::from("runs").join(format!("{}-bench", spec.job.name)));
    let mut t = Trainer::new(&spec, &out, 0, 1, Box::new(trellis_comm::Solo))?;
    for _ in 0..warmup {
        t.step()?;
    }
    let start = std::time::Instant::now();
    let mut tokens = 0u64;
    let mut last = 0.0;
    let mut step_secs = Vec::new();
    let mut cpu_secs = Vec::new();
    for _ in 0..steps {
        let (s0, c0) = (std::time::Instant::now(), cpu_seconds());
        let r = t.step()?;
        step_secs.push(s0.elapsed().as_secs_f64());
        cpu_secs.push(cpu_seconds() - c0);
        tokens += (spec.train.global_batch * spec.data.seq_len) as u64;
        last = r.loss;
    }
    let secs = start.elapsed().as_secs_f64();
    step_secs.sort_by(f64::total_cmp);
    cpu_secs.sort_by(f64::total_cmp);
    let median = step_secs
        .get(step_secs.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({
            "impl": "trellis-worker",
            "steps": steps,
            "tokens": tokens,
            "seconds": secs,
            "tokens_per_second": tokens as f64 / secs,
            "median_step_seconds": median,
            "median_step_tokens_per_second": (spec.train.global_batch * spec.data.seq_len) as f64 / median,
            "median_step_cpu_seconds": cpu_secs.get(cpu_secs.len() / 2).copied().unwrap_or(f64::NAN),
            "final_loss": last,
            "threads": tch::get_num_threads(),
            "precision": t.precision().name(),
            "activation_checkpointing": spec.train.activation_checkpointing,
            "peak_rss_mib": peak_rss_mib(),
            "flops_per_token": flops_per_token(t.config(), spec.data.seq_len),
            "params": t.model().num_parameters(),
            "vocab": t.config().vocab_size,
        })
    );
    Ok(())
}

/// Training FLOPs per token (forward + backward) of `cfg` at sequence length `seq`: `6·N` for the
/// matmul parameters N (all but the embedding lookup) plus `12·L·s·h` for attention scores and
/// values (the PaLM paper's count, not halved for the causal mask).
fn flops_per_token(cfg: &trellis_core::config::ModelConfig, seq: usize) -> f64 {
    let n = cfg.num_parameters() - (cfg.vocab_size * cfg.hidden_size) as u64;
    6.0 * n as f64 + 12.0 * (cfg.num_hidden_layers * seq * cfg.hidden_size) as f64
}

/// CPU time (user + system, all threads) this process has used, in seconds (/proc/self/stat;
/// 0 where unreadable): on a shared machine less sensitive to other processes than wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // utime and stime, in clock ticks of USER_HZ = 100 on Linux.
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => 0.0,
    }
}

/// This process's peak resident set size (`VmHWM` of /proc/self/status) in MiB; 0 where
/// unreadable.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Exit code of an error chain: 2 for bad input, 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(trellis_agent::Error::Unavailable { .. }) = cause.downcast_ref() {
            return 3;
        }
        if let Some(w) = cause.downcast_ref::<trellis_worker::Error>() {
            return if w.is_bad_input() { 2 } else { 1 };
        }
        if let Some(c) = cause.downcast_ref::<trellis_core::Error>() {
            return if trellis_worker::error::core_is_bad_input(c) {
                2
            } else {
                1
            };
        }
    }
    1
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Managed workers log (JSON with TRELLIS_LOG_FORMAT=json) and export spans over OTLP when
    // OTEL_EXPORTER_OTLP_ENDPOINT is set; the standalone CLI prints its own lines and only warns.
    let log_format = std::env::var("TRELLIS_LOG_FORMAT").unwrap_or_default();
    let managed_mode = cli.cmd.is_none() && cli.coordinator.is_some();
    let telemetry = trellis_telemetry::Options {
        default_log_filter: if managed_mode { "info" } else { "warn" }.into(),
        log_format: log_format.parse().unwrap_or_default(),
        ..trellis_telemetry::Options::new("trellis-worker")
    };
    let _telemetry = match trellis_telemetry::init_with(telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let res = match (cli.cmd, cli.coordinator) {
        (Some(Cmd::Train { job, out, stop_at }), _) => train(job, out, stop_at),
        (Some(Cmd::Eval { checkpoint, text, job, seq_len, device, output }), _) => {
            eval(checkpoint, text, job, seq_len, device, output)
        }
        (
            Some(Cmd::Generate {
                checkpoint,
                prompt,
                max_tokens,
                temperature,
                top_k,
                seed,
                device,
                threads,
                no_kv_cache,
                output,
            }),
            _,
        ) => generate(
            checkpoint,
            prompt,
            trellis_worker::generate::Options {
                max_tokens,
                temperature,
                top_k,
                seed,
                kv_cache: !no_kv_cache,
            },
            device,
            threads,
            output,
        ),
        (
            Some(Cmd::Bench {
                job,
                steps,
                warmup,
                out,
                precision,
                activation_checkpointing,
            }),
            _,
        ) => bench(
            job,
            steps,
            warmup,
            out,
            precision,
            activation_checkpointing,
        ),
        (None, Some(url)) => managed(&url, &cli.device, cli.give_up_after, &cli.tls),
        (None, None) => Err(anyhow::anyhow!(
            "nothing to do: use `trellis-worker train --job JOB.toml`, `trellis-worker eval ...`, `trellis-worker generate ...` or `trellis-worker --coordinator URL`"
        )
        .context("usage")),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain joined.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {}", msg.replace('\n', " "));
            let code = if e.chain().any(|c| c.to_string() == "usage") {
                2
            } else {
                exit_code(&e)
            };
            ExitCode::from(code)
        }
    }
}

/// Managed mode: register with the coordinator and train as it commands. The agent
/// (`trellis_agent`) owns the session, the ring collective and the lockstep command queue; the
/// trainer runs on the agent's dedicated training thread. Environment (set by the Helm chart):
/// `TRELLIS_WORKER_ID`, `TRELLIS_RING_PORT` (listen on 0.0.0.0:PORT), `TRELLIS_ADVERTISE_HOST`
/// (the name peers reach this pod by).
fn managed(url: &str, device: &str, give_up_after: u64, tls: &TlsArgs) -> Result<()> {
    let dev = parse_device(device).context("--device")?;
    // A CUDA rank shares tensors over NCCL: say so in Hello (with fresh unique ids) when it
    // loads; the coordinator refuses to put a CUDA rank that cannot into a group of several.
    let nccl: Option<trellis_agent::NcclIdSource> = match dev {
        tch::Device::Cuda(_) => match trellis_comm::nccl::available() {
            Ok(()) => {
                tracing::info!(device, "collective capability: NCCL");
                Some(trellis_agent::nccl_unique_id)
            }
            Err(e) => {
                tracing::warn!(
                    device,
                    "no NCCL on this worker ({e}); it can only train alone (world 1)"
                );
                None
            }
        },
        _ => None,
    };
    // mTLS: the worker id is the one in the certificate (the coordinator refuses any other).
    let (tls, cert_id) = match (&tls.tls_cert, &tls.tls_key, &tls.ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let pem = std::fs::read(cert)
                .with_context(|| format!("cannot read --tls-cert {}", cert.display()))?;
            let id = trellis_auth::Identity::from_cert_pem(&pem).context("--tls-cert")?;
            let id = id.worker_id().map(str::to_string).with_context(|| {
                format!("--tls-cert {} is not a worker certificate ({id}); issue one with `coordctl certs worker ID DIR`", cert.display())
            })?;
            (
                Some(trellis_auth::tls::client_tls(ca, cert, key)?),
                Some(id),
            )
        }
        _ => (None, None),
    };
    let mut options = trellis_agent::AgentOptions {
        device: device.to_string(),
        worker_id: std::env::var("TRELLIS_WORKER_ID")
            .ok()
            .filter(|s| !s.is_empty())
            .or(cert_id),
        tls,
        ring_advertise_host: std::env::var("TRELLIS_ADVERTISE_HOST")
            .ok()
            .filter(|s| !s.is_empty()),
        // A coordinator that stays away this long is gone for good: exit so an orchestrator
        // restarts the worker.
        give_up_after: Some(std::time::Duration::from_secs(give_up_after)),
        nccl,
        ..Default::default()
    };
    if let Ok(port) = std::env::var("TRELLIS_RING_PORT") {
        options.ring_bind = format!("0.0.0.0:{port}");
    }
    let device = device.to_string();
    let factory = move |a: &trellis_agent::Assignment, groups: trellis_agent::Collectives| {
        let mut a = a.clone();
        a.spec.train.device = device.clone();
        trellis_worker::managed::ManagedRunner::build(&a, groups)
            .map(|r| Box::new(r) as Box<dyn trellis_agent::Runner>)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(trellis_agent::run(url.to_string(), options, factory))?;
    Ok(())
}
