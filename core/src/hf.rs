//! The Hugging Face side files of an export: `config.json`, `tokenizer_config.json`,
//! `generation_config.json`, and the special tokens they name, found from the tokenizer itself
//! so that `AutoConfig`, `AutoModelForCausalLM` and `AutoTokenizer` load the directory as they
//! load any Llama (docs/models.md).
use crate::config::ModelConfig;
use crate::{Error, Result};
use serde_json::{json, Value};

/// A special token: its text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special {
    pub content: String,
    pub id: u32,
}

/// The tokenizer's BOS / EOS / UNK / PAD tokens (each optional).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpecialTokens {
    pub bos: Option<Special>,
    pub eos: Option<Special>,
    pub unk: Option<Special>,
    pub pad: Option<Special>,
}

/// End-of-text tokens by name, in the order the data pipeline looks for them.
const EOS_NAMES: &[&str] = &[
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
];
const BOS_NAMES: &[&str] = &["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"];
const PAD_NAMES: &[&str] = &["<pad>", "<|pad|>", "<|finetune_right_pad_id|>"];

/// The id of `content` in `tokenizer.json` (added tokens first, then the model's vocabulary).
fn token_id(tok: &Value, content: &str) -> Option<u32> {
    let added = tok.get("added_tokens").and_then(Value::as_array);
    added
        .into_iter()
        .flatten()
        .find(|t| t.get("content").and_then(Value::as_str) == Some(content))
        .and_then(|t| t.get("id")?.as_u64())
        .or_else(|| tok.get("model")?.get("vocab")?.get(content)?.as_u64())
        .map(|id| id as u32)
}

fn special(tok: &Value, content: &str) -> Option<Special> {
    token_id(tok, content).map(|id| Special {
        content: content.to_string(),
        id,
    })
}

/// The special tokens a `TemplateProcessing` post-processor (possibly inside a `Sequence`) puts
/// before and after a single text: (first before, last after).
fn template_affixes(pp: &Value) -> (Option<String>, Option<String>) {
    match pp.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            let mut out = (None, None);
            for p in pp
                .get("processors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let (b, e) = template_affixes(p);
                out.0 = out.0.or(b);
                out.1 = out.1.or(e);
            }
            out
        }
        Some("TemplateProcessing") => {
            let single = pp.get("single").and_then(Value::as_array);
            let mut seen_text = false;
            let (mut before, mut after) = (None, None);
            for piece in single.into_iter().flatten() {
                if piece.get("Sequence").is_some() {
                    seen_text = true;
                } else if let Some(id) = piece
                    .get("SpecialToken")
                    .and_then(|s| s.get("id"))
                    .and_then(Value::as_str)
                {
                    if seen_text {
                        after = Some(id.to_string());
                    } else if before.is_none() {
                        before = Some(id.to_string());
                    }
                }
            }
            (before, after)
        }
        Some("RobertaProcessing") | Some("BertProcessing") => {
            let name = |k: &str| {
                pp.get(k)
                    .and_then(|v| v.get(0))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            (name("cls"), name("sep"))
        }
        _ => (None, None),
    }
}

/// A token named by a `tokenizer_config.json` field: a string or an `AddedToken` object.
fn named(cfg: &Value, key: &str) -> Option<String> {
    let v = cfg.get(key)?;
    v.as_str()
        .or_else(|| v.get("content")?.as_str())
        .map(str::to_string)
}

/// The special tokens of `tokenizer.json` (`tok`), taking the names a `tokenizer_config.json`
/// (`tok_cfg`, e.g. one kept from an import) gives first; otherwise BOS and EOS are what the
/// post-processor adds around a text, else the conventional names; UNK is the model's
/// `unk_token`; with no BOS of its own, a tokenizer uses its EOS (GPT-2's convention).
pub fn special_tokens(tok: &Value, tok_cfg: Option<&Value>) -> SpecialTokens {
    let from_cfg = |k: &str| {
        tok_cfg
            .and_then(|c| named(c, k))
            .and_then(|n| special(tok, &n))
    };
    let (pp_bos, pp_eos) = tok
        .get("post_processor")
        .map(template_affixes)
        .unwrap_or((None, None));
    let first = |names: &[&str]| names.iter().find_map(|n| special(tok, n));
    let eos = from_cfg("eos_token")
        .or_else(|| pp_eos.and_then(|n| special(tok, &n)))
        .or_else(|| first(EOS_NAMES));
    let bos = from_cfg("bos_token")
        .or_else(|| pp_bos.and_then(|n| special(tok, &n)))
        .or_else(|| first(BOS_NAMES))
        .or_else(|| eos.clone());
    let unk = from_cfg("unk_token").or_else(|| {
        tok.get("model")
            .and_then(|m| m.get("unk_token"))
            .and_then(Value::as_str)
            .and_then(|n| special(tok, n))
    });
    let pad = from_cfg("pad_token").or_else(|| first(PAD_NAMES));
    SpecialTokens { bos, eos, unk, pad }
}

fn id(s: &Option<Special>) -> Value {
    s.as_ref().map_or(Value::Null, |s| Value::from(s.id))
}

/// The `rope_scaling` dict of `cfg` as transformers 4.x reads it (`null` for plain RoPE).
fn rope_scaling(cfg: &ModelConfig) -> Value {
    match &cfg.rope_scaling {
        None => Value::Null,
        Some(r) => json!({
            "rope_type": r.rope_type.name(),
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        }),
    }
}

/// The `config.json` of a `LlamaForCausalLM` with config `cfg`: RoPE both as transformers 4.x
/// reads it (`rope_theta` + `rope_scaling`) and as 5.x writes it (`rope_parameters`).
pub fn config_json(cfg: &ModelConfig, specials: &SpecialTokens, torch_dtype: &str) -> Value {
    let scaling = rope_scaling(cfg);
    let mut params = match &scaling {
        Value::Object(m) => Value::Object(m.clone()),
        _ => json!({"rope_type": "default"}),
    };
    params["rope_theta"] = Value::from(cfg.rope_theta);
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": params,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        "bos_token_id": id(&specials.bos),
        "eos_token_id": id(&specials.eos),
        "pad_token_id": id(&specials.pad),
        "torch_dtype": torch_dtype,
    })
}

/// A `tokenizer_config.json` that makes `AutoTokenizer` load `tokenizer.json` as a fast
/// tokenizer with these special tokens.
pub fn tokenizer_config_json(cfg: &ModelConfig, specials: &SpecialTokens) -> Value {
    let mut v = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    for (key, s) in [
        ("bos_token", &specials.bos),
        ("eos_token", &specials.eos),
        ("unk_token", &specials.unk),
        ("pad_token", &specials.pad),
    ] {
        if let Some(s) = s {
            v[key] = Value::from(s.content.clone());
        }
    }
    v
}

/// A `generation_config.json` naming the BOS / EOS / PAD ids.
pub fn generation_config_json(specials: &SpecialTokens) -> Value {
    let mut v = json!({
        "_from_model_config": true,
        "bos_token_id": id(&specials.bos),
        "eos_token_id": id(&specials.eos),
    });
    if specials.pad.is_some() {
        v["pad_token_id"] = id(&specials.pad);
    }
    v
}

/// The size of a shard, as `transformers`' `max_shard_size` takes it: bytes, or a number with
/// `KB`/`MB`/`GB` (powers of 1000) or `KiB`/`MiB`/`GiB` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = || {
        Error::InvalidConfig(format!(
            "'{s}' is not a size; write it like 5GB, 500MB, 2GiB or 1000000"
        ))
    };
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let bytes = v * mult;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3_like() -> Value {
        json!({
            "added_tokens": [
                {"id": 256, "content": "<|begin_of_text|>", "special": true},
                {"id": 257, "content": "<|end_of_text|>", "special": true},
            ],
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel"},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}}]},
            ]},
            "model": {"type": "BPE", "vocab": {"a": 0}},
        })
    }

    #[test]
    fn bos_and_eos_come_from_the_post_processor_and_the_names() {
        let s = special_tokens(&llama3_like(), None);
        assert_eq!(s.bos.unwrap().id, 256);
        assert_eq!(s.eos.unwrap().id, 257);
        assert!(s.unk.is_none() && s.pad.is_none());
    }

    #[test]
    fn a_gpt2_style_tokenizer_uses_its_eos_as_bos() {
        let tok = json!({
            "added_tokens": [{"id": 5, "content": "<|endoftext|>", "special": true}],
            "model": {"type": "BPE", "vocab": {"a": 0}},
        });
        let s = special_tokens(&tok, None);
        assert_eq!((s.bos.unwrap().id, s.eos.unwrap().id), (5, 5));
    }

    #[test]
    fn tokenizer_config_names_win() {
        let cfg = json!({"eos_token": {"content": "<|begin_of_text|>"}});
        let s = special_tokens(&llama3_like(), Some(&cfg));
        assert_eq!(s.eos.unwrap().id, 256);
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("1.5 kb").unwrap(), 1500);
        for bad in ["", "GB", "5XB", "-1", "0"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains("is not a size"), "{bad}: {e}");
        }
    }
}
