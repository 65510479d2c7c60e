//! The connection storm of `make bench-storm`, run in `make test` as a test: the
//! `trellis-coordinator` binary as a real process, simulated workers (raw gRPC sessions, no
//! training) that all open their sessions at once, then reconnect with jittered backoff after
//! the coordinator is `kill -9`ed and restarted on the same store and port; several rounds in a
//! row (the shared code is `bench/storm.rs`). Asserts the invariants, never the timings (the
//! figures are printed, and measured in docs/benchmarks.md with the full benchmark).
#[path = "../../bench/storm.rs"]
mod storm;

/// Workers per round and rounds: `make bench-storm`'s (about 2 s a round on 2 busy cores).
const WORKERS: usize = 500;
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_comes_back_after_a_storm_and_a_coordinator_kill() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_trellis-coordinator"));
    for round in 1..=ROUNDS {
        let r = storm::storm(bin, WORKERS, round).await;
        eprintln!("{}", r.summary);
        assert_eq!(r.missing, 0, "every worker assigned in the storm: {r:#?}");
        assert!(
            r.errors.is_empty(),
            "no session open failed while the coordinator was up: {r:#?}"
        );
        assert_eq!(
            r.missing_after_restart, 0,
            "every worker re-assigned by the restarted coordinator: {r:#?}"
        );
        assert!(
            r.epoch_after > r.epoch_before,
            "the restarted coordinator started a new epoch for every worker: {r:#?}"
        );
        assert!(r.ok());
    }
}
