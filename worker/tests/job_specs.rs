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
