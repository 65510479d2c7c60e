//! Every example job spec in `deploy/jobs/` parses and validates (including its growth stages
//! against its model).
mod common;

#[test]
fn every_deploy_job_spec_parses() {
    let dir = common::repo().join("deploy").join("jobs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let spec = trellis_core::job::JobSpec::from_file(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(
                spec.data.train.exists(),
                "{}: {} missing",
                p.display(),
                spec.data.train.display()
            );
            let cfg = spec.model_config(spec.data.vocab_size).unwrap();
            trellis_worker::trainer::check_growth_stages(&spec, &cfg)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 1, "no job specs in {}", dir.display());
}

/// The GPU example specs: each parses, asks for bf16 on CUDA on the stated number of GPUs, and
/// the layout planner fits its model (and every grown model) at the stated per-GPU memory, at
/// the spec's own layout for the initial model.
#[test]
fn gpu_example_specs_fit_their_gpus() {
    use trellis_core::config::PrecisionChoice;
    use trellis_core::layout::{memory_per_rank, plan_layout};
    const GIB: u64 = 1 << 30;
    // (spec, GPUs, GiB per GPU, layers after each growth, TP the planner picks for the last model)
    let cases = [
        ("llama-1b-8gpu.toml", 8, 80, vec![22], 1),
        ("llama-7b-gstack-64gpu.toml", 64, 80, vec![8, 32], 4),
    ];
    for (file, gpus, gib, layers, last_tp) in cases {
        let p = common::repo().join("deploy").join("jobs").join(file);
        let spec = trellis_core::job::JobSpec::from_file(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(spec.parallel.dp * spec.parallel.tp, gpus, "{file}");
        assert!(spec.train.device.starts_with("cuda"), "{file}");
        assert_eq!(spec.train.precision, PrecisionChoice::Bf16, "{file}");
        let budget = gib * GIB;
        let mb = spec.train.micro_batch.unwrap();
        let seq = spec.data.seq_len;
        let mut cfg = spec.model_config(spec.data.vocab_size).unwrap();
        trellis_worker::trainer::check_growth_stages(&spec, &cfg).unwrap();
        let initial = plan_layout(&cfg, gpus, budget, mb, seq).unwrap();
        assert_eq!(
            initial.tp, spec.parallel.tp,
            "{file}: {}",
            initial.explanation
        );
        assert!(memory_per_rank(&cfg, spec.parallel.tp, mb, seq).total <= budget);
        let mut seen = vec![cfg.num_hidden_layers];
        let mut plan = initial;
        for stage in &spec.growth {
            cfg = trellis_core::growth::plan(&cfg, &stage.spec().unwrap())
                .unwrap()
                .new;
            plan = plan_layout(&cfg, gpus, budget, mb, seq)
                .unwrap_or_else(|e| panic!("{file}: the grown model does not fit: {e}"));
            seen.push(cfg.num_hidden_layers);
        }
        assert_eq!(seen, layers, "{file}");
        assert_eq!(plan.tp, last_tp, "{file}: {}", plan.explanation);
        eprintln!("{file}: {}", plan.explanation);
    }
}
