#!/usr/bin/env python3
"""Analysis for `make paper-mini` (bench/paper_mini.sh): reads every run under OUT
(OUT/<run>-s<seed>/{metrics.jsonl,summary.json}, specs in OUT/specs/) and writes

  OUT/results.md          tokens and FLOPs to reach the baseline's final validation loss, speedups
  OUT/val_vs_tokens.png   validation loss vs tokens, every run, growth marked
  OUT/val_vs_flops.png    validation loss vs training FLOPs (the small model's counted at its size)

FLOPs per token are those of `ModelConfig::train_flops_per_token` (core/src/config.rs):
6 * (L * layer_params + V * h) + 6 * (2 * L * seq * h), with the depth L of the model that
trained that step (metrics.jsonl `layers`), so G_stack's small-model steps count at small size.
Speedup (docs/design.md §1) = baseline tokens (FLOPs) to the target loss / run's tokens (FLOPs) - 1.
Usage: paper_mini_analyze.py OUT
"""
import json
import math
import sys
import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["baseline", "gstack", "interpolate", "zero", "random", "carry", "g2", "gstack-d2", "gstack-lr", "random-lr", "zero-lr"]
LABEL = {
    "baseline": "baseline (target from scratch)",
    "gstack": "G_stack (stack, g=4, reset)",
    "interpolate": "interpolate (g=4, reset)",
    "zero": "zero / identity (g=4, reset)",
    "random": "random (g=4, reset)",
    "carry": "G_stack, optimizer carry",
    "g2": "G_stack g=2",
    "gstack-d2": "G_stack, later growth (d2)",
    "gstack-lr": "G_stack, post-growth LR = baseline's",
    "random-lr": "random, post-growth LR = baseline's",
    "zero-lr": "zero, post-growth LR = baseline's",
}


def flops_per_token(m, layers, seq):
    h, f, heads, kv = m["hidden_size"], m["intermediate_size"], m["num_attention_heads"], m["num_key_value_heads"]
    v = m["vocab_size"]
    kv_dim = h // heads * kv
    layer = 2 * h * h + 2 * h * kv_dim + 3 * h * f + 2 * h
    dense = layers * layer + v * h
    attn = 2 * layers * seq * h
    return 6.0 * dense + 6.0 * attn


def load_run(d: Path, spec_path: Path):
    spec = tomllib.loads(spec_path.read_text())
    m = dict(spec["model"])
    m.setdefault("vocab_size", spec["data"].get("vocab_size", 4096))
    seq = spec["data"]["seq_len"]
    lines = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    summary = json.loads((d / "summary.json").read_text())
    flops_at_step = {0: 0.0}
    tokens_at_step = {0: 0}
    cum, prev_tokens = 0.0, 0
    for l in lines:
        if l["kind"] == "train":
            cum += (l["tokens"] - prev_tokens) * flops_per_token(m, l["layers"], seq)
            prev_tokens = l["tokens"]
            flops_at_step[l["step"]] = cum
            tokens_at_step[l["step"]] = l["tokens"]
    val = [(l["tokens"], flops_at_step.get(l["step"], math.nan), l["loss"]) for l in lines if l["kind"] == "val"]
    growth = [(l["tokens"], flops_at_step.get(l["step"], math.nan), l["from_layers"], l["to_layers"], l["operator"])
              for l in lines if l["kind"] == "growth"]
    return dict(val=val, growth=growth, summary=summary, spec=spec, final=summary["final_val_loss"],
                tokens=summary["tokens"], flops=cum)


def first_reach(val, target):
    """(tokens, flops) where the validation curve first reaches `target`, linearly interpolated
    between evaluation points; None if it never does."""
    prev = None
    for t, f, loss in val:
        if loss <= target:
            if prev is None or prev[2] == loss:
                return t, f
            w = (prev[2] - target) / (prev[2] - loss)
            return prev[0] + w * (t - prev[0]), prev[1] + w * (f - prev[1])
        prev = (t, f, loss)
    return None


def mean(xs):
    return sum(xs) / len(xs)


def fmt_tok(x):
    return f"{x / 1e6:.3f}M" if x >= 1e5 else f"{x / 1e3:.1f}K"


def main():
    out = Path(sys.argv[1])
    runs = {}
    for d in sorted(out.iterdir()):
        if not (d / "summary.json").is_file():
            continue
        name, _, seed = d.name.rpartition("-s")
        spec = out / "specs" / f"{d.name}.toml"
        if not spec.is_file():
            continue
        runs.setdefault(name, {})[int(seed)] = load_run(d, spec)
    if "baseline" not in runs:
        sys.exit(f"no finished baseline run under {out}")
    names = [n for n in ORDER if n in runs] + sorted(n for n in runs if n not in ORDER)
    target = mean([r["final"] for r in runs["baseline"].values()])

    rows = {}
    for n in names:
        reach = [first_reach(r["val"], target) for r in runs[n].values()]
        ok = [x for x in reach if x is not None]
        rows[n] = dict(
            seeds=len(reach), reached=len(ok),
            tokens=mean([x[0] for x in ok]) if len(ok) == len(reach) else None,
            flops=mean([x[1] for x in ok]) if len(ok) == len(reach) else None,
            final=mean([r["final"] for r in runs[n].values()]),
            final_sd=(lambda xs: (sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0)(
                [r["final"] for r in runs[n].values()]),
            total_flops=mean([r["flops"] for r in runs[n].values()]),
            growth=next(iter(runs[n].values()))["growth"],
        )
    base = rows["baseline"]
    any_run = next(iter(runs["baseline"].values()))
    spec = any_run["spec"]
    m = spec["model"]
    D = any_run["tokens"]
    # The target is the baseline's own final loss (mean over seeds): the baseline reaches it at
    # the end of its budget by definition, whichever side of the mean each seed ended on.
    base["tokens"], base["flops"], base["by_definition"] = D, base["total_flops"], True

    md = [f"# paper-mini results: `{out.name}` scale", "",
          f"Generated by `bench/paper_mini_analyze.py` from {sum(len(v) for v in runs.values())} runs under `{out}`.", "",
          f"Target model: {m['num_hidden_layers']} layers x hidden {m['hidden_size']} (FFN {m['intermediate_size']}, "
          f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} KV), vocab {spec['data']['vocab_size']}, "
          f"seq {spec['data']['seq_len']}, batch {spec['train']['global_batch']} sequences; budget D = {fmt_tok(D)} tokens "
          f"({spec['train']['max_steps']} steps).", "",
          f"Target loss = the baseline's final validation loss (mean over {base['seeds']} seed(s)): **{target:.4f}**. "
          "Tokens / FLOPs to reach it are interpolated linearly between evaluation points (mean over seeds); "
          "FLOPs count every step at the size of the model that trained it (the small model's before growth). "
          "The baseline reaches the target at D by definition (its tokens and FLOPs to target are its budget). "
          "Speedup = baseline / run - 1.", "",
          "| run | growth | seeds | final val loss | tokens to target | FLOPs to target | speedup (tokens) | speedup (FLOPs) | total FLOPs |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        r = rows[n]
        g = "; ".join(f"{a}→{b} {op} at {fmt_tok(t)}" for t, _, a, b, op in r["growth"]) or "none"
        if r["tokens"] is None:
            tok = f"not reached ({r['reached']}/{r['seeds']} seeds)"
            fl = su_t = su_f = "—"
        else:
            tok, fl = fmt_tok(r["tokens"]), f"{r['flops']:.3g}"
            if r.get("by_definition"):
                tok += " (D)"
                su_t = su_f = "0 (reference)"
            else:
                su_t = f"{(base['tokens'] / r['tokens'] - 1) * 100:+.1f}%"
                su_f = f"{(base['flops'] / r['flops'] - 1) * 100:+.1f}%"
        sd = f" ± {r['final_sd']:.4f}" if r["seeds"] > 1 else ""
        md.append(f"| {n} | {g} | {r['seeds']} | {r['final']:.4f}{sd} | {tok} | {fl} | {su_t} | {su_f} | {r['total_flops']:.3g} |")
    md += ["", "Per-seed final validation losses:", ""]
    for n in names:
        md.append(f"- {n}: " + ", ".join(f"seed {s}: {r['final']:.4f}" for s, r in sorted(runs[n].items())))
    md += ["", "Plots: `val_vs_tokens.png`, `val_vs_flops.png` (dotted vertical lines: growth).", ""]
    (out / "results.md").write_text("\n".join(md))

    # One distinct colour per run (tab10 repeats after 10 runs); the baseline is black.
    colors = [plt.cm.tab20(i) for i in (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19)]
    styles = ["-", "--", ":", "-."]
    for xi, xlabel, fname in [(0, "tokens", "val_vs_tokens.png"), (1, "training FLOPs", "val_vs_flops.png")]:
        fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
        for ci, n in enumerate(names):
            c = "black" if n == "baseline" else colors[ci % len(colors)]
            for si, (seed, r) in enumerate(sorted(runs[n].items())):
                xs = [p[xi] for p in r["val"]]
                ys = [p[2] for p in r["val"]]
                ax.plot(xs, ys, styles[si % len(styles)], color=c, lw=1.4,
                        label=f"{LABEL.get(n, n)}" + (f" seed {seed}" if len(runs[n]) > 1 else ""))
                for g in r["growth"]:
                    if si == 0:
                        ax.axvline(g[xi], color=c, ls=":", lw=1, alpha=0.7)
                    # mark the curve at the growth point (the last evaluation at or before it)
                    before = [p for p in r["val"] if p[xi] <= g[xi] * (1 + 1e-9)]
                    if before:
                        ax.plot([before[-1][xi]], [before[-1][2]], marker="^", color=c, ms=7)
        ax.axhline(target, color="black", ls="--", lw=0.8, label=f"baseline final loss {target:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"paper-mini ({out.name}): validation loss vs {xlabel}; ▲ / dotted = growth")
        finals = [r["final"] for v in runs.values() for r in v.values()]
        allv = [p[2] for v in runs.values() for r in v.values() for p in r["val"]]
        lo = min(finals)
        hi = min(max(allv), lo + 2.5) + 0.05
        ax.set_ylim(lo - 0.05 * (hi - lo) - 0.02, hi)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'val_vs_tokens.png'}, {out / 'val_vs_flops.png'}")


if __name__ == "__main__":
    main()
