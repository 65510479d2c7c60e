//! The online executor of a [`GrowthPlan`] (docs/design.md §Growth transaction).
//!
//! The plan (built and validated by `trellis_core::growth::plan`, the same generator the offline
//! `coordctl checkpoint grow` uses) says, for every target tensor, where its values come from.
//! [`apply`] builds a *new* model and optimizer from the old ones and never touches the old
//! ones, so a failure at any point leaves the caller's state as it was.
use crate::model::Llama;
use crate::optim::{AdamW, Moments};
use crate::{Error, Result};
use std::collections::HashMap;
use std::time::Instant;
use tch::{Kind, Tensor};
use trellis_core::growth::{GrowthPlan, OptimizerPolicy, TensorSource};

/// Seconds spent in each phase of an online growth.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GrowthTimings {
    /// Validating the request and building the plan.
    pub plan_seconds: f64,
    /// Building the grown weights.
    pub stack_seconds: f64,
    /// Growing (or resetting) the optimizer state.
    pub optimizer_seconds: f64,
    pub total_seconds: f64,
}

fn dims(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

/// Check that `plan` can be applied to `model` (sources exist with the right shapes, the target
/// list is the new config's) before anything is allocated.
pub fn check(model: &Llama, plan: &GrowthPlan) -> Result<()> {
    if plan.old != model.cfg {
        return Err(Error::Invalid(format!(
            "growth plan was made for a {}-layer model but the model has {} layers; re-plan against the current model",
            plan.old.num_hidden_layers, model.cfg.num_hidden_layers
        )));
    }
    let want = plan.new.tensor_shapes();
    if want.len() != plan.tensors.len()
        || want
            .iter()
            .zip(&plan.tensors)
            .any(|((n, s), (pn, ps, _))| n != pn || s != ps)
    {
        return Err(Error::Invalid(
            "growth plan's tensor list does not match its new config (a bug in the plan generator)"
                .into(),
        ));
    }
    for (name, shape, src) in &plan.tensors {
        if let TensorSource::Copy(from) = src {
            let t = model.parameter(from).ok_or_else(|| {
                Error::Invalid(format!(
                    "growth plan copies {name} from {from}, which the model does not have"
                ))
            })?;
            if t.size() != dims(&model.shard.local_shape(from, shape)) {
                return Err(Error::Invalid(format!(
                    "growth plan copies {name} {shape:?} from {from} of shape {:?}",
                    t.size()
                )));
            }
        }
    }
    Ok(())
}

/// Apply `plan`: returns the grown model and optimizer (per `policy`) and the phase timings.
/// Fresh (`Normal`) tensors draw from per-tensor streams seeded by
/// [`crate::init::generation_seed`]`(seed, generation)` and the name,
/// so every rank and every re-run of the same growth produce the same values.
pub fn apply(
    model: &Llama,
    optim: &AdamW,
    plan: &GrowthPlan,
    policy: OptimizerPolicy,
    seed: u64,
    generation: u64,
) -> Result<(Llama, AdamW, GrowthTimings)> {
    check(model, plan)?;
    let device = model.device();
    let t0 = Instant::now();
    let sources: HashMap<&str, (&[usize], &TensorSource)> = plan
        .tensors
        .iter()
        .map(|(n, shape, s)| (n.as_str(), (shape.as_slice(), s)))
        .collect();
    // A TP shard grows its own slices: copies stay local (source and target are split alike),
    // fresh tensors are drawn whole (the TP = 1 stream) and sliced.
    let shard = model.shard;
    let grown = tch::no_grad(|| {
        Llama::new_shard(&plan.new, device, shard, &mut |name, shape| match sources
            .get(name)
            .map(|(_, s)| *s)
        {
            Some(TensorSource::Copy(from)) => {
                model.parameter(from).expect("checked").detach().copy()
            }
            Some(TensorSource::Zeros) => Tensor::zeros(dims(shape), (Kind::Float, device)),
            Some(TensorSource::Ones) => Tensor::ones(dims(shape), (Kind::Float, device)),
            Some(TensorSource::Normal { std }) => shard.slice(
                name,
                &crate::init::normal(
                    name,
                    sources[name].0,
                    *std,
                    crate::init::generation_seed(seed, generation),
                    device,
                ),
            ),
            None => panic!("plan has no source for {name} (checked)"),
        })
    });
    let mut grown = grown;
    grown.precision = model.precision;
    let stack_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let new_optim = match policy {
        OptimizerPolicy::Reset => AdamW::new(optim.cfg, grown.named_parameters()),
        OptimizerPolicy::Carry => {
            let mut moments = HashMap::new();
            tch::no_grad(|| -> Result<()> {
                for (i, (name, _, _)) in plan.tensors.iter().enumerate() {
                    let p = grown
                        .parameter(name)
                        .expect("grown model has every plan tensor");
                    let m = match plan.moment_source(i) {
                        Some(from) => {
                            let src = optim.moments.get(from).ok_or_else(|| {
                                Error::Invalid(format!("optimizer has no moments for {from}"))
                            })?;
                            Moments {
                                exp_avg: src.exp_avg.copy(),
                                exp_avg_sq: src.exp_avg_sq.copy(),
                            }
                        }
                        None => Moments::zeros_like(p),
                    };
                    moments.insert(name.clone(), m);
                }
                Ok(())
            })?;
            AdamW {
                cfg: optim.cfg,
                step: optim.step,
                moments,
            }
        }
    };
    let optimizer_seconds = t1.elapsed().as_secs_f64();
    Ok((
        grown,
        new_optim,
        GrowthTimings {
            plan_seconds: 0.0,
            stack_seconds,
            optimizer_seconds,
            total_seconds: stack_seconds + optimizer_seconds,
        },
    ))
}
