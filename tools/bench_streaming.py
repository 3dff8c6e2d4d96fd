"""Streamed vs all-resident training throughput, in one process.

    python tools/bench_streaming.py [--steps 6] [--threads 2] [--out .cache/bench]

Model: a random 12-layer Llama of 134M parameters (hidden 768, MLP 2048,
12 heads, vocab 32000, untied), fp32, sequence 256, batch 1: 256 tokens/step.
Two runtimes train it with SGD: one with every unit resident (no budget) and one
with a weights budget of a quarter of the weights (536 MB / 4 = 134 MB, about
5 of the 14 units). Steps alternate between the two so a noisy neighbour hits
both alike; the figure is the ratio of median tokens/s. Prints a table and
writes JSON to OUT/bench_streaming.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lomo_runtime import SGD, Runtime
from lomo_runtime.memory import peak_rss_bytes, reset_peak_rss
from lomo_runtime.sizes import format_size
from lomo_runtime.synthetic import llama_config, save_random_model

SEQ, BATCH = 256, 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per runtime (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=".cache/bench")
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model_dir = out / "llama-134m"
    if not (model_dir / "config.json").exists():
        save_random_model(model_dir, llama_config(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048))
    for old in ("work-resident", "work-streamed"):
        import shutil

        shutil.rmtree(out / old, ignore_errors=True)

    resident = Runtime(model_dir, SGD(lr=1e-4), work_dir=out / "work-resident")
    weights = sum(rec.nbytes for rec in resident.store.units.values())
    budget = int(weights * args.budget_fraction)
    streamed = Runtime(model_dir, SGD(lr=1e-4), work_dir=out / "work-streamed", weights_budget=budget)
    runs = {"resident": resident, "streamed": streamed}
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, int] = {k: 0 for k in runs}
    io: dict[str, dict[str, float]] = {}
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps + 1):
        ids = torch.randint(0, 32000, (BATCH, SEQ), generator=gen)
        for name, rt in runs.items():
            reset_peak_rss()
            started = time.perf_counter()
            rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            elapsed = time.perf_counter() - started
            if step > 0:  # step 0 warms allocators and the page cache
                times[name].append(elapsed)
            peaks[name] = max(peaks[name], peak_rss_bytes())
    for name, rt in runs.items():
        s = rt.scheduler.stats
        io[name] = {"read_bytes_per_step": s.read_bytes / (args.steps + 1), "write_bytes_per_step": s.write_bytes / (args.steps + 1),
                    "io_wait_s_per_step": s.waits_s / (args.steps + 1)}
        rt.close()

    tokens = SEQ * BATCH
    result = {
        "model": "llama 134M fp32 (h768, 12 layers, vocab 32000)", "seq_len": SEQ, "batch_size": BATCH,
        "threads": args.threads, "weights_bytes": weights, "streamed_budget_bytes": budget,
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "tokens_per_s": {k: tokens / statistics.median(v) for k, v in times.items()},
        "step_times_s": times, "peak_rss_bytes": peaks, "io": io,
    }
    result["ratio_streamed_over_resident"] = result["tokens_per_s"]["streamed"] / result["tokens_per_s"]["resident"]
    print(f"weights {format_size(weights)}, streamed budget {format_size(budget)}; seq {SEQ} x batch {BATCH}; {args.threads} threads")
    print(f"{'run':10} {'median s/step':>14} {'tokens/s':>9} {'read/step':>10} {'write/step':>10} {'io wait/step':>12}")
    for k in runs:
        print(f"{k:10} {result['median_step_s'][k]:14.3f} {result['tokens_per_s'][k]:9.1f} "
              f"{format_size(io[k]['read_bytes_per_step']):>10} {format_size(io[k]['write_bytes_per_step']):>10} {io[k]['io_wait_s_per_step']:12.3f}")
    print(f"ratio streamed/resident tokens/s: {result['ratio_streamed_over_resident']:.3f} (target >= 0.85)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_streaming.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
