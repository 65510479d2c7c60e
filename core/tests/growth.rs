mod common;
use common::tiny;
use trellis_core::config::names;
use trellis_core::growth::{
    init_std, plan, GrowthSpec, Operator, OptimizerPolicy, TensorSource, OPERATOR_NAMES,
};
use trellis_core::Error;

fn spec(op: Operator, factor: usize) -> GrowthSpec {
    GrowthSpec {
        factor,
        operator: op,
        optimizer: OptimizerPolicy::Reset,
    }
}

fn copy(s: String) -> TensorSource {
    TensorSource::Copy(s)
}

/// Every layer tensor of target layer t is a copy of the same suffix of `src[t]`.
fn assert_layer_copies(p: &trellis_core::growth::GrowthPlan, src: &[usize]) {
    assert_eq!(p.new.num_hidden_layers, src.len());
    assert_eq!(
        p.layer_sources,
        src.iter().map(|&s| Some(s)).collect::<Vec<_>>()
    );
    for (t, &s) in src.iter().enumerate() {
        for suffix in names::LAYER_TENSORS {
            assert_eq!(
                p.source_of(&names::layer(t, suffix)),
                Some(&copy(names::layer(s, suffix))),
                "target layer {t} {suffix}"
            );
        }
    }
}

fn assert_common(p: &trellis_core::growth::GrowthPlan) {
    // Order and shapes are the new config's.
    let shapes = p.new.tensor_shapes();
    assert_eq!(p.tensors.len(), shapes.len());
    for ((n, s, _), (n2, s2)) in p.tensors.iter().zip(shapes.iter()) {
        assert_eq!((n, s), (n2, s2));
    }
    for n in [names::EMBED, names::NORM, names::LM_HEAD] {
        assert_eq!(p.source_of(n), Some(&copy(n.to_string())));
    }
    assert_eq!(p.new.hidden_size, p.old.hidden_size);
    assert_eq!(p.new.intermediate_size, p.old.intermediate_size);
}

#[test]
fn stack_is_g_stack_order() {
    let p = plan(&tiny(3), &spec(Operator::Stack, 4)).unwrap();
    let src: Vec<usize> = (0..12).map(|t| t % 3).collect();
    assert_layer_copies(&p, &src);
    assert_common(&p);
    assert_eq!(p.added_layers, (3..12).collect::<Vec<_>>());
    assert_eq!(p.mask_ramp_steps, 0);
    assert_eq!(p.old, tiny(3));
    assert_eq!(p.new, tiny(12));
}

#[test]
fn interpolate_repeats_in_place() {
    let p = plan(&tiny(3), &spec(Operator::Interpolate, 2)).unwrap();
    assert_layer_copies(&p, &[0, 0, 1, 1, 2, 2]);
    assert_common(&p);
    assert_eq!(p.added_layers, vec![1, 3, 5]);
}

#[test]
fn middle_keeps_ends_and_repeats_middle_block() {
    let p = plan(&tiny(4), &spec(Operator::Middle, 2)).unwrap();
    assert_layer_copies(&p, &[0, 1, 2, 1, 2, 1, 2, 3]);
    assert_common(&p);
    assert_eq!(p.added_layers, vec![3, 4, 5, 6]);
    // Partial last repetition: L=5, g=2 → 10 layers, 8 middle slots over a block of 3.
    let p = plan(&tiny(5), &spec(Operator::Middle, 2)).unwrap();
    assert_layer_copies(&p, &[0, 1, 2, 3, 1, 2, 3, 1, 2, 4]);
    // L=3: the middle block is the single layer 1.
    let p = plan(&tiny(3), &spec(Operator::Middle, 4)).unwrap();
    let mut want = vec![0];
    want.extend(std::iter::repeat_n(1, 10));
    want.push(2);
    assert_layer_copies(&p, &want);
}

#[test]
fn middle_refuses_too_shallow_models() {
    for l in [1, 2] {
        let e = plan(&tiny(l), &spec(Operator::Middle, 4))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("at least 3 layers") && e.contains("'stack'"),
            "{e}"
        );
    }
}

#[test]
fn stacking_list_sets_depth_and_ignores_factor() {
    let p = plan(
        &tiny(2),
        &spec(
            Operator::StackingList {
                layers: vec![0, 1, 0, 1, 1],
            },
            0,
        ),
    )
    .unwrap();
    assert_layer_copies(&p, &[0, 1, 0, 1, 1]);
    assert_common(&p);
    assert_eq!(p.added_layers, vec![2, 3, 4]);
}

#[test]
fn stacking_list_refusals() {
    let e = plan(
        &tiny(2),
        &spec(Operator::StackingList { layers: vec![] }, 4),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidGrowth(_)));
    assert!(e.to_string().contains("stacking_list is empty"), "{e}");
    let e = plan(
        &tiny(2),
        &spec(Operator::StackingList { layers: vec![0, 2] }, 4),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("stacking_list[1] = 2") && e.contains("0..=1"),
        "{e}"
    );
    // A growth adds layers: a list no longer than the model is refused.
    let e = plan(
        &tiny(2),
        &spec(Operator::StackingList { layers: vec![1, 0] }, 4),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("must make the 2-layer model deeper"), "{e}");
}

#[test]
fn zero_adds_identity_blocks() {
    let p = plan(&tiny(2), &spec(Operator::Zero, 3)).unwrap();
    assert_common(&p);
    assert_eq!(p.new.num_hidden_layers, 6);
    assert_eq!(
        p.layer_sources,
        vec![Some(0), Some(1), Some(0), Some(1), Some(0), Some(1)]
    );
    assert_eq!(p.added_layers, vec![2, 3, 4, 5]);
    for t in 0..6 {
        for suffix in names::LAYER_TENSORS {
            let got = p.source_of(&names::layer(t, suffix)).unwrap();
            let zeroed = t >= 2
                && (*suffix == "self_attn.o_proj.weight" || *suffix == "mlp.down_proj.weight");
            if zeroed {
                assert_eq!(got, &TensorSource::Zeros, "layer {t} {suffix}");
            } else {
                assert_eq!(
                    got,
                    &copy(names::layer(t % 2, suffix)),
                    "layer {t} {suffix}"
                );
            }
        }
    }
    // Moments: copies of the source's for Copy tensors, zero for the zeroed ones.
    for (i, (name, _, src)) in p.tensors.iter().enumerate() {
        match src {
            TensorSource::Copy(s) => assert_eq!(p.moment_source(i), Some(s.as_str()), "{name}"),
            _ => assert_eq!(p.moment_source(i), None, "{name}"),
        }
    }
    assert_eq!(p.moment_source(10_000), None);
}

#[test]
fn random_adds_fresh_layers() {
    let cfg = tiny(2);
    let p = plan(
        &cfg,
        &spec(
            Operator::Random {
                mask_ramp_steps: 50,
            },
            4,
        ),
    )
    .unwrap();
    assert_common(&p);
    assert_eq!(p.mask_ramp_steps, 50);
    assert_eq!(
        p.layer_sources,
        vec![Some(0), Some(1), None, None, None, None, None, None]
    );
    assert_eq!(p.added_layers, (2..8).collect::<Vec<_>>());
    let small = (2.0f64 / (5.0 * 16.0)).sqrt();
    let down = 1.0 / 24f64.sqrt() / 8.0;
    for t in 2..8 {
        for suffix in names::LAYER_TENSORS {
            let got = p.source_of(&names::layer(t, suffix)).unwrap().clone();
            let want = match *suffix {
                "mlp.down_proj.weight" => TensorSource::Normal { std: down },
                "input_layernorm.weight" | "post_attention_layernorm.weight" => TensorSource::Ones,
                _ => TensorSource::Normal { std: small },
            };
            assert_eq!(got, want, "layer {t} {suffix}");
        }
    }
    for t in 0..2 {
        for suffix in names::LAYER_TENSORS {
            assert_eq!(
                p.source_of(&names::layer(t, suffix)),
                Some(&copy(names::layer(t, suffix)))
            );
        }
    }
    let i = p
        .tensors
        .iter()
        .position(|(n, _, _)| n == &names::layer(5, "mlp.up_proj.weight"))
        .unwrap();
    assert_eq!(p.moment_source(i), None);
}

#[test]
fn factor_refusals_say_what_to_do() {
    for f in [0, 1] {
        let e = plan(&tiny(2), &spec(Operator::Stack, f)).unwrap_err();
        assert!(matches!(e, Error::InvalidGrowth(_)));
        let m = e.to_string();
        assert!(
            m.contains(&format!("growth factor must be an integer ≥ 2, got {f}"))
                && m.contains("recommends 4"),
            "{m}"
        );
    }
    let e = plan(&tiny(2), &spec(Operator::Zero, 1_000_000))
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than the"), "{e}");
    let e = plan(&tiny(2), &spec(Operator::Zero, usize::MAX))
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than the"), "{e}");
}

#[test]
fn invalid_config_is_refused_not_panicking() {
    let mut cfg = tiny(2);
    cfg.num_attention_heads = 3;
    let e = plan(&cfg, &spec(Operator::Stack, 2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("divisible"), "{e}");
}

#[test]
fn parse_operators() {
    assert_eq!(Operator::parse("stack").unwrap(), Operator::Stack);
    assert_eq!(
        Operator::parse("interpolate").unwrap(),
        Operator::Interpolate
    );
    assert_eq!(Operator::parse("middle").unwrap(), Operator::Middle);
    assert_eq!(Operator::parse("zero").unwrap(), Operator::Zero);
    assert_eq!(
        Operator::parse("random").unwrap(),
        Operator::Random { mask_ramp_steps: 0 }
    );
    for n in OPERATOR_NAMES {
        assert_eq!(Operator::parse(n).unwrap().name(), *n);
    }
    let e = Operator::parse("lego").unwrap_err();
    assert!(matches!(e, Error::InvalidGrowth(_)));
    let m = e.to_string();
    assert!(
        m.contains("'lego'") && m.contains("stack, interpolate, middle, zero, random"),
        "{m}"
    );
    assert!(Operator::parse("stacking_list")
        .unwrap_err()
        .to_string()
        .contains("stacking_list = ["));
}

#[test]
fn init_std_values() {
    let cfg = tiny(8);
    let small = (2.0f64 / 80.0).sqrt();
    assert_eq!(init_std(names::EMBED, &cfg), Some(small));
    assert_eq!(init_std(names::LM_HEAD, &cfg), Some(small));
    assert_eq!(init_std(names::NORM, &cfg), None);
    assert_eq!(
        init_std(&names::layer(3, "self_attn.k_proj.weight"), &cfg),
        Some(small)
    );
    assert_eq!(
        init_std(&names::layer(3, "mlp.down_proj.weight"), &cfg),
        Some(1.0 / 24f64.sqrt() / 8.0)
    );
    assert_eq!(
        init_std(&names::layer(3, "input_layernorm.weight"), &cfg),
        None
    );
    assert_eq!(init_std(&names::layer(8, "mlp.up_proj.weight"), &cfg), None);
    assert_eq!(init_std("foo", &cfg), None);
}

#[test]
fn plan_serialises() {
    let p = plan(&tiny(2), &spec(Operator::Zero, 2)).unwrap();
    let j = serde_json::to_string(&p).unwrap();
    let back: trellis_core::growth::GrowthPlan = serde_json::from_str(&j).unwrap();
    assert_eq!(back, p);
}
