"""Summarises a GPU check: the devices benchmark's and PyTorch's JSON lines as one table per model and batch.

    python3 scripts/gpu_summary.py bench.jsonl [torch.jsonl]
"""
import json
import sys


def load(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.startswith("{")]
    except FileNotFoundError:
        return []


rows = load(sys.argv[1]) + (load(sys.argv[2]) if len(sys.argv) > 2 else [])
by = {}
for r in rows:
    by[(r["model"], r["batch"], r["device"], r["variant"])] = r["s_per_epoch"]
cpu = sorted({r["device"] for r in rows if r["device"].startswith("cpu")}, key=lambda d: int(d.split("(")[1].split()[0]))
print("| model | batch | GPU fused (edgeloop) | GPU candle AdamW | GPU no optimiser | PyTorch | PyTorch fused | "
      "edgeloop / PyTorch | " + " | ".join(f"{d} fused" for d in cpu) + " | best CPU / GPU |")
print("|---" * (9 + len(cpu)) + "|")
for model in ("small", "big"):
    for batch in (256, 4096):
        g = lambda v: by.get((model, batch, "cuda:0", v))
        fused, torch = g("fused"), g("torch")
        torch_best = min([t for t in (torch, g("torch-fused")) if t is not None], default=None)
        cpus = [by.get((model, batch, d, "fused")) for d in cpu]
        best_cpu = min([c for c in cpus if c is not None], default=None)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"
        print(f"| {model} | {batch} | {fmt(fused)} | {fmt(g('candle'))} | {fmt(g('no-opt'))} | {fmt(torch)} | "
              f"{fmt(g('torch-fused'))} | {ratio(fused, torch_best)} | " + " | ".join(fmt(c) for c in cpus) +
              f" | {ratio(best_cpu, fused)} |")
