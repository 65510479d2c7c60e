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
    pub moments: HashMap<String, Moments>,
}

/// Whether parameter `name` (of shape `shape`) is weight-decayed.
pub fn decays(shape: &[i64]) -> bool {
    shape.len() >= 2
}

impl AdamW {
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
                let st = self
                    .moments
                    .get_mut(name)
                    .unwrap_or_else(|| panic!("optimizer has no moments for {name}"));
                if clip < 1.0 {
                    let _ = g.g_mul_scalar_(clip);
                }
                let mut p = p.shallow_clone();
                // Decoupled weight decay.
                if c.weight_decay != 0.0 && decays(&p.size()) {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                // m ← β1 m + (1−β1) g
                let _ = st.exp_avg.lerp_(&g, 1.0 - c.beta1);
                // v ← β2 v + (1−β2) g²   (g becomes g²)
                let _ = g.g_mul_(&g.shallow_clone());
                let _ = st.exp_avg_sq.lerp_(&g, 1.0 - c.beta2);
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
