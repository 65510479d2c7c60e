"""PyTorch eager peer of `trellis-worker bench`: the same LLaMA (transformers LlamaForCausalLM,
sdpa attention), the same batch, sequence length and threads, the same training step
(forward, mean cross-entropy, backward, clip_grad_norm_(1.0), AdamW(0.9, 0.95, wd 0.1)).
`--precision bf16`: forward and loss under `torch.autocast(device, torch.bfloat16)` (fp32
weights and optimizer, as a PyTorch user writes mixed precision). `--adamw foreach|fused|loop`
picks PyTorch's AdamW implementation. Prints one JSON line like `trellis-worker bench`."""
import argparse, json, time, tomllib, os
import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {  # trellis_core::config::PRESETS
    "tiny": (64, 176, 2, 4, 2, 256),
    "small": (256, 688, 2, 8, 4, 512),
    "base": (512, 1376, 4, 8, 8, 1024),
    "1b": (2048, 5632, 22, 32, 4, 2048),
    "7b": (4096, 11008, 32, 32, 32, 4096),
}

ap = argparse.ArgumentParser()
ap.add_argument("--job", required=True)
ap.add_argument("--vocab", type=int, required=True, help="the tokenizer's vocabulary size")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--foreach", choices=["on", "off"], default=None, help="old spelling of --adamw")
ap.add_argument("--adamw", choices=["loop", "foreach", "fused"], default="loop")
ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
ap.add_argument("--device", default=None, help="cpu or cuda (default: the job's train.device)")
a = ap.parse_args()
if a.foreach is not None:
    a.adamw = "foreach" if a.foreach == "on" else "loop"
spec = tomllib.load(open(a.job, "rb"))
m, t = spec["model"], spec["train"]
h, f, layers, heads, kv, maxpos = PRESETS[m.get("preset", "tiny")]
h = m.get("hidden_size", h); f = m.get("intermediate_size", f)
layers = m.get("num_hidden_layers", layers); heads = m.get("num_attention_heads", heads)
kv = m.get("num_key_value_heads", kv)
seq = spec["data"]["seq_len"]; batch = t["global_batch"]
dev = torch.device(a.device or t.get("device", "cpu"))
torch.set_num_threads(t.get("threads", torch.get_num_threads()))
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=h, intermediate_size=f, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=h // heads,
                  max_position_embeddings=max(maxpos, seq), rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
cfg._attn_implementation = "sdpa"
model = LlamaForCausalLM(cfg).to(dev).train()
decay = [p for p in model.parameters() if p.dim() >= 2]
nodecay = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.get("weight_decay", 0.1)},
                         {"params": nodecay, "weight_decay": 0.0}],
                        lr=t.get("lr", 1e-3), betas=(0.9, 0.95), eps=1e-8,
                        foreach=(a.adamw == "foreach"), fused=(a.adamw == "fused"))
autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if a.precision == "bf16"
            else torch.autocast(dev.type, enabled=False))
data = torch.randint(a.vocab, (a.warmup + a.steps, batch, seq + 1)).to(dev)
micro = t.get("micro_batch", batch)

def step(i):
    total = 0.0
    for ids in data[i].split(micro):  # gradient accumulation over micro-batches, like the job
        with autocast:
            logits = model(input_ids=ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        (loss * (ids.shape[0] / batch)).backward()
        total += loss.item() * ids.shape[0] / batch
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return total

for i in range(a.warmup):
    step(i)
t0 = time.perf_counter()
step_secs, cpu_secs = [], []
for i in range(a.steps):
    s0, c0 = time.perf_counter(), time.process_time()
    last = step(a.warmup + i)
    step_secs.append(time.perf_counter() - s0)
    cpu_secs.append(time.process_time() - c0)
secs = time.perf_counter() - t0
median = sorted(step_secs)[len(step_secs) // 2]
tokens = a.steps * batch * seq
print(json.dumps({"impl": f"pytorch-eager-hf-sdpa-{a.precision}-adamw-{a.adamw}", "steps": a.steps,
                  "tokens": tokens, "seconds": secs, "tokens_per_second": tokens / secs,
                  "median_step_seconds": median, "median_step_tokens_per_second": batch * seq / median,
                  "median_step_cpu_seconds": sorted(cpu_secs)[len(cpu_secs) // 2],
                  "final_loss": last, "threads": torch.get_num_threads(),
                  "params": sum(p.numel() for p in model.parameters())}))
