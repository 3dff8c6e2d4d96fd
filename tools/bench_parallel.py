"""One process against two ranks (`--parallel replicate` and `shard`): step time, all-reduce
waits, and the per-rank figures (disk, I/O, resident weights, peak RSS), alternated in one run.

    python tools/bench_parallel.py [--steps 8] [--rounds 2] [--hidden 512 --layers 8] [--budget-frac 0.5]

The same random untied Llama (`lomo_runtime.synthetic`), the same data and global batch
(2 x `--batch-size` sequences): one process with 2 torch threads and `--batch-size 2b`, and
`torchrun --nproc-per-node=2` with 1 thread per rank and `--batch-size b`, so all use the
machine's 2 cores. Two configurations: "streamed", every run under the same weights budget (a
fraction of the weights), for disk bytes and I/O per rank; "all resident", no weights budget,
for the weights held at rest (one process keeps every unit whole; a shard rank keeps the units
it is not using as its slices). Runs alternate (one, replicate, shard, one, ...); each figure is
the median over rounds of the median over steps 2..N (step 1 warms caches); two-rank figures
are rank 0's. Prints the tables, the shard/one-process ratios of the per-rank figures, and
writes JSON to `benchmarks/parallel.json`.

On one 2-core machine this measures what several ranks cost, not what they gain: the ranks
share the cores one process would use.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **env})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _figures(out: Path, store: Path) -> dict[str, float]:
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r][1:]
    return {
        "step_s": statistics.median(r["step_time_s"] for r in steps),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "reduce_wait_s": statistics.median(r.get("reduce_wait_s", 0.0) for r in steps),
        "peak_rss_bytes": max(r["peak_host_bytes"] for r in steps),
        "read_bytes_per_step": statistics.median(r["io_read_bytes"] for r in steps),
        "write_bytes_per_step": statistics.median(r["io_write_bytes"] for r in steps),
        "weights_resident_bytes": max(r["weights_resident_peak_bytes"] for r in steps),
        "weights_at_rest_bytes": max(r.get("weights_at_rest_peak_bytes", 0) for r in steps),
        "store_bytes_per_rank": _du(store / "rank-0") if (store / "rank-0").exists() else _du(store),
        "final_loss": steps[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2, help="per rank; one process runs twice this")
    ap.add_argument("--budget-frac", type=float, default=0.5, help="weights budget as a fraction of the weights")
    ap.add_argument("--configs", default="streamed,all resident", help="which configurations to run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "parallel.json"))
    args = ap.parse_args()

    from lomo_runtime.synthetic import llama_config, save_random_model, write_word_data

    root = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    try:
        model = save_random_model(root / "model", llama_config(args.hidden, args.layers, 8, 4, 4 * args.hidden,
                                                               vocab=8192))
        data = write_word_data(root / "data.jsonl", lines=2000)
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        budget = int(weights * args.budget_frac)
        report: dict = {"settings": {**vars(args), "weights_bytes": weights, "weights_budget_bytes": budget}}
        mib = 2**20
        print(f"model: llama hidden {args.hidden} x {args.layers} layers, {weights / mib:.0f} MiB fp32; "
              f"global batch {2 * args.batch_size} x {args.seq_len}")
        # Streamed: disk bytes and I/O per rank. All resident: the weights held at rest.
        configs = (("streamed", budget, ("one process", "replicate", "shard")),
                   ("all resident", None, ("one process", "shard")))
        for config, cap, methods in (c for c in configs if c[0] in args.configs.split(",")):
            common = ["train", "--model", str(model), "--data", str(data), "--steps", str(args.steps),
                      "--seq-len", str(args.seq_len), "--lr", "0.01", "--eval-fraction", "0", "--commit-every", "10",
                      *(["--weights-budget", str(cap)] if cap else [])]
            results: dict[str, list[dict]] = {name: [] for name in methods}
            for round_ in range(args.rounds):
                for name in methods:
                    out = root / f"{config.replace(' ', '-')}-{name.replace(' ', '-')}-{round_}"
                    if name == "one process":
                        _run([sys.executable, "-m", "lomo_runtime", *common, "--out", str(out), "--threads", "2",
                              "--batch-size", str(2 * args.batch_size)], {"OMP_NUM_THREADS": "2"})
                    else:
                        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              "--no-python", "lomo-run", *common, "--out", str(out), "--threads", "1",
                              "--batch-size", str(args.batch_size), "--parallel", name], {"OMP_NUM_THREADS": "1"})
                    results[name].append(_figures(out, out / "store"))
                    shutil.rmtree(out)
            summary = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
            print(f"\n{config}" + (f", weights budget {cap / mib:.0f} MiB" if cap else ", no weights budget")
                  + " (two-rank figures: rank 0's)")
            print(f"{'':<12} {'step s':>8} {'tok/s':>8} {'reduce wait s':>14} {'peak RSS MiB':>13} {'weights MiB':>12} "
                  f"{'at rest MiB':>12} {'read MiB/step':>14} {'write MiB/step':>15} {'store MiB/rank':>15}")
            for name in methods:
                m = summary[name]
                print(f"{name:<12} {m['step_s']:8.3f} {m['tokens_per_s']:8.0f} {m['reduce_wait_s']:14.3f} "
                      f"{m['peak_rss_bytes'] / mib:13.0f} {m['weights_resident_bytes'] / mib:12.0f} "
                      f"{m['weights_at_rest_bytes'] / mib:12.0f} {m['read_bytes_per_step'] / mib:14.1f} "
                      f"{m['write_bytes_per_step'] / mib:15.1f} {m['store_bytes_per_rank'] / mib:15.0f}")
            for name in methods[1:]:
                ratio = summary[name]["tokens_per_s"] / summary["one process"]["tokens_per_s"]
                summary[f"ratio_tokens_per_s_{name}"] = ratio
                print(f"{name} / one process tokens/s: {ratio:.2f}x (median of {args.rounds} alternated rounds)")
            one, shard = summary["one process"], summary["shard"]
            halves = {k: shard[k] / one[k] for k in ("store_bytes_per_rank", "read_bytes_per_step",
                                                     "write_bytes_per_step") if one[k]}
            if config == "all resident":  # one process holds every unit whole at rest; shard its slices
                halves["weights_at_rest"] = shard["weights_at_rest_bytes"] / one["weights_resident_bytes"]
            summary["shard_over_one_process"] = halves
            print("shard per rank / one process: " + ", ".join(f"{k} {v:.3f}" for k, v in halves.items())
                  + "  (target 0.5 +- 15%)")
            report[config] = summary
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
