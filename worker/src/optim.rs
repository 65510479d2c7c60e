//! AdamW with plain-tensor moments (docs/design.md §Conventions: β = (0.9, 0.95), decoupled
//! weight decay 0.1, global-norm clipping 1.0).
//!
//! The moments (`exp_avg`, `exp_avg_sq`) are ordinary tensors keyed by the parameter's HF name,
//! so they are saved in `optim-*.safetensors` (`<param>.exp_avg[_sq]`), loaded, and grown with
//! the same plan as the weights. The bias correction uses the optimizer's own step count `t`,
//! which restarts at 0 when the optimizer is reset at growth.
//!
//! Weight decay applies to 2-D weights only: every linear weight and, following the Hugging Face
//! Trainer convention (all parameters but biases and norms), the embedding and the `lm_head`
//! matrix. Norm weights (1-D) are not decayed.
//!
//! The update runs in place under `no_grad` with no temporaries: the gradient buffer is reused
//! as scratch (`g ← g²`, then `g ← sqrt(v) + ε'`), so per parameter it is 6–7 kernels and zero
//! allocations (PyTorch's single-tensor AdamW allocates its denominator).
use std::collections::HashMap;
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Max global grad norm (≤ 0: no clipping).
    pub grad_clip: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

impl AdamWConfig {
    pub fn from_train(t: &trellis_core::job::TrainSection) -> AdamWConfig {
        AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.adam_eps,
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
        }
    }
}

/// The moments of one parameter.
#[derive(Debug)]
pub struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

impl Moments {
    pub fn zeros_like(p: &Tensor) -> Moments {
        Moments {
            exp_avg: p.zeros_like().detach(),
            exp_avg_sq: p.zeros_like().detach(),
        }
    }
}

/// AdamW state.
#[derive(Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Adam's step count `t` (number of updates applied since the last reset).
    pub step: u64,
    /// The moments by parameter name. A parameter without an entry has zero moments that are
    /// not allocated yet (a fresh optimizer after a `reset` growth, [`AdamW::fresh`]): its first
    /// update writes them whole — `m = (1−β1)·g`, `v = (1−β2)·g²`, bit for bit what the update
    /// from zero buffers gives — so a growth does not first fill twice the model's bytes with
    /// zeros. [`AdamW::moments_of`] reads either kind.
    pub moments: HashMap<String, Moments>,
}

/// Whether parameter `name` (of shape `shape`) is weight-decayed.
pub fn decays(shape: &[i64]) -> bool {
    shape.len() >= 2
}

impl AdamW {
    /// Fresh state with the zero moments not allocated (see [`AdamW::moments`]), `t = 0`.
    pub fn fresh(cfg: AdamWConfig) -> AdamW {
        AdamW {
            cfg,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// The moments of parameter `name` (`p`): shared with the optimizer, or zeros when they are
    /// not allocated yet.
    pub fn moments_of(&self, name: &str, p: &Tensor) -> Moments {
        match self.moments.get(name) {
            Some(m) => Moments {
                exp_avg: m.exp_avg.shallow_clone(),
                exp_avg_sq: m.exp_avg_sq.shallow_clone(),
            },
            None => tch::no_grad(|| Moments::zeros_like(p)),
        }
    }

    /// Fresh state: zero moments for every parameter, `t = 0`.
    pub fn new(cfg: AdamWConfig, params: &[(String, Tensor)]) -> AdamW {
        let moments = tch::no_grad(|| {
            params
                .iter()
                .map(|(n, p)| (n.clone(), Moments::zeros_like(p)))
                .collect()
        });
        AdamW {
            cfg,
            step: 0,
            moments,
        }
    }

    /// The global L2 norm of the gradients (before clipping). Parameters without a gradient
    /// count as zero.
    pub fn grad_norm(params: &[(String, Tensor)]) -> f64 {
        tch::no_grad(|| {
            let norms: Vec<Tensor> = params
                .iter()
                .map(|(_, p)| p.grad())
                .filter(|g| g.defined())
                .map(|g| g.norm())
                .collect();
            if norms.is_empty() {
                return 0.0;
            }
            Tensor::stack(&norms, 0).norm().double_value(&[])
        })
    }

    /// Clip by global norm, then apply one AdamW update with learning rate `lr`. Consumes the
    /// gradients (their buffers are used as scratch; zero them before the next backward).
    /// Returns the pre-clip global gradient norm.
    pub fn step(&mut self, params: &[(String, Tensor)], lr: f64) -> f64 {
        let norm = Self::grad_norm(params);
        self.step_with_norm(params, lr, norm)
    }

    /// [`AdamW::step`] with the global gradient norm computed by the caller (a TP shard's
    /// norm spans every rank's slice: `crate::parallel::grad_norm`). Returns `norm`.
    pub fn step_with_norm(&mut self, params: &[(String, Tensor)], lr: f64, norm: f64) -> f64 {
        let clip = if self.cfg.grad_clip > 0.0 {
            (self.cfg.grad_clip / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        tch::no_grad(|| {
            for (name, p) in params {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                if clip < 1.0 {
                    let _ = g.g_mul_scalar_(clip);
                }
                let mut p = p.shallow_clone();
                // Decoupled weight decay.
                if c.weight_decay != 0.0 && decays(&p.size()) {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let (w1, w2) = (1.0 - c.beta1, 1.0 - c.beta2);
                if !self.moments.contains_key(name) && w1 < 0.5 && w2 < 0.5 {
                    // Zero moments not allocated yet: `lerp(0, x, w)` is `0 + w·x` for w < 0.5
                    // (libtorch's formula), i.e. `w·x` with −0 turned to +0: written directly.
                    let exp_avg = (&g * w1) + 0.0;
                    let _ = g.g_mul_(&g.shallow_clone());
                    let exp_avg_sq = (&g * w2) + 0.0;
                    self.moments.insert(
                        name.clone(),
                        Moments {
                            exp_avg,
                            exp_avg_sq,
                        },
                    );
                } else {
                    let st = self
                        .moments
                        .entry(name.clone())
                        .or_insert_with(|| Moments::zeros_like(&p));
                    // m ← β1 m + (1−β1) g
                    let _ = st.exp_avg.lerp_(&g, w1);
                    // v ← β2 v + (1−β2) g²   (g becomes g²)
                    let _ = g.g_mul_(&g.shallow_clone());
                    let _ = st.exp_avg_sq.lerp_(&g, w2);
                }
                let st = &self.moments[name];
                // p ← p − step_size · m / (sqrt(v)/bc2_sqrt + ε)
                //   = p + m / ((sqrt(v) + ε·bc2_sqrt) · (−1 / (step_size·bc2_sqrt)))
                let _ = st.exp_avg_sq.sqrt_out(&g);
                let _ = g.g_add_scalar_(c.eps * bc2_sqrt);
                let _ = g.g_mul_scalar_(-1.0 / (step_size * bc2_sqrt));
                let _ = p.addcdiv_(&st.exp_avg, &g);
            }
        });
        norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The first update of moments not allocated yet is bit for bit the update from zero
    /// buffers (signed zeros included), for weights, moments and the next steps.
    #[test]
    fn unallocated_zero_moments_update_like_zero_buffers() {
        tch::manual_seed(3);
        let mk = || {
            let w = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
            let b = Tensor::zeros([8], (Kind::Float, Device::Cpu));
            vec![
                ("w".to_string(), w.set_requires_grad(true)),
                ("b".to_string(), b.set_requires_grad(true)),
            ]
        };
        let (pa, pb) = (mk(), mk());
        tch::no_grad(|| {
            for ((_, a), (_, b)) in pa.iter().zip(&pb) {
                b.shallow_clone().copy_(a);
            }
        });
        let mut eager = AdamW::new(AdamWConfig::default(), &pa);
        let mut lazy = AdamW::fresh(AdamWConfig::default());
        for k in 0..3 {
            let x = Tensor::randn([8], (Kind::Float, Device::Cpu));
            for (params, opt) in [(&pa, &mut eager), (&pb, &mut lazy)] {
                // A gradient with exact zeros and negative zeros in it.
                let loss = (&params[0].1.matmul(&x)).relu().sum(Kind::Float)
                    + (&params[1].1 * &x * (-0.0)).sum(Kind::Float);
                loss.backward();
                opt.step(params, 1e-2);
                for (_, p) in params.iter() {
                    let _ = p.grad().zero_();
                }
            }
            for ((n, a), (_, b)) in pa.iter().zip(&pb) {
                let same = |x: &Tensor, y: &Tensor| {
                    let (x, y) = (x.flatten(0, -1), y.flatten(0, -1));
                    let xv: Vec<f32> = Vec::try_from(&x).unwrap();
                    let yv: Vec<f32> = Vec::try_from(&y).unwrap();
                    xv.iter()
                        .map(|v| v.to_bits())
                        .eq(yv.iter().map(|v| v.to_bits()))
                };
                assert!(same(a, b), "step {k}: {n}");
                let (ma, mb) = (&eager.moments[n], &lazy.moments[n]);
                assert!(same(&ma.exp_avg, &mb.exp_avg), "step {k}: {n} exp_avg");
                assert!(
                    same(&ma.exp_avg_sq, &mb.exp_avg_sq),
                    "step {k}: {n} exp_avg_sq"
                );
            }
        }
    }
}
