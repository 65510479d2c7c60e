//! The `trellis-worker` binary end to end (real processes, libtorch on CPU): resume
//! bit-exactness across a growth, one-line refusals with exit code 2, and `eval` against a
//! Hugging Face export of the same checkpoint.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(worker_bin())
        .args(args)
        .output()
        .expect("trellis-worker runs")
}

fn write_job(dir: &Path, toml: &str) -> PathBuf {
    let p = dir.join("job.toml");
    std::fs::write(&p, toml).unwrap();
    p
}

fn train(job: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--job",
        job.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(
        o.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// (step, loss bits) of every train line of `metrics.jsonl`.
fn train_losses(out: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

fn stderr_line(o: &Output) -> String {
    let s = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(
        s.lines().count(),
        1,
        "expected one line on stderr, got: {s}"
    );
    assert!(s.starts_with("error: "), "{s}");
    s
}

const GROWTH: &str =
    "[[growth]]\nat_step = 6\nfactor = 4\noperator = \"stack\"\nwarmup_steps = 2\n";

#[test]
fn resume_through_a_growth_is_bit_exact_and_outputs_are_written() {
    let d = tempfile::tempdir().unwrap();
    let job = write_job(
        d.path(),
        &test_job_toml("resume", 12, GROWTH).replace("interval = 0", "interval = 4"),
    );
    let full = d.path().join("full");
    train(&job, &full, &[]);
    let reference = train_losses(&full);
    assert_eq!(reference.len(), 12);

    // Stop at step 4 (a checkpoint), then a fresh process resumes, grows at 6 and finishes.
    let split = d.path().join("split");
    train(&job, &split, &["--stop-at", "4"]);
    assert_eq!(train_losses(&split).len(), 4);
    let o = train(&job, &split, &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("resumed from"));
    assert_eq!(
        train_losses(&split),
        reference,
        "resumed losses differ from the uninterrupted run"
    );

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 12);
    assert_eq!(summary["layers_before"], 2);
    assert_eq!(summary["layers_after"], 8);
    assert_eq!(summary["growth_events"][0]["step"], 6);
    assert!(summary["params_after"].as_u64() > summary["params_before"].as_u64());
    assert!(summary["final_val_loss"].as_f64().unwrap() > 0.0);
    let png = std::fs::read(full.join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // Checkpoints: pre-growth (6), post-growth (7), periodic (4, 8), final (12).
    let root = full.join("checkpoints").join("resume");
    for s in [6, 7, 8, 12] {
        assert!(
            root.join(format!("step-{s}"))
                .join("manifest.json")
                .exists(),
            "step-{s}"
        );
    }
}

#[test]
fn bad_job_specs_are_refused_with_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let cases = [
        (
            test_job_toml("bad", 10, "").replace("max_steps", "max_stepz"),
            "max_stepz",
        ),
        (
            test_job_toml("bad", 10, "[[growth]]\nat_step = 5\nfactor = 1\n"),
            "factor",
        ),
        (
            test_job_toml("bad", 10, "[[growth]]\nat_step = 5\noperator = \"stak\"\n"),
            "stak",
        ),
    ];
    for (toml, needle) in cases {
        let job = write_job(d.path(), &toml);
        let o = run(&[
            "train",
            "--job",
            job.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let line = stderr_line(&o);
        assert!(line.contains(needle), "{line}");
    }
    assert!(
        !out.join("checkpoints").exists(),
        "a refused job wrote checkpoints"
    );
}

/// A managed worker asked for a CUDA device on a machine without one (this CPU machine, or a
/// CPU build of libtorch) refuses at start with one line, before it registers anywhere (the
/// coordinator address is never dialled).
#[test]
fn a_managed_worker_on_cuda_without_a_gpu_refuses_with_one_line() {
    if tch::Cuda::is_available() {
        println!("skipped: this machine has a CUDA device, so --device cuda is not refused");
        return;
    }
    for dev in ["cuda", "cuda:1"] {
        let o = run(&["--coordinator", "http://127.0.0.1:9", "--device", dev]);
        assert!(!o.status.success(), "--device {dev} started");
        let line = stderr_line(&o);
        assert!(
            line.contains("--device")
                && line.contains(&format!("device {dev} requested"))
                && line.contains("0 CUDA device"),
            "{line}"
        );
    }
}

#[test]
fn corrupt_or_mismatched_checkpoints_are_refused_with_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let job = write_job(d.path(), &test_job_toml("cmis", 3, ""));
    let out = d.path().join("out");
    train(&job, &out, &[]);
    let ckpt = out.join("checkpoints").join("cmis").join("step-3");

    // Resuming with another model config.
    let other = write_job(
        d.path(),
        &test_job_toml("cmis", 6, "").replace("intermediate_size = 88", "intermediate_size = 96"),
    );
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let o = run(&[
        "train",
        "--job",
        other.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr_line(&o).contains("intermediate_size"));
    assert_eq!(
        std::fs::read(out.join("metrics.jsonl")).unwrap(),
        before,
        "a refused resume changed the run"
    );

    // A flipped byte in a shard: eval names the file.
    let text = small_corpus().1;
    let ok = run(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "32",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let shard = ckpt.join("optim-tp0-of-1.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let o = run(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr_line(&o).contains("optim-tp0-of-1.safetensors"));
}

#[test]
fn eval_matches_transformers_on_the_hf_export_before_and_after_growth() {
    let d = tempfile::tempdir().unwrap();
    let job = write_job(d.path(), &test_job_toml("hfx", 8, GROWTH));
    let out = d.path().join("out");
    train(&job, &out, &[]);
    let text = small_corpus().1;
    let root = out.join("checkpoints").join("hfx");
    for (step, layers) in [(6, 2), (8, 8)] {
        let ckpt = root.join(format!("step-{step}"));
        let (a, tokens, l) = worker_eval_loss(&ckpt, &text, 32);
        assert_eq!(l, layers);
        let hf = d.path().join(format!("hf-{step}"));
        trellis_core::offline::export_hf(&ckpt, &hf).unwrap();
        // Loaded with AutoModelForCausalLM + AutoTokenizer from the export alone.
        let (b, hf_tokens) = hf_eval_loss(&hf, &text, 32);
        assert_eq!(tokens, hf_tokens, "tokenization differs");
        assert!(
            (a - b).abs() < 1e-4,
            "step {step}: trellis-worker eval {a} vs transformers {b}"
        );
    }
}

#[test]
fn usage_errors_exit_2_and_an_unreachable_coordinator_exits_3() {
    let o = run(&["train"]);
    assert_eq!(o.status.code(), Some(2));
    // Nothing listens on port 1: the managed worker retries, gives up, says what to check.
    let o = run(&[
        "--coordinator",
        "http://127.0.0.1:1",
        "--give-up-after",
        "2",
    ]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("cannot reach the coordinator") && last.contains("127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn kill_9_and_restart_continues_bit_exactly() {
    let d = tempfile::tempdir().unwrap();
    let growth = "[[growth]]\nat_step = 150\nfactor = 2\noperator = \"stack\"\n";
    let job = write_job(
        d.path(),
        &test_job_toml("kill", 300, growth).replace("interval = 0", "interval = 10"),
    );
    let full = d.path().join("full");
    train(&job, &full, &[]);
    let reference = train_losses(&full);

    let out = d.path().join("killed");
    let mut child = Command::new(worker_bin())
        .args([
            "train",
            "--job",
            job.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let latest = out.join("checkpoints").join("kill").join("latest");
    let t0 = std::time::Instant::now();
    while !latest.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    kill_9(child.id());
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before it could be killed; make the job longer"
    );
    let o = train(&job, &out, &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("resumed from"));
    assert_eq!(
        train_losses(&out),
        reference,
        "losses after kill -9 + restart differ"
    );
}

fn kill_9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}
