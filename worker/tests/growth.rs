//! Online growth on real tensors (libtorch, CPU).
mod common;
use common::*;
use tch::{Device, Kind, Tensor};
use trellis_core::config::names;
use trellis_core::growth::{init_std, plan, GrowthSpec, Operator, OptimizerPolicy};
use trellis_worker::grow;
use trellis_worker::model::Llama;
use trellis_worker::optim::{AdamW, AdamWConfig};

fn spec(op: Operator, factor: usize, optimizer: OptimizerPolicy) -> GrowthSpec {
    GrowthSpec {
        factor,
        operator: op,
        optimizer,
    }
}

/// A model and an optimizer that has taken two steps (non-zero moments).
fn trained(layers: usize) -> (Llama, AdamW) {
    tch::manual_seed(0);
    let cfg = tiny_cfg(layers, 2);
    let mut m = Llama::init(&cfg, Device::Cpu, 3);
    let mut opt = AdamW::new(AdamWConfig::default(), m.named_parameters());
    for _ in 0..2 {
        let ids = Tensor::randint(cfg.vocab_size as i64, [2, 17], (Kind::Int64, Device::Cpu));
        m.loss(&ids.narrow(1, 0, 16), &ids.narrow(1, 1, 16))
            .backward();
        opt.step(m.named_parameters(), 1e-3);
        m.zero_grad();
    }
    (m, opt)
}

fn p<'a>(m: &'a Llama, name: &str) -> &'a Tensor {
    m.parameter(name).unwrap_or_else(|| panic!("no {name}"))
}

fn check_layer_copies(old: &Llama, new: &Llama, src_of: impl Fn(usize) -> usize) {
    for t in 0..new.cfg.num_hidden_layers {
        for suffix in names::LAYER_TENSORS {
            let a = p(new, &names::layer(t, suffix));
            let b = p(old, &names::layer(src_of(t), suffix));
            assert!(
                bit_equal(a, b),
                "layer {t} {suffix} is not a bit copy of layer {}",
                src_of(t)
            );
        }
    }
    for n in [names::EMBED, names::NORM, names::LM_HEAD] {
        assert!(bit_equal(p(new, n), p(old, n)), "{n} changed");
    }
}

#[test]
fn gstack_x4_copies_every_tensor_bit_for_bit() {
    let (m, opt) = trained(2);
    let pl = plan(&m.cfg, &spec(Operator::Stack, 4, OptimizerPolicy::Reset)).unwrap();
    let (g, gopt, timings) = grow::apply(&m, &opt, &pl, OptimizerPolicy::Reset, 1, 1).unwrap();
    assert_eq!(g.cfg.num_hidden_layers, 8);
    check_layer_copies(&m, &g, |t| t % 2);
    assert!(timings.total_seconds >= 0.0);
    // reset: fresh moments, t = 0.
    assert_eq!(gopt.step, 0);
    for (name, t) in g.named_parameters() {
        let mo = &gopt.moments_of(name, t);
        assert_eq!(mo.exp_avg.abs().max().double_value(&[]), 0.0, "{name}");
        assert_eq!(mo.exp_avg_sq.abs().max().double_value(&[]), 0.0, "{name}");
    }
    // The grown copies are independent parameters.
    let a = p(&g, &names::layer(0, "mlp.up_proj.weight"));
    let b = p(&g, &names::layer(2, "mlp.up_proj.weight"));
    tch::no_grad(|| {
        let _ = a.shallow_clone().g_add_scalar_(1.0);
    });
    assert!(!bit_equal(a, b), "stacked layers share storage");
}

#[test]
fn interpolate_repeats_layers_in_place() {
    let (m, opt) = trained(2);
    let pl = plan(
        &m.cfg,
        &spec(Operator::Interpolate, 3, OptimizerPolicy::Reset),
    )
    .unwrap();
    let (g, _, _) = grow::apply(&m, &opt, &pl, OptimizerPolicy::Reset, 1, 1).unwrap();
    assert_eq!(g.cfg.num_hidden_layers, 6);
    check_layer_copies(&m, &g, |t| t / 3);
}

#[test]
fn carry_copies_the_moments_with_the_plan() {
    let (m, opt) = trained(2);
    let pl = plan(&m.cfg, &spec(Operator::Stack, 4, OptimizerPolicy::Carry)).unwrap();
    let (g, gopt, _) = grow::apply(&m, &opt, &pl, OptimizerPolicy::Carry, 1, 1).unwrap();
    assert_eq!(gopt.step, opt.step);
    for t in 0..8 {
        for suffix in names::LAYER_TENSORS {
            let a = &gopt.moments[&names::layer(t, suffix)];
            let b = &opt.moments[&names::layer(t % 2, suffix)];
            assert!(bit_equal(&a.exp_avg, &b.exp_avg) && bit_equal(&a.exp_avg_sq, &b.exp_avg_sq));
            assert!(a.exp_avg.abs().max().double_value(&[]) > 0.0);
        }
    }
    let _ = g;
}

#[test]
fn zero_operator_preserves_the_function_and_zeroes_those_moments() {
    let (m, opt) = trained(2);
    let pl = plan(&m.cfg, &spec(Operator::Zero, 4, OptimizerPolicy::Carry)).unwrap();
    let (g, gopt, _) = grow::apply(&m, &opt, &pl, OptimizerPolicy::Carry, 1, 1).unwrap();
    assert_eq!(g.cfg.num_hidden_layers, 8);
    let ids = Tensor::randint(m.cfg.vocab_size as i64, [2, 24], (Kind::Int64, Device::Cpu));
    let d = max_abs_diff(&m.forward(&ids), &g.forward(&ids));
    assert!(d < 1e-5, "zero growth changed the logits by {d:e}");
    for t in 2..8 {
        for s in ["self_attn.o_proj.weight", "mlp.down_proj.weight"] {
            let n = names::layer(t, s);
            assert_eq!(p(&g, &n).abs().max().double_value(&[]), 0.0, "{n}");
            assert_eq!(
                gopt.moments[&n].exp_avg.abs().max().double_value(&[]),
                0.0,
                "{n} moment"
            );
        }
    }
}

#[test]
fn random_operator_draws_fresh_layers_with_the_stated_std() {
    let (m, opt) = trained(2);
    let sp = spec(
        Operator::Random { mask_ramp_steps: 0 },
        4,
        OptimizerPolicy::Reset,
    );
    let pl = plan(&m.cfg, &sp).unwrap();
    let (g, _, _) = grow::apply(&m, &opt, &pl, OptimizerPolicy::Reset, 1, 1).unwrap();
    for t in 0..2 {
        for suffix in names::LAYER_TENSORS {
            let n = names::layer(t, suffix);
            assert!(bit_equal(p(&g, &n), p(&m, &n)), "{n} kept layer changed");
        }
    }
    for t in 2..8 {
        for suffix in names::LAYER_TENSORS {
            let n = names::layer(t, suffix);
            let x = p(&g, &n);
            match init_std(&n, &g.cfg) {
                Some(std) => {
                    let s = x.std(true).double_value(&[]);
                    assert!((s / std - 1.0).abs() < 0.1, "{n}: std {s} vs stated {std}");
                    assert!(
                        x.mean(Kind::Float).double_value(&[]).abs() < 0.2 * std,
                        "{n} mean"
                    );
                }
                None => assert_eq!(
                    (x - 1.0).abs().max().double_value(&[]),
                    0.0,
                    "{n} is not ones"
                ),
            }
        }
    }
    // Same seed and generation → same fresh tensors (deterministic across ranks and resumes).
    let (g2, _, _) = grow::apply(&m, &opt, &pl, OptimizerPolicy::Reset, 1, 1).unwrap();
    for (n, t) in g.named_parameters() {
        assert!(
            bit_equal(t, p(&g2, n)),
            "{n} differs between two identical growths"
        );
    }
}

#[test]
fn a_stale_plan_is_refused() {
    let (m, opt) = trained(2);
    let other = tiny_cfg(3, 2);
    let pl = plan(&other, &spec(Operator::Stack, 2, OptimizerPolicy::Reset)).unwrap();
    let e = grow::apply(&m, &opt, &pl, OptimizerPolicy::Reset, 1, 1).unwrap_err();
    assert!(e.to_string().contains("re-plan"), "{e}");
}
