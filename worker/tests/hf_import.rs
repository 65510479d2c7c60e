//! Bring your own model (issue #13): a `LlamaForCausalLM` made by `transformers` with random
//! weights — tied embeddings, rope_theta 500000, llama3 rope_scaling, GQA, an explicit head_dim
//! ≠ hidden/heads, saved in bf16 with a locally trained tokenizer — is imported, evaluated by
//! `trellis-worker eval` and by transformers to the same loss, grown ×2 with G_stack, exported
//! (sharded) and loaded back with `AutoModelForCausalLM` + `AutoTokenizer`; a job trains from
//! the import via `init_from`. Real processes, real libtorch on CPU, nothing downloaded.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind};
use trellis_core::checkpoint::Checkpoint;
use trellis_core::config::{RopeScaling, RopeType};
use trellis_core::growth::{GrowthSpec, Operator, OptimizerPolicy};
use trellis_worker::model::Rope;

/// Python: train a byte-level BPE on `argv[2]` with Llama-3-style special tokens (BOS added by
/// the post-processor), wrap it so `save_pretrained` writes the tokenizer files, and save a
/// randomly initialised LlamaForCausalLM in `argv[3]` (a torch dtype name; default bf16) into
/// `argv[1]`.
const MAKE_MODEL: &str = r#"
import sys, torch
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
out, corpus = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
tk = Tokenizer(models.BPE())
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tk.decoder = decoders.ByteLevel()
tk.train([corpus], trainers.BpeTrainer(vocab_size=320, show_progress=False,
         special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
bos, eos = tk.token_to_id("<|begin_of_text|>"), tk.token_to_id("<|end_of_text|>")
tk.post_processor = processors.Sequence([
    processors.ByteLevel(trim_offsets=False),
    processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                  special_tokens=[("<|begin_of_text|>", bos)])])
PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                        eos_token="<|end_of_text|>").save_pretrained(out)
cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=48, intermediate_size=112,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    bos_token_id=bos, eos_token_id=eos)
m = LlamaForCausalLM(cfg)
with torch.no_grad():  # far from the default init, so every weight shows in the loss
    for n, p in m.named_parameters():
        p.copy_(torch.rand_like(p) + 0.5 if p.dim() == 1 else torch.randn_like(p) * 0.15)
assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
m.to(getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.bfloat16).save_pretrained(out)
print(tk.get_vocab_size())
"#;

/// Python: what an export looks like to `transformers` users (Auto classes only).
const CHECK_EXPORT: &str = r#"
import sys, json, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
c = AutoConfig.from_pretrained(d)
m, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
tok = AutoTokenizer.from_pretrained(d)
rope = getattr(c, "rope_parameters", None) or c.rope_scaling
print(json.dumps({
    "class": type(m).__name__, "layers": c.num_hidden_layers, "head_dim": c.head_dim,
    "tied": c.tie_word_embeddings,
    "shared": m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(),
    "rope_type": rope.get("rope_type"), "rope_theta": rope.get("rope_theta", getattr(c, "rope_theta", None)),
    "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
    "tok_bos": tok.bos_token, "tok_eos": tok.eos_token,
    "tok_bos_id": tok.bos_token_id, "tok_eos_id": tok.eos_token_id,
    "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
}))
"#;

/// Python: transformers' llama3 inverse frequencies for `argv[1]` = head_dim, theta, factor,
/// low, high, original.
const ROPE_FREQS: &str = r#"
import sys, json, torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
hd, theta, f, lo, hi, orig = json.loads(sys.argv[1])
c = LlamaConfig(hidden_size=hd * 2, num_attention_heads=2, head_dim=hd, max_position_embeddings=4 * orig,
                rope_theta=theta, rope_scaling={"rope_type": "llama3", "factor": f,
                "low_freq_factor": lo, "high_freq_factor": hi, "original_max_position_embeddings": orig})
inv, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
print(json.dumps([v.item() for v in inv.float()]))
"#;

fn make_hf_model(dir: &Path) -> PathBuf {
    make_hf_model_as(dir, "bfloat16")
}

/// [`MAKE_MODEL`] saved in `dtype` (`bfloat16`, `float16`, `float32`).
fn make_hf_model_as(dir: &Path, dtype: &str) -> PathBuf {
    let hf = dir.join("hf");
    let (train, _) = small_corpus();
    run_python(
        MAKE_MODEL,
        &[hf.to_str().unwrap(), train.to_str().unwrap(), dtype],
    );
    hf
}

/// Python: the source's tensors (`argv[1]`, as saved) against an fp32 export (`argv[2]`)
/// bit for bit after upcasting, and transformers' greedy ids (fp32, its own KV cache) for
/// prompt `argv[3]`, `argv[4]` new tokens.
const EXACT_AND_GREEDY: &str = r#"
import sys, json, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
src, exp, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
a, b = load_file(src + "/model.safetensors"), load_file(exp + "/model.safetensors")
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(src)
ids = tok(prompt)["input_ids"]
out = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
print(json.dumps({
    "dtypes": sorted({str(t.dtype) for t in a.values()}), "same_names": sorted(a) == sorted(b),
    "names": len(a), "unequal": [k for k in a if not torch.equal(a[k].float(), b[k])],
    "prompt_ids": ids, "ids": out[0, len(ids):].tolist()}))
"#;

fn check_export(dir: &Path) -> serde_json::Value {
    serde_json::from_str(run_python(CHECK_EXPORT, &[dir.to_str().unwrap()]).trim()).unwrap()
}

fn assert_close(a: f64, b: f64, what: &str) {
    let rel = (a - b).abs() / b.abs();
    eprintln!("{what}: trellis {a} vs transformers {b} (relative difference {rel:.1e})");
    assert!(
        rel < 1e-4,
        "{what}: trellis {a} vs transformers {b} (rel {rel:e})"
    );
}

const SEQ: usize = 96;

#[test]
fn an_hf_model_imports_evaluates_grows_and_exports_with_the_same_loss() {
    let d = tempfile::tempdir().unwrap();
    let hf = make_hf_model(d.path());
    let (_, text) = small_corpus();

    // Import: the config as made, fp32 masters, the tokenizer files carried.
    let ck0 = d.path().join("ck0");
    let r = trellis_core::import::import_hf(&hf, &ck0).unwrap();
    let cfg = &r.config;
    assert!(cfg.tie_word_embeddings);
    assert_eq!((cfg.head_dim, cfg.hidden_size), (Some(16), 48));
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads), (4, 2));
    assert_eq!(cfg.rope_theta, 500000.0);
    assert_eq!(
        cfg.rope_scaling,
        Some(RopeScaling {
            rope_type: RopeType::Llama3,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        })
    );
    assert_eq!(r.source_dtypes.iter().collect::<Vec<_>>(), ["BF16"]);
    let ck = Checkpoint::open(&ck0).unwrap();
    assert!(ck.has_file("tokenizer.json") && ck.has_file("tokenizer_config.json"));

    // trellis-worker eval on the import = transformers on the original (both fp32).
    let (ours, tokens, layers) = worker_eval_loss(&ck0, &text, SEQ);
    let (theirs, hf_tokens) = hf_eval_loss(&hf, &text, SEQ);
    assert_eq!((tokens, layers), (hf_tokens, 2));
    assert!(tokens > 3 * SEQ as u64, "several windows: {tokens} tokens");
    assert_close(ours, theirs, "imported model");

    // G_stack ×2, then an export sharded by a tiny threshold, loaded back by the Auto classes.
    let ck1 = d.path().join("ck1");
    let spec = GrowthSpec {
        factor: 2,
        operator: Operator::Stack,
        optimizer: OptimizerPolicy::Reset,
    };
    trellis_core::offline::grow_checkpoint(&ck0, &ck1, &spec, 1).unwrap();
    let grown = Checkpoint::open(&ck1).unwrap();
    assert_eq!(grown.state.model, cfg.with_layers(4));
    assert!(grown.has_file("tokenizer_config.json"));
    let out = d.path().join("export");
    let opts = trellis_core::offline::ExportOptions {
        dtype: trellis_core::offline::ExportDtype::F32,
        max_shard_size: 40_000,
    };
    trellis_core::offline::export_hf_with(&ck1, &out, &opts).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let files: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(files.len() > 3, "{files:?}");
    assert!(index["weight_map"].get("lm_head.weight").is_none());
    assert!(!out.join("model.safetensors").exists());

    let seen = check_export(&out);
    assert_eq!(seen["class"], "LlamaForCausalLM");
    assert_eq!(seen["layers"], 4);
    assert_eq!(seen["head_dim"], 16);
    assert_eq!(seen["tied"], true);
    assert_eq!(seen["shared"], true, "{seen}");
    assert_eq!(seen["rope_type"], "llama3");
    assert_eq!(seen["rope_theta"], 500000.0);
    assert_eq!(seen["missing"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["unexpected"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["tok_bos"], "<|begin_of_text|>");
    assert_eq!(seen["tok_eos"], "<|end_of_text|>");
    assert_eq!(seen["bos_token_id"], seen["tok_bos_id"]);
    assert_eq!(seen["eos_token_id"], seen["tok_eos_id"]);
    assert!(seen["bos_token_id"].is_u64() && seen["eos_token_id"].is_u64());

    let (ours, tokens, layers) = worker_eval_loss(&ck1, &text, SEQ);
    let (theirs, hf_tokens) = hf_eval_loss(&out, &text, SEQ);
    assert_eq!((tokens, layers), (hf_tokens, 4));
    assert_close(ours, theirs, "grown ×2 and exported");
}

/// fp16 weights as transformers and safetensors write them: imported exactly (fp16 → fp32 is
/// exact; compared bit for bit through an fp32 export), evaluated to transformers' loss, and
/// `trellis-worker generate` (KV cache, and without) writes transformers' greedy ids.
#[test]
fn an_fp16_model_written_by_transformers_imports_exactly_and_generates_its_greedy_ids() {
    let d = tempfile::tempdir().unwrap();
    let hf = make_hf_model_as(d.path(), "float16");
    let ck0 = d.path().join("ck0");
    let r = trellis_core::import::import_hf(&hf, &ck0).unwrap();
    assert_eq!(r.source_dtypes.iter().collect::<Vec<_>>(), ["F16"]);
    let out = d.path().join("export");
    trellis_core::offline::export_hf(&ck0, &out).unwrap();
    let prompt = "First Citizen:\nBefore we proceed";
    let n = 24;
    let seen: serde_json::Value = serde_json::from_str(
        run_python(
            EXACT_AND_GREEDY,
            &[
                hf.to_str().unwrap(),
                out.to_str().unwrap(),
                prompt,
                &n.to_string(),
            ],
        )
        .trim(),
    )
    .unwrap();
    assert_eq!(
        seen["dtypes"],
        serde_json::json!(["torch.float16"]),
        "{seen}"
    );
    assert_eq!(seen["same_names"], true, "{seen}");
    assert_eq!(seen["names"], r.tensors, "{seen}");
    assert_eq!(seen["unequal"], serde_json::json!([]), "not exact: {seen}");

    let (_, text) = small_corpus();
    let (ours, _, _) = worker_eval_loss(&ck0, &text, SEQ);
    let (theirs, _) = hf_eval_loss(&hf, &text, SEQ);
    assert_close(ours, theirs, "fp16 import");

    let generate = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "generate",
            "--checkpoint",
            ck0.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-tokens",
            "24",
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        let o = Command::new(worker_bin()).args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let cached = generate(&[]);
    assert_eq!(
        cached["prompt_ids"], seen["prompt_ids"],
        "BOS and prompt ids"
    );
    assert_eq!(
        cached["ids"], seen["ids"],
        "greedy ids differ from transformers': {cached} vs {seen}"
    );
    assert_eq!(cached["ids"], generate(&["--no-kv-cache"])["ids"]);
    let distinct: std::collections::BTreeSet<u64> = cached["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(distinct.len() >= 5, "a weak check: {cached}");
    eprintln!(
        "fp16 import: {} tensors exact; greedy {:?} = transformers'",
        r.tensors, cached["ids"]
    );
}

/// The export of a checkpoint with only a trained `tokenizer.json` (no HF side files) gets a
/// generated tokenizer_config.json / generation_config.json that the Auto classes accept.
#[test]
fn an_export_without_imported_tokenizer_files_still_loads_with_auto_classes() {
    let d = tempfile::tempdir().unwrap();
    let hf = make_hf_model(d.path());
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        let _ = std::fs::remove_file(hf.join(f));
    }
    let ck0 = d.path().join("ck0");
    trellis_core::import::import_hf(&hf, &ck0).unwrap();
    assert!(!Checkpoint::open(&ck0)
        .unwrap()
        .has_file("tokenizer_config.json"));
    let out = d.path().join("export");
    trellis_core::offline::export_hf(&ck0, &out).unwrap();
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    let seen = check_export(&out);
    assert_eq!(seen["tok_bos"], "<|begin_of_text|>", "{seen}");
    assert_eq!(seen["tok_eos"], "<|end_of_text|>", "{seen}");
    assert_eq!(seen["bos_token_id"], seen["tok_bos_id"]);
    assert_eq!(seen["eos_token_id"], seen["tok_eos_id"]);
    let (_, text) = small_corpus();
    let (ours, _, _) = worker_eval_loss(&ck0, &text, SEQ);
    let (theirs, _) = hf_eval_loss(&out, &text, SEQ);
    assert_close(ours, theirs, "export with generated tokenizer files");
}

#[test]
fn a_job_trains_from_an_imported_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let hf = make_hf_model(d.path());
    let ck0 = d.path().join("ck0");
    trellis_core::import::import_hf(&hf, &ck0).unwrap();
    let (train, valid) = small_corpus();
    let cache = d.path().join("cache");
    let job = d.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"
[job]
name = "from-import"
seed = 1

[model]
preset = "tiny"
hidden_size = 48
intermediate_size = 112
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
head_dim = 16
max_position_embeddings = 128
rope_theta = 500000.0
rms_norm_eps = 1e-5
tie_word_embeddings = true

[model.rope_scaling]
rope_type = "llama3"
factor = 8.0
low_freq_factor = 1.0
high_freq_factor = 4.0
original_max_position_embeddings = 64

[data]
train = "{}"
valid = "{}"
tokenizer = "{}"
seq_len = 32
cache_dir = "{}"

[train]
global_batch = 4
micro_batch = 2
max_steps = 4
lr = 1e-3
min_lr = 1e-4
warmup_steps = 1
eval_interval = 0
eval_sequences = 4
threads = 1
precision = "fp32"

[checkpoint]
interval = 0
init_from = "{}"
"#,
            train.display(),
            valid.display(),
            ck0.join("tokenizer.json").display(),
            cache.display(),
            ck0.display()
        ),
    )
    .unwrap();
    let out = d.path().join("out");
    let o = Command::new(worker_bin())
        .args(["train", "--job", job.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train" && v["loss"].as_f64().is_some_and(f64::is_finite))
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    let end = Checkpoint::open(&out.join("checkpoints/from-import/step-4")).unwrap();
    let start = Checkpoint::open(&ck0).unwrap();
    assert_eq!(end.state.model, start.state.model);
    // The job's own schedule, not the import's placeholder.
    assert_eq!(
        (end.state.schedule.end_step, end.state.schedule.peak_lr),
        (4, 1e-3)
    );
    assert!(end.has_optim() && end.has_file("tokenizer_config.json"));
    // Trained from the imported weights: moved by a few Adam steps (≤ 4 · lr each), not
    // replaced by a fresh init (std 0.15 in the import vs ~0.09 fresh).
    for name in [
        "model.embed_tokens.weight",
        "model.layers.1.mlp.down_proj.weight",
    ] {
        let (a, b) = (start.read_full(name).unwrap(), end.read_full(name).unwrap());
        let max = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max > 0.0 && max < 5e-3, "{name}: max |Δ| {max}");
    }
}

/// The model's llama3 inverse frequencies are transformers' (same fp32 ops, same order).
#[test]
fn llama3_rope_frequencies_match_transformers() {
    for (hd, theta, f, lo, hi, orig) in [
        (64usize, 500000.0f64, 32.0f64, 1.0f64, 4.0f64, 8192usize),
        (16, 500000.0, 8.0, 1.0, 4.0, 64),
        (128, 10000.0, 4.0, 2.0, 8.0, 2048),
    ] {
        let want: Vec<f64> = serde_json::from_str(
            run_python(
                ROPE_FREQS,
                &[&serde_json::json!([hd, theta, f, lo, hi, orig]).to_string()],
            )
            .trim(),
        )
        .unwrap();
        let scaling = RopeScaling {
            rope_type: RopeType::Llama3,
            factor: f,
            low_freq_factor: lo,
            high_freq_factor: hi,
            original_max_position_embeddings: orig,
        };
        let ours = Rope::inv_freq(hd, theta, Some(&scaling), Device::Cpu);
        assert_eq!(ours.kind(), Kind::Float);
        let ours: Vec<f32> = Vec::try_from(&ours).unwrap();
        assert_eq!(ours.len(), want.len());
        for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
            // `b` is an f32 printed by Python; JSON parsing may be an f64 ULP off, never an f32.
            assert_eq!(
                a.to_bits(),
                (*b as f32).to_bits(),
                "head_dim {hd}: inv_freq[{i}] {a} vs {b}"
            );
        }
        // The f64 reference in core agrees to fp32 rounding.
        let plain: Vec<f64> = Vec::<f32>::try_from(&Rope::inv_freq(hd, theta, None, Device::Cpu))
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        for (r, b) in scaling.scale_inv_freq(&plain).iter().zip(&want) {
            assert!((r - b).abs() <= 1e-6 * b.abs(), "{r} vs {b}");
        }
    }
}
