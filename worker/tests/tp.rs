//! Tensor parallelism (docs/design.md §Parallel layout): TP = 2 and DP = 2 × TP = 2 (ranks are
//! threads of this process, groups are `TcpRing`s on 127.0.0.1) match a single rank on the same
//! global batch, for GQA and for a grown model, in fp32 and in bf16; TP resharding after growth
//! (checkpoint and peers paths); resuming with another DP degree reads the same sample stream.
//!
//! Tolerances (fp32 on CPU; a TP all-reduce sums partial products in another order than one
//! GEMM, so results agree to rounding, not bit for bit): losses within `LOSS_TOL` absolute,
//! every gradient within `GRAD_TOL` of the single-rank gradient's largest magnitude
//! (max |Δg| ≤ GRAD_TOL · max(|g|, 1e-3)), weights after a few AdamW steps within `WEIGHT_TOL`.
mod common;
use common::*;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;
use tch::{Device, Tensor};
use trellis_comm::ring::derive_key;
use trellis_comm::{Collective, Solo, TcpRing};
use trellis_core::checkpoint::shard_dim;
use trellis_core::growth::{GrowthSpec, Operator, OptimizerPolicy};
use trellis_core::job::JobSpec;
use trellis_worker::model::{Llama, Shard};
use trellis_worker::optim::AdamW;
use trellis_worker::parallel::{self, reshard, Groups};
use trellis_worker::Trainer;

const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-5;
const WEIGHT_TOL: f64 = 1e-5;

/// Tolerances of one parity check (loss absolute, gradient relative to the largest magnitude,
/// weight absolute).
#[derive(Clone, Copy)]
struct Tol {
    loss: f64,
    grad: f64,
    weight: f64,
}

const FP32: Tol = Tol {
    loss: LOSS_TOL,
    grad: GRAD_TOL,
    weight: WEIGHT_TOL,
};

/// bf16 (working copies of the weights in bf16, bf16 activations between the matmuls): a TP
/// rank's GEMM over half the inner dimension rounds its partial sums to bf16 before the fp32
/// all-reduce, and a DP rank's half batch runs other GEMM shapes, so results agree to bf16
/// rounding (relative 2^-8 ≈ 4e-3 per value), not to fp32's. Weights: AdamW's normalised step
/// moves an entry whose gradient is near zero by up to ~lr per step whatever the gradient's
/// size, so a bf16 rounding difference there shows as up to 2 · steps · lr (4 steps at lr 3e-3).
const BF16: Tol = Tol {
    loss: 2e-2,
    grad: 5e-2,
    weight: 2.5e-2,
};

/// `n` groups' listeners and addresses.
fn addrs(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let a = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, a)
}

/// Run `f(dp_rank, Groups)` on `dp × tp` threads with TcpRing groups (TP groups: ranks
/// `(d, ·)`; DP groups: ranks `(·, t)`); results in global-rank order (`d·tp + t`).
fn run_world<T: Send + 'static>(
    dp: usize,
    tp: usize,
    f: impl Fn(usize, Groups) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let mut tp_ls: Vec<Vec<Option<TcpListener>>> = Vec::new();
    let mut tp_addr = Vec::new();
    for _ in 0..dp {
        let (l, a) = addrs(tp);
        tp_ls.push(l.into_iter().map(Some).collect());
        tp_addr.push(a);
    }
    let mut dp_ls: Vec<Vec<Option<TcpListener>>> = Vec::new();
    let mut dp_addr = Vec::new();
    for _ in 0..tp {
        let (l, a) = addrs(dp);
        dp_ls.push(l.into_iter().map(Some).collect());
        dp_addr.push(a);
    }
    let timeout = Duration::from_secs(60);
    let mut hs = Vec::new();
    for d in 0..dp {
        for t in 0..tp {
            let tl = tp_ls[d][t].take().unwrap();
            let ta = tp_addr[d].clone();
            let dl = dp_ls[t][d].take().unwrap();
            let da = dp_addr[t].clone();
            let f = f.clone();
            hs.push(std::thread::spawn(move || {
                let tpc: Box<dyn Collective> = if tp == 1 {
                    Box::new(Solo)
                } else {
                    Box::new(
                        TcpRing::new(t, tp, tl, ta, &derive_key(&format!("tp/{d}")), timeout)
                            .unwrap(),
                    )
                };
                let dpc: Box<dyn Collective> = if dp == 1 {
                    Box::new(Solo)
                } else {
                    Box::new(
                        TcpRing::new(d, dp, dl, da, &derive_key(&format!("dp/{t}")), timeout)
                            .unwrap(),
                    )
                };
                f(d, Groups { dp: dpc, tp: tpc })
            }));
        }
    }
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Concatenate TP slices of `name` into the global tensor.
fn gather(name: &str, slices: &[&Tensor]) -> Tensor {
    match shard_dim(name) {
        Some(d) => Tensor::cat(slices, d as i64),
        None => slices[0].shallow_clone(),
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// Compare gathered per-rank gradients (`per_rank[r]` = rank r's (name, grad) list) with the
/// reference; also checks replicated gradients agree across ranks. Returns the worst relative
/// error.
fn check_grads(
    reference: &[(String, Tensor)],
    per_rank: &[Vec<(String, Tensor)>],
    tol: f64,
) -> f64 {
    let mut worst = 0f64;
    for (i, (name, g_ref)) in reference.iter().enumerate() {
        let slices: Vec<&Tensor> = per_rank.iter().map(|r| &r[i].1).collect();
        assert!(per_rank.iter().all(|r| &r[i].0 == name));
        if shard_dim(name).is_none() {
            for (r, s) in slices.iter().enumerate().skip(1) {
                let d = max_abs(&(*s - slices[0]));
                assert!(
                    d <= 1e-6 * max_abs(slices[0]).max(1e-3),
                    "replicated {name}: rank {r}'s gradient differs from rank 0's by {d}"
                );
            }
        }
        let g = gather(name, &slices);
        assert_eq!(g.size(), g_ref.size(), "{name}");
        let scale = max_abs(g_ref).max(1e-3);
        let rel = max_abs(&(&g - g_ref)) / scale;
        worst = worst.max(rel);
        assert!(
            rel <= tol,
            "{name}: TP gradient differs by {rel:.2e} (relative to max |g| {scale:.3e})"
        );
    }
    worst
}

/// A model (optionally grown ×2 by the `random` operator with its mask ramp half way, which
/// exercises fresh sliced tensors and masked blocks) as TP slice `shard`.
fn model(cfg: &trellis_core::config::ModelConfig, grown: bool, shard: Shard) -> Llama {
    let m = Llama::init_shard(cfg, Device::Cpu, 5, shard);
    if !grown {
        return m;
    }
    let spec = GrowthSpec {
        factor: 2,
        operator: Operator::Random { mask_ramp_steps: 4 },
        optimizer: OptimizerPolicy::Carry,
    };
    let plan = trellis_core::growth::plan(&m.cfg, &spec).unwrap();
    let opt = AdamW::new(Default::default(), m.named_parameters());
    let (mut g, _, _) = trellis_worker::grow::apply(&m, &opt, &plan, spec.optimizer, 5, 1).unwrap();
    for &l in &plan.added_layers {
        g.masks[l] = Some(0.5);
    }
    g
}

/// Gradients of a batch: the single-device model vs `tp` shards on threads.
fn direct_parity(cfg: trellis_core::config::ModelConfig, grown: bool, tp: usize) -> f64 {
    let ids = Tensor::from_slice(&(0..2 * 17).map(|i| (i * 7 % 97) as i64).collect::<Vec<_>>())
        .view([2, 17]);
    let (inp, tgt) = (ids.narrow(1, 0, 16), ids.narrow(1, 1, 16));
    let full = model(&cfg, grown, Shard::FULL);
    let loss = full.loss(&inp, &tgt);
    loss.backward();
    let l_ref = loss.double_value(&[]);
    let g_ref: Vec<(String, Tensor)> = full
        .named_parameters()
        .iter()
        .map(|(n, p)| (n.clone(), p.grad().copy()))
        .collect();
    let (inp_v, tgt_v) = (
        Vec::<i64>::try_from(&inp.flatten(0, -1)).unwrap(),
        Vec::<i64>::try_from(&tgt.flatten(0, -1)).unwrap(),
    );
    let results = run_world(1, tp, move |_, mut g| {
        let shard = Shard {
            rank: g.tp.rank(),
            tp,
        };
        let m = model(&cfg, grown, shard);
        let inp = Tensor::from_slice(&inp_v).view([2, 16]);
        let tgt = Tensor::from_slice(&tgt_v).view([2, 16]);
        let l = parallel::tp::forward_backward(&m, g.tp.as_mut(), &inp, &tgt, 1.0).unwrap();
        let eval = parallel::tp::loss(&m, g.tp.as_mut(), &inp, &tgt).unwrap();
        let grads: Vec<(String, Tensor)> = m
            .named_parameters()
            .iter()
            .map(|(n, p)| (n.clone(), p.grad().copy()))
            .collect();
        (l, eval, grads)
    });
    for (r, (l, eval, _)) in results.iter().enumerate() {
        assert!(
            (l - l_ref).abs() < LOSS_TOL,
            "rank {r}: loss {l} vs {l_ref}"
        );
        assert!(
            (eval - l_ref).abs() < LOSS_TOL,
            "rank {r}: eval loss {eval} vs {l_ref}"
        );
    }
    let per_rank: Vec<Vec<(String, Tensor)>> = results.into_iter().map(|r| r.2).collect();
    let worst = check_grads(&g_ref, &per_rank, GRAD_TOL);
    eprintln!("tp={tp} grown={grown}: worst relative gradient error {worst:.2e}");
    worst
}

#[test]
fn tp2_gradients_match_single_device_gqa() {
    // 4 heads, 2 KV heads (GQA), FFN 88: every split even at TP = 2.
    direct_parity(tiny_cfg(2, 2), false, 2);
}

#[test]
fn tp1_segmented_backward_is_the_plain_backward() {
    direct_parity(tiny_cfg(2, 4), false, 1);
}

#[test]
fn tp2_gradients_match_single_device_for_a_grown_model() {
    direct_parity(tiny_cfg(2, 2), true, 2);
}

#[test]
fn tp4_gradients_match_single_device_mha() {
    direct_parity(tiny_cfg(1, 4), false, 4);
}

#[test]
fn tp2_gradients_match_single_device_tied_llama3_head_dim() {
    // The tied embedding is replicated: its gradient (embedding + head) agrees on every rank.
    direct_parity(tied_llama3_cfg(2, 2), true, 2);
}

/// Gradients and losses of `steps` trainer steps at DP × TP vs one rank (the same global batch).
fn trainer_parity(spec: JobSpec, dp: usize, tp: usize, steps: usize, grow_at: Option<u64>) {
    trainer_parity_tol(spec, dp, tp, steps, grow_at, FP32)
}

fn trainer_parity_tol(
    spec: JobSpec,
    dp: usize,
    tp: usize,
    steps: usize,
    grow_at: Option<u64>,
    tol: Tol,
) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().to_path_buf();
    let run = move |t: &mut Trainer| -> (Vec<f64>, Vec<Vec<(String, Tensor)>>) {
        let mut losses = Vec::new();
        let mut grads = Vec::new();
        for _ in 0..steps {
            if let Some(i) = t.pending_growth_stage() {
                t.grow_stage(i).unwrap();
            }
            let (l, g) = t.next_gradients().unwrap();
            grads.push(g);
            let r = t.step().unwrap();
            assert!(
                (r.loss - l).abs() < 1e-12,
                "next_gradients changed the state"
            );
            losses.push(r.loss);
        }
        (losses, grads)
    };
    let mut single = Trainer::new(&spec, &out, 0, 1, Box::new(Solo)).unwrap();
    let (ref_losses, ref_grads) = run(&mut single);
    if let Some(s) = grow_at {
        assert!(single.growth_history().len() == 1 && s < steps as u64);
    }
    let ref_params: Vec<(String, Tensor)> = single
        .model()
        .named_parameters()
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy()))
        .collect();
    let (spec2, out2) = (spec.clone(), out.clone());
    let results = run_world(dp, tp, move |dp_rank, g| {
        let mut t = Trainer::with_groups(&spec2, &out2, dp_rank, dp, g).unwrap();
        let (losses, grads) = run(&mut t);
        let params: Vec<(String, Tensor)> = t
            .model()
            .named_parameters()
            .iter()
            .map(|(n, p)| (n.clone(), p.detach().copy()))
            .collect();
        (losses, grads, params)
    });
    let mut worst = 0f64;
    for d in 0..dp {
        let group = &results[d * tp..(d + 1) * tp];
        for (r, (losses, _, _)) in group.iter().enumerate() {
            for (s, (a, b)) in losses.iter().zip(&ref_losses).enumerate() {
                assert!(
                    (a - b).abs() < tol.loss,
                    "dp {d} tp {r} step {s}: loss {a} vs single-rank {b}"
                );
            }
        }
        for s in 0..steps {
            let per_rank: Vec<Vec<(String, Tensor)>> = group
                .iter()
                .map(|r| {
                    r.1[s]
                        .iter()
                        .map(|(n, t)| (n.clone(), t.shallow_clone()))
                        .collect()
                })
                .collect();
            worst = worst.max(check_grads(&ref_grads[s], &per_rank, tol.grad));
        }
        for (i, (name, p_ref)) in ref_params.iter().enumerate() {
            let slices: Vec<&Tensor> = group.iter().map(|r| &r.2[i].1).collect();
            let diff = max_abs(&(gather(name, &slices) - p_ref));
            assert!(
                diff < tol.weight,
                "dp {d}: {name} after {steps} steps differs by {diff}"
            );
        }
    }
    eprintln!("dp={dp} tp={tp}: losses {ref_losses:?}, worst relative gradient error {worst:.2e}");
}

#[test]
fn trainer_tp2_matches_one_rank() {
    trainer_parity(test_spec("tp2", 20, ""), 1, 2, 4, None);
}

#[test]
fn trainer_dp2_tp2_matches_one_rank() {
    trainer_parity(test_spec("dp2tp2", 20, ""), 2, 2, 3, None);
}

#[test]
fn trainer_dp2_tp2_matches_one_rank_tied_llama3_head_dim() {
    let mut spec = test_spec("dp2tp2tied", 20, "");
    let cfg = tied_llama3_cfg(2, 2);
    spec.model.tie_word_embeddings = Some(true);
    spec.model.head_dim = cfg.head_dim;
    spec.model.rope_theta = Some(cfg.rope_theta);
    spec.model.rope_scaling = cfg.rope_scaling;
    trainer_parity(spec, 2, 2, 3, None);
}

#[test]
fn trainer_tp2_matches_one_rank_across_growth() {
    let spec = test_spec(
        "tp2grow",
        20,
        "[[growth]]\nat_step = 2\nfactor = 2\noperator = \"stack\"\noptimizer = \"carry\"\n",
    );
    trainer_parity(spec, 1, 2, 4, Some(2));
}

#[test]
fn bf16_trainer_tp2_and_dp2_match_one_bf16_rank() {
    let bf16 = "precision = \"bf16\"";
    trainer_parity_tol(test_spec_with("bf16tp2", 20, bf16, ""), 1, 2, 4, None, BF16);
    trainer_parity_tol(test_spec_with("bf16dp2", 20, bf16, ""), 2, 1, 4, None, BF16);
}

/// Acceptance 2: a TP = 1 job whose ×4 growth no longer fits the per-rank budget is re-planned
/// to TP = 2; the loss right after the reshard equals the TP = 1 loss from the same checkpoint,
/// by both reshard paths.
#[test]
fn growth_that_does_not_fit_reshards_to_tp2() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().to_path_buf();
    let spec = test_spec(
        "reshard",
        20,
        "[[growth]]\nat_step = 2\nfactor = 4\noperator = \"stack\"\noptimizer = \"carry\"\n",
    );
    let mut t = Trainer::new(&spec, &out, 0, 1, Box::new(Solo)).unwrap();
    let (mb, seq) = (2, spec.data.seq_len);
    let before = t.config().clone();
    for _ in 0..2 {
        t.step().unwrap();
    }
    let i = t.pending_growth_stage().unwrap();
    t.grow_stage(i).unwrap();
    let after = t.config().clone();
    assert_eq!(after.num_hidden_layers, 4 * before.num_hidden_layers);
    // A budget between the grown model's TP = 2 and TP = 1 needs: TP = 1 fit before growth.
    let m = |c, tp| trellis_core::layout::memory_per_rank(c, tp, mb, seq).total;
    let budget = (m(&after, 1) + m(&after, 2)) / 2;
    assert!(
        m(&before, 1) <= budget,
        "the initial model must fit one rank"
    );
    let plan = trellis_core::layout::plan_layout(&before, 2, budget, mb, seq).unwrap();
    assert_eq!(plan.tp, 1, "{}", plan.explanation);
    let plan = trellis_core::layout::plan_layout(&after, 2, budget, mb, seq).unwrap();
    assert_eq!(plan.tp, 2, "{}", plan.explanation);
    let root = out.join("ck");
    let ck = t.save_checkpoint(&root, 3).unwrap();

    // The reference: TP = 1 from the same checkpoint.
    let mut r = Trainer::new(&spec, &out, 0, 1, Box::new(Solo)).unwrap();
    r.restore(&ck).unwrap();
    let ref_eval = r.evaluate().unwrap();
    let ref_step = r.step().unwrap().loss;

    // Checkpoint path.
    let (spec2, out2, ck2) = (spec.clone(), out.clone(), ck.clone());
    let res = run_world(1, 2, move |_, g| {
        let mut n = Trainer::with_groups(&spec2, &out2, 0, 1, g).unwrap();
        let rep = reshard::from_checkpoint(&mut n, &ck2).unwrap();
        assert_eq!(n.config(), &after);
        (n.evaluate().unwrap(), n.step().unwrap().loss, rep.seconds)
    });
    for (r, (e, l, _)) in res.iter().enumerate() {
        assert!(
            (e - ref_eval).abs() < LOSS_TOL,
            "checkpoint path rank {r}: eval {e} vs {ref_eval}"
        );
        assert!(
            (l - ref_step).abs() < LOSS_TOL,
            "checkpoint path rank {r}: step loss {l} vs {ref_step}"
        );
    }

    // Peers path: the old TP = 1 trainer becomes rank 0 of the new TP group.
    let old = std::sync::Arc::new(std::sync::Mutex::new(Some(t)));
    let (spec3, out3) = (spec.clone(), out.clone());
    let res = run_world(1, 2, move |_, g| {
        let me = g.tp.rank();
        let mut n = Trainer::with_groups(&spec3, &out3, 0, 1, g).unwrap();
        let mine = if me == 0 {
            old.lock().unwrap().take()
        } else {
            None
        };
        let rep = reshard::from_peers(&mut n, mine.as_ref(), 1, &[0]).unwrap();
        drop(mine);
        (n.evaluate().unwrap(), n.step().unwrap().loss, rep.seconds)
    });
    for (r, (e, l, _)) in res.iter().enumerate() {
        assert!(
            (e - ref_eval).abs() < LOSS_TOL,
            "peers path rank {r}: eval {e} vs {ref_eval}"
        );
        assert!(
            (l - ref_step).abs() < LOSS_TOL,
            "peers path rank {r}: step loss {l} vs {ref_step}"
        );
    }
}

/// A TP = 2 checkpoint (each rank writes its slice) loads at TP = 1 with the same loss.
#[test]
fn tp2_checkpoint_loads_at_tp1() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().to_path_buf();
    let spec = test_spec("tpck", 20, "");
    let root = out.join("ck");
    let (spec2, out2, root2) = (spec.clone(), out.clone(), root.clone());
    let res = run_world(1, 2, move |_, g| {
        let mut t = Trainer::with_groups(&spec2, &out2, 0, 1, g).unwrap();
        t.step().unwrap();
        let dir = t.save_checkpoint(&root2, 3).unwrap();
        (dir, t.step().unwrap().loss)
    });
    let (dir, next) = (res[0].0.clone(), res[0].1);
    let ck = trellis_core::checkpoint::Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.state.layout.tp, 2);
    assert!(dir.join("model-tp1-of-2.safetensors").exists());
    let mut t = Trainer::new(&spec, &out, 0, 1, Box::new(Solo)).unwrap();
    t.restore(&dir).unwrap();
    let l = t.step().unwrap().loss;
    assert!(
        (l - next).abs() < LOSS_TOL,
        "TP = 1 from a TP = 2 checkpoint: {l} vs {next}"
    );
}

/// Acceptance 3: resuming with another DP degree reads exactly the sample stream the original
/// run would have read (global sample ids per step), 2 → 1 and 1 → 2.
#[test]
fn resume_with_another_dp_degree_reads_the_same_samples() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().to_path_buf();
    let spec = test_spec("dpresume", 20, "");
    // samples of each step, all ranks of the group merged and sorted
    let run = |dp: usize,
               restore: Option<std::path::PathBuf>,
               save_after: Option<usize>,
               steps: usize,
               tag: &str| {
        let (spec, out) = (spec.clone(), out.clone());
        let root = out.join(format!("ck-{tag}"));
        let res = run_world(dp, 1, move |dp_rank, g| {
            let mut t = Trainer::with_groups(&spec, &out, dp_rank, dp, g).unwrap();
            if let Some(dir) = &restore {
                t.restore(dir).unwrap();
            }
            let mut samples = Vec::new();
            let mut losses = Vec::new();
            let mut dir = None;
            for s in 0..steps {
                if save_after == Some(s) {
                    dir = Some(t.save_checkpoint(&root, 3).unwrap());
                }
                let r = t.step().unwrap();
                samples.push(r.samples.collect::<Vec<u64>>());
                losses.push(r.loss);
            }
            (samples, losses, dir)
        });
        let steps_n = res[0].0.len();
        let merged: Vec<Vec<u64>> = (0..steps_n)
            .map(|s| {
                let mut v: Vec<u64> = res.iter().flat_map(|r| r.0[s].clone()).collect();
                v.sort();
                v
            })
            .collect();
        (merged, res[0].1.clone(), res[0].2.clone())
    };
    for (from, to) in [(2usize, 1usize), (1, 2)] {
        let (orig, orig_losses, dir) = run(from, None, Some(2), 4, &format!("{from}"));
        let (resumed, losses, _) = run(to, dir, None, 2, &format!("{from}to{to}"));
        assert_eq!(
            resumed[..],
            orig[2..],
            "dp {from} -> {to}: sample ids differ"
        );
        for (a, b) in losses.iter().zip(&orig_losses[2..]) {
            assert!(
                (a - b).abs() < LOSS_TOL,
                "dp {from} -> {to}: loss {a} vs {b}"
            );
        }
        assert_eq!(orig[2], (8..12).collect::<Vec<u64>>());
    }
}

/// A spec whose model splits 2, 3 and 6 ways (6 heads and 6 KV heads of 8, FFN 96), so a
/// reshard can go 1 → 2 → 3 (a new slice of 3 spans two old slices of 2).
fn reshard_spec(name: &str, extra: &str) -> JobSpec {
    let toml = test_job_toml_with(name, 20, "precision = \"fp32\"", extra)
        .replace("hidden_size = 32", "hidden_size = 48")
        .replace(
            "intermediate_size = 88",
            "intermediate_size = 96\nnum_attention_heads = 6\nnum_key_value_heads = 6",
        );
    JobSpec::from_toml(&toml, std::path::Path::new("."), "test").unwrap()
}

/// Every parameter of `t`'s slice and both its moments (zeros where not allocated), copied.
fn slice_state(t: &Trainer) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for (n, p) in t.model().named_parameters() {
        let m = t.optimizer().moments_of(n, p);
        let [a, b] = trellis_core::checkpoint::moment_names(n);
        v.push((n.clone(), p.detach().copy()));
        v.push((a, m.exp_avg.copy()));
        v.push((b, m.exp_avg_sq.copy()));
    }
    v
}

/// `got` (TP slice `shard`) is the direct slice of the unsharded `full`, bit for bit.
fn assert_slice_of(full: &[(String, Tensor)], got: &[(String, Tensor)], shard: Shard, what: &str) {
    assert_eq!(full.len(), got.len(), "{what}: tensor count");
    for ((n, f), (gn, g)) in full.iter().zip(got) {
        assert_eq!(n, gn, "{what}: tensor order");
        let want = shard.slice(n, f);
        let same = want.size() == g.size()
            && want
                .view([-1])
                .iter::<f64>()
                .unwrap()
                .zip(g.view([-1]).iter::<f64>().unwrap())
                .all(|(a, b)| (a as f32).to_bits() == (b as f32).to_bits());
        assert!(
            same,
            "{what}: rank {} of {}: {n} {:?} is not the direct slice {:?} of the unsharded state",
            shard.rank,
            shard.tp,
            g.size(),
            want.size()
        );
    }
}

/// The trainer state without its layout (which a reshard changes).
fn state_json(t: &Trainer) -> serde_json::Value {
    let mut v = serde_json::to_value(t.state()).unwrap();
    v.as_object_mut().unwrap().remove("layout");
    v
}

/// Resharding moves the state exactly: a trained TP = 1 state (weights and both Adam moments)
/// resharded over the peers path to TP = 2, then TP = 3 (old holders in another order; the
/// middle rank's new slice is cut from two old slices), then back to TP = 1 through a TP = 3
/// checkpoint, gives at every stage each rank exactly the direct slice of the unsharded
/// state, bit for bit, and the same step, schedule, cursor and optimizer step.
#[test]
fn reshard_1_to_2_to_3_to_1_is_the_direct_slice_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().to_path_buf();
    let spec = reshard_spec("reshard-exact", "");
    let mut t = Trainer::new(&spec, &out, 0, 1, Box::new(Solo)).unwrap();
    for _ in 0..3 {
        t.step().unwrap();
    }
    let full = slice_state(&t);
    let state = state_json(&t);
    assert!(
        t.optimizer().moments.len() == t.model().named_parameters().len(),
        "the trained state must have allocated moments"
    );

    // 1 → 2: the old trainer is rank 0 of the new group.
    let old = std::sync::Arc::new(std::sync::Mutex::new(vec![Some(t)]));
    let (spec2, out2, old2) = (spec.clone(), out.clone(), old.clone());
    let tp2 = run_world(1, 2, move |_, g| {
        let me = g.tp.rank();
        let mut n = Trainer::for_reshard(&spec2, &out2, 0, 1, g).unwrap();
        let mine = if me == 0 {
            old2.lock().unwrap()[0].take()
        } else {
            None
        };
        reshard::from_peers(&mut n, mine.as_ref(), 1, &[0]).unwrap();
        n
    });
    for (r, n) in tp2.iter().enumerate() {
        assert_slice_of(&full, &slice_state(n), Shard { rank: r, tp: 2 }, "1 → 2");
        assert_eq!(state_json(n), state, "1 → 2: rank {r}'s trainer state");
    }

    // 2 → 3: old slice 0 on new rank 2, old slice 1 on new rank 0.
    let holders = [2usize, 0];
    *old.lock().unwrap() = tp2.into_iter().map(Some).collect();
    let (spec3, out3, old3) = (spec.clone(), out.clone(), old.clone());
    let tp3 = run_world(1, 3, move |_, g| {
        let me = g.tp.rank();
        let mut n = Trainer::for_reshard(&spec3, &out3, 0, 1, g).unwrap();
        let mine = holders
            .iter()
            .position(|&h| h == me)
            .and_then(|o| old3.lock().unwrap()[o].take());
        reshard::from_peers(&mut n, mine.as_ref(), 2, &holders).unwrap();
        n
    });
    for (r, n) in tp3.iter().enumerate() {
        assert_slice_of(&full, &slice_state(n), Shard { rank: r, tp: 3 }, "2 → 3");
        assert_eq!(state_json(n), state, "2 → 3: rank {r}'s trainer state");
    }

    // 3 → 1 through the checkpoint the TP = 3 ranks write together.
    let root = out.join("ck");
    let writers: Vec<_> = tp3
        .into_iter()
        .map(|mut n| {
            let root = root.clone();
            std::thread::spawn(move || n.save_checkpoint(&root, 3).unwrap())
        })
        .collect();
    let dirs: Vec<_> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let mut back =
        Trainer::for_reshard(&spec, &out, 0, 1, Groups::dp_only(Box::new(Solo))).unwrap();
    reshard::from_checkpoint(&mut back, &dirs[0]).unwrap();
    assert_slice_of(&full, &slice_state(&back), Shard::FULL, "3 → 1");
    assert_eq!(state_json(&back), state, "3 → 1: trainer state");
}

/// DP = 2 × TP = 1 → DP = 2 × TP = 2 right after a `reset` growth: each replica's old trainer
/// is rank 0 of its new TP group; every rank gets the direct slice of its replica's grown
/// weights, and the moments the `reset` left unallocated stay unallocated (nothing is sent for
/// them). The resharded job then trains.
#[test]
fn dp2_reshard_after_a_reset_growth_keeps_moments_unallocated() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().to_path_buf();
    let spec = reshard_spec(
        "reshard-dp",
        "[[growth]]\nat_step = 2\nfactor = 2\noperator = \"stack\"\noptimizer = \"reset\"\n",
    );
    let (spec1, out1) = (spec.clone(), out.clone());
    let olds = run_world(2, 1, move |dp_rank, g| {
        let mut t = Trainer::with_groups(&spec1, &out1, dp_rank, 2, g).unwrap();
        for _ in 0..2 {
            t.step().unwrap();
        }
        let i = t.pending_growth_stage().unwrap();
        t.grow_stage(i).unwrap();
        assert!(
            t.optimizer().moments.is_empty(),
            "reset leaves moments unallocated"
        );
        t
    });
    let fulls: Vec<_> = olds.iter().map(slice_state).collect();
    let states: Vec<_> = olds.iter().map(state_json).collect();
    let old = std::sync::Arc::new(std::sync::Mutex::new(
        olds.into_iter().map(Some).collect::<Vec<_>>(),
    ));
    let (spec2, out2) = (spec.clone(), out.clone());
    let res = run_world(2, 2, move |dp_rank, g| {
        let me = g.tp.rank();
        let mut n = Trainer::for_reshard(&spec2, &out2, dp_rank, 2, g).unwrap();
        let mine = if me == 0 {
            old.lock().unwrap()[dp_rank].take()
        } else {
            None
        };
        reshard::from_peers(&mut n, mine.as_ref(), 1, &[0]).unwrap();
        let got = (slice_state(&n), state_json(&n), n.optimizer().moments.len());
        let loss = n.step().unwrap().loss;
        (dp_rank, me, got, loss)
    });
    for (dp_rank, me, (got, st, moments), loss) in &res {
        let what = format!("DP rank {dp_rank}");
        assert_slice_of(&fulls[*dp_rank], got, Shard { rank: *me, tp: 2 }, &what);
        assert_eq!(st, &states[*dp_rank], "{what}: trainer state");
        assert_eq!(*moments, 0, "{what} TP rank {me}: moments were allocated");
        assert!(loss.is_finite(), "{what}: the step after the reshard");
    }
}
