//! `trellis_core::import::import_hf` on Hugging Face directories written here (no python):
//! single-file and sharded weights, fp32 and bf16, tied embeddings, and a one-line refusal for
//! everything the model cannot represent.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use trellis_core::checkpoint::{self, f32_to_bf16, Checkpoint, HostTensor};
use trellis_core::config::{names, ModelConfig, RopeScaling, RopeType};
use trellis_core::hf::{config_json, SpecialTokens};
use trellis_core::import::import_hf;

fn llama3(layers: usize) -> ModelConfig {
    ModelConfig {
        num_key_value_heads: 2,
        head_dim: Some(6),
        rope_theta: 500000.0,
        tie_word_embeddings: true,
        rope_scaling: Some(RopeScaling {
            rope_type: RopeType::Llama3,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        }),
        ..tiny(layers)
    }
}

/// An HF directory for `cfg`: `config.json`, the tensors (`shards` files; more than one adds
/// an index), a tokenizer and its config. Returns the dir and the tensors written (fp32).
fn hf_dir(
    root: &Path,
    cfg: &ModelConfig,
    bf16: bool,
    shards: usize,
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut Vec<(String, HostTensor)>),
) -> (PathBuf, Vec<(String, HostTensor)>) {
    let dir = root.join("hf");
    std::fs::create_dir_all(&dir).unwrap();
    let mut conf = config_json(cfg, &SpecialTokens::default(), "bfloat16");
    edit_config(&mut conf);
    std::fs::write(dir.join("config.json"), conf.to_string()).unwrap();
    let mut tensors = model_tensors(cfg, 3);
    edit_tensors(&mut tensors);
    let per = tensors.len().div_ceil(shards);
    let mut map = serde_json::Map::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
        };
        let refs: Vec<(&str, &HostTensor)> = chunk.iter().map(|(n, t)| (n.as_str(), t)).collect();
        if bf16 {
            checkpoint::write_safetensors_bf16(&dir.join(&file), &refs).unwrap();
        } else {
            checkpoint::write_safetensors(&dir.join(&file), &refs).unwrap();
        }
        for (n, _) in chunk {
            map.insert(n.clone(), file.clone().into());
        }
    }
    if shards > 1 {
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
        )
        .unwrap();
    }
    std::fs::write(dir.join("tokenizer.json"), b"{\"version\":\"1.0\"}").unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        b"{\"bos_token\":\"<s>\",\"eos_token\":\"</s>\"}",
    )
    .unwrap();
    (dir, tensors)
}

fn bf16_round(t: &HostTensor) -> HostTensor {
    HostTensor {
        shape: t.shape.clone(),
        data: t
            .data
            .iter()
            .map(|&x| f32::from_bits((f32_to_bf16(x) as u32) << 16))
            .collect(),
    }
}

#[test]
fn a_sharded_bf16_tied_llama3_model_imports_as_a_step_0_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let cfg = llama3(2);
    // A tied model whose file also holds lm_head.weight (older exports did) and a RoPE buffer.
    let (hf, tensors) = hf_dir(
        d.path(),
        &cfg,
        true,
        3,
        |_| {},
        |t| {
            let embed = t[0].1.clone();
            t.push((names::LM_HEAD.into(), embed));
            t.push((
                "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
                HostTensor::zeros(&[3]),
            ));
        },
    );
    let out = d.path().join("ck");
    let r = import_hf(&hf, &out).unwrap();
    assert_eq!(r.config, cfg);
    assert_eq!(r.source_dtypes.into_iter().collect::<Vec<_>>(), ["BF16"]);
    assert_eq!(
        r.skipped,
        [
            "lm_head.weight",
            "model.layers.0.self_attn.rotary_emb.inv_freq"
        ]
    );
    assert_eq!(r.tensors, cfg.tensor_shapes().len());
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.state.model, cfg);
    assert_eq!((ck.state.step, ck.state.generation), (0, 0));
    assert!(!ck.has_optim());
    assert!(ck.has_file("tokenizer.json") && ck.has_file("tokenizer_config.json"));
    assert!(!ck.manifest.tensors.contains_key(names::LM_HEAD));
    for (name, t) in &tensors {
        if cfg.tensor_shapes().iter().any(|(n, _)| n == name) {
            assert_eq!(ck.read_full(name).unwrap(), bf16_round(t), "{name}");
        }
    }
    // Any TP layout reads it (q is [4·6, 16]: split in 2).
    let q = ck
        .read("model.layers.1.self_attn.q_proj.weight", 1, 2)
        .unwrap();
    assert_eq!(q.shape, vec![12, 16]);
}

#[test]
fn an_fp32_model_in_v4_config_form_imports_exactly() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ModelConfig {
        head_dim: Some(4), // = hidden / heads: stored as the default
        ..tiny(2)
    };
    let (hf, tensors) = hf_dir(
        d.path(),
        &cfg,
        false,
        1,
        |c| {
            // transformers 4.x: no rope_parameters, no head_dim, default rms_norm_eps.
            let o = c.as_object_mut().unwrap();
            o.remove("rope_parameters");
            o.remove("head_dim");
            o.insert("rms_norm_eps".into(), 1e-5.into());
        },
        |_| {},
    );
    let out = d.path().join("ck");
    let r = import_hf(&hf, &out).unwrap();
    assert_eq!(r.config, tiny(2));
    let ck = Checkpoint::open(&out).unwrap();
    for (name, t) in &tensors {
        assert_eq!(&ck.read_full(name).unwrap(), t, "{name}");
    }
}

/// Import `edit`ed versions of a good directory; each must fail with one line containing
/// `want`, leaving no output behind.
fn refused(
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut Vec<(String, HostTensor)>),
    want: &str,
) {
    let d = tempfile::tempdir().unwrap();
    let (hf, _) = hf_dir(d.path(), &llama3(2), false, 1, edit_config, edit_tensors);
    let out = d.path().join("ck");
    let e = import_hf(&hf, &out).unwrap_err().to_string();
    assert!(e.contains(want), "want '{want}' in: {e}");
    assert!(e.starts_with("cannot import ") && !e.contains('\n'), "{e}");
    assert!(!out.exists() && !d.path().join("ck.tmp").exists());
}

#[test]
fn another_architecture_is_refused() {
    refused(
        |c| c["architectures"] = serde_json::json!(["MistralForCausalLM"]),
        |_| {},
        "architectures is [\"MistralForCausalLM\"]; only LlamaForCausalLM can be imported",
    );
}

#[test]
fn biases_are_refused() {
    refused(
        |c| c["attention_bias"] = true.into(),
        |_| {},
        "attention_bias is true; Trellis's Llama has no biases",
    );
    refused(|c| c["mlp_bias"] = true.into(), |_| {}, "mlp_bias is true");
    refused(
        |_| {},
        |t| {
            t.push((
                "model.layers.1.self_attn.q_proj.bias".into(),
                HostTensor::zeros(&[24]),
            ))
        },
        "tensor model.layers.1.self_attn.q_proj.bias is a bias",
    );
}

#[test]
fn an_unknown_rope_scaling_type_is_refused() {
    refused(
        |c| {
            c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
            c.as_object_mut().unwrap().remove("rope_parameters");
        },
        |_| {},
        "rope_scaling type 'yarn' is not supported",
    );
    refused(
        |c| c["rope_parameters"]["rope_type"] = "dynamic".into(),
        |_| {},
        "rope_parameters type 'dynamic' is not supported",
    );
}

#[test]
fn missing_unknown_and_misshapen_tensors_are_refused() {
    refused(
        |_| {},
        |t| t.retain(|(n, _)| n != names::NORM),
        "tensor model.norm.weight (shape [16]) is missing from the weights",
    );
    refused(
        |_| {},
        |t| {
            t.push((
                "model.layers.2.mlp.up_proj.weight".into(),
                HostTensor::zeros(&[2]),
            ))
        },
        "tensor model.layers.2.mlp.up_proj.weight is not part of a 2-layer LlamaForCausalLM",
    );
    refused(
        |c| c["intermediate_size"] = 32.into(),
        |_| {},
        "has shape [24, 16] but config.json implies [32, 16]",
    );
    // Untied: the head is required.
    refused(
        |c| c["tie_word_embeddings"] = false.into(),
        |_| {},
        "tensor lm_head.weight (shape [40, 16]) is missing",
    );
}

#[test]
fn configs_the_model_cannot_represent_are_refused() {
    refused(
        |c| c["hidden_act"] = "gelu".into(),
        |_| {},
        "hidden_act is \"gelu\"; only silu",
    );
    refused(
        |c| c["num_key_value_heads"] = 3.into(),
        |_| {},
        "the model cannot be represented: invalid model config: num_attention_heads 4 must be divisible by num_key_value_heads 3",
    );
    refused(
        |c| {
            c.as_object_mut()
                .unwrap()
                .remove("hidden_size")
                .map(|_| ())
                .unwrap()
        },
        |_| {},
        "hidden_size is missing from config.json",
    );
}

#[test]
fn a_directory_without_safetensors_weights_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (hf, _) = hf_dir(d.path(), &llama3(1), false, 1, |_| {}, |_| {});
    std::fs::rename(hf.join("model.safetensors"), hf.join("pytorch_model.bin")).unwrap();
    let e = import_hf(&hf, &d.path().join("ck"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has neither model.safetensors nor model.safetensors.index.json"),
        "{e}"
    );
    let e = import_hf(&d.path().join("nope"), &d.path().join("ck"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not a directory"), "{e}");
}
