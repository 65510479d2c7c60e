//! The job spec (TOML). One struct, `deny_unknown_fields` everywhere, relative paths resolved
//! against the spec file's directory. `deploy/jobs/*.toml` are documented examples that a test
//! parses.
use crate::config::ModelConfig;
use crate::growth::{GrowthSpec, Operator, OptimizerPolicy};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub job: JobSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub parallel: ParallelSection,
    /// Growth stages, applied in order.
    #[serde(default)]
    pub growth: Vec<GrowthStage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    pub name: String,
    #[serde(default = "d_seed")]
    pub seed: u64,
}

/// A preset, optionally with fields overridden. `vocab_size` defaults to the tokenizer's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub head_dim: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rms_norm_eps: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
    /// `[model.rope_scaling]`: `rope_type = "llama3"`, `factor`, `low_freq_factor`,
    /// `high_freq_factor`, `original_max_position_embeddings`.
    pub rope_scaling: Option<crate::config::RopeScaling>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training data: a file, a directory or a glob (`shards/*.jsonl.zst`) of `.txt`,
    /// `.txt.zst`, `.jsonl` (`.gz` / `.zst`), `.parquet` or pre-tokenized `.bin` files. In text
    /// files `<|endoftext|>` lines separate documents; a jsonl line or parquet row is one
    /// document. Leave it out when `[[data.sources]]` gives a weighted mixture instead.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub train: PathBuf,
    /// Held-out data for validation loss (same forms as `train`).
    pub valid: PathBuf,
    /// A `tokenizer.json` to load. Without it a byte-level BPE of `vocab_size` is trained on
    /// `train` (and cached). Required with pre-tokenized data.
    pub tokenizer: Option<PathBuf>,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Where tokenized corpora and trained tokenizers are cached. Default: `<out>/data`.
    pub cache_dir: Option<PathBuf>,
    /// The string field holding a document's text in jsonl / parquet files (default `text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_field: Option<String>,
    /// Force the input format instead of inferring it from file names: `text`, `jsonl`,
    /// `parquet` or `tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Element type of pre-tokenized `.bin` files (raw little-endian ids, nanoGPT style):
    /// `uint16` or `uint32`. Required when there are any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_dtype: Option<String>,
    /// A weighted mixture of training sources (instead of `train`). One deterministic global
    /// cursor still orders every sample.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<DataSource>,
}

/// One `[[data.sources]]` entry of a training mixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// A file, a directory or a glob, as `data.train`.
    pub path: PathBuf,
    /// Relative share of training samples drawn from this source (weights need not sum to 1).
    pub weight: f64,
    /// Overrides `data.text_field` for this source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_field: Option<String>,
    /// Overrides `data.format` for this source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// The input formats `data.format` / `data.sources[].format` accept.
pub const DATA_FORMATS: &[&str] = &["text", "jsonl", "parquet", "tokens"];

impl DataSection {
    /// A plain single-corpus section (no mixture, formats inferred from file names).
    pub fn new(train: PathBuf, valid: PathBuf, seq_len: usize) -> DataSection {
        DataSection {
            train,
            valid,
            tokenizer: None,
            vocab_size: d_vocab(),
            seq_len,
            cache_dir: None,
            text_field: None,
            format: None,
            token_dtype: None,
            sources: Vec::new(),
        }
    }

    /// The training sources: `[[data.sources]]`, or `data.train` as one source of weight 1.
    pub fn train_sources(&self) -> Vec<DataSource> {
        if !self.sources.is_empty() {
            return self.sources.clone();
        }
        vec![DataSource {
            path: self.train.clone(),
            weight: 1.0,
            text_field: None,
            format: None,
        }]
    }

    /// Checks of the `[data]` section alone.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        crate::config::limits::check(
            "data.seq_len",
            self.seq_len as u64,
            crate::config::limits::SEQ_LEN as u64,
        )?;
        if self.seq_len < 2 {
            return bad("data.seq_len must be at least 2".into());
        }
        match (path_is_empty(&self.train), self.sources.is_empty()) {
            (true, true) => {
                return bad("set data.train (a file, directory or glob) or [[data.sources]]".into())
            }
            (false, false) => {
                return bad(
                    "set either data.train or [[data.sources]], not both (a mixture lists every training source)"
                        .into(),
                )
            }
            _ => {}
        }
        if path_is_empty(&self.valid) {
            return bad("data.valid must name a file, directory or glob".into());
        }
        let formats = std::iter::once(&self.format).chain(self.sources.iter().map(|s| &s.format));
        for f in formats.flatten() {
            if !DATA_FORMATS.contains(&f.as_str()) {
                return bad(format!(
                    "data format '{f}' is unknown; use one of {}",
                    DATA_FORMATS.join(", ")
                ));
            }
        }
        if let Some(d) = &self.token_dtype {
            if d != "uint16" && d != "uint32" {
                return bad(format!(
                    "data.token_dtype '{d}' is unknown; use \"uint16\" or \"uint32\""
                ));
            }
        }
        let fields =
            std::iter::once(&self.text_field).chain(self.sources.iter().map(|s| &s.text_field));
        if fields.flatten().any(|f| f.is_empty()) {
            return bad("data.text_field must not be empty".into());
        }
        for (i, s) in self.sources.iter().enumerate() {
            if path_is_empty(&s.path) {
                return bad(format!(
                    "data.sources[{i}].path must name a file, directory or glob"
                ));
            }
            if !(s.weight.is_finite() && s.weight > 0.0) {
                return bad(format!(
                    "data.sources[{i}].weight {} must be a positive number",
                    s.weight
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Sequences per optimizer step, over all data-parallel ranks (constant across growth).
    pub global_batch: usize,
    /// Sequences per forward/backward on one rank; gradient accumulation fills the rest.
    /// Default: the whole per-rank batch.
    pub micro_batch: Option<usize>,
    /// Total optimizer steps of the job (all stages).
    pub max_steps: u64,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_min_lr")]
    pub min_lr: f64,
    #[serde(default = "d_warmup")]
    pub warmup_steps: u64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default = "d_b1")]
    pub beta1: f64,
    #[serde(default = "d_b2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_eps: f64,
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    /// Validation every this many steps (0 = only at the end).
    #[serde(default = "d_eval_interval")]
    pub eval_interval: u64,
    /// Sequences of the validation split used per evaluation (0 = all).
    #[serde(default = "d_eval_seqs")]
    pub eval_sequences: usize,
    /// libtorch intra-op threads (default: libtorch's).
    pub threads: Option<usize>,
    /// `cpu` or `cuda[:N]`.
    #[serde(default = "d_device")]
    pub device: String,
    /// `fp32`, `bf16` or `auto` (default; docs/precision.md).
    #[serde(default)]
    pub precision: crate::config::PrecisionChoice,
    /// Recompute each block's activations in backward instead of keeping them.
    #[serde(default)]
    pub activation_checkpointing: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Checkpoint root. Default: `<out>/checkpoints`.
    pub dir: Option<PathBuf>,
    /// Steps between periodic checkpoints (0 = only at growth and at the end).
    #[serde(default = "d_ckpt_interval")]
    pub interval: u64,
    /// Committed checkpoints to keep.
    #[serde(default = "d_keep")]
    pub keep: usize,
    /// Start the job from this committed checkpoint (`…/step-N`, of any job, e.g. one grown
    /// offline with `coordctl checkpoint grow`): weights, optimizer, step, tokens, data cursor and
    /// growth history. Its model must have the `[model]` section's sizes (the depth may differ).
    /// The job's own checkpoints, once it has any, take precedence on restart.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            dir: None,
            interval: d_ckpt_interval(),
            keep: d_keep(),
            init_from: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    #[serde(default = "d_one")]
    pub dp: usize,
    #[serde(default = "d_one")]
    pub tp: usize,
}

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection { dp: 1, tp: 1 }
    }
}

/// One growth stage. Exactly one of `at_step`, `at_tokens` or `trigger = "plateau"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrowthStage {
    pub at_step: Option<u64>,
    pub at_tokens: Option<u64>,
    /// `"plateau"`: fire when the coordinator's loss watcher sees the training-loss EMA improve
    /// by less than `plateau_threshold` (relative) over `plateau_window` steps. Only a
    /// coordinator fires it (standalone `trellis-worker train` has no loss watcher).
    pub trigger: Option<String>,
    /// Plateau window in steps (default: the coordinator's `plateau_window`).
    pub plateau_window: Option<u64>,
    /// Plateau threshold, relative EMA improvement (default: the coordinator's).
    pub plateau_threshold: Option<f64>,
    #[serde(default = "d_factor")]
    pub factor: usize,
    #[serde(default = "d_operator")]
    pub operator: String,
    /// For `operator = "stacking_list"`.
    pub stacking_list: Option<Vec<usize>>,
    /// For `operator = "random"`.
    #[serde(default)]
    pub mask_ramp_steps: u64,
    #[serde(default)]
    pub optimizer: OptimizerPolicy,
    /// Post-growth peak LR under `reset` (the paper: 3e-4).
    #[serde(default = "d_grow_lr")]
    pub lr: f64,
    /// Post-growth final LR under `reset` (the paper: 3e-5).
    #[serde(default = "d_grow_min_lr")]
    pub min_lr: f64,
    /// Re-warmup steps under `reset`.
    #[serde(default = "d_warmup")]
    pub warmup_steps: u64,
}

fn d_seed() -> u64 {
    1234
}
fn d_vocab() -> usize {
    4096
}
fn d_lr() -> f64 {
    1e-3
}
fn d_min_lr() -> f64 {
    1e-4
}
fn d_warmup() -> u64 {
    20
}
fn d_wd() -> f64 {
    0.1
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.95
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    1.0
}
fn d_eval_interval() -> u64 {
    50
}
fn d_eval_seqs() -> usize {
    64
}
fn d_device() -> String {
    "cpu".into()
}
fn d_ckpt_interval() -> u64 {
    100
}
fn d_keep() -> usize {
    3
}
fn d_one() -> usize {
    1
}
fn d_factor() -> usize {
    4
}
fn d_operator() -> String {
    "stack".into()
}
fn d_grow_lr() -> f64 {
    3e-4
}
fn d_grow_min_lr() -> f64 {
    3e-5
}

impl GrowthStage {
    /// The growth request this stage makes.
    pub fn spec(&self) -> Result<GrowthSpec> {
        let operator = match self.operator.as_str() {
            "stacking_list" => Operator::StackingList {
                layers: self.stacking_list.clone().ok_or_else(|| {
                    Error::InvalidGrowth(
                        "operator 'stacking_list' needs stacking_list = [..]".into(),
                    )
                })?,
            },
            "random" => Operator::Random {
                mask_ramp_steps: self.mask_ramp_steps,
            },
            other => Operator::parse(other)?,
        };
        Ok(GrowthSpec {
            factor: self.factor,
            operator,
            optimizer: self.optimizer,
        })
    }
}

impl JobSpec {
    /// Read and validate a spec; relative paths are resolved against the file's directory.
    pub fn from_file(path: &Path) -> Result<JobSpec> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read job spec {}", path.display()), e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, base, &path.display().to_string())
    }

    /// Parse spec text; `origin` names it in errors.
    pub fn from_toml(text: &str, base: &Path, origin: &str) -> Result<JobSpec> {
        let err = |message: String| Error::InvalidJobSpec {
            path: origin.to_string(),
            message,
        };
        let mut spec: JobSpec =
            toml::from_str(text).map_err(|e| err(e.to_string().trim().replace('\n', " ")))?;
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if !path_is_empty(&spec.data.train) {
            resolve(&mut spec.data.train);
        }
        resolve(&mut spec.data.valid);
        for src in &mut spec.data.sources {
            resolve(&mut src.path);
        }
        if let Some(t) = spec.data.tokenizer.as_mut() {
            resolve(t);
        }
        if let Some(c) = spec.data.cache_dir.as_mut() {
            resolve(c);
        }
        if let Some(c) = spec.checkpoint.dir.as_mut() {
            resolve(c);
        }
        if let Some(c) = spec.checkpoint.init_from.as_mut() {
            resolve(c);
        }
        spec.validate().map_err(|e| err(e.to_string()))?;
        Ok(spec)
    }

    /// Cross-field checks a TOML schema cannot express.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.job.name.is_empty()
            || !self
                .job
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "job.name '{}' must be non-empty and use only letters, digits, '-' and '_'",
                self.job.name
            ));
        }
        self.data.validate()?;
        use crate::config::limits;
        limits::check("parallel.dp", self.parallel.dp as u64, limits::WORLD as u64)?;
        limits::check("parallel.tp", self.parallel.tp as u64, limits::WORLD as u64)?;
        limits::check(
            "parallel.dp × parallel.tp",
            (self.parallel.dp as u64).saturating_mul(self.parallel.tp as u64),
            limits::WORLD as u64,
        )?;
        limits::check(
            "train.global_batch",
            self.train.global_batch as u64,
            limits::GLOBAL_BATCH as u64,
        )?;
        limits::check("train.max_steps", self.train.max_steps, limits::STEPS)?;
        // Every token count of the run fits a u64 with room to spare.
        let tokens = (self.train.global_batch as u64)
            .checked_mul(self.data.seq_len as u64)
            .and_then(|t| t.checked_mul(self.train.max_steps));
        if tokens.is_none_or(|t| t > 1 << 62) {
            return bad(format!(
                "train.max_steps × train.global_batch × data.seq_len ({} × {} × {}) is above the limit of 2^62 tokens; check the job spec",
                self.train.max_steps, self.train.global_batch, self.data.seq_len
            ));
        }
        let dp = self.parallel.dp;
        if dp == 0 || self.parallel.tp == 0 {
            return bad("parallel.dp and parallel.tp must be at least 1".into());
        }
        if self.train.global_batch == 0 || self.train.global_batch % dp != 0 {
            return bad(format!(
                "train.global_batch {} must be a positive multiple of parallel.dp {dp}",
                self.train.global_batch
            ));
        }
        let per_rank = self.train.global_batch / dp;
        if let Some(mb) = self.train.micro_batch {
            if mb == 0 || per_rank % mb != 0 {
                return bad(format!("train.micro_batch {mb} must divide the per-rank batch {per_rank} (global_batch / dp)"));
            }
        }
        if self.train.max_steps == 0 {
            return bad("train.max_steps must be at least 1".into());
        }
        let mut last = 0u64;
        for (i, g) in self.growth.iter().enumerate() {
            if let Some(t) = &g.trigger {
                if t != "plateau" {
                    return bad(format!(
                        "growth[{i}]: unknown trigger '{t}'; the only trigger is \"plateau\" (or set at_step / at_tokens instead)"
                    ));
                }
            } else if g.plateau_window.is_some() || g.plateau_threshold.is_some() {
                return bad(format!(
                    "growth[{i}]: plateau_window / plateau_threshold need trigger = \"plateau\""
                ));
            }
            if g.plateau_window == Some(0) {
                return bad(format!(
                    "growth[{i}]: plateau_window must be at least 1 step"
                ));
            }
            if let Some(th) = g.plateau_threshold {
                if !(th.is_finite() && th >= 0.0) {
                    return bad(format!(
                        "growth[{i}]: plateau_threshold {th} must be a non-negative number (e.g. 0.001)"
                    ));
                }
            }
            let step = match (g.at_step, g.at_tokens, g.trigger.is_some()) {
                (Some(s), None, false) => s,
                (None, Some(t), false) => self.step_for_tokens(t),
                (None, None, true) => {
                    g.spec()
                        .map_err(|e| Error::InvalidConfig(format!("growth[{i}]: {e}")))?;
                    continue;
                }
                _ => {
                    return bad(format!(
                    "growth[{i}]: set exactly one of at_step, at_tokens and trigger = \"plateau\""
                ))
                }
            };
            if step == 0 || step >= self.train.max_steps {
                return bad(format!(
                    "growth[{i}] at step {step} must lie inside the run (1..{})",
                    self.train.max_steps
                ));
            }
            if step <= last {
                return bad(format!(
                    "growth[{i}] at step {step} must come after the previous stage (step {last})"
                ));
            }
            last = step;
            g.spec()
                .map_err(|e| Error::InvalidConfig(format!("growth[{i}]: {e}")))?;
        }
        Ok(())
    }

    /// Tokens consumed by one optimizer step.
    pub fn tokens_per_step(&self) -> u64 {
        (self.train.global_batch * self.data.seq_len) as u64
    }

    /// The first step at whose end at least `tokens` tokens have been consumed.
    pub fn step_for_tokens(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.tokens_per_step())
    }

    /// The step at which growth stage `i` fires; `u64::MAX` for a triggered (`plateau`) stage,
    /// which has no fixed step.
    pub fn growth_step(&self, i: usize) -> u64 {
        let g = &self.growth[i];
        match (g.at_step, g.at_tokens) {
            (Some(s), _) => s,
            (None, Some(t)) => self.step_for_tokens(t),
            (None, None) => u64::MAX,
        }
    }

    /// Whether growth stage `i` fires on a loss plateau rather than at a step.
    pub fn is_plateau_stage(&self, i: usize) -> bool {
        self.growth
            .get(i)
            .is_some_and(|g| g.trigger.as_deref() == Some("plateau"))
    }

    /// The vocabulary of a job that starts from `checkpoint.init_from`, whose model has
    /// `checkpoint_vocab` embedding rows: the checkpoint's when `[model] vocab_size` is absent;
    /// refused, naming both numbers, when it is given and differs.
    pub fn init_vocab_size(&self, checkpoint_vocab: usize) -> Result<usize> {
        match self.model.vocab_size {
            Some(v) if v != checkpoint_vocab => Err(Error::InvalidConfig(format!(
                "[model] vocab_size is {v} but checkpoint.init_from {} has a vocabulary of {checkpoint_vocab}; \
                 remove vocab_size from [model] (it is taken from the checkpoint) or set it to {checkpoint_vocab}",
                self.checkpoint
                    .init_from
                    .as_deref()
                    .unwrap_or(Path::new("(none)"))
                    .display()
            ))),
            _ => Ok(checkpoint_vocab),
        }
    }

    /// The initial model config, given the tokenizer's vocabulary size.
    pub fn model_config(&self, tokenizer_vocab: usize) -> Result<ModelConfig> {
        let m = &self.model;
        let mut cfg = ModelConfig::preset(m.preset.as_deref().unwrap_or("tiny"), tokenizer_vocab)?;
        if let Some(v) = m.vocab_size {
            cfg.vocab_size = v;
        }
        if let Some(v) = m.hidden_size {
            cfg.hidden_size = v;
        }
        if let Some(v) = m.intermediate_size {
            cfg.intermediate_size = v;
        }
        if let Some(v) = m.num_hidden_layers {
            cfg.num_hidden_layers = v;
        }
        if let Some(v) = m.num_attention_heads {
            cfg.num_attention_heads = v;
        }
        if let Some(v) = m.num_key_value_heads {
            cfg.num_key_value_heads = v;
        }
        if let Some(v) = m.max_position_embeddings {
            cfg.max_position_embeddings = v;
        }
        if let Some(v) = m.head_dim {
            cfg.head_dim = Some(v);
        }
        if let Some(v) = m.rope_theta {
            cfg.rope_theta = v;
        }
        if let Some(v) = m.rms_norm_eps {
            cfg.rms_norm_eps = v;
        }
        if let Some(v) = m.tie_word_embeddings {
            cfg.tie_word_embeddings = v;
        }
        if let Some(v) = m.rope_scaling {
            cfg.rope_scaling = Some(v);
        }
        if cfg.max_position_embeddings < self.data.seq_len {
            cfg.max_position_embeddings = self.data.seq_len;
        }
        let cfg = cfg.canonical();
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str) -> JobSpec {
        let text = format!(
            r#"[job]
name = "j"

[model]
preset = "tiny"
{model}

[data]
train = "t.txt"
valid = "v.txt"
seq_len = 32

[train]
global_batch = 4
max_steps = 10

[checkpoint]
init_from = "imported/step-0"
"#
        );
        JobSpec::from_toml(&text, Path::new("/base"), "test").unwrap()
    }

    #[test]
    fn init_vocab_size_comes_from_the_checkpoint_and_a_mismatch_names_both_numbers() {
        // Absent: the checkpoint's, whatever data.vocab_size says.
        let s = spec("");
        assert_ne!(s.data.vocab_size, 49152);
        assert_eq!(s.init_vocab_size(49152).unwrap(), 49152);
        let cfg = s.model_config(s.init_vocab_size(49152).unwrap()).unwrap();
        assert_eq!(cfg.vocab_size, 49152);
        // Stated and equal: accepted.
        assert_eq!(
            spec("vocab_size = 49152").init_vocab_size(49152).unwrap(),
            49152
        );
        // Stated and different: one line with both numbers, the checkpoint and the fix.
        let e = spec("vocab_size = 32000")
            .init_vocab_size(49152)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vocab_size is 32000")
                && e.contains("/base/imported/step-0 has a vocabulary of 49152")
                && e.contains("set it to 49152")
                && !e.contains('\n'),
            "{e}"
        );
    }
}
