//! The trainer on real data (libtorch, CPU): determinism, checkpoint round trip, growth
//! policies through the trainer, and refusals that leave the trainer unchanged.
mod common;
use common::*;
use std::path::Path;
use trellis_comm::Solo;
use trellis_core::growth::{GrowthSpec, Operator, OptimizerPolicy};
use trellis_worker::schedule::lr_at;
use trellis_worker::{PostGrowthSchedule, Trainer};

fn trainer(name: &str, extra: &str, out: &Path) -> Trainer {
    Trainer::new(&test_spec(name, 40, extra), out, 0, 1, Box::new(Solo)).unwrap()
}

fn losses(t: &mut Trainer, n: usize) -> Vec<f64> {
    (0..n).map(|_| t.step().unwrap().loss).collect()
}

fn params_equal(a: &Trainer, b: &Trainer) -> bool {
    a.model().named_parameters().len() == b.model().named_parameters().len()
        && a.model()
            .named_parameters()
            .iter()
            .zip(b.model().named_parameters())
            .all(|((na, ta), (nb, tb))| na == nb && bit_equal(ta, tb))
}

const POST: PostGrowthSchedule = PostGrowthSchedule {
    lr: 1e-3,
    min_lr: 1e-4,
    warmup_steps: 5,
};

#[test]
fn same_seed_same_losses_and_the_loss_goes_down() {
    let d = tempfile::tempdir().unwrap();
    let mut a = trainer("det", "", d.path());
    let mut b = trainer("det", "", d.path());
    let la = losses(&mut a, 12);
    let lb = losses(&mut b, 12);
    assert_eq!(
        la.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        lb.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert!(la[11] < la[0] - 0.3, "loss did not go down: {la:?}");
    let r = a.step().unwrap();
    assert_eq!(r.step, 13);
    assert_eq!(r.tokens, 13 * 4 * 32);
    assert_eq!(r.samples, 48..52);
    let v = a.evaluate().unwrap();
    assert!(v.is_finite() && v > 0.0);
}

#[test]
fn checkpoint_restore_continues_bit_exactly() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("ckpt").join("rt");
    let mut a = trainer("rt", "", d.path());
    losses(&mut a, 3);
    let dir = a.save_checkpoint(&root, 3).unwrap();
    assert!(dir.join("tokenizer.json").exists());
    let mut b = trainer("rt", "", d.path());
    b.restore(&dir).unwrap();
    assert_eq!(a.state(), b.state());
    assert!(params_equal(&a, &b));
    let la = losses(&mut a, 3);
    let lb = losses(&mut b, 3);
    assert_eq!(la, lb);
    assert!(params_equal(&a, &b));
}

#[test]
fn reset_growth_restarts_the_schedule_and_carry_continues_it() {
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer("pol", "", d.path());
    losses(&mut t, 4);
    let gs = GrowthSpec {
        factor: 2,
        operator: Operator::Stack,
        optimizer: OptimizerPolicy::Reset,
    };
    let timings = t.grow(&gs, &POST).unwrap();
    assert!(timings.total_seconds >= timings.stack_seconds);
    assert_eq!(t.config().num_hidden_layers, 4);
    assert_eq!(t.optimizer().step, 0);
    let s = t.schedule().clone();
    assert_eq!(
        (
            s.start_step,
            s.end_step,
            s.peak_lr,
            s.min_lr,
            s.warmup_steps
        ),
        (4, 40, 1e-3, 1e-4, 5)
    );
    assert!(
        (lr_at(&s, 4) - 1e-3 / 5.0).abs() < 1e-15,
        "re-warmup starts at peak/warmup"
    );
    let r = t.step().unwrap();
    assert!((r.lr - 2e-4).abs() < 1e-15);
    assert_eq!(t.optimizer().step, 1);
    assert_eq!(t.generation(), 1);
    assert_eq!(t.growth_history()[0].from_layers, 2);

    let mut c = trainer("pol", "", d.path());
    losses(&mut c, 4);
    let before = c.schedule().clone();
    let gs = GrowthSpec {
        factor: 2,
        operator: Operator::Stack,
        optimizer: OptimizerPolicy::Carry,
    };
    c.grow(&gs, &POST).unwrap();
    assert_eq!(c.schedule(), &before);
    assert_eq!(c.optimizer().step, 4);
}

#[test]
fn a_refused_growth_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer("refuse", "", d.path());
    losses(&mut t, 2);
    let state = t.state();
    let mut twin = trainer("refuse", "", d.path());
    losses(&mut twin, 2);
    let e = t
        .grow(
            &GrowthSpec {
                factor: 1,
                operator: Operator::Stack,
                optimizer: OptimizerPolicy::Reset,
            },
            &POST,
        )
        .unwrap_err();
    assert!(e.is_bad_input() && e.to_string().contains("factor"), "{e}");
    let e = t
        .grow(
            &GrowthSpec {
                factor: 2,
                operator: Operator::StackingList { layers: vec![0, 5] },
                optimizer: OptimizerPolicy::Reset,
            },
            &POST,
        )
        .unwrap_err();
    assert!(e.is_bad_input(), "{e}");
    let e = trellis_core::growth::Operator::parse("stak").unwrap_err();
    assert!(e.to_string().contains("stack"), "{e}");
    assert_eq!(t.state(), state);
    assert!(params_equal(&t, &twin));
    assert_eq!(losses(&mut t, 2), losses(&mut twin, 2));
}

#[test]
fn masked_random_growth_is_function_preserving_at_first() {
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer("mask", "", d.path());
    losses(&mut t, 2);
    let v0 = t.evaluate().unwrap();
    let gs = GrowthSpec {
        factor: 2,
        operator: Operator::Random { mask_ramp_steps: 4 },
        optimizer: OptimizerPolicy::Reset,
    };
    t.grow(&gs, &POST).unwrap();
    let v1 = t.evaluate().unwrap();
    assert!(
        (v0 - v1).abs() < 1e-5,
        "masked growth changed the loss: {v0} → {v1}"
    );
    assert!(t.state().mask.is_some());
    losses(&mut t, 4);
    assert!(t.state().mask.is_none(), "the ramp ends after its steps");
}

#[test]
fn restore_refuses_mismatches_and_corruption_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("ckpt").join("cor");
    let mut a = trainer("cor", "", d.path());
    losses(&mut a, 2);
    let dir = a.save_checkpoint(&root, 3).unwrap();

    // Another model width: refused with the differing field named.
    let other = test_job_toml("cor", 40, "").replace("hidden_size = 32", "hidden_size = 48");
    let spec = trellis_core::job::JobSpec::from_toml(&other, Path::new("."), "t").unwrap();
    let mut w = Trainer::new(&spec, d.path(), 0, 1, Box::new(Solo)).unwrap();
    let before = w.state();
    let e = w.restore(&dir).unwrap_err();
    assert!(
        e.is_bad_input() && e.to_string().contains("hidden_size"),
        "{e}"
    );
    assert_eq!(w.state(), before);

    // A tokenizer with another vocabulary.
    let other = test_job_toml("cor", 40, "").replace("vocab_size = 384", "vocab_size = 320");
    let spec = trellis_core::job::JobSpec::from_toml(&other, Path::new("."), "t").unwrap();
    let mut v = Trainer::new(&spec, d.path(), 0, 1, Box::new(Solo)).unwrap();
    let e = v.restore(&dir).unwrap_err();
    assert!(
        e.is_bad_input() && e.to_string().contains("vocabulary"),
        "{e}"
    );

    // A flipped byte in a shard: refused, naming the file.
    let mut b = trainer("cor", "", d.path());
    let before = b.state();
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("model-")
        })
        .unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let i = bytes.len() - 7;
    bytes[i] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let e = b.restore(&dir).unwrap_err();
    let msg = e.to_string();
    assert!(
        e.is_bad_input() && msg.contains(shard.file_name().unwrap().to_str().unwrap()),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    assert_eq!(b.state(), before);
}

#[test]
fn growth_stages_that_would_be_refused_are_refused_up_front() {
    let d = tempfile::tempdir().unwrap();
    let spec = test_spec("early", 40, "[[growth]]\nat_step = 5\nfactor = 1\n");
    let e = Trainer::new(&spec, d.path(), 0, 1, Box::new(Solo))
        .err()
        .expect("refused");
    assert!(
        e.is_bad_input() && e.to_string().contains("growth[0]"),
        "{e}"
    );
}

/// The coordinator's skip windows (after a NaN batch): when the cursor reaches a window's start
/// it jumps to its end, chained windows followed; the step reports the global range it read,
/// and `next_gradients` sees the batch `step` then trains on.
#[test]
fn skip_windows_move_the_cursor_and_the_step_reports_the_range_read() {
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer("skip", "", d.path());
    t.set_skip_windows(vec![(4, 12), (12, 16)]);
    let r = t.step().unwrap();
    assert_eq!((r.samples.clone(), r.step_samples.clone()), (0..4, 0..4));
    let (loss, _) = t.next_gradients().unwrap();
    let r = t.step().unwrap();
    assert_eq!(r.step_samples, 16..20);
    assert_eq!(r.samples, 16..20);
    assert_eq!(r.loss.to_bits(), loss.to_bits());
    assert_eq!(t.data_cursor(), 20);
}

/// The restore point "checkpoint + plan" (docs/design.md §3): the growth checkpoint restored
/// and the same growth applied gives the state the online growth gave, bit for bit — weights,
/// moments, schedule, step, cursor — and training on continues identically. For `random` (fresh
/// draws) and `carry` (grown moments) as well as the default `stack` + `reset`.
#[test]
fn checkpoint_plus_plan_restores_the_online_growth_bit_for_bit() {
    let cases = [
        (Operator::Stack, OptimizerPolicy::Reset),
        (Operator::Stack, OptimizerPolicy::Carry),
        (
            Operator::Random { mask_ramp_steps: 0 },
            OptimizerPolicy::Reset,
        ),
    ];
    for (operator, optimizer) in cases {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("ckpt").join("cp");
        let mut online = trainer("cp", "", d.path());
        losses(&mut online, 3);
        // The growth checkpoint: a snapshot sharing the tensors the growth replaces, and the
        // trainer state of its step (what the agent keeps for the commit).
        let w = online
            .snapshot_growth_checkpoint_shards(&root)
            .unwrap()
            .unwrap();
        let st = online.state();
        let gs = GrowthSpec {
            factor: 2,
            operator: operator.clone(),
            optimizer,
        };
        online.grow(&gs, &POST).unwrap();
        // Written after the growth and the grown model's first step (in the background, as
        // online, straight from the shared tensors): still the old state.
        let first = losses(&mut online, 1);
        let report = w.write().unwrap();
        let tmp = trellis_core::checkpoint::tmp_dir(&root, 3);
        let dir = trellis_core::checkpoint::finalize(&tmp, &st, &[report]).unwrap();

        let mut restored = trainer("cp", "", d.path());
        restored.restore(&dir).unwrap();
        assert_eq!(restored.generation(), 0);
        restored.grow(&gs, &POST).unwrap();
        assert_eq!(
            losses(&mut restored, 1),
            first,
            "{operator:?} {optimizer:?}"
        );
        assert_eq!(
            online.state(),
            restored.state(),
            "{operator:?} {optimizer:?}"
        );
        assert!(
            params_equal(&online, &restored),
            "{operator:?} {optimizer:?}"
        );
        for (name, m) in &online.optimizer().moments {
            let r = &restored.optimizer().moments[name];
            assert!(
                bit_equal(&m.exp_avg, &r.exp_avg) && bit_equal(&m.exp_avg_sq, &r.exp_avg_sq),
                "{operator:?} {optimizer:?}: moments of {name}"
            );
        }
        let (la, lb) = (losses(&mut online, 2), losses(&mut restored, 2));
        assert_eq!(la, lb, "{operator:?} {optimizer:?}");
        assert!(params_equal(&online, &restored));
    }
}
