"""The machine's measured matmul peak (GFLOP/s) for `bench/train_step.sh`: the best of several
timed square GEMMs (1024, 1536, 2048) in the given dtype at the given threads, median of 5
after warmup. Prints one JSON line."""
import argparse, json, statistics, time
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
best = {}
for n in (1024, 1536, 2048):
    x, y = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    for _ in range(2):
        x @ y
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        x @ y
        ts.append(time.perf_counter() - t0)
    best[n] = 2 * n**3 / statistics.median(ts) / 1e9
print(json.dumps({"dtype": a.dtype, "threads": a.threads, "gflops_by_size": best,
                  "peak_gflops": max(best.values())}))
