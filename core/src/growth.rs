//! Growth operators as one pure plan generator (docs/design.md §1).
//!
//! An operator maps (model config, factor, options) to a [`GrowthPlan`]: for every target tensor,
//! where its values come from. The worker applies a plan to its in-memory tensors (online growth)
//! and `coordctl checkpoint grow` applies the same plan to safetensors files (offline growth).
use crate::config::{names, ModelConfig};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// A depthwise growth operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Operator {
    /// G_stack: target layer t copies source layer t mod L (order `[0..L-1] × g`).
    Stack,
    /// Each source layer repeated g times in place (`[0,0,…,1,1,…]`).
    Interpolate,
    /// MIDAS-style: the first and last layers kept once, the middle block `1..L−1` repeated in
    /// order to fill depth `g·L` (exact definition at [`plan`]; needs `L ≥ 3`).
    Middle,
    /// Any list of source indices (covers partial stacking). Its length is the new depth.
    StackingList { layers: Vec<usize> },
    /// Function preserving: the original layers keep their place; the added layers are copies
    /// (in stack order) whose `o_proj` and `down_proj` are zero, so each is the identity.
    Zero,
    /// The added layers are freshly initialised; with `mask_ramp_steps > 0` their block output is
    /// masked in over that many steps (`out = m·f(x) + (1−m)·x`, m: 0→1).
    Random {
        #[serde(default)]
        mask_ramp_steps: u64,
    },
}

impl Operator {
    /// Parse the operator names used on the command line and in job specs.
    ///
    /// `stacking_list` is not accepted here because it needs its list of layers: build
    /// [`Operator::StackingList`] directly (job specs: `stacking_list = [..]`). `random` parses
    /// with `mask_ramp_steps = 0`.
    pub fn parse(name: &str) -> Result<Operator> {
        match name.trim().to_ascii_lowercase().as_str() {
            "stack" | "g_stack" | "gstack" => Ok(Operator::Stack),
            "interpolate" => Ok(Operator::Interpolate),
            "middle" => Ok(Operator::Middle),
            "zero" => Ok(Operator::Zero),
            "random" => Ok(Operator::Random { mask_ramp_steps: 0 }),
            "stacking_list" => Err(Error::InvalidGrowth(
                "operator 'stacking_list' needs an explicit list of source layers \
                 (job spec: stacking_list = [0, 1, 0, 1]); on the command line use one of \
                 stack, interpolate, middle, zero, random"
                    .into(),
            )),
            _ => Err(Error::InvalidGrowth(format!(
                "unknown growth operator '{name}'; choose one of {}",
                OPERATOR_NAMES.join(", ")
            ))),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Operator::Stack => "stack",
            Operator::Interpolate => "interpolate",
            Operator::Middle => "middle",
            Operator::StackingList { .. } => "stacking_list",
            Operator::Zero => "zero",
            Operator::Random { .. } => "random",
        }
    }
}

/// The operator names [`Operator::parse`] accepts.
pub const OPERATOR_NAMES: &[&str] = &["stack", "interpolate", "middle", "zero", "random"];

/// The paper's recommended growth factor.
pub const RECOMMENDED_FACTOR: usize = 4;

/// The deepest model a plan may produce; a guard against typos such as `--factor 4000`.
pub const MAX_LAYERS: usize = 4096;

/// What happens to the optimizer at growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerPolicy {
    /// The paper's protocol: fresh AdamW (zero moments), schedule restarted with re-warmup and
    /// the post-growth peak LR.
    #[default]
    Reset,
    /// Adam moments grown with the same plan as the weights (zeros for zeroed / fresh tensors);
    /// the step count and the LR schedule continue.
    Carry,
}

/// A growth request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrowthSpec {
    /// Depth multiplier, an integer ≥ 2 (ignored for `StackingList`, whose length sets depth).
    pub factor: usize,
    pub operator: Operator,
    #[serde(default)]
    pub optimizer: OptimizerPolicy,
}

/// Where one target tensor's values come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorSource {
    /// A copy of this source tensor (same shape).
    Copy(String),
    /// All zeros.
    Zeros,
    /// All ones (fresh norm weights).
    Ones,
    /// Fresh N(0, std²).
    Normal { std: f64 },
}

/// The outcome of a plan: the new config and, for every target tensor in
/// [`ModelConfig::tensor_shapes`] order, its source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrowthPlan {
    pub old: ModelConfig,
    pub new: ModelConfig,
    /// For every target layer, the source layer it was derived from (`None` if fresh).
    pub layer_sources: Vec<Option<usize>>,
    /// Target layers that are *added*, as opposed to kept, ascending. A target layer is kept
    /// when it is the first target layer (in depth order) derived from its source layer; every
    /// later copy, and every fresh layer, is added. So for `stack`, `zero` and `random` the added
    /// layers are `L..g·L`, for `interpolate` those with `t mod g ≠ 0`. Under `zero` they are the
    /// identity blocks, under `random` the fresh (and masked-in) ones.
    pub added_layers: Vec<usize>,
    /// Every target tensor (name, global shape, source).
    pub tensors: Vec<(String, Vec<usize>, TensorSource)>,
    /// For `random` with a mask ramp, the number of steps; 0 otherwise.
    pub mask_ramp_steps: u64,
}

impl GrowthPlan {
    /// The source of an Adam moment of target tensor `i` under `carry`: the *parameter* name whose
    /// moments (`<name>.exp_avg`, `<name>.exp_avg_sq`) are copied. `None` means zero moments:
    /// zeroed, ones or fresh tensors start with zero moments. `None` also for an index out of
    /// range.
    pub fn moment_source(&self, i: usize) -> Option<&str> {
        match &self.tensors.get(i)?.2 {
            TensorSource::Copy(src) => Some(src.as_str()),
            TensorSource::Zeros | TensorSource::Ones | TensorSource::Normal { .. } => None,
        }
    }

    /// The source of target tensor `name`, if the plan has it.
    pub fn source_of(&self, name: &str) -> Option<&TensorSource> {
        self.tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, s)| s)
    }

    /// Number of target layers.
    pub fn new_layers(&self) -> usize {
        self.new.num_hidden_layers
    }
}

/// The standard deviation of a freshly initialised parameter `name` of a model with config `cfg`
/// (docs/design.md §1, TinyLlama / GPT-NeoX "small init"):
///
/// * linear and embedding weights: `N(0, sqrt(2 / (5 · fan_in)))`, `fan_in` = the input width
///   (the hidden size for the embedding, every projection but `down_proj`, and `lm_head`);
/// * `down_proj`: `N(0, 1 / sqrt(intermediate_size) / num_hidden_layers)` with the depth of `cfg`
///   (pass the *new* config when growing);
/// * RMSNorm weights: `None`, meaning all ones.
///
/// Names `cfg` does not have (unknown suffix, layer index ≥ depth) also give `None`; callers
/// iterate [`ModelConfig::tensor_shapes`].
pub fn init_std(name: &str, cfg: &ModelConfig) -> Option<f64> {
    let h = cfg.hidden_size as f64;
    let small = (2.0 / (5.0 * h)).sqrt();
    if name == names::EMBED || name == names::LM_HEAD {
        return Some(small);
    }
    let (i, suffix) = names::parse_layer(name)?;
    if i >= cfg.num_hidden_layers {
        return None;
    }
    match suffix {
        "self_attn.q_proj.weight"
        | "self_attn.k_proj.weight"
        | "self_attn.v_proj.weight"
        | "self_attn.o_proj.weight"
        | "mlp.gate_proj.weight"
        | "mlp.up_proj.weight" => Some(small),
        "mlp.down_proj.weight" => {
            Some(1.0 / (cfg.intermediate_size as f64).sqrt() / cfg.num_hidden_layers as f64)
        }
        _ => None,
    }
}

/// The fresh-init source of tensor `name` (ones for norms, `Normal` otherwise).
pub fn fresh_source(name: &str, cfg: &ModelConfig) -> TensorSource {
    match init_std(name, cfg) {
        Some(std) => TensorSource::Normal { std },
        None => TensorSource::Ones,
    }
}

/// How each target layer is made.
#[derive(Clone, Copy)]
enum LayerKind {
    /// A copy of source layer `s`.
    Copy(usize),
    /// A copy of source layer `s` with `o_proj` and `down_proj` zeroed (identity block).
    Identity(usize),
    /// Freshly initialised.
    Fresh,
}

/// Whether `factor` can be a growth factor at all (an integer in `2..=MAX_LAYERS`), before any
/// model is known: the one rule clients check locally and [`plan`] applies.
pub fn check_factor(factor: usize) -> Result<()> {
    if factor < 2 {
        return Err(Error::InvalidGrowth(format!(
            "growth factor must be an integer ≥ 2, got {factor}; the paper recommends {RECOMMENDED_FACTOR}"
        )));
    }
    if factor > MAX_LAYERS {
        return Err(Error::InvalidGrowth(format!(
            "growth factor {factor} would make more than the {MAX_LAYERS} layers allowed; \
             choose a smaller factor (the paper recommends {RECOMMENDED_FACTOR})"
        )));
    }
    Ok(())
}

fn factor_checked(cfg: &ModelConfig, spec: &GrowthSpec) -> Result<usize> {
    let l = cfg.num_hidden_layers;
    check_factor(spec.factor)?;
    match l.checked_mul(spec.factor) {
        Some(n) if n <= MAX_LAYERS => Ok(n),
        _ => Err(Error::InvalidGrowth(format!(
            "growth factor {} would make {l} × {} layers, more than the {MAX_LAYERS} allowed; \
             choose a smaller factor (the paper recommends {RECOMMENDED_FACTOR})",
            spec.factor, spec.factor
        ))),
    }
}

/// Validate `spec` against `cfg` and build the plan. Refusals are [`Error::InvalidGrowth`] with a
/// message that says what to change (factor < 2, empty or out-of-range stacking list, …).
///
/// Layer orders, for a source of `L` layers and factor `g`:
///
/// * `stack` (G_stack): target `t` ← source `t mod L`, depth `g·L`.
/// * `interpolate`: target `t` ← source `⌊t / g⌋`, depth `g·L`.
/// * `middle` (MIDAS-style): depth `g·L`. The first layer (0) and the last layer (`L−1`) are kept
///   once each, at the very bottom and the very top; the middle block `1..L−1` (the `L−2` layers
///   between them) is repeated in order to fill the `g·L − 2` slots between: target `0` ← `0`,
///   target `g·L−1` ← `L−1`, target `t` in between ← `1 + ((t−1) mod (L−2))`. When `L−2` does not
///   divide `g·L−2` the last repetition is partial (it stops early, in order). Needs `L ≥ 3`.
///   Example `L = 4, g = 2`: `[0, 1,2, 1,2, 1,2, 3]`.
/// * `stacking_list`: target `t` ← `layers[t]`; depth = list length (≥ 1; `factor` ignored).
/// * `zero`: as `stack`, but the added layers `L..g·L` have `o_proj` and `down_proj` zero, so
///   each added block is the identity on the residual stream (function preserving).
/// * `random`: layers `0..L` kept in place, layers `L..g·L` freshly initialised with
///   [`init_std`] of the new config (norms ones).
///
/// Embeddings, the final norm and `lm_head` are copied unchanged by every operator.
pub fn plan(cfg: &ModelConfig, spec: &GrowthSpec) -> Result<GrowthPlan> {
    cfg.validate()
        .map_err(|e| Error::InvalidGrowth(format!("the model to grow is invalid: {e}")))?;
    let l = cfg.num_hidden_layers;
    let kinds: Vec<LayerKind> = match &spec.operator {
        Operator::StackingList { layers } => {
            if layers.is_empty() {
                return Err(Error::InvalidGrowth(
                    "stacking_list is empty; list the source layer of every target layer, e.g. \
                     [0, 1, 0, 1] to stack a 2-layer model twice"
                        .into(),
                ));
            }
            if layers.len() > MAX_LAYERS {
                return Err(Error::InvalidGrowth(format!(
                    "stacking_list has {} entries, more than the {MAX_LAYERS} layers allowed",
                    layers.len()
                )));
            }
            if let Some((pos, bad)) = layers.iter().enumerate().find(|(_, &s)| s >= l) {
                return Err(Error::InvalidGrowth(format!(
                    "stacking_list[{pos}] = {bad} is not a layer of the {l}-layer model; \
                     use source indices 0..={}",
                    l - 1
                )));
            }
            if layers.len() <= l {
                return Err(Error::InvalidGrowth(format!(
                    "stacking_list has {} entries; a growth must make the {l}-layer model deeper, \
                     so list more than {l} source layers",
                    layers.len()
                )));
            }
            layers.iter().map(|&s| LayerKind::Copy(s)).collect()
        }
        Operator::Stack => {
            let n = factor_checked(cfg, spec)?;
            (0..n).map(|t| LayerKind::Copy(t % l)).collect()
        }
        Operator::Interpolate => {
            let n = factor_checked(cfg, spec)?;
            (0..n).map(|t| LayerKind::Copy(t / spec.factor)).collect()
        }
        Operator::Middle => {
            let n = factor_checked(cfg, spec)?;
            if l < 3 {
                return Err(Error::InvalidGrowth(format!(
                    "operator 'middle' needs at least 3 layers (first, a middle block, last), \
                     the model has {l}; use 'stack' instead"
                )));
            }
            let m = l - 2;
            (0..n)
                .map(|t| {
                    if t == 0 {
                        LayerKind::Copy(0)
                    } else if t == n - 1 {
                        LayerKind::Copy(l - 1)
                    } else {
                        LayerKind::Copy(1 + (t - 1) % m)
                    }
                })
                .collect()
        }
        Operator::Zero => {
            let n = factor_checked(cfg, spec)?;
            (0..n)
                .map(|t| {
                    if t < l {
                        LayerKind::Copy(t)
                    } else {
                        LayerKind::Identity(t % l)
                    }
                })
                .collect()
        }
        Operator::Random { .. } => {
            let n = factor_checked(cfg, spec)?;
            (0..n)
                .map(|t| {
                    if t < l {
                        LayerKind::Copy(t)
                    } else {
                        LayerKind::Fresh
                    }
                })
                .collect()
        }
    };

    let new = cfg.with_layers(kinds.len());
    let layer_sources: Vec<Option<usize>> = kinds
        .iter()
        .map(|k| match *k {
            LayerKind::Copy(s) | LayerKind::Identity(s) => Some(s),
            LayerKind::Fresh => None,
        })
        .collect();
    let mut seen = vec![false; l];
    let mut added_layers = Vec::new();
    for (t, src) in layer_sources.iter().enumerate() {
        match src {
            Some(s) if !seen[*s] => seen[*s] = true,
            _ => added_layers.push(t),
        }
    }

    let tensors = new
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let source = match names::parse_layer(&name) {
                None => TensorSource::Copy(name.clone()),
                Some((t, suffix)) => match kinds[t] {
                    LayerKind::Copy(s) => TensorSource::Copy(names::layer(s, suffix)),
                    LayerKind::Identity(s) => match suffix {
                        "self_attn.o_proj.weight" | "mlp.down_proj.weight" => TensorSource::Zeros,
                        _ => TensorSource::Copy(names::layer(s, suffix)),
                    },
                    LayerKind::Fresh => fresh_source(&name, &new),
                },
            };
            (name, shape, source)
        })
        .collect();

    let mask_ramp_steps = match spec.operator {
        Operator::Random { mask_ramp_steps } => mask_ramp_steps,
        _ => 0,
    };
    Ok(GrowthPlan {
        old: cfg.clone(),
        new,
        layer_sources,
        added_layers,
        tensors,
        mask_ramp_steps,
    })
}
