//! Model parity with Hugging Face `transformers.LlamaForCausalLM` (real libtorch on CPU and the
//! venv's transformers): same weights, same tokens → same logits, loss and gradients.
mod common;
use common::*;
use tch::{Device, Kind, Tensor};
use trellis_worker::model::Llama;

const SCRIPT: &str = r#"
import sys, json, torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM
d = sys.argv[1]
torch.set_num_threads(1)
m = LlamaForCausalLM.from_pretrained(d, attn_implementation=sys.argv[2], dtype=torch.float32)
m.train()
ids = json.load(open(d + "/tokens.json"))
inp = torch.tensor(ids["inputs"]); tgt = torch.tensor(ids["targets"])
logits = m(input_ids=inp).logits
loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
loss.backward()
out = {"logits": logits.detach().contiguous(), "loss": loss.detach().reshape(1)}
for n, p in m.named_parameters():
    out["grad." + n] = p.grad.contiguous()
save_file(out, d + "/out.safetensors")
print(json.dumps({"loss": loss.item()}))
"#;

fn parity(layers: usize, kv_heads: usize, attn: &str) {
    parity_of(tiny_cfg(layers, kv_heads), attn)
}

fn parity_of(cfg: trellis_core::config::ModelConfig, attn: &str) {
    let kv_heads = cfg.num_key_value_heads;
    let model = Llama::init(&cfg, Device::Cpu, 7);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &cfg, model.named_parameters());
    let b = 2i64;
    let s = 40i64;
    let ids = Tensor::randint(
        cfg.vocab_size as i64,
        [b, s + 1],
        (Kind::Int64, Device::Cpu),
    );
    let inp = ids.narrow(1, 0, s);
    let tgt = ids.narrow(1, 1, s);
    let to_vec = |t: &Tensor| -> Vec<Vec<i64>> {
        (0..b)
            .map(|i| Vec::<i64>::try_from(&t.get(i)).unwrap())
            .collect()
    };
    std::fs::write(
        dir.path().join("tokens.json"),
        serde_json::json!({"inputs": to_vec(&inp), "targets": to_vec(&tgt)}).to_string(),
    )
    .unwrap();
    run_python(SCRIPT, &[dir.path().to_str().unwrap(), attn]);
    let out: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("out.safetensors"))
            .unwrap()
            .into_iter()
            .collect();

    let logits = model.forward(&inp);
    let dl = max_abs_diff(&logits, &out["logits"]);
    assert!(dl < 1e-4, "max |Δlogit| = {dl:e} ({attn}, kv {kv_heads})");
    let loss = model.loss(&inp, &tgt);
    let dloss = (loss.double_value(&[]) - out["loss"].double_value(&[0])).abs();
    assert!(dloss < 1e-5, "|Δloss| = {dloss:e}");
    loss.backward();
    for (name, p) in model.named_parameters() {
        let g = p.grad();
        let hg = &out[&format!("grad.{name}")];
        let scale = hg.abs().max().double_value(&[]).max(1e-12);
        let rel = max_abs_diff(&g, hg) / scale;
        assert!(rel < 1e-4, "gradient of {name}: max rel diff {rel:e}");
    }
}

#[test]
fn logits_loss_and_grads_match_transformers_sdpa_gqa() {
    parity(2, 2, "sdpa");
}

#[test]
fn logits_loss_and_grads_match_transformers_eager_mha() {
    parity(3, 4, "eager");
}

/// Tied embeddings (one tensor, its gradient the sum of both uses), head_dim ≠ hidden/heads,
/// rope_theta 500000 with llama3 scaling, GQA; 40 positions cover all three frequency bands.
#[test]
fn logits_loss_and_grads_match_transformers_tied_llama3_head_dim() {
    parity_of(tied_llama3_cfg(2, 2), "sdpa");
}
