//! The `coordctl` binary as operators and scripts use it: exit codes, one-line errors, `plan`
//! values, offline `checkpoint grow` / `export --hf`. No coordinator is needed.
use std::path::{Path, PathBuf};
use std::process::Command;
use trellis_core::checkpoint::{self, HostTensor, Layout, ScheduleState, TrainerState};
use trellis_core::config::ModelConfig;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn coordctl_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordctl"));
    cmd.args(args)
        .env_remove("TRELLIS_ENDPOINT")
        .env_remove("TRELLIS_CA")
        .env_remove("TRELLIS_CERT")
        .env_remove("TRELLIS_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run coordctl");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn coordctl(args: &[&str]) -> Run {
    coordctl_env(args, &[])
}

/// A loopback endpoint with nothing listening.
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// Exit code `code`, nothing on stdout, exactly one `error: …` line on stderr; returns it.
fn assert_error(r: &Run, code: i32, what: &str) -> String {
    assert_eq!(
        r.code, code,
        "{what}: exit {} (want {code}); stderr: {}",
        r.code, r.stderr
    );
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want one stderr line, got {:?}",
        r.stderr
    );
    assert!(lines[0].starts_with("error: "), "{what}: {:?}", lines[0]);
    assert!(r.stdout.is_empty(), "{what}: stdout {:?}", r.stdout);
    lines[0].to_string()
}

fn json(r: &Run) -> serde_json::Value {
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.stdout))
}

// ------------------------------------------------------------------------------------------
// Usage and local validation: exit 2, checked before any connection
// ------------------------------------------------------------------------------------------

#[test]
fn bad_factors_are_refused_locally_with_exit_2() {
    let ep = dead_endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    for factor in ["0", "1", "-4", "2.5", "four"] {
        for args in [
            vec!["--endpoint", &ep, "grow", "--factor", factor],
            vec!["checkpoint", "grow", "--factor", factor, a, b],
            vec![
                "plan", "--params", "7B", "--tokens", "2T", "--factor", factor,
            ],
        ] {
            let r = coordctl(&args);
            let line = assert_error(&r, 2, &format!("{args:?}"));
            assert!(
                line.contains("--factor") && line.contains("factor must be"),
                "{line}"
            );
        }
    }
    // `--factor=-4` spelling too.
    let r = coordctl(&["--endpoint", &ep, "grow", "--factor=-4"]);
    assert_error(&r, 2, "--factor=-4");
}

#[test]
fn unknown_operator_and_optimizer_are_refused_locally() {
    let ep = dead_endpoint();
    let r = coordctl(&[
        "--endpoint",
        &ep,
        "grow",
        "--factor",
        "4",
        "--operator",
        "stak",
    ]);
    let line = assert_error(&r, 2, "unknown operator");
    assert!(
        line.contains("unknown growth operator 'stak'") && line.contains("stack, interpolate"),
        "{line}"
    );

    let r = coordctl(&[
        "--endpoint",
        &ep,
        "grow",
        "--factor",
        "4",
        "--optimizer",
        "keep",
    ]);
    let line = assert_error(&r, 2, "unknown optimizer");
    assert!(line.contains("reset") && line.contains("carry"), "{line}");

    let r = coordctl(&[
        "checkpoint",
        "grow",
        "--factor",
        "2",
        "--operator",
        "nope",
        "x",
        "y",
    ]);
    assert_error(&r, 2, "offline unknown operator");

    let r = coordctl(&[
        "--endpoint",
        &ep,
        "grow",
        "--factor",
        "4",
        "--mask-ramp-steps",
        "10",
    ]);
    let line = assert_error(&r, 2, "mask ramp without random");
    assert!(line.contains("--operator random"), "{line}");
}

#[test]
fn clap_usage_errors_are_one_line_with_exit_2() {
    for args in [
        vec![],
        vec!["checkpoint"],
        vec!["grow"],
        vec!["grow", "--factr", "4"],
        vec!["frobnicate"],
        vec!["--output", "yaml", "status"],
        vec!["plan", "--params", "7X", "--tokens", "2T"],
        vec!["plan", "--params", "-5", "--tokens", "2T"],
        vec!["checkpoint", "export", "in"],
    ] {
        let r = coordctl(&args);
        let line = assert_error(&r, 2, &format!("{args:?}"));
        assert!(line.contains("--help"), "{line}");
    }
    let r = coordctl(&["grow", "--factr", "4"]);
    assert!(
        r.stderr.contains("'--factor'") && r.stderr.contains("coordctl grow --help"),
        "{}",
        r.stderr
    );
}

#[test]
fn help_and_version_exit_0() {
    for args in [vec!["--help"], vec!["grow", "--help"], vec!["--version"]] {
        let r = coordctl(&args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        assert!(!r.stdout.is_empty());
    }
}

const JOB: &str = r#"
[job]
name = "cli-test"

[model]
preset = "tiny"

[data]
train = "corpus/train.txt"
valid = "corpus/valid.txt"
seq_len = 64

[train]
global_batch = 8
max_steps = 100

[[growth]]
at_step = 50
factor = 4
"#;

#[test]
fn missing_job_file_is_exit_2_naming_it() {
    let ep = dead_endpoint();
    let r = coordctl(&["--endpoint", &ep, "job", "submit", "/nonexistent/job.toml"]);
    let line = assert_error(&r, 2, "missing job file");
    assert!(line.contains("/nonexistent/job.toml"), "{line}");
}

#[test]
fn misspelt_key_in_job_file_is_exit_2_naming_file_and_key() {
    let ep = dead_endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("job.toml");
    std::fs::write(&path, JOB.replace("seq_len", "seq_lenn")).unwrap();
    let r = coordctl(&["--endpoint", &ep, "job", "submit", path.to_str().unwrap()]);
    let line = assert_error(&r, 2, "misspelt key");
    assert!(
        line.contains("job.toml") && line.contains("seq_lenn"),
        "{line}"
    );

    // A cross-field error (growth after the end of the run) is local too.
    std::fs::write(&path, JOB.replace("at_step = 50", "at_step = 500")).unwrap();
    let r = coordctl(&["--endpoint", &ep, "job", "submit", path.to_str().unwrap()]);
    let line = assert_error(&r, 2, "growth out of the run");
    assert!(
        line.contains("job.toml") && line.contains("growth[0]"),
        "{line}"
    );
}

#[test]
fn bad_endpoint_is_exit_2() {
    for ep in ["ftp://x:1", "https://127.0.0.1:50051", "http://[::1"] {
        let r = coordctl(&["--endpoint", ep, "status"]);
        let line = assert_error(&r, 2, ep);
        assert!(line.contains("--endpoint"), "{line}");
    }
}

#[test]
fn tls_flags_are_checked_locally() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("pki");
    assert_eq!(coordctl(&["certs", "init", d.to_str().unwrap()]).code, 0);
    let f = |n: &str| d.join(n).display().to_string();
    let (ca, cert, key) = (f("ca.crt"), f("operator.crt"), f("operator.key"));
    let e = assert_error(
        &coordctl(&[
            "--endpoint",
            "https://127.0.0.1:1",
            "--cert",
            &cert,
            "status",
        ]),
        2,
        "--cert alone",
    );
    assert!(e.contains("--ca, --cert and --key"), "{e}");
    let missing = f("nope.crt");
    let e = assert_error(
        &coordctl(&[
            "--endpoint",
            "https://127.0.0.1:1",
            "--ca",
            &missing,
            "--cert",
            &cert,
            "--key",
            &key,
            "status",
        ]),
        2,
        "missing CA file",
    );
    assert!(e.contains("nope.crt"), "{e}");
    let e = assert_error(
        &coordctl(&[
            "--endpoint",
            "http://127.0.0.1:1",
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "status",
        ]),
        2,
        "TLS files with http://",
    );
    assert!(e.contains("https://"), "{e}");
    // From the environment too; unreachable stays exit 3 (not a TLS refusal).
    let dead = dead_endpoint().replace("http://", "https://");
    let r = coordctl_env(
        &["--endpoint", &dead, "status"],
        &[
            ("TRELLIS_CA", &ca),
            ("TRELLIS_CERT", &cert),
            ("TRELLIS_KEY", &key),
        ],
    );
    let e = assert_error(&r, 3, "unreachable over TLS");
    assert!(e.contains("cannot reach"), "{e}");
}

// ------------------------------------------------------------------------------------------
// Unreachable coordinator: exit 3
// ------------------------------------------------------------------------------------------

#[test]
fn unreachable_endpoint_is_exit_3_with_advice() {
    let ep = dead_endpoint();
    for args in [
        vec!["status"],
        vec!["workers"],
        vec!["watch"],
        vec!["grow", "--factor", "4"],
        vec!["pause"],
        vec!["resume"],
        vec!["loss"],
        vec!["checkpoint", "save"],
        vec!["checkpoint", "list"],
        vec!["plan", "--params", "7B", "--tokens", "2T", "--remote"],
    ] {
        let mut full = vec!["--endpoint", ep.as_str()];
        full.extend(&args);
        let r = coordctl(&full);
        let line = assert_error(&r, 3, &format!("{args:?}"));
        assert!(
            line.contains(&ep) && line.contains("connection refused"),
            "{line}"
        );
        assert!(line.contains("TRELLIS_ENDPOINT"), "{line}");
    }
    // The endpoint also comes from the environment, and `host:port` means http.
    let hostport = ep.trim_start_matches("http://").to_string();
    let r = coordctl_env(
        &["status", "--output", "json"],
        &[("TRELLIS_ENDPOINT", &hostport)],
    );
    let line = assert_error(&r, 3, "env endpoint");
    assert!(line.contains(&ep), "{line}");
}

#[test]
fn valid_job_reaches_the_connection_step() {
    let ep = dead_endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("job.toml");
    std::fs::write(&path, JOB).unwrap();
    let r = coordctl(&["--endpoint", &ep, "job", "submit", path.to_str().unwrap()]);
    assert_error(&r, 3, "valid job, no coordinator");
}

// ------------------------------------------------------------------------------------------
// plan
// ------------------------------------------------------------------------------------------

#[test]
fn plan_llama2_7b_at_2t_is_in_range() {
    let r = coordctl(&[
        "--output", "json", "plan", "--params", "7B", "--tokens", "2T",
    ]);
    let v = json(&r);
    assert_eq!(v["in_range"], true);
    assert_eq!(v["factor"], 4);
    let d = v["recommended_tokens"].as_f64().unwrap();
    assert!((d - 11.11e9).abs() < 0.01e9, "d = {d}");
    assert!((v["flops"].as_f64().unwrap() - 6.0 * 7e9 * 2e12).abs() < 1e18);
    assert!(v["rule"].as_str().unwrap().len() > 10);
    for key in ["params", "budget_tokens", "formula_tokens"] {
        assert!(v[key].is_number(), "{key}");
    }

    // Scientific notation, and the table.
    let r = coordctl(&["plan", "--params", "7e9", "--tokens", "2e12"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("11.11B tokens"), "{}", r.stdout);
    assert!(
        r.stdout.contains("in fitted range") && r.stdout.contains("yes"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("8.40e22 FLOPs"), "{}", r.stdout);
    assert!(
        r.stdout.contains("growth factor g") && r.stdout.contains("4 (the paper's recommendation)")
    );

    // A stated factor is carried through.
    let v = json(&coordctl(&[
        "--output", "json", "plan", "--params", "6.74e9", "--tokens", "2T", "--factor", "2",
    ]));
    assert_eq!(v["factor"], 2);
}

#[test]
fn plan_125m_at_2_5b_is_out_of_range_with_a_fallback() {
    let r = coordctl(&[
        "plan", "--params", "125M", "--tokens", "2.5B", "--output", "json",
    ]);
    let v = json(&r);
    assert_eq!(v["in_range"], false);
    let budget = v["budget_tokens"].as_f64().unwrap();
    assert_eq!(budget, 2.5e9);
    // The formula overshoots the whole budget; the recommendation must not.
    assert!(v["formula_tokens"].as_f64().unwrap() > budget);
    let d = v["recommended_tokens"].as_f64().unwrap();
    assert!(d > 0.0 && d < budget, "d = {d}");
    assert!(
        v["rule"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("fallback"),
        "{}",
        v["rule"]
    );

    let r = coordctl(&["plan", "--params", "125M", "--tokens", "2.5B"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("NO: outside the range"), "{}", r.stdout);
    assert!(r.stdout.to_lowercase().contains("fallback"), "{}", r.stdout);
}

// ------------------------------------------------------------------------------------------
// Offline checkpoint grow / export
// ------------------------------------------------------------------------------------------

fn tiny_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 32,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        head_dim: None,
        rope_scaling: None,
    }
}

/// Deterministic, distinct values per tensor.
fn tensor(shape: &[usize], salt: usize) -> HostTensor {
    let n: usize = shape.iter().product();
    HostTensor {
        shape: shape.to_vec(),
        data: (0..n)
            .map(|i| ((i * 31 + salt * 7) % 97) as f32 / 97.0 - 0.5)
            .collect(),
    }
}

/// A committed 2-layer checkpoint (with a tokenizer.json) under `root`; returns its dir.
fn tiny_checkpoint(root: &Path, with_moments: bool) -> PathBuf {
    let cfg = tiny_config();
    let model: Vec<(String, HostTensor)> = cfg
        .tensor_shapes()
        .into_iter()
        .enumerate()
        .map(|(i, (n, s))| (n, tensor(&s, i)))
        .collect();
    let optim: Vec<(String, HostTensor)> = if with_moments {
        model
            .iter()
            .flat_map(|(n, t)| {
                checkpoint::moment_names(n)
                    .into_iter()
                    .map(move |m| (m, HostTensor::full(&t.shape, 0.01)))
            })
            .collect()
    } else {
        Vec::new()
    };
    let step = 10;
    let tmp = checkpoint::tmp_dir(root, step);
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join(checkpoint::TOKENIZER), "{\"model\": {}}").unwrap();
    let report = checkpoint::write_full(&tmp, 1, &model, &optim).unwrap();
    let state = TrainerState {
        job: "cli-test".into(),
        step,
        tokens: 10 * 8 * 16,
        generation: 0,
        model: cfg,
        layout: Layout { dp: 1, tp: 1 },
        data_cursor: 80,
        seed: 1234,
        schedule: ScheduleState {
            start_step: 0,
            end_step: 100,
            peak_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 5,
        },
        optimizer_step: step,
        next_growth_stage: 0,
        growth_history: vec![],
        mask: None,
    };
    checkpoint::finalize(&tmp, &state, &[report]).unwrap()
}

#[test]
fn offline_grow_stacks_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tiny_checkpoint(tmp.path(), false);
    let out = tmp.path().join("grown");
    let r = coordctl(&[
        "checkpoint",
        "grow",
        "--factor",
        "2",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("2 → 4 layers"), "{}", r.stdout);
    assert!(
        r.stdout.contains("manifest.json") && r.stdout.contains("trainer_state.json"),
        "{}",
        r.stdout
    );

    let grown = checkpoint::Checkpoint::open(&out).unwrap();
    assert_eq!(grown.state.model.num_hidden_layers, 4);
    assert_eq!(grown.state.generation, 1);
    let src = checkpoint::Checkpoint::open(&input).unwrap();
    // G_stack: target layer t copies source layer t mod L.
    for t in 0..4 {
        let name = format!("model.layers.{t}.self_attn.q_proj.weight");
        let orig = format!("model.layers.{}.self_attn.q_proj.weight", t % 2);
        assert_eq!(
            grown.read_full(&name).unwrap(),
            src.read_full(&orig).unwrap(),
            "{name}"
        );
    }

    // The same in JSON, with another operator, into a second dir.
    let out2 = tmp.path().join("grown-zero");
    let r = coordctl(&[
        "--output",
        "json",
        "checkpoint",
        "grow",
        "--factor",
        "3",
        "--operator",
        "zero",
        input.to_str().unwrap(),
        out2.to_str().unwrap(),
    ]);
    let v = json(&r);
    assert_eq!(v["from_layers"], 2);
    assert_eq!(v["to_layers"], 6);
    assert_eq!(v["operator"], "zero");
    assert_eq!(v["factor"], 3);
    assert_eq!(v["optimizer"], "reset");
    assert!(v["to_parameters"].as_u64().unwrap() > v["from_parameters"].as_u64().unwrap());
    let files = v["files"].as_array().unwrap();
    assert!(files
        .iter()
        .any(|f| f["path"].as_str().unwrap().ends_with("manifest.json")));
    assert!(files.iter().all(|f| f["bytes"].is_u64()));

    // Growing into a non-empty directory is refused (exit 2), and the output is untouched.
    let r = coordctl(&[
        "checkpoint",
        "grow",
        "--factor",
        "2",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_error(&r, 2, "non-empty OUT_DIR");
}

#[test]
fn offline_grow_carry_needs_moments() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tiny_checkpoint(tmp.path(), false);
    let out = tmp.path().join("grown");
    let r = coordctl(&[
        "checkpoint",
        "grow",
        "--factor",
        "2",
        "--optimizer",
        "carry",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let line = assert_error(&r, 2, "carry without moments");
    assert!(line.contains("optimizer=reset"), "{line}");

    let tmp2 = tempfile::tempdir().unwrap();
    let input = tiny_checkpoint(tmp2.path(), true);
    let out = tmp2.path().join("grown");
    let r = coordctl(&[
        "checkpoint",
        "grow",
        "--factor",
        "2",
        "--optimizer",
        "carry",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(checkpoint::Checkpoint::open(&out).unwrap().has_optim());
}

#[test]
fn offline_commands_refuse_missing_input() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let out = tmp.path().join("out");
    let r = coordctl(&[
        "checkpoint",
        "grow",
        "--factor",
        "2",
        missing.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let line = assert_error(&r, 2, "grow missing input");
    assert!(line.contains("nope"), "{line}");
    let r = coordctl(&[
        "checkpoint",
        "export",
        "--hf",
        out.to_str().unwrap(),
        missing.to_str().unwrap(),
    ]);
    assert_error(&r, 2, "export missing input");
    // A directory that is not a checkpoint.
    let r = coordctl(&[
        "checkpoint",
        "export",
        "--hf",
        out.to_str().unwrap(),
        tmp.path().to_str().unwrap(),
    ]);
    let line = assert_error(&r, 2, "export non-checkpoint");
    assert!(line.contains("manifest.json"), "{line}");
}

#[test]
fn export_hf_writes_config_weights_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tiny_checkpoint(tmp.path(), true);
    let hf = tmp.path().join("hf");
    let r = coordctl(&[
        "checkpoint",
        "export",
        "--hf",
        hf.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(hf.join(f).is_file(), "{f}");
        assert!(r.stdout.contains(f), "{}", r.stdout);
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    let tensors = checkpoint::read_safetensors(&hf.join("model.safetensors")).unwrap();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"model.embed_tokens.weight") && names.contains(&"lm_head.weight"));
    assert!(
        !names.iter().any(|n| n.contains("exp_avg")),
        "moments are not exported"
    );

    // JSON shape.
    let hf2 = tmp.path().join("hf2");
    let v = json(&coordctl(&[
        "checkpoint",
        "export",
        "--output",
        "json",
        "--hf",
        hf2.to_str().unwrap(),
        input.to_str().unwrap(),
    ]));
    assert_eq!(v["layers"], 2);
    assert_eq!(v["parameters"], tiny_config().num_parameters());
    // config, weights, tokenizer.json and the tokenizer/generation configs made for it.
    assert_eq!(v["files"].as_array().unwrap().len(), 5);

    // --dtype bf16: half the weight bytes, torch_dtype bfloat16; an unknown dtype is exit 2.
    let hf3 = tmp.path().join("hf3");
    let r = coordctl(&[
        "checkpoint",
        "export",
        "--dtype",
        "bf16",
        "--hf",
        hf3.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf3.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let size = |d: &std::path::Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&hf3) * 2 < size(&hf2) + 4096,
        "{} vs {}",
        size(&hf3),
        size(&hf2)
    );
    let r = coordctl(&[
        "checkpoint",
        "export",
        "--dtype",
        "fp8",
        "--hf",
        tmp.path().join("hf4").to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("fp32 or bf16"), "{}", r.stderr);
}

/// `checkpoint import --hf`: an HF directory (here: the export of a checkpoint) comes back as a
/// step-0 checkpoint with the same weights; what cannot be imported is one line, exit 2.
#[test]
fn import_hf_round_trips_an_export_and_refuses_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tiny_checkpoint(tmp.path(), true);
    let hf = tmp.path().join("hf");
    let r = coordctl(&[
        "checkpoint",
        "export",
        "--hf",
        hf.to_str().unwrap(),
        "--max-shard-size",
        "2KB",
        input.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(hf.join("model.safetensors.index.json").is_file());
    let out = tmp.path().join("imported");
    let v = json(&coordctl(&[
        "checkpoint",
        "import",
        "--output",
        "json",
        "--hf",
        hf.to_str().unwrap(),
        out.to_str().unwrap(),
    ]));
    assert_eq!(v["layers"], 2);
    assert_eq!(v["parameters"], tiny_config().num_parameters());
    assert_eq!(v["source_dtypes"], serde_json::json!(["F32"]));
    assert_eq!(v["tokenizer"], true);
    let (a, b) = (
        checkpoint::Checkpoint::open(&input).unwrap(),
        checkpoint::Checkpoint::open(&out).unwrap(),
    );
    assert_eq!(b.state.step, 0);
    assert_eq!(b.state.model, a.state.model);
    for (name, _) in tiny_config().tensor_shapes() {
        assert_eq!(
            a.read_full(&name).unwrap(),
            b.read_full(&name).unwrap(),
            "{name}"
        );
    }

    // Refusals: an existing non-empty output, another architecture, a missing directory.
    let r = coordctl(&[
        "checkpoint",
        "import",
        "--hf",
        hf.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let e = assert_error(&r, 2, "import into a non-empty dir");
    assert!(e.contains("exists and is not empty"), "{e}");
    let conf = hf.join("config.json");
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("LlamaForCausalLM", "Qwen2ForCausalLM");
    std::fs::write(&conf, text).unwrap();
    let r = coordctl(&[
        "checkpoint",
        "import",
        "--hf",
        hf.to_str().unwrap(),
        tmp.path().join("q").to_str().unwrap(),
    ]);
    let e = assert_error(&r, 2, "another architecture");
    assert!(
        e.contains(
            "architectures is [\"Qwen2ForCausalLM\"]; only LlamaForCausalLM can be imported"
        ),
        "{e}"
    );
    assert!(!tmp.path().join("q").exists());
    let r = coordctl(&[
        "checkpoint",
        "import",
        "--hf",
        tmp.path().join("nope").to_str().unwrap(),
        tmp.path().join("n").to_str().unwrap(),
    ]);
    let e = assert_error(&r, 2, "missing input");
    assert!(e.contains("is not a directory"), "{e}");
    let r = coordctl(&[
        "checkpoint",
        "export",
        "--max-shard-size",
        "5XB",
        "--hf",
        tmp.path().join("x").to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is not a size"), "{}", r.stderr);
}

#[test]
fn certs_init_and_worker_write_pem_files_naming_identities() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pki");
    let d = dir.to_str().unwrap();
    let r = coordctl(&[
        "--output",
        "json",
        "certs",
        "init",
        d,
        "--host",
        "coord.internal",
        "--host",
        "10.0.0.5",
    ]);
    let v = json(&r);
    let files: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for want in [
        "ca.crt",
        "ca.key",
        "coordinator.crt",
        "coordinator.key",
        "operator.crt",
        "operator.key",
        "viewer.crt",
        "viewer.key",
    ] {
        assert!(files.contains(&want), "{want} not in {files:?}");
        assert!(dir.join(want).is_file(), "{want} not written");
    }
    let id = |f: &str| trellis_auth::Identity::from_cert_pem(&std::fs::read(dir.join(f)).unwrap());
    assert_eq!(
        id("operator.crt").unwrap(),
        trellis_auth::Identity::operator("operator")
    );
    assert_eq!(
        id("viewer.crt").unwrap(),
        trellis_auth::Identity::viewer("viewer")
    );

    let r = coordctl(&["certs", "worker", "gpu-node-3-4711", d]);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert!(r.stdout.contains("wrote 2 files"), "{}", r.stdout);
    assert!(
        r.stdout.contains("worker-gpu-node-3-4711.key"),
        "{}",
        r.stdout
    );
    assert_eq!(
        id("worker-gpu-node-3-4711.crt").unwrap(),
        trellis_auth::Identity::worker("gpu-node-3-4711")
    );

    // Refusals: one line, exit 2, nothing overwritten.
    let before = std::fs::read(dir.join("ca.key")).unwrap();
    let e = assert_error(&coordctl(&["certs", "init", d]), 2, "init twice");
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), before);
    let e = assert_error(
        &coordctl(&["certs", "worker", "gpu-node-3-4711", d]),
        2,
        "worker twice",
    );
    assert!(e.contains("already exists"), "{e}");
    let e = assert_error(&coordctl(&["certs", "worker", "a/b", d]), 2, "bad id");
    assert!(e.contains("not a valid name"), "{e}");
    let empty = t.path().join("empty");
    let e = assert_error(
        &coordctl(&["certs", "worker", "w1", empty.to_str().unwrap()]),
        2,
        "no CA",
    );
    assert!(e.contains("coordctl certs init"), "{e}");
    let e = assert_error(
        &coordctl(&["certs", "init", empty.to_str().unwrap(), "--host", "a b"]),
        2,
        "bad host",
    );
    assert!(e.contains("--host"), "{e}");
}
