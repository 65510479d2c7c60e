//! Data parallelism: two ranks (threads, an in-process collective) on the same global batch
//! match one rank (loss and weights to float tolerance), and read disjoint halves of the batch.
mod common;
use common::local::Local;
use common::*;
use trellis_comm::Solo;
use trellis_worker::Trainer;

#[test]
fn two_dp_ranks_match_one_rank_on_the_same_global_batch() {
    let d = tempfile::tempdir().unwrap();
    // Prepare the data once before the ranks start (they share the cache).
    let spec = test_spec("dp", 20, "").clone();
    let mut single = Trainer::new(&spec, d.path(), 0, 1, Box::new(Solo)).unwrap();
    let ref_losses: Vec<f64> = (0..3).map(|_| single.step().unwrap().loss).collect();

    let out = d.path().to_path_buf();
    let handles: Vec<_> = Local::group(2)
        .into_iter()
        .map(|c| {
            let spec = spec.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                let rank = c.rank;
                let mut t = Trainer::new(&spec, &out, rank, 2, Box::new(c)).unwrap();
                let mut losses = Vec::new();
                let mut samples = Vec::new();
                for _ in 0..3 {
                    let r = t.step().unwrap();
                    losses.push(r.loss);
                    samples.push((r.samples, r.step_samples));
                }
                let params: Vec<Vec<f32>> = t
                    .model()
                    .named_parameters()
                    .iter()
                    .map(|(_, p)| Vec::try_from(&p.flatten(0, -1)).unwrap())
                    .collect();
                (losses, samples, params)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (rank, (losses, samples, params)) in results.iter().enumerate() {
        for (a, b) in losses.iter().zip(&ref_losses) {
            assert!(
                (a - b).abs() < 1e-5,
                "rank {rank}: loss {a} vs single-rank {b}"
            );
        }
        assert_eq!(samples[0].0, (rank as u64 * 2)..(rank as u64 * 2 + 2));
        assert_eq!(
            samples[2].0,
            (8 + rank as u64 * 2)..(8 + rank as u64 * 2 + 2)
        );
        // Every rank reports the step's whole global range (what the coordinator records).
        assert_eq!(samples[0].1, 0..4);
        assert_eq!(samples[2].1, 8..12);
        for ((name, p), mine) in single.model().named_parameters().iter().zip(params) {
            let refv: Vec<f32> = Vec::try_from(&p.flatten(0, -1)).unwrap();
            let max = refv
                .iter()
                .zip(mine)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                max < 1e-5,
                "rank {rank}: {name} differs from the single-rank run by {max}"
            );
        }
    }
    assert_eq!(results[0].2, results[1].2, "the DP replicas diverged");
}
