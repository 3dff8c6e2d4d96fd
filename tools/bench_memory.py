"""Peak RSS of `lomo-run train` on a model whose weights are 4x the memory budget.

    python tools/bench_memory.py [--budget 640MiB] [--steps 3] [--out .cache/bench-memory]

Model: a random Llama of 0.87B parameters, fp32 (hidden 1024, 76 layers,
MLP 2816, 16 heads / 4 KV heads, vocab 8000, untied): 3.5 GB of weights,
45 MB per block. The run gets `--memory-budget 800MiB` (process RSS), so the
weights are 4.2x the budget; the planner turns the budget into a weights
budget after subtracting the framework (torch + transformers, ~390 MiB here),
allocator slack and activations. Training runs in a child process; its peak
RSS comes from the kernel (VmHWM per step in metrics.jsonl, and the child's
ru_maxrss for the whole process, store creation and export included).
Prints a table and writes OUT/bench_memory.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lomo_runtime.sizes import format_size, parse_size
from lomo_runtime.synthetic import llama_config, save_random_model, write_word_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="800MiB", help="--memory-budget for the run (process RSS)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=".cache/bench-memory")
    args = parser.parse_args()
    out = Path(args.out)
    model_dir = out / "llama-870m"
    if not (model_dir / "config.json").exists():
        save_random_model(model_dir, llama_config(hidden=1024, layers=76, heads=16, kv_heads=4, intermediate=2816,
                                                  vocab=8000, max_positions=1024), max_shard_size="500MB")
    data = write_word_data(out / "data.jsonl", lines=200)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    budget = parse_size(args.budget)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-c", "from lomo_runtime.cli import main; main()", "train",
           "--model", str(model_dir), "--data", str(data), "--out", str(run_dir), "--steps", str(args.steps),
           "--seq-len", str(args.seq_len), "--batch-size", "1", "--lr", "1e-4", "--memory-budget", args.budget,
           "--threads", str(args.threads), "--eval-fraction", "0"]
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        raise SystemExit(f"training failed with exit code {proc.returncode}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    plan = json.loads((run_dir / "plan.json").read_text())
    step_peak = max(r["peak_host_bytes"] for r in steps)
    result = {
        "model": "llama 0.87B fp32 (h1024, 76 layers, vocab 8000, untied)",
        "weights_bytes": weights, "memory_budget_bytes": budget, "weights_over_budget": weights / budget,
        "weights_budget_bytes": plan.get("weights_budget"), "predicted_peak_host_bytes": plan.get("peak_host_bytes"),
        "peak_rss_training_steps_bytes": step_peak, "peak_rss_whole_process_bytes": child_peak,
        "step_peak_minus_budget_bytes": step_peak - budget, "whole_peak_minus_budget_bytes": child_peak - budget,
        "median_step_time_s": sorted(r["step_time_s"] for r in steps)[len(steps) // 2],
        "io_read_bytes_per_step": steps[-1]["io_read_bytes"], "io_write_bytes_per_step": steps[-1]["io_write_bytes"],
        "wall_s": wall, "command": " ".join(cmd[3:]), "ru_maxrss_before": before,
    }
    print(f"weights {format_size(weights)} = {result['weights_over_budget']:.2f} x memory budget {format_size(budget)}")
    print(f"weights budget chosen by the planner: {format_size(result['weights_budget_bytes'] or 0)}")
    print(f"{'measure':38} {'bytes':>12}")
    for label, key in [("predicted peak host (plan.json)", "predicted_peak_host_bytes"),
                       ("peak RSS during training steps", "peak_rss_training_steps_bytes"),
                       ("peak RSS, whole process (create, export)", "peak_rss_whole_process_bytes")]:
        print(f"{label:38} {format_size(result[key] or 0):>12}")
    print(f"training-step peak vs budget: {format_size(step_peak - budget)} "
          f"({'within' if step_peak <= budget else 'over'}); whole process vs budget: {format_size(child_peak - budget)}")
    print(f"median step {result['median_step_time_s']:.1f} s; reads {format_size(result['io_read_bytes_per_step'])}/step, "
          f"writes {format_size(result['io_write_bytes_per_step'])}/step")
    (out / "bench_memory.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
