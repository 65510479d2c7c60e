"""The machine's measured matmul peak (GFLOP/s) for `bench/train_step.sh`: the best of several
timed square GEMMs (CPU: 1024, 1536, 2048; CUDA: 4096, 8192) in the given dtype at the given threads, median of 5
after warmup. Prints one JSON line."""
import argparse, json, statistics, time
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--device", default="cpu")
a = ap.parse_args()
torch.set_num_threads(a.threads)
dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
best = {}
cuda = a.device.startswith("cuda")
sync = torch.cuda.synchronize if cuda else (lambda: None)
sizes = (4096, 8192) if cuda else (1024, 1536, 2048)
for n in sizes:
    x = torch.randn(n, n, dtype=dt, device=a.device)
    y = torch.randn(n, n, dtype=dt, device=a.device)
    for _ in range(2):
        x @ y
    ts = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(10 if cuda else 1):
            x @ y
        sync()
        ts.append((time.perf_counter() - t0) / (10 if cuda else 1))
    best[n] = 2 * n**3 / statistics.median(ts) / 1e9
print(json.dumps({"dtype": a.dtype, "device": a.device, "threads": a.threads, "gflops_by_size": best,
                  "peak_gflops": max(best.values())}))
