"""Planner accuracy: predicted peak host memory against measured peak RSS while training runs, on CPU.

For each configuration (model size x sequence length x budget) a fresh Python
process builds `Runtime(model_dir, rule=SGD(lr=1e-4), weights_budget=...)`,
runs `--steps` training steps (`out = rt.model(input_ids=ids, labels=ids)`,
`rt.backward(out.loss)`) and reports its peak RSS (VmHWM, reset after the
working store is built, so the one-off copy of the checkpoint into the store
does not count). The prediction is made before launch by `plan()` from
`config.json` alone, with the framework overhead from `lomo-run probe`'s
cache (or the default).

The runtime trims freed heap after every unit (`heap_trim="unit"`), as it does by default
under a memory budget, the case the plan must hold for (LOMO_PLAN_ACCURACY_HEAP_TRIM=step measures
the other policy, whose retained heap the planner does not model).

Budgets: "resident" (no weights budget: every unit stays in memory) and
"stream" (the smallest weights budget the plan allows: every step streams).

    python tools/plan_accuracy.py                    # 3 sizes x 2 seq lens x 2 budgets = 12 runs
    python tools/plan_accuracy.py --quick            # the smallest model only (what the test runs)
    python tools/plan_accuracy.py --out plan_accuracy.json
    python tools/plan_accuracy.py --grid families    # llama, qwen3, gemma2, starcoder2 x vocab 32k/152k x 2 budgets
    python tools/plan_accuracy.py --grid quoted      # the two cases issue 14 quotes, at their weights budgets

Prints a table (predicted, measured, error per configuration) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Llama shapes, random weights, untied except "large" (SmolLM-style tied embeddings).
# Parameters: small 12.6M (50 MB fp32), medium 58.5M (234 MB), large 110M (440 MB).
MODELS = {
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=16000, tie_word_embeddings=False),
    "medium": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "large": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True),
}
SEQ_LENS = (128, 512)
BUDGETS = ("resident", "stream")

# `--grid families`: 4 families x 2 vocabularies (32k; Qwen2's 151936) x resident/streamed at seq 128,
# 4 layers, 256 wide, untied (row updates apply to SGD fp32), random weights.
FAMILY_DIMS = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=1024,
                   bos_token_id=0, eos_token_id=1, pad_token_id=0)
FAMILY_EXTRA = {"llama": {}, "qwen3": {}, "gemma2": {"head_dim": 64}, "starcoder2": {}}
VOCABS = (32000, 151936)

# `--grid quoted`: the two models issue 14 quotes (seq 256, batch 2), at the weights budgets it names
# (the 6 x 640 model's MLP width and heads are not given there: SmolLM-like 1728 and 10 / 5 here).
QUOTED = {
    "llama-6x640-tied-32k": (dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=6, num_attention_heads=10,
                                  num_key_value_heads=5, vocab_size=32000, tie_word_embeddings=True), 120_000_000),
    "llama-0.37b-untied-32k": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                    num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                    tie_word_embeddings=False), 130 * 2**20),
}


def make_family_model(out: Path, model_type: str, vocab: int) -> Path:
    """Save a random `model_type` model with FAMILY_DIMS and `vocab` and return its directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **FAMILY_DIMS, **FAMILY_EXTRA[model_type])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def make_model(out: Path, dims: dict) -> Path:
    """Save a random Llama with `dims` (fp32 safetensors) and return its directory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (out / "config.json").exists():
        return out
    config = LlamaConfig(max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, **dims)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def child(args: dict) -> dict:
    """Run in a fresh process: train `steps` steps, return measured peaks."""
    import torch

    from lomo_runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from lomo_runtime.rules import SGD
    from lomo_runtime.runtime import Runtime

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args["work_root"]) as work:
        rt = Runtime(args["model_dir"], rule=SGD(lr=1e-4), work_dir=work, weights_budget=args["weights_budget"],
                     seq_len=args["seq_len"], batch_size=args["batch_size"],
                     heap_trim=os.environ.get("LOMO_PLAN_ACCURACY_HEAP_TRIM", "unit"))
        rss_built = current_rss_bytes()
        reset_peak_rss()
        vocab = rt.checkpoint.config["vocab_size"]
        ids = torch.randint(0, vocab, (args["batch_size"], args["seq_len"]))
        times = []
        for _ in range(args["steps"]):
            start = time.perf_counter()
            out = rt.model(input_ids=ids, labels=ids)
            rt.backward(out.loss)
            del out
            times.append(time.perf_counter() - start)
        result = {
            "peak_rss_bytes": peak_rss_bytes(), "rss_after_build_bytes": rss_built,
            "read_bytes": rt.scheduler.stats.read_bytes, "pool_peak_bytes": rt.pool.peak_bytes,
            "step_time_s": min(times),
        }
        rt.close()
    return result


def run_child(payload: dict) -> dict:
    # As `lomo-run train --memory-budget` runs: MKL's buffer cache off from the start (cli.main).
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(payload)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "MKL_DISABLE_FAST_MM": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="only the small model (4 runs)")
    parser.add_argument("--models", nargs="*", default=None, choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--model-root", default=None, help="where random models are saved (default: a temp dir)")
    parser.add_argument("--grid", choices=["llama", "families", "quoted"], default="llama",
                        help="llama: 3 Llama sizes x 2 seq lens x 2 budgets; families: 4 families x 2 vocabs x 2 budgets")
    parser.add_argument("--out", default="plan_accuracy.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from lomo_runtime.checkpoint.checkpoint import load_config
    from lomo_runtime.planner import RunConfig, plan
    from lomo_runtime.probe import load_machine
    from lomo_runtime.sizes import format_size

    names = args.models or (["small"] if args.quick else list(MODELS))
    root = Path(args.model_root or tempfile.mkdtemp(prefix="plan-acc-"))
    machine = load_machine("cpu", "fp32")
    rows = []
    header = (f"{'model':<15} {'seq':>4} {'budget':<8} {'weights budget':>14} {'predicted':>10} {'measured':>10} "
              f"{'error':>7}  {'pred step':>9} {'meas step':>9}")
    print(f"framework overhead {format_size(machine.framework_bytes)} ({machine.source['framework_bytes']})")
    print(header)
    fixed_budget: dict[str, int] = {}
    if args.grid == "families":
        cases = [(f"{t}-{v // 1000}k", make_family_model(root / f"{t}-{v}", t, v), (128,))
                 for t in FAMILY_EXTRA for v in VOCABS]
    elif args.grid == "quoted":
        cases = [(name, make_model(root / name, dims), (256,)) for name, (dims, _) in QUOTED.items()]
        fixed_budget = {name: budget for name, (_, budget) in QUOTED.items()}
        args.batch_size = 2
    else:
        cases = [(name, make_model(root / name, MODELS[name]), SEQ_LENS) for name in names]
    for name, model_dir, seq_lens in cases:
        config = load_config(model_dir)
        for seq in seq_lens:
            for budget in (("quoted",) if name in fixed_budget else BUDGETS):
                run = RunConfig(seq_len=seq, batch_size=args.batch_size, dtype="fp32", rule="sgd", device="cpu",
                                memory_budget=machine.host_memory_bytes)
                p = plan(config, run, machine)
                wb = fixed_budget.get(name)
                if wb is not None:
                    run.weights_budget = wb
                    p = plan(config, run, machine)
                if budget == "stream":
                    wb = p.min_weights_budget
                    run.weights_budget = wb
                    p = plan(config, run, machine)
                measured = run_child(dict(model_dir=str(model_dir), work_root=str(root), weights_budget=wb,
                                          seq_len=seq, batch_size=args.batch_size, steps=args.steps))
                err = (p.peak_host_bytes - measured["peak_rss_bytes"]) / measured["peak_rss_bytes"]
                row = dict(model=name, params=p.params, seq_len=seq, batch_size=args.batch_size, budget=budget,
                           weights_budget=wb, predicted_peak_host_bytes=p.peak_host_bytes,
                           predicted_memory=p.memory, predicted_read_bytes_per_step=p.read_bytes_per_step,
                           predicted_step_time_s=p.est_step_time_s, error=err, **{f"measured_{k}": v
                                                                              for k, v in measured.items()})
                rows.append(row)
                print(f"{name:<15} {seq:>4} {budget:<8} {format_size(wb) if wb else '-':>14} "
                      f"{format_size(p.peak_host_bytes):>10} {format_size(measured['peak_rss_bytes']):>10} "
                      f"{err:>+7.1%}  {p.est_step_time_s:>8.2f}s {measured['step_time_s']:>8.2f}s", flush=True)
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst:.1%} over {len(rows)} configurations")
    Path(args.out).write_text(json.dumps({"machine": machine.__dict__, "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
