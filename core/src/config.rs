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
    /// The LM head is the token embedding (one tensor, `model.embed_tokens.weight`, stored
    /// once); `lm_head.weight` does not exist.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Width of one attention head; `None` = `hidden_size / num_attention_heads`. q/k/v/o
    /// project to and from `heads · head_dim`, which may differ from `hidden_size`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RoPE frequency scaling; `None` = plain RoPE with `rope_theta`.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
}

/// The kinds of RoPE scaling the model implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeType {
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3,
}

impl RopeType {
    pub fn name(self) -> &'static str {
        match self {
            RopeType::Llama3 => "llama3",
        }
    }
}

/// `rope_scaling` as Hugging Face writes it (`rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    pub rope_type: RopeType,
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl RopeScaling {
    /// The inverse frequencies `inv_freq` (plain RoPE's, one per pair of head dimensions)
    /// rescaled as `transformers`' `_compute_llama3_parameters` does, in f64. The model
    /// computes the same in fp32 with libtorch; this is the reference for tests and docs.
    pub fn scale_inv_freq(&self, inv_freq: &[f64]) -> Vec<f64> {
        let old = self.original_max_position_embeddings as f64;
        let low_wavelen = old / self.low_freq_factor;
        let high_wavelen = old / self.high_freq_factor;
        inv_freq
            .iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / self.factor
                } else {
                    let smooth = (old / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    (1.0 - smooth) * f / self.factor + smooth * f
                }
            })
            .collect()
    }
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-5
}

/// A named preset: a model shape; the vocabulary is the tokenizer's.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub head_dim: Option<usize>,
    pub rope_scaling: Option<RopeScaling>,
}

/// The fields the Trellis-sized presets share (Llama 2 conventions).
const LLAMA2: Preset = Preset {
    name: "",
    hidden_size: 0,
    intermediate_size: 0,
    num_hidden_layers: 0,
    num_attention_heads: 0,
    num_key_value_heads: 0,
    max_position_embeddings: 0,
    rope_theta: 10000.0,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: false,
    head_dim: None,
    rope_scaling: None,
};

/// Presets from CPU-test size to Llama-2-7B, then the shapes of published models (so that a
/// checkpoint imported from one of them, `coordctl checkpoint import --hf`, is described by
/// `preset = "<name>"` alone). `coordctl plan` and the docs quote their parameter counts from
/// [`ModelConfig::num_parameters`].
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "tiny",
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 256,
        ..LLAMA2
    },
    Preset {
        name: "small",
        hidden_size: 256,
        intermediate_size: 688,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        max_position_embeddings: 512,
        ..LLAMA2
    },
    Preset {
        name: "base",
        hidden_size: 512,
        intermediate_size: 1376,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        max_position_embeddings: 1024,
        ..LLAMA2
    },
    Preset {
        name: "125m",
        hidden_size: 768,
        intermediate_size: 2048,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        num_key_value_heads: 12,
        max_position_embeddings: 2048,
        ..LLAMA2
    },
    Preset {
        name: "410m",
        hidden_size: 1024,
        intermediate_size: 2816,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        num_key_value_heads: 16,
        max_position_embeddings: 2048,
        ..LLAMA2
    },
    Preset {
        name: "1b",
        hidden_size: 2048,
        intermediate_size: 5632,
        num_hidden_layers: 22,
        num_attention_heads: 32,
        num_key_value_heads: 4,
        max_position_embeddings: 2048,
        ..LLAMA2
    },
    Preset {
        name: "3b",
        hidden_size: 3200,
        intermediate_size: 8640,
        num_hidden_layers: 26,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        max_position_embeddings: 2048,
        ..LLAMA2
    },
    Preset {
        name: "7b",
        hidden_size: 4096,
        intermediate_size: 11008,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        max_position_embeddings: 4096,
        ..LLAMA2
    },
    // HuggingFaceTB/SmolLM-135M (vocab 49152).
    Preset {
        name: "smollm-135m",
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        ..LLAMA2
    },
    // HuggingFaceTB/SmolLM-360M (vocab 49152).
    Preset {
        name: "smollm-360m",
        hidden_size: 960,
        intermediate_size: 2560,
        num_hidden_layers: 32,
        num_attention_heads: 15,
        num_key_value_heads: 5,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        ..LLAMA2
    },
    // TinyLlama/TinyLlama-1.1B (vocab 32000): the shape of "1b".
    Preset {
        name: "tinyllama-1.1b",
        hidden_size: 2048,
        intermediate_size: 5632,
        num_hidden_layers: 22,
        num_attention_heads: 32,
        num_key_value_heads: 4,
        max_position_embeddings: 2048,
        ..LLAMA2
    },
    // meta-llama/Llama-3.2-1B (vocab 128256).
    Preset {
        name: "llama-3.2-1b",
        hidden_size: 2048,
        intermediate_size: 8192,
        num_hidden_layers: 16,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        max_position_embeddings: 131072,
        rope_theta: 500000.0,
        tie_word_embeddings: true,
        head_dim: Some(64),
        rope_scaling: Some(RopeScaling {
            rope_type: RopeType::Llama3,
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }),
        ..LLAMA2
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
        let cfg: ModelConfig = ModelConfig {
            vocab_size,
            hidden_size: p.hidden_size,
            intermediate_size: p.intermediate_size,
            num_hidden_layers: p.num_hidden_layers,
            num_attention_heads: p.num_attention_heads,
            num_key_value_heads: p.num_key_value_heads,
            max_position_embeddings: p.max_position_embeddings,
            rope_theta: p.rope_theta,
            rms_norm_eps: p.rms_norm_eps,
            tie_word_embeddings: p.tie_word_embeddings,
            head_dim: p.head_dim,
            rope_scaling: p.rope_scaling,
        }
        .canonical();
        cfg.validate()?;
        Ok(cfg)
    }

    /// The width of one attention head: `head_dim` if given, else `hidden_size / heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The width of all query heads together (q's output, o's input).
    pub fn q_dim(&self) -> usize {
        self.head_dim() * self.num_attention_heads
    }

    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.num_key_value_heads
    }

    /// The same config with `head_dim` left out when it is the default
    /// `hidden_size / num_attention_heads` (so an imported config and a preset compare equal).
    pub fn canonical(mut self) -> ModelConfig {
        if self.num_attention_heads > 0
            && self.hidden_size % self.num_attention_heads == 0
            && self.head_dim == Some(self.hidden_size / self.num_attention_heads)
        {
            self.head_dim = None;
        }
        self
    }

    /// The fields where `self` and `other` differ, as `name a vs b` (for one-line errors).
    pub fn diff(&self, other: &ModelConfig) -> String {
        let (a, b) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(other).unwrap_or_default(),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return String::new();
        };
        let null = serde_json::Value::Null;
        a.iter()
            .filter(|(k, v)| b.get(*k).unwrap_or(&null) != *v)
            .map(|(k, v)| format!("{k} {v} vs {}", b.get(k).unwrap_or(&null)))
            .collect::<Vec<_>>()
            .join(", ")
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
        if self.num_attention_heads == 0 {
            return bad("num_attention_heads must be at least 1".into());
        }
        match self.head_dim {
            Some(d) => limits::check("model.head_dim", d as u64, limits::HIDDEN as u64)?,
            None if self.hidden_size % self.num_attention_heads != 0 => {
                return bad(format!(
                    "hidden_size {} must be divisible by num_attention_heads {} (or set head_dim)",
                    self.hidden_size, self.num_attention_heads
                ))
            }
            None => {}
        }
        if self.head_dim() == 0 || self.head_dim() % 2 != 0 {
            return bad(format!(
                "head_dim {} must be even and positive for RoPE",
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
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!(
                "rope_theta {} must be a positive number",
                self.rope_theta
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps {} must be a positive number",
                self.rms_norm_eps
            ));
        }
        if let Some(r) = &self.rope_scaling {
            let positive = |x: f64| x.is_finite() && x > 0.0;
            if !(positive(r.factor)
                && positive(r.low_freq_factor)
                && positive(r.high_freq_factor)
                && r.high_freq_factor > r.low_freq_factor
                && r.original_max_position_embeddings > 0)
            {
                return bad(format!(
                    "rope_scaling ({}) needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings ≥ 1; got factor {}, low_freq_factor {}, high_freq_factor {}, original_max_position_embeddings {}",
                    r.rope_type.name(),
                    r.factor,
                    r.low_freq_factor,
                    r.high_freq_factor,
                    r.original_max_position_embeddings
                ));
            }
        }
        Ok(())
    }

    /// Parameters of one decoder layer.
    pub fn layer_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = self.q_dim() as u64;
        let kv = self.kv_dim() as u64;
        let f = self.intermediate_size as u64;
        // q, o: h*q ; k, v: h*kv ; gate, up, down: 3*h*f ; two norms: 2h
        2 * h * q + 2 * h * kv + 3 * h * f + 2 * h
    }

    /// Embedding matrices stored: 1 when the head is tied to the embedding, else 2.
    pub fn embedding_matrices(&self) -> u64 {
        if self.tie_word_embeddings {
            1
        } else {
            2
        }
    }

    /// [`Self::num_parameters`] with checked arithmetic: `None` when it overflows `u64`.
    pub fn checked_parameters(&self) -> Option<u64> {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads as u64).checked_mul(self.head_dim() as u64)?;
        let kv = (self.num_key_value_heads as u64).checked_mul(self.head_dim() as u64)?;
        let f = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let layer = (2 * h)
            .checked_mul(q)?
            .checked_add((2 * h).checked_mul(kv)?)?
            .checked_add((3 * h).checked_mul(f)?)?
            .checked_add(2 * h)?;
        (self.embedding_matrices() * v)
            .checked_mul(h)?
            .checked_add(h)?
            .checked_add((self.num_hidden_layers as u64).checked_mul(layer)?)
    }

    /// All parameters: embeddings + layers + final norm + the head (unless tied).
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        self.embedding_matrices() * v * h
            + h
            + self.num_hidden_layers as u64 * self.layer_parameters()
    }

    /// Training FLOPs per token at sequence length `seq_len`: 6 × (non-embedding parameters +
    /// head) plus the attention score/value matmuls (6 · 2 · L · seq · q_dim, causal halved not
    /// assumed). Used for MFU and for FLOP-matched comparisons. A tied head still multiplies.
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let h = self.hidden_size as f64;
        let v = self.vocab_size as f64;
        let dense = self.num_hidden_layers as f64 * self.layer_parameters() as f64 + v * h;
        let attn = 2.0 * self.num_hidden_layers as f64 * seq_len as f64 * self.q_dim() as f64;
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
    /// Every tensor name with its global shape, in a fixed order (no `lm_head.weight` when the
    /// embeddings are tied).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.q_dim();
        let kv = self.kv_dim();
        let f = self.intermediate_size;
        let mut out = vec![(names::EMBED.to_string(), vec![self.vocab_size, h])];
        for i in 0..self.num_hidden_layers {
            for suffix in names::LAYER_TENSORS {
                let shape = match *suffix {
                    "self_attn.q_proj.weight" => vec![q, h],
                    "self_attn.o_proj.weight" => vec![h, q],
                    "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
                    "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![f, h],
                    "mlp.down_proj.weight" => vec![h, f],
                    _ => vec![h],
                };
                out.push((names::layer(i, suffix), shape));
            }
        }
        out.push((names::NORM.to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push((names::LM_HEAD.to_string(), vec![self.vocab_size, h]));
        }
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
    fn published_model_presets_have_their_published_parameter_counts() {
        for (name, vocab, params) in [
            ("smollm-135m", 49152, 134_515_008u64),
            ("smollm-360m", 49152, 361_821_120),
            ("tinyllama-1.1b", 32000, 1_100_048_384),
            ("llama-3.2-1b", 128256, 1_235_814_400),
        ] {
            let cfg = ModelConfig::preset(name, vocab).unwrap();
            assert_eq!(cfg.num_parameters(), params, "{name}");
        }
    }

    #[test]
    fn tied_embeddings_store_the_embedding_once() {
        let mut cfg = ModelConfig::preset("tiny", 100).unwrap();
        let untied = cfg.num_parameters();
        cfg.tie_word_embeddings = true;
        assert_eq!(cfg.num_parameters(), untied - 100 * 64);
        assert!(cfg.tensor_shapes().iter().all(|(n, _)| n != names::LM_HEAD));
    }

    #[test]
    fn explicit_head_dim_shapes_q_k_v_o() {
        let mut cfg = ModelConfig::preset("tiny", 100).unwrap();
        cfg.head_dim = Some(24); // 4 heads × 24 = 96 ≠ hidden 64
        cfg.validate().unwrap();
        let shapes: std::collections::HashMap<_, _> = cfg.tensor_shapes().into_iter().collect();
        assert_eq!(
            shapes["model.layers.0.self_attn.q_proj.weight"],
            vec![96, 64]
        );
        assert_eq!(
            shapes["model.layers.0.self_attn.k_proj.weight"],
            vec![48, 64]
        );
        assert_eq!(
            shapes["model.layers.0.self_attn.o_proj.weight"],
            vec![64, 96]
        );
        let sum: u64 = shapes
            .values()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum();
        assert_eq!(sum, cfg.num_parameters());
        cfg.head_dim = Some(7);
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("head_dim 7 must be even"), "{e}");
        // Without head_dim the hidden size must split evenly; with it, it need not.
        cfg.head_dim = None;
        cfg.num_attention_heads = 3;
        cfg.num_key_value_heads = 3;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("(or set head_dim)"), "{e}");
        cfg.head_dim = Some(16);
        cfg.validate().unwrap();
    }

    #[test]
    fn rope_scaling_is_validated_in_one_line() {
        let mut cfg = ModelConfig::preset("llama-3.2-1b", 1000).unwrap();
        cfg.rope_scaling.as_mut().unwrap().high_freq_factor = 0.5;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("rope_scaling (llama3)")
                && e.contains("high_freq_factor 0.5")
                && !e.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn configs_written_before_the_new_fields_still_load() {
        let old = r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 32}"#;
        let cfg: ModelConfig = serde_json::from_str(old).unwrap();
        assert!(!cfg.tie_word_embeddings && cfg.head_dim.is_none() && cfg.rope_scaling.is_none());
        assert_eq!((cfg.head_dim(), cfg.rope_theta), (4, 10000.0));
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_ramps_between() {
        let r = RopeScaling {
            rope_type: RopeType::Llama3,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // wavelengths: high-frequency bound 2048, low-frequency bound 8192.
        let tau = 2.0 * std::f64::consts::PI;
        let f = [tau / 100.0, tau / 4096.0, tau / 20000.0];
        let g = r.scale_inv_freq(&f);
        assert_eq!(g[0], f[0]);
        assert!((g[2] - f[2] / 8.0).abs() < 1e-18);
        // 8192 / 4096 = 2 → smooth = (2 − 1) / 3.
        let smooth = 1.0 / 3.0;
        let want = (1.0 - smooth) * f[1] / 8.0 + smooth * f[1];
        assert!((g[1] - want).abs() < 1e-15);
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
