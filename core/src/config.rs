//! The model configuration. Field names are Hugging Face `LlamaConfig`'s, so export is a
//! straight serialisation.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-5
}

/// A named preset: (name, config with vocab 0 = "take the tokenizer's", stated parameter count
/// at vocab 32000).
pub struct Preset {
    pub name: &'static str,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
}

/// Presets from CPU-test size to Llama-2-7B. `coordctl plan` and the docs quote their parameter
/// counts from [`ModelConfig::num_parameters`].
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "tiny",
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 256,
    },
    Preset {
        name: "small",
        hidden_size: 256,
        intermediate_size: 688,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        max_position_embeddings: 512,
    },
    Preset {
        name: "base",
        hidden_size: 512,
        intermediate_size: 1376,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        max_position_embeddings: 1024,
    },
    Preset {
        name: "125m",
        hidden_size: 768,
        intermediate_size: 2048,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        num_key_value_heads: 12,
        max_position_embeddings: 2048,
    },
    Preset {
        name: "410m",
        hidden_size: 1024,
        intermediate_size: 2816,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        num_key_value_heads: 16,
        max_position_embeddings: 2048,
    },
    Preset {
        name: "1b",
        hidden_size: 2048,
        intermediate_size: 5632,
        num_hidden_layers: 22,
        num_attention_heads: 32,
        num_key_value_heads: 4,
        max_position_embeddings: 2048,
    },
    Preset {
        name: "3b",
        hidden_size: 3200,
        intermediate_size: 8640,
        num_hidden_layers: 26,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        max_position_embeddings: 2048,
    },
    Preset {
        name: "7b",
        hidden_size: 4096,
        intermediate_size: 11008,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        max_position_embeddings: 4096,
    },
];

impl ModelConfig {
    /// Build a preset with the given vocabulary size.
    pub fn preset(name: &str, vocab_size: usize) -> Result<ModelConfig> {
        let p = PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
            let names: Vec<_> = PRESETS.iter().map(|p| p.name).collect();
            Error::InvalidConfig(format!(
                "unknown model preset '{name}'; choose one of {}",
                names.join(", ")
            ))
        })?;
        let cfg = ModelConfig {
            vocab_size,
            hidden_size: p.hidden_size,
            intermediate_size: p.intermediate_size,
            num_hidden_layers: p.num_hidden_layers,
            num_attention_heads: p.num_attention_heads,
            num_key_value_heads: p.num_key_value_heads,
            max_position_embeddings: p.max_position_embeddings,
            rope_theta: default_rope_theta(),
            rms_norm_eps: default_eps(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.num_key_value_heads
    }

    /// Check the shape constraints every executor relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        for (field, value, limit) in [
            ("model.vocab_size", self.vocab_size, limits::VOCAB),
            ("model.hidden_size", self.hidden_size, limits::HIDDEN),
            (
                "model.intermediate_size",
                self.intermediate_size,
                limits::FFN,
            ),
            (
                "model.num_hidden_layers",
                self.num_hidden_layers,
                limits::LAYERS,
            ),
            (
                "model.num_attention_heads",
                self.num_attention_heads,
                limits::HEADS,
            ),
            (
                "model.num_key_value_heads",
                self.num_key_value_heads,
                limits::HEADS,
            ),
            (
                "model.max_position_embeddings",
                self.max_position_embeddings,
                limits::SEQ_LEN,
            ),
        ] {
            limits::check(field, value as u64, limit as u64)?;
        }
        if self
            .checked_parameters()
            .is_none_or(|p| p > limits::PARAMETERS)
        {
            return bad(format!(
                "the model has more than {:.0e} parameters (the limit); check hidden_size, intermediate_size, num_hidden_layers and vocab_size",
                limits::PARAMETERS as f64
            ));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return bad("vocab_size, hidden_size and intermediate_size must be positive".into());
        }
        if self.num_hidden_layers == 0 {
            return bad("num_hidden_layers must be at least 1".into());
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} must be divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0
        {
            return bad(format!(
                "num_attention_heads {} must be divisible by num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        Ok(())
    }

    /// Parameters of one decoder layer.
    pub fn layer_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let kv = self.kv_dim() as u64;
        let f = self.intermediate_size as u64;
        // q, o: h*h ; k, v: h*kv ; gate, up, down: 3*h*f ; two norms: 2h
        2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    }

    /// [`Self::num_parameters`] with checked arithmetic: `None` when it overflows `u64`.
    pub fn checked_parameters(&self) -> Option<u64> {
        let h = self.hidden_size as u64;
        let kv = self.kv_dim() as u64;
        let f = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let layer = (2 * h)
            .checked_mul(h)?
            .checked_add((2 * h).checked_mul(kv)?)?
            .checked_add((3 * h).checked_mul(f)?)?
            .checked_add(2 * h)?;
        (2 * v)
            .checked_mul(h)?
            .checked_add(h)?
            .checked_add((self.num_hidden_layers as u64).checked_mul(layer)?)
    }

    /// All parameters: embeddings + layers + final norm + untied head.
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        2 * v * h + h + self.num_hidden_layers as u64 * self.layer_parameters()
    }

    /// Training FLOPs per token at sequence length `seq_len`: 6 × (non-embedding parameters +
    /// head) plus the attention score/value matmuls (6 · 2 · L · seq · h, causal halved not
    /// assumed). Used for MFU and for FLOP-matched comparisons.
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let h = self.hidden_size as f64;
        let v = self.vocab_size as f64;
        let dense = self.num_hidden_layers as f64 * self.layer_parameters() as f64 + v * h;
        let attn = 2.0 * self.num_hidden_layers as f64 * seq_len as f64 * h;
        6.0 * dense + 6.0 * attn
    }

    /// The same config with `layers` decoder layers.
    pub fn with_layers(&self, layers: usize) -> ModelConfig {
        ModelConfig {
            num_hidden_layers: layers,
            ..self.clone()
        }
    }
}

/// Hugging Face tensor names, in one place.
pub mod names {
    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";
    /// The per-layer tensors, as suffixes after `model.layers.{i}.`.
    pub const LAYER_TENSORS: &[&str] = &[
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ];

    pub fn layer(i: usize, suffix: &str) -> String {
        format!("model.layers.{i}.{suffix}")
    }

    /// Parse `model.layers.{i}.{suffix}` into `(i, suffix)`.
    pub fn parse_layer(name: &str) -> Option<(usize, &str)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (i, suffix) = rest.split_once('.')?;
        Some((i.parse().ok()?, suffix))
    }
}

impl ModelConfig {
    /// Every tensor name with its global shape, in a fixed order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let kv = self.kv_dim();
        let f = self.intermediate_size;
        let mut out = vec![(names::EMBED.to_string(), vec![self.vocab_size, h])];
        for i in 0..self.num_hidden_layers {
            for suffix in names::LAYER_TENSORS {
                let shape = match *suffix {
                    "self_attn.q_proj.weight" | "self_attn.o_proj.weight" => vec![h, h],
                    "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
                    "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![f, h],
                    "mlp.down_proj.weight" => vec![h, f],
                    _ => vec![h],
                };
                out.push((names::layer(i, suffix), shape));
            }
        }
        out.push((names::NORM.to_string(), vec![h]));
        out.push((names::LM_HEAD.to_string(), vec![self.vocab_size, h]));
        out
    }
}

/// `[train] precision`: the arithmetic of training (docs/precision.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    /// fp32 everywhere.
    Fp32,
    /// bf16 compute; fp32 master weights, Adam moments, loss and norm statistics.
    Bf16,
    /// bf16 on CUDA and on CPUs with native bf16 arithmetic, fp32 otherwise (the worker decides
    /// and logs its choice).
    #[default]
    Auto,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_matches_tensor_shapes() {
        for p in PRESETS {
            let cfg = ModelConfig::preset(p.name, 32000).unwrap();
            let sum: u64 = cfg
                .tensor_shapes()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(sum, cfg.num_parameters(), "preset {}", p.name);
        }
    }

    #[test]
    fn llama2_7b_preset_has_6_74b_parameters() {
        let cfg = ModelConfig::preset("7b", 32000).unwrap();
        assert_eq!(cfg.num_parameters(), 6_738_415_616);
    }

    #[test]
    fn unknown_preset_names_the_choices() {
        let e = ModelConfig::preset("huge", 10).unwrap_err().to_string();
        assert!(
            e.contains("unknown model preset 'huge'") && e.contains("tiny"),
            "{e}"
        );
    }
}

/// Upper bounds on every size a job spec can state: far above any real model, low enough that
/// sizes multiply without overflow and a typo is refused at submit instead of aborting workers
/// on an impossible allocation.
pub mod limits {
    use crate::{Error, Result};

    pub const VOCAB: usize = 1 << 22;
    pub const HIDDEN: usize = 1 << 16;
    pub const FFN: usize = 1 << 18;
    pub const LAYERS: usize = crate::growth::MAX_LAYERS;
    pub const HEADS: usize = 1 << 10;
    pub const SEQ_LEN: usize = 1 << 20;
    /// Sequences in one global batch.
    pub const GLOBAL_BATCH: usize = 1 << 24;
    /// Ranks in one job (`dp × tp`).
    pub const WORLD: usize = 1 << 16;
    /// Optimizer steps of one run.
    pub const STEPS: u64 = 1 << 40;
    /// Parameters of one model (10 T).
    pub const PARAMETERS: u64 = 10_000_000_000_000;

    /// `field` = `value` must not exceed `limit`: one line naming both.
    pub fn check(field: &str, value: u64, limit: u64) -> Result<()> {
        if value > limit {
            return Err(Error::InvalidConfig(format!(
                "{field} = {value} is above the limit of {limit}; check the job spec"
            )));
        }
        Ok(())
    }
}
