"""The devices benchmark's models in PyTorch, for comparison on the same GPU.

Same task as control-plane/benches/devices.rs: 100,000 random-normal rows, autoencoders 32-64-16-64-32 and
256-1024-256-64-256-1024-256 (ReLU between layers, none after the last), reconstruction MSE, Adam at 1e-3,
batches of 256 and 4,096, one gather per epoch then contiguous batches. One warm-up epoch, then the median of
up to five timed epochs, synchronised before each clock read. One JSON object per configuration on stdout.

    python3 scripts/gpu_bench_torch.py [--rows N]
"""
import json
import statistics
import sys
import time

import torch

MODELS = [("small", [32, 64, 16, 64, 32]), ("big", [256, 1024, 256, 64, 256, 1024, 256])]
BATCHES = [256, 4096]


def model(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i + 2 < len(sizes):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def epoch(net, opt, x, batch):
    shuffled = x[torch.randperm(x.shape[0], device=x.device)]
    for start in range(0, x.shape[0], batch):
        xb = shuffled[start:start + batch]
        loss = ((net(xb) - xb) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main():
    rows = 100_000
    if "--rows" in sys.argv:
        rows = int(sys.argv[sys.argv.index("--rows") + 1])
    if not torch.cuda.is_available():
        print("PyTorch sees no GPU", file=sys.stderr)
        return
    dev = torch.device("cuda:0")
    torch.manual_seed(1)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", file=sys.stderr)
    for name, sizes in MODELS:
        x = torch.randn(rows, sizes[0], device=dev)
        for batch, fused in [(b, f) for b in BATCHES for f in (False, True)]:
            net = model(sizes).to(dev)
            # PyTorch's default Adam on a GPU (multi-tensor "foreach"), and its single-kernel fused Adam.
            opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused)
            variant = "torch-fused" if fused else "torch"
            t = time.perf_counter()
            epoch(net, opt, x, batch)
            torch.cuda.synchronize()
            warm = time.perf_counter() - t
            reps = max(1, min(5, int(8.0 / warm)))
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                epoch(net, opt, x, batch)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            secs = statistics.median(times)
            print(json.dumps({"model": name, "batch": batch, "device": "cuda:0", "variant": variant,
                              "s_per_epoch": round(secs, 4), "epochs_timed": reps}), flush=True)
            print(f"{name:>5} batch {batch:>4} {variant:<11} cuda:0 {secs:8.4f} s/epoch ({reps} timed)", file=sys.stderr)


if __name__ == "__main__":
    main()
