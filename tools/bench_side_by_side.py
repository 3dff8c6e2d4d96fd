"""Side-by-side fine-tuning benchmark: five ways to train the same model on the same data.

    python tools/bench_side_by_side.py [--steps 20] [--seq-len 128] [--batch-size 8] [--eval 200]
                                       [--methods adamw,lomo,deepspeed,resident,streamed] [--write-md]
                                       [--rounds 2] [--previous deepspeed]

Same model (SmolLM2-135M-Instruct, fp32, `tools/build_smollm2.py`), same data
(the balanced tweet-sentiment task, `tools/build_demo_data.py`), same packed
batches in the same order, same sequence length and number of steps, 2 torch
threads, each method in its own subprocess so peak memory never mixes:

    adamw      torch.optim.AdamW, model, gradients and both moments in memory
    lomo       lomo-optim's Lomo (fused SGD in backward; the paper's reference code)
    deepspeed  DeepSpeed ZeRO-3 (ZeRO-Infinity), parameters and optimizer state
               offloaded to NVMe, its own CPU AdamW
               (CPU accelerator, gloo, one process); lomo-optim + ZeRO-3 is broken
               in DeepSpeed 0.19.8, so DeepSpeed runs with its own optimizer; one
               patch fixes a CPU-only aliasing bug in 0.19.8 that trains on wrong
               gradients (`_deepspeed_copy_gathered_nvme_params`)
    resident   lomo-run, fused SGD, every unit resident
    streamed   lomo-run, fused SGD, weights budget of a quarter of the weights

Every method runs with activation checkpointing (HF `gradient_checkpointing_enable`
for the first three; lomo-run checkpoints every unit by design), so the
comparison is about where weights, gradients and optimizer state live, not
about activations. SGD methods share one learning rate, the AdamW methods
another (AdamW's normalised step needs a far smaller one).

Per step each worker records the loss, the step time and the exact peak RSS
of the step (VmHWM, reset at the step's start: `lomo_runtime.memory`). After
training it scores held-out multiple-choice accuracy and loss with
`lomo_runtime.evaluation` (the same code for all five). tokens/s counts every
input token (batch x seq_len) over steps 2..N (step 1 warms allocators and
caches). The parent prints a markdown table, writes JSON and a PNG (loss and
memory over training time), and with `--write-md` rewrites BENCHMARKS.md.

The ratios that matter (lomo-run against lomo-optim, streamed against
resident) are measured in lock-step (`--interleave step`, the default): lomo,
resident and streamed run as three processes alive at once that take turns one
step at a time (the order rotating every step), so only one computes at any
moment and step k of each lands within seconds of the others'. Each ratio is
the median over all timed steps of the per-step time ratio. This machine is
shared and noisy (a step's time moves by 10-30% from one minute to the next);
whole runs in turn (`--interleave run`: lomo, resident, streamed, lomo, ...,
each ratio the median of per-round ratios) let a slow minute land on one
method only. `--rounds R` repeats either (later rounds skip the eval); each
row's tokens/s is the median over its rounds.
`--previous METHOD` copies a method's row from the last run's JSON, marked as
such, instead of running it (DeepSpeed needs a 7.5-minute async-I/O build).

lomo-run runs with its defaults: commits every 10 steps (so all-resident it
writes the model at steps 10 and 20 only), the head's graph kept, freed heap
returned a few times a step (before the head, every 15 blocks of backward, before
the embedding).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("adamw", "lomo", "deepspeed", "resident", "streamed")
LABELS = {
    "adamw": "torch AdamW, in memory",
    "lomo": "lomo-optim Lomo (fused SGD)",
    "deepspeed": "DeepSpeed ZeRO-3, params on NVMe, AdamW",
    "resident": "lomo-run, all units resident",
    "streamed": "lomo-run, streamed, 1/4 of weights",
}


# =========================================================================== worker (one method)


def _data(args):
    from lomo_runtime.data import Batches, load_examples, load_tokenizer, pack, pad_id_of, tokenize_examples
    from lomo_runtime.evaluation import load_choice_examples

    tokenizer = load_tokenizer(args.model)
    sequences = pack(tokenize_examples(load_examples(Path(args.data) / "sentiment-train.jsonl"), tokenizer),
                     args.seq_len, pad_id=pad_id_of(tokenizer))
    batches = Batches(sequences, args.batch_size, seed=0)
    evaluation = load_choice_examples(Path(args.data) / "sentiment-eval.jsonl")[: args.eval]
    return tokenizer, batches, evaluation


def _hf_model(args):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    return model


def _lr_at(args, peak: float, step: int) -> float:
    """The demo's schedule for every method: linear warm-up, then cosine decay (HF conventions).

    Without warm-up, plain SGD at lr 0.01 diverges on this model in its first
    steps (loss 3 -> 39 in three steps, measured); with it, it trains.
    """
    from lomo_runtime.schedule import LRSchedule

    return LRSchedule("cosine", peak, args.warmup_steps, args.steps, 0.0).lr_at(step)


def _set_lr(param_groups, lr: float) -> None:
    for group in param_groups:
        group["lr"] = lr


class _Method:
    """What a worker needs from a method: a model to call, a training step, and a close."""

    def __init__(self, model, step, close=lambda: None, info=None):
        self.model, self.step, self.close, self.info = model, step, close, info or {}


def _setup_adamw(args) -> _Method:
    import torch

    model = _hf_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.adamw_lr, weight_decay=0.0)

    def step(index, ids, labels):
        _set_lr(optimizer.param_groups, _lr_at(args, args.adamw_lr, index))
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return _Method(model, step)


def _setup_lomo(args) -> _Method:
    from lomo_optim import Lomo

    model = _hf_model(args)
    optimizer = Lomo(model, lr=args.lr)

    def step(index, ids, labels):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.fused_backward(loss, _lr_at(args, args.lr, index))
        return float(loss.detach())

    return _Method(model, step)


def _deepspeed_copy_gathered_nvme_params() -> None:
    """Give every gathered NVMe parameter its own full tensor, as a GPU run would.

    DeepSpeed 0.19.8 bug on the CPU accelerator with one rank (the only patch in this
    benchmark, and it patches nothing but this): with a partition world size of 1 the
    all-gather is skipped and `NoGatherHandle` / `NoGatherCoalescedHandle`
    (runtime/zero/partition_parameters.py:74 and :105) set
    `param.data = param.ds_tensor.data.to(current_device)`. On a GPU that `.to` copies the
    partition out of its pinned swap buffer; on the CPU it returns the same tensor, so the
    full parameter *is* a slice of the NVMe swap buffer. When the module is released
    (`remove_partition_and_release_buffers`, swap_tensor/partitioned_param_swapper.py:236)
    the buffer goes back to the pool and the next `swap_in` reads another parameter into
    it, while autograd still holds the old view for backward. Training runs, but with
    the wrong weights in backward: on a 2-layer Llama every gradient before the last MLP
    came out with random signs (sign agreement with torch 0.5). Cloning restores the
    GPU semantics (a private full tensor, freed on release) and reproduces DeepSpeed's
    own in-memory ZeRO-3 losses bit for bit. Only NVMe partitions are copied; a
    CPU-resident partition has storage of its own, so aliasing it is harmless.
    """
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    original = partition_parameters._no_gather_coalesced
    if getattr(original, "copies_nvme_params", False):
        return

    def no_gather_coalesced(params):
        params = list(params)
        handle = original(params)  # sets param.data to a view of the partition
        for param in params:
            if getattr(param.ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme:
                param.data = param.data.clone()
        return handle

    no_gather_coalesced.copies_nvme_params = True
    # all_gather_coalesced looks this module global up at call time, so this reaches every gather.
    partition_parameters._no_gather_coalesced = no_gather_coalesced


def _setup_deepspeed(args) -> _Method:
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # One process on the CPU accelerator; the shared-memory comm op would JIT-build
    # for about 85 s and is useless with one rank, so plain gloo is used.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _deepspeed_copy_gathered_nvme_params()
    nvme = Path(args.scratch) / "deepspeed-nvme"
    nvme.mkdir(parents=True, exist_ok=True)
    # Every swap buffer holds the largest tensor: the tied embedding, 49152 x 576 = 28.3M
    # elements, 113 MB. The buffers are mlock'ed, so each one is resident (counted in RSS).
    largest = _largest_tensor_numel(args.model)
    config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        # DeepSpeed's own CPU AdamW (cpu_adam op, JIT-built on first use, about 2 min).
        "optimizer": {"type": "AdamW", "params": {"lr": args.adamw_lr, "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": 3,
            # Parameters on NVMe through the async_io op (libaio, loads here). Only tensors
            # of at least 1 MiB are swapped (swap_tensor/utils.py MIN_AIO_BYTES): the
            # embedding and q/o/gate/up/down of each block; k/v and norms stay in memory.
            # max_in_cpu 0: no flat copy of the parameters kept in memory. Each module
            # fetch needs one buffer (every swapped tensor is a leaf Linear's or the tied
            # embedding's weight); 2 buffers trained correctly on a tiny Llama, the third
            # lets the next weight be read ahead.
            "offload_param": {
                "device": "nvme", "nvme_path": str(nvme), "pin_memory": False,
                "buffer_count": 3, "buffer_size": largest, "max_in_cpu": 0,
            },
            # The cause of "Not enough buffers 0 for swapping 1" at step 2: with a complete
            # trace (from step 2 on) a released module keeps every parameter it will use
            # again within stage3_max_reuse_distance elements (default 1e9, more than the
            # model's 135M; partitioned_param_coordinator.py __params_to_release), and
            # with activation checkpointing every parameter is used again in backward, so
            # forward never gives a swap buffer back and any buffer_count below the number
            # of swapped tensors (151 here) runs dry. 0 releases each module after use.
            "stage3_max_reuse_distance": 0,
            # ZeRO-Infinity: fp32 master weights, gradients and AdamW moments on NVMe too,
            # swapped one sub-group at a time through buffer_count pinned buffers of
            # sub_group_size elements (4 = weights, two moments, gradient). The default
            # 1e9 would make all 135M parameters one sub-group: 4 x 540 MB pinned, plus a
            # 540 MB buffer for writing the updated weights back. Sub-groups of the
            # largest tensor bound both to its size.
            "offload_optimizer": {"device": "nvme", "nvme_path": str(nvme), "pin_memory": False,
                                  "buffer_count": 4},
            "sub_group_size": largest,
            # Gradients are copied into a reduce bucket of this many elements (default 5e8,
            # 2 GB, touched up to the model's 135M = 540 MB) before landing in the
            # full-model fp32 gradient partition that ZeRO-3 keeps in memory anyway.
            "reduce_bucket_size": largest,
            "stage3_param_persistence_threshold": 0,
        },
        "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True,
                "intra_op_parallelism": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    keep = HfDeepSpeedConfig(config)  # noqa: F841  (must stay alive: from_pretrained partitions under zero.Init)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=__import__("torch").float32)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.train()

    def step(index, ids, labels):
        _set_lr(engine.optimizer.param_groups, _lr_at(args, args.adamw_lr, index))
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    info = {"deepspeed": deepspeed.__version__, "config": config,
            "patch": "partition_parameters._no_gather_coalesced copies gathered NVMe params (CPU, one rank)"}

    def close():
        # Proof that parameters really live on NVMe: the swap files DeepSpeed holds there.
        info["nvme_bytes"] = sum(f.stat().st_size for f in nvme.rglob("*") if f.is_file())
        engine.destroy() if hasattr(engine, "destroy") else None

    return _Method(engine, step, close, info)


def _largest_tensor_numel(model_dir: str) -> int:
    from lomo_runtime.checkpoint import Checkpoint

    ckpt = Checkpoint.open(model_dir)
    return max(loc.entry.nbytes // 4 for loc in ckpt.tensors.values())


def _setup_lomo_run(args, streamed: bool) -> _Method:
    from lomo_runtime import SGD, Runtime
    from lomo_runtime.checkpoint import Checkpoint
    from lomo_runtime.io import align_up

    work = Path(args.scratch) / ("store-streamed" if streamed else "store-resident")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    info: dict = {}
    budget = None
    if streamed:
        # Unit bytes as the store lays them out (every tensor 4 KiB-aligned).
        ckpt = Checkpoint.open(args.model)
        units = {u.name: sum(align_up(ckpt.tensors[t].entry.nbytes) for t in u.tensor_names) for u in ckpt.units}
        weights = sum(units.values())
        quarter = weights // 4
        # Tied embeddings: the embedding stays resident from the head's backward to its own,
        # so a step needs at least the embedding plus the largest other unit at once.
        minimum = units["embed"] + max(v for k, v in units.items() if k != "embed")
        budget = max(quarter, minimum)
        info = {"weights_bytes": weights, "quarter_bytes": quarter, "minimum_bytes": minimum, "budget_bytes": budget,
                "budget_is_quarter": budget == quarter}
    extra = json.loads(getattr(args, "runtime_kwargs", None) or "{}")  # tools/bench_ab.py's variants
    rt = Runtime(args.model, SGD(lr=args.lr), work_dir=work, weights_budget=budget, **extra)

    def step(index, ids, labels):
        loss = rt.model(input_ids=ids, labels=labels).loss
        rt.backward(loss, lr=_lr_at(args, args.lr, index))
        return float(loss.detach())

    def close():
        info.update(io_read_bytes=rt.scheduler.stats.read_bytes, io_write_bytes=rt.scheduler.stats.write_bytes)
        rt.close()

    return _Method(rt.model, step, close, info)


def run_worker(args) -> None:
    """Train one method for `args.steps` steps, evaluate, write JSON to `args.result`."""
    if args.worker == "deepspeed":
        for key, value in {"DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(args.port)}.items():
            os.environ.setdefault(key, value)
    import torch

    from lomo_runtime.evaluation import score_choices
    from lomo_runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gate = _Gate(args.lockstep_fd)
    tokenizer, batches, evaluation = _data(args)
    gate.wait()  # setup
    started = time.perf_counter()
    setup = {
        "adamw": _setup_adamw, "lomo": _setup_lomo, "deepspeed": _setup_deepspeed,
        "resident": lambda a: _setup_lomo_run(a, streamed=False), "streamed": lambda a: _setup_lomo_run(a, streamed=True),
    }[args.worker]
    method = setup(args)
    setup_s = time.perf_counter() - started
    setup_peak = peak_rss_bytes()
    gate.done()
    steps = []
    train_started = time.perf_counter()
    for index in range(args.steps):
        ids, labels = next(batches)
        gate.wait()
        reset_peak_rss()
        t0 = time.perf_counter()
        loss = method.step(index, ids, labels)
        elapsed = time.perf_counter() - t0
        steps.append({"step": index + 1, "loss": loss, "step_s": elapsed, "t_s": time.perf_counter() - train_started,
                      "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": current_rss_bytes()})
        print(f"[{args.worker}] step {index + 1}/{args.steps} loss {loss:.4f} {elapsed:.2f} s "
              f"peak {steps[-1]['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        gate.done()
    tokens = args.batch_size * args.seq_len
    timed = [s["step_s"] for s in steps[1:]] or [steps[0]["step_s"]]
    gate.wait()  # evaluation
    t0 = time.perf_counter()
    model = method.model
    if hasattr(model, "eval"):
        model.eval()
    scored = score_choices(model, tokenizer, evaluation, batch_size=16) if evaluation else None
    eval_s = time.perf_counter() - t0
    method.close()
    result = {
        "method": args.worker, "label": LABELS[args.worker], "steps": steps, "setup_s": setup_s,
        "setup_peak_rss_bytes": setup_peak,
        "train_peak_rss_bytes": max(s["peak_rss_bytes"] for s in steps),
        "tokens_per_step": tokens, "tokens_per_s": tokens * len(timed) / sum(timed),
        "median_step_s": statistics.median(timed), "final_loss": steps[-1]["loss"],
        "final_loss_mean_last5": statistics.mean(s["loss"] for s in steps[-5:]),
        "accuracy": scored.accuracy if scored else None, "eval_loss": scored.loss if scored else None,
        "eval_examples": len(evaluation), "eval_s": eval_s,
        "info": method.info,
    }
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    gate.done()


class _Gate:
    """A worker's turn in lock-step runs (`--interleave step`): `wait` blocks until the parent
    says go (a line on stdin), `done` tells it the phase is over (a byte on the ack pipe).
    Without a pipe (`--interleave run`) both are no-ops."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def wait(self) -> None:
        if self.fd is not None and not sys.stdin.readline():
            sys.exit("lock-step parent went away")

    def done(self) -> None:
        if self.fd is not None:
            os.write(self.fd, b".")


# =========================================================================== parent (all methods)


def _zero_shot(args) -> dict:
    """Accuracy of the untrained model, through the same evaluation code (in a subprocess)."""
    code = (
        "import json,sys,torch;torch.set_num_threads(%d);"
        "from transformers import AutoModelForCausalLM;"
        "from lomo_runtime.data import load_tokenizer;"
        "from lomo_runtime.evaluation import load_choice_examples,score_choices;"
        "m=AutoModelForCausalLM.from_pretrained(%r).eval();"
        "ex=load_choice_examples(%r)[:%d];r=score_choices(m,load_tokenizer(%r),ex,16);"
        "print(json.dumps({'accuracy':r.accuracy,'eval_loss':r.loss}))"
    ) % (args.threads, args.model, str(Path(args.data) / "sentiment-eval.jsonl"), args.eval, args.model)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


ALTERNATED = ("lomo", "resident", "streamed")


def _report(method: str, result: dict, note: str = "") -> None:
    acc = result.get("accuracy")
    status = result.get("error") or (f"acc {acc:.3f}, " if acc is not None else "") + \
        f"{result['tokens_per_s']:.0f} tok/s, peak {_gib(result['train_peak_rss_bytes'])}"
    print(f"{method}{note}: {status} ({result['wall_s']:.0f} s)", flush=True)


def step_ratios(num_steps: list[dict], den_steps: list[dict]) -> list[float]:
    """Per timed step k (step 1 warms up): den's step k time / num's, num's speed relative to den's."""
    return [d["step_s"] / n["step_s"] for n, d in zip(num_steps[1:], den_steps[1:])]


def quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4) if len(values) > 1 else values * 3


def _alternation(rounds: dict[str, list[dict]], per_step: bool = False) -> dict:
    """Median tokens/s per alternated method over rounds, and each ratio: the median of the
    per-round ratios, or with `per_step` (lock-step runs) the median over every timed step k of
    every round of (den's step k time) / (num's step k time)."""
    ok = {m: [r for r in rs if "error" not in r] for m, rs in rounds.items() if m in ALTERNATED}
    tps = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in ok.items() if rs}
    ratios = {}
    for name, (num, den) in {"resident_vs_lomo": ("resident", "lomo"), "streamed_vs_lomo": ("streamed", "lomo"),
                             "streamed_vs_resident": ("streamed", "resident")}.items():
        pairs = list(zip(ok.get(num, []), ok.get(den, [])))
        if pairs:
            per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]
            ratios[name] = {"median": statistics.median(per_round), "rounds": per_round}
            if per_step:
                steps = [r for a, b in pairs for r in step_ratios(a["steps"], b["steps"])]
                ratios[name].update(median=statistics.median(steps), steps=steps, quartiles=quartiles(steps))
    return {"tokens_per_s": tps, "ratios": ratios, "per_step": per_step}


def _worker_cmd(args, method: str, out: Path, result_file: Path) -> list[str]:
    return [sys.executable, __file__, "--worker", method, "--result", str(result_file), "--scratch", str(out / "scratch"),
            "--model", args.model, "--data", args.data, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--eval", str(args.eval), "--lr", str(args.lr),
            "--adamw-lr", str(args.adamw_lr), "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads),
            "--port", str(args.port)]


def _collect(method: str, returncode: int, result_file: Path, log: Path, wall: float) -> dict:
    if returncode != 0 or not result_file.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
        return {"method": method, "label": LABELS.get(method, method), "error": error.strip()[:400], "returncode": returncode,
                "wall_s": wall, "log": str(log)}
    result = json.loads(result_file.read_text())
    result["wall_s"] = wall
    return result


def run_method(args, method: str, out: Path, tag: str = "") -> dict:
    """One method on its own, start to end."""
    result_file = out / f"{method}{tag}.json"
    result_file.unlink(missing_ok=True)
    log = out / f"{method}{tag}.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run(_worker_cmd(args, method, out, result_file), stdout=handle, stderr=subprocess.STDOUT,
                              cwd=REPO, timeout=args.timeout if args.timeout > 0 else None)
    return _collect(method, proc.returncode, result_file, log, time.perf_counter() - started)


def run_lockstep(args, methods: list[str], out: Path, tag: str = "") -> dict[str, dict]:
    """All `methods` alive at once, taking turns one phase at a time (setup, each step, evaluation):
    only one computes at any moment, and step k of every method lands within seconds of the others',
    so a slow minute on this shared machine hits them alike. The order rotates every phase."""
    workers = {m: (_worker_cmd(args, m, out, out / f"{m}{tag}.json"), None, out / f"{m}{tag}.json", out / f"{m}{tag}.log")
               for m in methods}
    done = drive_lockstep(workers, args.steps + 2, args.timeout)  # setup, steps, evaluation
    return {m: _collect(m, rc, workers[m][2], workers[m][3], busy) for m, (rc, busy) in done.items()}


def drive_lockstep(workers: dict[str, tuple[list[str], dict | None, Path, Path]], phases: int,
                   timeout: float = 0) -> dict[str, tuple[int, float]]:
    """Run worker processes (name -> (command, environment or None, result file, log)) in lock-step:
    each gets "go" on stdin in turn, one phase at a time, and answers a byte on `--lockstep-fd`
    when its phase is done; the order rotates every phase. `timeout` (0: none) bounds each worker's
    busy seconds. Returns name -> (return code, busy seconds). Also used by tools/bench_ab.py."""
    live = {}
    for name, (cmd, env, result_file, log) in workers.items():
        result_file.unlink(missing_ok=True)
        ack_r, ack_w = os.pipe()
        handle = log.open("w")
        proc = subprocess.Popen(cmd + ["--lockstep-fd", str(ack_w)], stdin=subprocess.PIPE, stdout=handle,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env, pass_fds=(ack_w,), text=True)
        os.close(ack_w)
        live[name] = {"proc": proc, "ack": ack_r, "handle": handle, "busy_s": 0.0, "alive": True}
    names = list(workers)
    for phase in range(phases):
        turn = names[phase % len(names):] + names[:phase % len(names)]
        for name in turn:
            w = live[name]
            if not w["alive"]:
                continue
            started = time.perf_counter()
            try:
                w["proc"].stdin.write("go\n")
                w["proc"].stdin.flush()
                left = timeout - w["busy_s"] if timeout > 0 else None
                ready, _, _ = select.select([w["ack"]], [], [], None if left is None else max(0.0, left))
                w["alive"] = bool(ready) and os.read(w["ack"], 1) == b"."  # EOF: the worker failed
            except BrokenPipeError:
                w["alive"] = False
            w["busy_s"] += time.perf_counter() - started
            if not w["alive"] and w["proc"].poll() is None:
                w["proc"].kill()  # past its timeout
    done = {}
    for name, w in live.items():
        w["proc"].stdin.close()
        returncode = w["proc"].wait()
        w["handle"].close()
        os.close(w["ack"])
        done[name] = (returncode, w["busy_s"])
    return done


def _score(x: float | None) -> str:
    return "not scored" if x is None else f"{x:.3f}"  # --eval 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(results: list[dict], zero_shot: dict) -> str:
    rows = ["| method | peak RSS (training) | tokens/s | final loss (mean of last 5) | accuracy | held-out loss |",
            "|---|---:|---:|---:|---:|---:|"]
    if "accuracy" in zero_shot:
        rows.append(f"| zero-shot (no training) | | | | {zero_shot['accuracy']:.3f} | {zero_shot['eval_loss']:.3f} |")
    for r in results:
        if "error" in r:
            rows.append(f"| {r['label']} | did not run: `{r['error']}` | | | | |")
            continue
        rows.append(f"| {r['label']} | {_gib(r['train_peak_rss_bytes'])} | {r['tokens_per_s']:.0f} | "
                    f"{r['final_loss']:.3f} ({r['final_loss_mean_last5']:.3f}) | {_score(r['accuracy'])} | {_score(r['eval_loss'])} |")
    return "\n".join(rows)


def ratios(results: list[dict]) -> list[str]:
    by = {r["method"]: r for r in results if "error" not in r}
    if "streamed" not in by:
        return []
    s = by["streamed"]
    lines = []
    for name, r in by.items():
        if name == "streamed":
            continue
        lines.append(f"- vs {r['label']}: peak memory x{s['train_peak_rss_bytes'] / r['train_peak_rss_bytes']:.2f}, "
                     f"tokens/s x{s['tokens_per_s'] / r['tokens_per_s']:.2f}")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        if "error" in r:
            continue
        t = [s["t_s"] for s in r["steps"]]
        ax_loss.plot(t, [s["loss"] for s in r["steps"]], marker=".", label=r["label"])
        ax_mem.plot(t, [s["peak_rss_bytes"] / 2**30 for s in r["steps"]], marker=".", label=r["label"])
    ax_loss.set(xlabel="training time (s)", ylabel="training loss", title="Loss over time")
    ax_mem.set(xlabel="training time (s)", ylabel="peak RSS per step (GiB)", title="Memory over time")
    ax_mem.set_ylim(bottom=0)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _alternation_lines(args, alternation: dict) -> list[str]:
    ratios = alternation.get("ratios", {})
    if not ratios:
        return []
    names = {"resident_vs_lomo": "lomo-run all-resident / lomo-optim Lomo",
             "streamed_vs_lomo": "lomo-run streamed / lomo-optim Lomo",
             "streamed_vs_resident": "lomo-run streamed / lomo-run all-resident"}
    if alternation.get("per_step"):
        lines = [f"tokens/s measured in lock-step ({args.rounds} round(s); lomo, resident and streamed alive at once, "
                 "one step each in turn, the order rotating every step, so step k of each lands within seconds of "
                 "the others'). Each ratio is the median over every timed step k of (the other's step k time) / "
                 "(this one's step k time), with its quartiles; the table's tokens/s for these rows is the median "
                 "over rounds:", ""]
    else:
        lines = [f"tokens/s measured in alternation ({args.rounds} rounds of lomo, resident, streamed; the table's "
                 "tokens/s for these rows is the median over rounds; each ratio is the median of the per-round ratios):", ""]
    for key, label in names.items():
        if key not in ratios:
            continue
        r = ratios[key]
        rounds = ", ".join(f"{x:.3f}" for x in r["rounds"])
        if "steps" in r:
            q1, _, q3 = r["quartiles"]
            lines.append(f"- {label}: **x{r['median']:.3f}** over {len(r['steps'])} steps (quartiles {q1:.3f}, {q3:.3f}; "
                         f"whole-run ratio per round: {rounds})")
        else:
            lines.append(f"- {label}: **x{r['median']:.3f}** (rounds: {rounds})")
    return lines + [""]


def write_markdown(path: Path, args, results: list[dict], zero_shot: dict, command: str, png: Path,
                   alternation: dict | None = None) -> None:
    ok = [r for r in results if "error" not in r]
    streamed = next((r for r in ok if r["method"] == "streamed"), None)
    budget = ""
    if streamed:
        info = streamed["info"]
        budget = (f"Streamed budget: {info['budget_bytes'] / 1e6:.1f} MB of {info['weights_bytes'] / 1e6:.1f} MB of weights "
                  + ("(a quarter)." if info["budget_is_quarter"] else
                     f"(a quarter, {info['quarter_bytes'] / 1e6:.1f} MB, is below the minimum a step needs, "
                     "embedding + one block, so the minimum is used)."))
    lines = [
        "# Side-by-side benchmark",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPU cores, {args.threads} torch threads, Python {platform.python_version()}.",
        "",
        f"Model: SmolLM2-135M-Instruct (dequantised to fp32, 134.5M parameters, tied embeddings). Data: balanced "
        f"tweet sentiment, {args.steps} steps of {args.batch_size} packed sequences x {args.seq_len} tokens; "
        f"accuracy and held-out loss on {args.eval} balanced held-out examples (multiple choice between "
        f"\" positive\" and \" negative\"). Peak learning rate {args.lr} for SGD, {args.adamw_lr} for AdamW, "
        f"{args.warmup_steps} warm-up steps then cosine decay, for every method. "
        "Every method uses activation checkpointing. Each method ran in its own process; peak RSS is the exact "
        "high-water mark (VmHWM) over the training steps, excluding model loading. tokens/s counts all input "
        "tokens over steps 2..N.",
        "",
        table(results, zero_shot),
        "",
        budget,
        "",
        *_alternation_lines(args, alternation or {}),
        "Headline ratios, lomo-run streamed against each alternative (below 1 = less memory / fewer tokens/s):",
        "",
        *ratios(results),
        "",
        f"![loss and memory over time]({png.as_posix()})",
        "",
        "Setup (model load, store creation, DeepSpeed initialisation) is not in the table:",
        "",
        *[f"- {r['label']}: setup {r['setup_s']:.0f} s, setup peak RSS {_gib(r['setup_peak_rss_bytes'])}, "
          f"eval {r['eval_s']:.0f} s" for r in ok],
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=".cache/smollm2-135m")
    parser.add_argument("--data", default=".cache/demo")
    parser.add_argument("--out", default=".cache/bench-side-by-side")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval", type=int, default=200, help="held-out examples scored after training")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (lomo, resident, streamed)")
    parser.add_argument("--adamw-lr", type=float, default=2e-5, help="AdamW learning rate (adamw, deepspeed)")
    parser.add_argument("--warmup-steps", type=int, default=4, help="linear warm-up, then cosine decay, for every method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per method (0: none)")
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--write-md", action="store_true", help="rewrite BENCHMARKS.md and benchmarks/side_by_side.*")
    parser.add_argument("--rounds", type=int, default=1, help="run lomo, resident and streamed this many times, alternating")
    parser.add_argument("--interleave", choices=("step", "run"), default="step",
                        help="step: lomo, resident and streamed alive at once, taking turns step by step; "
                             "run: each runs start to end in turn")
    parser.add_argument("--previous", default="", help="methods whose row is copied from the last benchmarks/side_by_side.json")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--lockstep-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--runtime-kwargs", help=argparse.SUPPRESS)  # JSON: extra Runtime arguments (bench_ab.py)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    for needed in (Path(args.model) / "config.json", Path(args.data) / "sentiment-train.jsonl"):
        if not needed.exists():
            sys.exit(f"{needed} is missing: run tools/build_smollm2.py and tools/build_demo_data.py first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python tools/" + Path(__file__).name + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    zero_shot = _zero_shot(args)
    print(f"zero-shot: {zero_shot}", flush=True)
    previous = [m for m in args.previous.split(",") if m]
    old = json.loads((REPO / "benchmarks" / "side_by_side.json").read_text()) if previous else {}
    rounds: dict[str, list[dict]] = {}
    alternated = [m for m in args.methods.split(",") if m in ALTERNATED and m not in previous]
    lockstep = args.interleave == "step" and len(alternated) > 1
    by_method: dict[str, dict] = {}
    for method in args.methods.split(","):
        if method in previous:
            row = next(r for r in old["results"] if r["method"] == method)
            if "(previous run" not in row["label"]:  # carried over twice: keep the date of the run that measured it
                row = {**row, "label": row["label"] + f" (previous run, {old.get('date', 'earlier')}; not re-run)"}
            by_method[method] = row
            continue
        if lockstep and method in alternated:
            continue  # below, together
        by_method[method] = run_method(args, method, out)
        rounds.setdefault(method, []).append(by_method[method])
        _report(method, by_method[method])
    later = argparse.Namespace(**{**vars(args), "eval": 0})
    if lockstep:
        for index in range(args.rounds):
            tag = f"-round{index + 1}" if index else ""
            got = run_lockstep(later if index else args, alternated, out, tag=tag)
            for method in alternated:
                by_method.setdefault(method, got[method])
                rounds.setdefault(method, []).append(got[method])
                _report(method, got[method], f" (lock-step round {index + 1})")
    else:
        for index in range(1, args.rounds):
            for method in alternated:
                result = run_method(later, method, out, tag=f"-round{index + 1}")
                rounds[method].append(result)
                _report(method, result, f" (round {index + 1})")
    results = [by_method[m] for m in args.methods.split(",") if m in by_method]
    alternation = _alternation(rounds, per_step=lockstep)
    for r in results:
        if r["method"] in alternation["tokens_per_s"]:
            r["tokens_per_s_rounds"] = [x.get("tokens_per_s") for x in rounds[r["method"]]]
            r["tokens_per_s"] = alternation["tokens_per_s"][r["method"]]
    summary = {"command": command, "date": time.strftime("%Y-%m-%d"), "args": vars(args), "zero_shot": zero_shot,
               "results": results, "alternation": alternation}
    print(json.dumps(alternation, indent=1))
    (out / "side_by_side.json").write_text(json.dumps(summary, indent=1, default=str))
    png = out / "side_by_side.png"
    plot(results, png)
    print(table(results, zero_shot))
    print("\n".join(ratios(results)))
    if args.write_md:
        target = REPO / "benchmarks"
        target.mkdir(exist_ok=True)
        (target / "side_by_side.json").write_text(json.dumps(summary, indent=1, default=str))
        plot(results, target / "side_by_side.png")
        write_markdown(REPO / "BENCHMARKS.md", args, results, zero_shot, command, Path("benchmarks/side_by_side.png"),
                       alternation)
        print(f"wrote {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
