"""The GPU check of lomo-run's device path: one GPU, at most 8 minutes, one table and one JSON line.

    PYTHONPATH=. python tools/gpu_check.py --work /tmp/gpu-check [--steps 4] [--json-out FILE]

Runs from the source tree on a machine with its own torch (CUDA), transformers, safetensors,
psutil and click; needs nothing from a registry or a model hub (the models are random).

1. Exactness: a tiny Llama (fp32) streamed on `cuda` (device budget of one block, host budget of
   half the weights, the rest from the working store) with SGD and with AdamW, against the same
   Hugging Face model trained on `cuda` by torch.optim.SGD / torch.optim.AdamW (single-tensor):
   max abs difference of every weight (expected <= 1e-6; GPU matmuls may differ in the last bits
   between the streamed and the whole-model graphs, so the figure is printed, and the check fails
   above 1e-5).
2. Speed: a random Llama of about 1.5B parameters in bf16, batch 4 x seq 2048, SGD:
   plain PyTorch (the HF model, activation checkpointing, torch.optim.SGD) against lomo-run all
   resident, lomo-run with a device budget of a quarter of the weights and every unit in pinned
   host memory, and the same quarter with a small host budget (units streamed from NVMe).
   Tokens/s (median step), model FLOPs utilisation (6 x params x tokens / step time / the GPU's
   dense bf16 peak), H2D GB/s achieved (bytes over the copies' own CUDA-event durations, while
   compute runs) against the probed pinned bandwidth.
3. Memory: the planner's device peak (less the CUDA context it adds) against
   `torch.cuda.max_memory_allocated`, and its pinned host bytes against the staging pool's peak.

`--simulate` runs the same script on CPU with the tests' simulated device and a tiny model: it
checks the script itself (about 10 s), not the GPU.

The done-when of the GPU issue, checked at the end: streamed from pinned host >= 0.9x all
resident, H2D >= 80% of probed, all resident >= 0.95x plain PyTorch, planned device peak within
5% of measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lomo_runtime import SGD, Runtime  # noqa: E402
from lomo_runtime.device import CudaDevice, SimulatedDevice  # noqa: E402
from lomo_runtime.rules import AdamW  # noqa: E402

BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=26, num_attention_heads=16,
           num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
BATCH, SEQ = 4, 2048
LR = 1e-4


class Cuda:
    """The accelerator calls the check makes, on CUDA."""

    def device(self, timing: bool = False):
        return CudaDevice(timing=timing)

    def to(self, x):
        return x.cuda()

    def sync(self) -> None:
        torch.cuda.synchronize()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated()

    def total_memory(self) -> int:
        return torch.cuda.mem_get_info()[1]

    def name(self) -> str:
        return torch.cuda.get_device_name()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def probe_copies(self) -> tuple[float, float, str]:
        from lomo_runtime.probe import measure_copies

        return measure_copies(256 * 2**20, repeat=5)


class Simulated(Cuda):
    """`--simulate`: the same script on CPU with the tests' simulated device and a tiny model, so
    its own code is exercised before a GPU session spends device minutes on it. Figures are
    meaningless; the checks' verdicts too."""

    def device(self, timing: bool = False):
        device = SimulatedDevice(max_delay_s=0.001)
        device.copy_rates = lambda reset=True: {}
        return device

    def to(self, x):
        return x

    def sync(self) -> None:
        return None

    def reset_peak(self) -> None:
        return None

    def peak(self) -> int:
        return 0

    def total_memory(self) -> int:
        import psutil

        return psutil.virtual_memory().total

    def name(self) -> str:
        return "simulated device (CPU)"

    def empty_cache(self) -> None:
        return None

    def probe_copies(self) -> tuple[float, float, str]:
        return 1e9, 1e9, "simulated"


ACC: Cuda = Cuda()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_llama(path: Path, dtype: torch.dtype, device: str = "cpu", **config) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(bos_token_id=0, eos_token_id=1, **config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(path)
    del model
    ACC.empty_cache()
    return path


# ---- 1. exactness --------------------------------------------------------------------------------
def exactness(work: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model_dir = save_llama(work / "tiny", torch.float32, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                           max_position_embeddings=64, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 24), generator=gen) for _ in range(4)]
    results = {}
    for name, make_rule, make_opt in (
        ("sgd", lambda: SGD(lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
        ("adamw", lambda: AdamW(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
         lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)),
    ):
        ref = ACC.to(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
        ref.config.use_cache = False
        ref.train()
        opt = make_opt(ref.parameters())
        for ids in batches:
            ids = ACC.to(ids)
            opt.zero_grad()
            ref(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        expected = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
        del ref, opt
        with Runtime(model_dir, make_rule(), work_dir=work / f"sizes-{name}", device=ACC.device()) as rt:
            sizes = {n: u.nbytes for n, u in rt.scheduler.units.items()}
            minimum = rt.minimum_weights_budget()
            rt.close(commit=False)
        host = max(sum(sizes.values()) // 2, 2 * max(sizes.values()))
        with Runtime(model_dir, make_rule(), work_dir=work / f"exact-{name}", device=ACC.device(),
                     weights_budget=minimum, host_budget=host) as rt:
            for ids in batches:
                result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
                assert not result.dropped, result.reason
            reads = rt.scheduler.stats.reads
            diff = max((t.cpu() - expected[n]).abs().max().item() for n, t in rt.iter_weights())
        results[f"{name}_max_abs_diff"] = diff
        results[f"{name}_store_reads"] = reads
        log(f"exactness {name}: max abs diff {diff:.2e} (device budget {minimum} B, host {host} B, {reads} reads)")
    return results


# ---- 2. speed ------------------------------------------------------------------------------------
def _timed_steps(step, steps: int, warmup: int = 2) -> list[float]:
    times = []
    for i in range(warmup + steps):
        ACC.sync()
        started = time.perf_counter()
        step()
        ACC.sync()
        if i >= warmup:
            times.append(time.perf_counter() - started)
        if i == warmup - 1:
            ACC.reset_peak()
    return times


def plain_pytorch(model_dir: Path, batches, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = ACC.to(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16))
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    it = iter(batches * 100)

    def step() -> None:
        ids = ACC.to(next(it))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = _timed_steps(step, steps)
    peak = ACC.peak()
    model = opt = None  # noqa: F841 (freed before the next configuration)
    ACC.empty_cache()
    return {"step_s": statistics.median(times), "peak_device_bytes": peak}


def lomo(model_dir: Path, work: Path, batches, steps: int, weights_budget, host_budget) -> dict:
    device = ACC.device(timing=True)
    rt = Runtime(model_dir, SGD(lr=LR), work_dir=work, device=device, dtype=torch.bfloat16,
                 weights_budget=weights_budget, host_budget=host_budget, commit_every=10_000)
    it = iter(batches * 100)
    try:
        def step() -> None:
            ids = next(it)
            result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            assert not result.dropped, result.reason

        for _ in range(2):
            step()
        ACC.sync()
        device.copy_rates(reset=True)
        h2d0, reads0 = rt._tier.dev_stats.h2d_bytes, rt.scheduler.stats.read_bytes
        rt.reset_peaks()
        times = _timed_steps(step, steps, warmup=0)
        rates = device.copy_rates(reset=True)
        report = rt.memory_report()
        return {
            "step_s": statistics.median(times),
            "peak_device_bytes": report["peak_device_bytes"],
            "device_weights_peak_bytes": report["weights_resident_peak_bytes"],
            "pinned_host_bytes": report["pinned_host_bytes"],
            "h2d_bytes_per_step": (rt._tier.dev_stats.h2d_bytes - h2d0) / steps,
            "disk_read_bytes_per_step": (rt.scheduler.stats.read_bytes - reads0) / steps,
            "h2d_achieved_bps": rates.get("h2d", 0.0),
            "d2h_achieved_bps": rates.get("d2h", 0.0),
            "weights_budget": rt.weights_budget,
            "host_budget": rt.host_budget,
        }
    finally:
        rt.close(commit=False)
        rt = None  # noqa: F841
        ACC.empty_cache()


def planned(config: dict, weights_budget, host_budget) -> dict:
    from transformers import LlamaConfig

    from lomo_runtime.planner import RunConfig, plan
    from lomo_runtime.planner.spec import ModelSpec
    from lomo_runtime.probe import load_machine

    spec = ModelSpec.from_config(LlamaConfig(**config).to_dict(), "bf16", "sgd")
    total_memory = ACC.total_memory()
    run = RunConfig(seq_len=SEQ, batch_size=BATCH, dtype="bf16", rule="sgd", device="cuda",
                    memory_budget=total_memory, weights_budget=weights_budget, host_budget=host_budget)
    p = plan(spec, run, load_machine("cuda", "bf16", gpu="h200", device_memory=total_memory))
    # max_memory_allocated counts the caching allocator's tensors, not the CUDA context: compare
    # it with the plan's device peak less its framework (context) bytes, the same categories.
    return {"peak_device_bytes": p.peak_device_bytes - p.memory["framework_bytes"],
            "device_framework_bytes": p.memory["framework_bytes"], "pinned_host_bytes": p.memory["staging_bytes"]}


def speed(work: Path, steps: int) -> dict:
    from lomo_runtime.planner.gpus import gpu as gpu_named

    log("saving a random 1.5B Llama (bf16)")
    model_dir = save_llama(work / "big", torch.bfloat16, device="cpu" if isinstance(ACC, Simulated) else "cuda", **BIG)
    from transformers import AutoConfig

    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(2, BIG["vocab_size"], (BATCH, SEQ), generator=gen) for _ in range(4)]
    h2d_probe, d2h_probe, pinned = ACC.probe_copies()
    log(f"probed pinned copies ({pinned}): H2D {h2d_probe / 1e9:.1f} GB/s, D2H {d2h_probe / 1e9:.1f} GB/s")
    config = AutoConfig.from_pretrained(model_dir)
    params = (config.vocab_size * config.hidden_size * 2 + config.hidden_size
              + config.num_hidden_layers * (4 * config.hidden_size ** 2 + 3 * config.hidden_size * config.intermediate_size
                                            + 2 * config.hidden_size))
    weights = params * 2
    name = ACC.name()
    gpu = "h200" if "H200" in name else "h100" if "H100" in name else "a100" if "A100" in name else None
    peak_flops = gpu_named(gpu).peak_flops["bf16"] if gpu else None

    runs = {}
    log("plain PyTorch (HF model, activation checkpointing, torch.optim.SGD)")
    runs["pytorch"] = plain_pytorch(model_dir, batches, steps)
    quarter = weights // 4
    largest = (config.vocab_size * config.hidden_size * 2)  # the embedding (and the head) in bf16
    for label, wb, hb in (("resident", None, None), ("pinned_quarter", quarter, None),
                          ("nvme_quarter", quarter, max(quarter, 3 * largest))):
        log(f"lomo-run {label}: device weights budget {wb}, host budget {hb}")
        runs[label] = lomo(model_dir, work / f"store-{label}", batches, steps, wb, hb)
        runs[label]["planned"] = planned(BIG, runs[label]["weights_budget"], runs[label]["host_budget"])
    tokens = BATCH * SEQ
    for r in runs.values():
        r["tokens_per_s"] = tokens / r["step_s"]
        r["mfu"] = 6 * params * tokens / r["step_s"] / peak_flops if peak_flops else None
    return {"params": params, "gpu": name, "peak_bf16_flops": peak_flops, "h2d_probed_bps": h2d_probe,
            "d2h_probed_bps": d2h_probe, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help="scratch directory (models, working stores)")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per configuration")
    parser.add_argument("--json-out", default=None, help="also write the JSON here")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--simulate", action="store_true",
                        help="run on CPU with the simulated device and a tiny model (checks the script, not the GPU)")
    args = parser.parse_args()
    global ACC, BIG, BATCH, SEQ
    if args.simulate:
        ACC = Simulated()
        BIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
        BATCH, SEQ = 2, 64
    elif not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="lomo-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda}
    out["exactness"] = exactness(work)
    if not args.skip_speed:
        out["speed"] = speed(work, args.steps)
    out["wall_s"] = time.perf_counter() - started

    print()
    ex = out["exactness"]
    print(f"exactness (fp32 tiny Llama, streamed on cuda vs torch.optim on cuda): "
          f"SGD {ex['sgd_max_abs_diff']:.2e}, AdamW {ex['adamw_max_abs_diff']:.2e}")
    checks = {"exact_sgd": ex["sgd_max_abs_diff"] <= 1e-5, "exact_adamw": ex["adamw_max_abs_diff"] <= 1e-5}
    if "speed" in out:
        sp = out["speed"]
        runs = sp["runs"]
        print(f"{sp['gpu']}: {sp['params'] / 1e9:.2f}B params bf16, batch {BATCH} x {SEQ}; "
              f"probed H2D {sp['h2d_probed_bps'] / 1e9:.1f} GB/s")
        print(f"{'run':<16}{'tokens/s':>10}{'MFU':>7}{'H2D GB/s':>10}{'peak dev GiB':>14}{'planned GiB':>13}"
              f"{'pinned GiB':>12}{'planned':>9}{'disk GB/step':>14}")
        for label, r in runs.items():
            pl = r.get("planned", {})
            gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"  # noqa: E731
            print(f"{label:<16}{r['tokens_per_s']:>10.0f}{(r['mfu'] or 0):>7.2f}"
                  f"{r.get('h2d_achieved_bps', 0) / 1e9:>10.1f}{gib(r['peak_device_bytes']):>14}"
                  f"{gib(pl.get('peak_device_bytes')):>13}{gib(r.get('pinned_host_bytes')):>12}"
                  f"{gib(pl.get('pinned_host_bytes')):>9}{r.get('disk_read_bytes_per_step', 0) / 1e9:>14.2f}")
        res, pin = runs["resident"], runs["pinned_quarter"]
        checks.update({
            "pinned_quarter_ge_0.9x_resident": pin["tokens_per_s"] >= 0.9 * res["tokens_per_s"],
            "h2d_ge_80pct_probed": pin["h2d_achieved_bps"] >= 0.8 * sp["h2d_probed_bps"],
            "resident_ge_0.95x_pytorch": res["tokens_per_s"] >= 0.95 * runs["pytorch"]["tokens_per_s"],
            "planned_peak_within_5pct": all(
                abs(r["planned"]["peak_device_bytes"] - r["peak_device_bytes"]) <= 0.05 * r["peak_device_bytes"]
                for k, r in runs.items() if k != "pytorch"),
        })
    out["checks"] = checks
    print("checks: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    line = json.dumps(out)
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
