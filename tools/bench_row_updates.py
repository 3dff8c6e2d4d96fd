"""Peak RSS with and without row updates of the input embedding, on a 152k vocabulary.

    python tools/bench_row_updates.py [--hidden 1024] [--vocab 151936] [--steps 3] [--out .cache/bench-rows]

Model: a random untied Llama (2 layers, hidden --hidden, vocab --vocab: Qwen2's 151936), fp32,
SGD without weight decay, so row updates are exact (Runtime.row_updates_exact). Each mode runs in
a fresh process, alternated over --rounds, all units resident and streamed at a budget of about
one block; per mode the peak RSS (VmHWM) of each step after the first is recorded, and the median
is quoted. The dense embedding gradient is vocab x hidden x 4 B. Prints a table and writes
OUT/bench_row_updates.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from lomo_runtime.sizes import format_size
from lomo_runtime.synthetic import llama_config, save_random_model

CHILD = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[5]))
from lomo_runtime import SGD, Runtime
model, work, rows, budget, _, steps, seq = sys.argv[1:8]
rows = rows == "rows"
with Runtime(model, SGD(lr=1e-3), work_dir=work, row_updates=None if rows else False,
             weights_budget=None if budget == "all" else budget) as rt:
    assert rt.row_updates is rows
    gen = torch.Generator().manual_seed(0)
    peaks = []
    for step in range(int(steps)):
        ids = torch.randint(0, 5000, (2, int(seq)), generator=gen)
        rt.reset_peaks()
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        peaks.append(rt.memory_report()["peak_host_bytes"])
    print(json.dumps({"peaks": peaks}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=".cache/bench-rows")
    args = parser.parse_args()
    out = Path(args.out)
    model_dir = out / f"llama-v{args.vocab}-h{args.hidden}"
    if not (model_dir / "config.json").exists():
        config = llama_config(hidden=args.hidden, layers=2, heads=8, kv_heads=8, intermediate=2 * args.hidden,
                              vocab=args.vocab, tied=False)
        save_random_model(model_dir, config)
    dense_grad = args.vocab * args.hidden * 4
    block = 2 * args.hidden * args.hidden * 4 * 2 + 3 * args.hidden * 2 * args.hidden * 4  # q,k,v,o + MLP, fp32
    budgets = {"resident": "all", "streamed": str(args.vocab * args.hidden * 4 + block + (1 << 20))}
    results: dict[str, dict[str, list[int]]] = {}
    for _ in range(args.rounds):
        for placement, budget in budgets.items():
            for mode in ("dense", "rows"):
                work = out / f"work-{placement}-{mode}"
                subprocess.run(["rm", "-rf", str(work)], check=True)
                proc = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(work), mode, budget,
                                       str(args.threads), str(args.steps), str(args.seq_len)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{placement} {mode} failed:\n{proc.stderr[-3000:]}")
                peaks = json.loads(proc.stdout.strip().splitlines()[-1])["peaks"][1:]
                results.setdefault(f"{placement}/{mode}", {"peaks": []})["peaks"].extend(peaks)
    table = {k: statistics.median(v["peaks"]) for k, v in results.items()}
    print(f"model: untied Llama, vocab {args.vocab}, hidden {args.hidden}, 2 layers, fp32; batch 2 x {args.seq_len}")
    print(f"dense embedding gradient: {format_size(dense_grad)}")
    print(f"{'placement':<10} {'dense peak':>12} {'rows peak':>12} {'saved':>12}")
    summary = {}
    for placement in budgets:
        d, r = table[f"{placement}/dense"], table[f"{placement}/rows"]
        print(f"{placement:<10} {format_size(d):>12} {format_size(r):>12} {format_size(d - r):>12}")
        summary[placement] = {"dense_peak_bytes": d, "rows_peak_bytes": r, "saved_bytes": d - r}
    (out / "bench_row_updates.json").write_text(json.dumps(
        {"args": vars(args), "dense_embedding_grad_bytes": dense_grad, "summary": summary, "raw": results}, indent=2))


if __name__ == "__main__":
    main()
