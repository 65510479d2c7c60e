//! Growth operators as one pure plan generator (DESIGN §1).
//!
//! An operator maps (model config, factor, options) to a [`GrowthPlan`]: for every target tensor,
//! where its values come from. The worker applies a plan to its in-memory tensors (online growth)
//! and `coordctl checkpoint grow` applies the same plan to safetensors files (offline growth).
use crate::config::ModelConfig;
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
    /// MIDAS-style: the middle block of layers is repeated.
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
    pub fn parse(name: &str) -> Result<Operator> {
        todo!("H1: stack|interpolate|middle|zero|random, else InvalidGrowth naming the choices: {name}")
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
    /// Target layers that are *added* (identity / fresh / masked-in), as opposed to kept.
    pub added_layers: Vec<usize>,
    /// Every target tensor (name, global shape, source).
    pub tensors: Vec<(String, Vec<usize>, TensorSource)>,
    /// For `random` with a mask ramp, the number of steps; 0 otherwise.
    pub mask_ramp_steps: u64,
}

impl GrowthPlan {
    /// The source of an Adam moment of target tensor `i` under `carry`: copies of copies,
    /// zeros for everything else (zeroed, ones or fresh tensors start with zero moments).
    pub fn moment_source(&self, i: usize) -> Option<&str> {
        match &self.tensors[i].2 {
            TensorSource::Copy(src) if !self.is_zeroed(i) => Some(src.as_str()),
            _ => None,
        }
    }

    fn is_zeroed(&self, i: usize) -> bool {
        matches!(self.tensors[i].2, TensorSource::Zeros)
    }
}

/// Validate `spec` against `cfg` and build the plan. Refusals are [`Error::InvalidGrowth`] with a
/// message that says what to change (factor < 2, empty or out-of-range stacking list, …).
pub fn plan(cfg: &ModelConfig, spec: &GrowthSpec) -> Result<GrowthPlan> {
    let _ = (cfg, spec, Error::InvalidGrowth(String::new()));
    todo!("H1")
}
