"""Fused C++ kernels (native/) against the pure-PyTorch update math, per tensor.

    python tools/bench_native.py [--threads 2] [--reps 15]

Shapes are those of the 134M Llama benchmark model: an MLP matrix (2048 x 768,
1.6M elements) and the embedding (32000 x 768, 24.6M). Both versions run
interleaved, the figure is the median time per call. Prints a table and writes
.cache/bench/bench_native.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lomo_runtime import native
from lomo_runtime.rules import AdamW, UpdateContext


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native.load() is None:
        raise SystemExit(f"native kernels unavailable: {native.load_error}")
    rule = AdamW(lr=1e-3, weight_decay=0.01)
    rows = []
    for shape in [(2048, 768), (32000, 768)]:
        x = torch.randn(shape)
        t_torch_sr, t_native_sr = [], []
        p, g = torch.randn(shape), torch.randn(shape)
        m1, v1, m2, v2 = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        p1, p2 = p.clone(), p.clone()
        t_torch_adam, t_native_adam = [], []
        for i in range(args.reps):
            t_torch_sr += _time(lambda: native.stochastic_round_bf16_torch(x, i), 1)  # same bits as the kernel
            t_native_sr += _time(lambda: native.stochastic_round_bf16_native(x, i), 1)
            ctx = UpdateContext(lr=1e-3, step=i + 1)
            t_torch_adam += _time(lambda: rule.apply(p1, g, {"exp_avg": m1, "exp_avg_sq": v1}, ctx), 1)
            t_native_adam += _time(lambda: native.adamw_native(p2, g, m2, v2, 1e-3, rule.betas, rule.eps, rule.weight_decay, i + 1), 1)
        diff = (p1 - p2).abs().max().item()
        for kernel, a, b in [("stochastic rounding bf16", t_torch_sr, t_native_sr), ("AdamW step", t_torch_adam, t_native_adam)]:
            rows.append({"kernel": kernel, "shape": list(shape), "torch_ms": 1e3 * statistics.median(a),
                         "native_ms": 1e3 * statistics.median(b), "speedup": statistics.median(a) / statistics.median(b)})
        rows[-1]["max_abs_diff_vs_torch"] = diff
    print(f"{'kernel':26} {'shape':>12} {'torch ms':>9} {'native ms':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['kernel']:26} {'x'.join(map(str, r['shape'])):>12} {r['torch_ms']:9.2f} {r['native_ms']:10.2f} {r['speedup']:7.2f}x")
    out = Path(".cache/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_native.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
