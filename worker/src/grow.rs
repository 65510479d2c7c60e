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
use tch::{Device, Kind, Tensor};
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

/// `n` tensors of the given local shapes as views of one new flat fp32 buffer (uninitialised):
/// one allocation for a whole model's worth of tensors instead of one per tensor.
fn flat_views(shapes: &[Vec<i64>], device: Device) -> Vec<Tensor> {
    let total: i64 = shapes.iter().map(|s| s.iter().product::<i64>()).sum();
    let flat = Tensor::empty([total], (Kind::Float, device));
    let mut off = 0;
    shapes
        .iter()
        .map(|s| {
            let n: i64 = s.iter().product();
            let v = flat.narrow(0, off, n).view(s.as_slice());
            off += n;
            v
        })
        .collect()
}

/// Apply `plan`: returns the grown model and optimizer (per `policy`) and the phase timings.
/// Fresh (`Normal`) tensors draw from per-tensor streams seeded by
/// [`crate::init::generation_seed`]`(seed, generation)` and the name,
/// so every rank and every re-run of the same growth produce the same values.
///
/// At memory speed: the grown weights (and carried moments) are views of one new buffer each,
/// every target is written once (a copy, a fill or its draw; nothing is initialised first and
/// then overwritten), nothing goes through the host, and `reset` moments are not written at
/// all before the first update writes them ([`AdamW::moments`]).
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
    // The copies are memory-bound: one thread nearly saturates the bandwidth, and a second
    // one spinning at every small kernel's barrier costs far more than it gives when the CPU is
    // shared — as it is during a growth, with the growth checkpoint's writer running
    // (docs/benchmarks.md, "Growth latency"). Restored on return.
    struct Threads(i32);
    impl Drop for Threads {
        fn drop(&mut self) {
            tch::set_num_threads(self.0);
        }
    }
    let _threads = (device == Device::Cpu).then(|| {
        let t = Threads(tch::get_num_threads());
        tch::set_num_threads(1);
        t
    });
    // A TP shard grows its own slices: copies stay local (source and target are split alike),
    // fresh tensors are drawn whole (the TP = 1 stream) and sliced.
    let shard = model.shard;
    let shapes: Vec<Vec<i64>> = plan
        .tensors
        .iter()
        .map(|(name, shape, _)| dims(&shard.local_shape(name, shape)))
        .collect();
    let mut weights: HashMap<String, Tensor> = tch::no_grad(|| {
        let views = flat_views(&shapes, device);
        plan.tensors
            .iter()
            .zip(views)
            .map(|((name, shape, src), mut v)| {
                match src {
                    TensorSource::Copy(from) => {
                        v.copy_(model.parameter(from).expect("checked"));
                    }
                    TensorSource::Zeros => {
                        let _ = v.zero_();
                    }
                    TensorSource::Ones => {
                        let _ = v.fill_(1.0);
                    }
                    TensorSource::Normal { std } => {
                        let full = crate::init::normal(
                            name,
                            shape,
                            *std,
                            crate::init::generation_seed(seed, generation),
                            device,
                        );
                        v.copy_(&shard.slice(name, &full));
                    }
                }
                (name.clone(), v)
            })
            .collect()
    });
    let mut grown = Llama::new_shard(&plan.new, device, shard, &mut |name, _| {
        weights
            .remove(name)
            .unwrap_or_else(|| panic!("plan has no source for {name} (checked)"))
    });
    grown.precision = model.precision;
    let stack_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let new_optim = match policy {
        // Zero moments, allocated and written by the first update (`AdamW::moments`).
        OptimizerPolicy::Reset => AdamW::fresh(optim.cfg),
        OptimizerPolicy::Carry => {
            let both: Vec<Vec<i64>> = shapes.iter().flat_map(|s| [s.clone(), s.clone()]).collect();
            let moments = tch::no_grad(|| {
                let mut views = flat_views(&both, device).into_iter();
                let mut moments = HashMap::new();
                for (i, (name, _, _)) in plan.tensors.iter().enumerate() {
                    let (mut exp_avg, mut exp_avg_sq) =
                        (views.next().unwrap(), views.next().unwrap());
                    // A source whose moments are not allocated yet has zero moments.
                    match plan
                        .moment_source(i)
                        .and_then(|from| optim.moments.get(from))
                    {
                        Some(src) => {
                            exp_avg.copy_(&src.exp_avg);
                            exp_avg_sq.copy_(&src.exp_avg_sq);
                        }
                        None => {
                            let _ = exp_avg.zero_();
                            let _ = exp_avg_sq.zero_();
                        }
                    }
                    moments.insert(
                        name.clone(),
                        Moments {
                            exp_avg,
                            exp_avg_sq,
                        },
                    );
                }
                moments
            });
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
