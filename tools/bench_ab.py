"""Lock-step A/B runs of lomo-run variants on the side-by-side benchmark's model and batches.

    python tools/bench_ab.py [--steps 10] [--save benchmarks/ab-NAME.json] VARIANT VARIANT ...

    VARIANT  name=method[,key=value,...]     method: resident or streamed
             threads=N        torch threads of that worker (default --threads)
             path=DIR         import lomo_runtime from DIR (say, a `git worktree` of an older commit)
             env.NAME=VALUE   an environment variable of that worker
             key=VALUE        any other key: a `Runtime` keyword argument, VALUE read as JSON
                              (io_threads=1, prefetch_depth=1, heap_keep=134217728, heap_trim="unit")

    python tools/bench_ab.py res=resident str=streamed res1=resident,threads=1 str1=streamed,threads=1

Each variant is one `tools/bench_side_by_side.py` worker (SmolLM2-135M, fp32, 8 x 128 tokens, the
same batches and learning rates; streamed at a quarter of the weights), all alive at once and taking
turns one step at a time, the order rotating every step (`drive_lockstep`), so step k of every
variant lands within seconds of the others' on this shared, noisy machine. For each variant it
prints the median step time over steps 2..N, every step's peak RSS, and against the first variant
the median and quartiles of the per-step ratio (first's step k time / this one's: above 1 is
faster) and whether every loss is bit-identical. JSON with every step goes to `--out` (and
`--save`). No evaluation: this measures training steps only.

This is how the streamed-versus-resident figures in BENCHMARKS.md's notes were taken apart.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_side_by_side as sbs  # noqa: E402  (the same worker, data and lock-step driver)

REPO = sbs.REPO


def parse_variant(text: str, threads: int) -> dict:
    """`name=method[,key=value,...]` as {name, method, threads, path, env, runtime_kwargs}."""
    name, sep, rest = text.partition("=")
    fields = rest.split(",")
    if not sep or not name or fields[0] not in ("resident", "streamed"):
        raise SystemExit(f"variant {text!r}: expected name=resident|streamed[,key=value,...]")
    variant = {"name": name, "method": fields[0], "threads": threads, "path": None, "env": {}, "runtime_kwargs": {}}
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if not sep:
            raise SystemExit(f"variant {name}: {field!r} is not key=value")
        if key == "threads":
            variant["threads"] = int(value)
        elif key == "path":
            variant["path"] = str(Path(value).resolve())
        elif key.startswith("env."):
            variant["env"][key[4:]] = value
        else:
            try:
                variant["runtime_kwargs"][key] = json.loads(value)
            except json.JSONDecodeError:
                raise SystemExit(f"variant {name}: {key}={value!r} is not a JSON value (strings need quotes)") from None
    return variant


def worker(args, variant: dict, out: Path) -> tuple[list[str], dict, Path, Path]:
    scratch = out / variant["name"]
    scratch.mkdir(parents=True, exist_ok=True)
    result = out / f"{variant['name']}.json"
    ns = argparse.Namespace(**{**vars(args), "eval": 0, "threads": variant["threads"], "adamw_lr": 2e-5,
                               "port": 29533, "timeout": 0})
    cmd = sbs._worker_cmd(ns, variant["method"], scratch, result)
    cmd += ["--runtime-kwargs", json.dumps(variant["runtime_kwargs"])]
    env = dict(os.environ, OMP_NUM_THREADS=str(variant["threads"]), **variant["env"])
    if variant["path"]:
        env["PYTHONPATH"] = variant["path"] + os.pathsep + env.get("PYTHONPATH", "")
    return cmd, env, result, out / f"{variant['name']}.log"


def summarise(variants: list[dict], results: dict[str, dict]) -> list[dict]:
    rows = []
    first = results.get(variants[0]["name"])
    for v in variants:
        r = results[v["name"]]
        row = {"name": v["name"], "variant": v}
        if "error" in r:
            rows.append({**row, "error": r["error"]})
            continue
        timed = r["steps"][1:]
        row.update(median_step_s=statistics.median(s["step_s"] for s in timed),
                   peak_rss_bytes=[s["peak_rss_bytes"] for s in r["steps"]], info=r.get("info", {}))
        if v is not variants[0] and first and "error" not in first:
            per_step = sbs.step_ratios(r["steps"], first["steps"])
            row.update(speed_vs_first=statistics.median(per_step), quartiles=sbs.quartiles(per_step),
                       losses_identical=[s["loss"] for s in first["steps"]] == [s["loss"] for s in r["steps"]])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", metavar="VARIANT")
    parser.add_argument("--model", default=".cache/smollm2-135m")
    parser.add_argument("--data", default=".cache/demo")
    parser.add_argument("--out", default=".cache/bench-ab")
    parser.add_argument("--save", help="also write the JSON here (say, benchmarks/ab-threads.json)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    variants = [parse_variant(text, args.threads) for text in args.variants]
    if len({v["name"] for v in variants}) != len(variants):
        raise SystemExit("variant names must differ")
    for needed in (Path(args.model) / "config.json", Path(args.data) / "sentiment-train.jsonl"):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run tools/build_smollm2.py and tools/build_demo_data.py first")
    args.model, args.data = str(Path(args.model).resolve()), str(Path(args.data).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = {v["name"]: worker(args, v, out) for v in variants}
    started = time.perf_counter()
    done = sbs.drive_lockstep(workers, args.steps + 2)  # setup, steps, the worker's (empty) evaluation
    results = {name: sbs._collect(name, rc, workers[name][2], workers[name][3], busy) for name, (rc, busy) in done.items()}
    rows = summarise(variants, results)
    for row in rows:
        if "error" in row:
            print(f"{row['name']}: FAILED: {row['error']} (log {workers[row['name']][3]})")
            continue
        peaks = ", ".join(f"{p / 2**30:.3f}" for p in row["peak_rss_bytes"])
        print(f"{row['name']}: median step {row['median_step_s']:.3f} s, step peaks {peaks} GiB")
        if "speed_vs_first" in row:
            q = row["quartiles"]
            print(f"    speed vs {variants[0]['name']}: {row['speed_vs_first']:.3f} (quartiles {q[0]:.3f}, {q[2]:.3f}); "
                  f"losses identical: {row['losses_identical']}")
    summary = {"command": "python tools/bench_ab.py " + shlex.join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M"),
               "steps": args.steps, "wall_s": time.perf_counter() - started, "rows": rows,
               "steps_by_variant": {n: r.get("steps") for n, r in results.items()}}
    text = json.dumps(summary, indent=1, default=str)
    (out / "ab.json").write_text(text)
    if args.save:
        Path(args.save).write_text(text)
        print(f"wrote {args.save}")
    if any("error" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
