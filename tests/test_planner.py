"""Planner: unit sizes, the scheduler replay, traced activations, the plan, the CLI, and measured accuracy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_model, tiny_config
from lomo_runtime.cli import main
from lomo_runtime.errors import DoesNotFit
from lomo_runtime.planner import Machine, ModelSpec, RunConfig, largest_fitting, plan
from lomo_runtime.planner.activations import _trace, trace_step
from lomo_runtime.planner.residency import min_weights_budget, simulate
from lomo_runtime.rules import SGD
from lomo_runtime.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
LLAMA_7B = ROOT / "configs" / "models" / "llama-7b"
MACHINE = Machine(host_memory_bytes=64 * 2**30, framework_bytes=390 * 2**20)


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMO_RUN_CACHE", str(tmp_path / "cache"))  # never read or write ~/.cache


def _run_steps(rt: Runtime, steps: int = 3, seq: int = 16) -> list[int]:
    ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(0))
    reads = []
    for _ in range(steps):
        before = rt.scheduler.stats.reads
        out = rt.model(input_ids=ids, labels=ids)
        rt.backward(out.loss)
        reads.append(rt.scheduler.stats.reads - before)
    return reads


@pytest.mark.parametrize("tied", [True, False])
def test_unit_bytes_match_the_working_store(tmp_path, tied):
    model = make_tiny_model(tmp_path, "llama", tied=tied)
    spec = ModelSpec.from_config(tiny_config("llama", tied=tied).to_dict())
    with Runtime(model, rule=SGD(lr=1e-3), work_dir=tmp_path / "w") as rt:
        assert {n: r.nbytes for n, r in rt.store.units.items()} == {u.name: u.nbytes for u in spec.units}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("budget", [None, 49152, 65536, 69632, 120000])
@pytest.mark.parametrize("commit_every", [1, 2, 10])
def test_replay_matches_the_scheduler(tmp_path, tied, budget, commit_every):
    """Reads per step, peak resident bytes and the staging pool's footprint, exactly."""
    model = make_tiny_model(tmp_path, "llama", tied=tied)
    # A budget makes the runtime cut blocks in two (Runtime._wants_split); the replay must know.
    spec = ModelSpec.from_config(tiny_config("llama", tied=tied).to_dict(), split=budget is not None)
    sim = simulate(spec, budget, depth=2, steps=3, commit_every=commit_every)
    if not sim.feasible:  # the runtime refuses such a budget before the first step
        with pytest.raises(DoesNotFit):
            Runtime(model, rule=SGD(lr=1e-3), work_dir=tmp_path / "w", weights_budget=budget)
        return
    with Runtime(model, rule=SGD(lr=1e-3), work_dir=tmp_path / "w", weights_budget=budget,
                 commit_every=commit_every) as rt:
        assert _run_steps(rt) == sim.reads_per_step
        assert rt.scheduler.stats.peak_resident_bytes == sim.peak_resident_bytes
        assert rt.pool.peak_bytes == sim.pool_bytes


def test_min_budget_holds_the_tied_embedding_beside_a_block():
    tied = ModelSpec.from_config(tiny_config("llama", tied=True).to_dict())
    untied = ModelSpec.from_config(tiny_config("llama", tied=False).to_dict())
    assert min_weights_budget(tied) == tied.unit("embed").nbytes + tied.unit("block.0").nbytes
    assert min_weights_budget(untied) == max(u.nbytes for u in untied.units)


@pytest.mark.parametrize("vocab", [128, 4096])
def test_activation_trace_extrapolates_linearly_in_depth(vocab):
    """Small vocab: block backwards dominate (2 B*T*H per block); large: the loss does (1 per block)."""
    config = tiny_config("llama", tied=True, hidden_size=64, intermediate_size=128, vocab_size=vocab).to_dict()
    spec5 = ModelSpec.from_config({**config, "num_hidden_layers": 5})
    direct, flops, _ = _trace(spec5, 2, 32, 5)
    predicted = trace_step(spec5, 2, 32)
    assert predicted.peak_bytes == max(direct.values()) and predicted.flops == flops
    assert predicted.per_block_bytes == (2 if vocab == 128 else 1) * 2 * 32 * 64 * 4


def test_fake_trace_agrees_with_real_tensors():
    spec = ModelSpec.from_config(tiny_config("llama", tied=True, hidden_size=64, intermediate_size=128).to_dict())
    fake, _, _ = _trace(spec, 2, 32, 2)
    real, _, _ = _trace(spec, 2, 32, 2, fake=False)
    assert abs(max(fake.values()) - max(real.values())) / max(real.values()) < 0.06


def test_llama_7b_matches_the_papers_arithmetic():
    """LLaMA-7B in fp16: 6,738,415,616 params; AdamW 16 B/param, SGD 8 B/param (PAPER.md)."""
    config = json.loads((LLAMA_7B / "config.json").read_text())
    p = plan(config, RunConfig(seq_len=512, dtype="fp16", device="cuda", memory_budget=24 * 2**30), MACHINE)
    assert p.params == 6_738_415_616
    alt = {a.name: a for a in p.alternatives}
    act = p.memory["activation_bytes"] + p.memory["framework_bytes"]
    assert alt["AdamW, all in memory"].peak_device_bytes == 16 * p.params + act
    assert p.fits and all(s == "resident" for s in p.placement.values())  # 7B fits a 24 GB card, as in the paper
    small = plan(config, RunConfig(seq_len=512, dtype="fp16", memory_budget=4 * 2**30), MACHINE)
    assert small.fits and "streamed" in small.placement.values() and small.peak_host_bytes <= 4 * 2**30


def test_largest_batch_that_fits(tmp_path):
    config = json.loads((LLAMA_7B / "config.json").read_text())
    run = RunConfig(seq_len=512, dtype="bf16", memory_budget=6 * 2**30)
    best = largest_fitting(config, run, MACHINE, "batch_size")
    assert best.fits and best.batch_size >= 1
    over = plan(config, RunConfig(seq_len=512, batch_size=best.batch_size + 1, dtype="bf16",
                                  memory_budget=6 * 2**30), MACHINE)
    assert not over.fits


def test_heap_keep_is_counted_in_the_host_peak():
    """Freed heap the runtime keeps for reuse (Runtime(heap_keep=)) is memory the process holds."""
    config = json.loads((LLAMA_7B / "config.json").read_text())
    base = plan(config, RunConfig(seq_len=512, dtype="bf16"), MACHINE)
    kept = plan(config, RunConfig(seq_len=512, dtype="bf16", heap_keep=256 * 2**20), MACHINE)
    assert kept.peak_host_bytes - base.peak_host_bytes == 256 * 2**20
    assert kept.memory["allocator_slack_bytes"] - base.memory["allocator_slack_bytes"] == 256 * 2**20


def test_allocator_slack_only_where_the_heap_is_not_trimmed_per_unit():
    """heap_trim "unit" (what a memory budget selects: trimmed per unit, mmap threshold pinned)
    keeps RSS at live memory, so the plan adds no slack; "step" leaves what glibc's dynamic
    threshold keeps mapped: 2 x min(32 MiB, the largest tensor)."""
    from lomo_runtime.planner.plan import allocator_slack

    config = json.loads((LLAMA_7B / "config.json").read_text())
    unit = plan(config, RunConfig(seq_len=512, dtype="bf16"), MACHINE)
    step = plan(config, RunConfig(seq_len=512, dtype="bf16", heap_trim="step"), MACHINE)
    assert unit.memory["allocator_slack_bytes"] == 0
    assert step.memory["allocator_slack_bytes"] == allocator_slack(32 * 2**20) == 64 * 2**20
    assert step.peak_host_bytes - unit.peak_host_bytes == 64 * 2**20


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_plan_json_contract_from_config_alone(tmp_path, capsys):
    code, out, _ = _cli(capsys, "plan", "--model", str(LLAMA_7B), "--seq-len", "256", "--dtype", "bf16",
                        "--memory-budget", "8GiB", "--json")
    assert code == 0
    p = json.loads(out)
    for key in ("fits", "peak_device_bytes", "peak_host_bytes", "nvme_bytes", "io_bytes_per_step",
                "est_step_time_s", "placement"):
        assert key in p
    # Under a budget the runtime cuts each block in two (block.i and block.i.mlp): so does the plan.
    assert p["fits"] and set(p["placement"]) == {"embed", "head", *(f"block.{i}" for i in range(32)),
                                                 *(f"block.{i}.mlp" for i in range(32))}
    code, out, _ = _cli(capsys, "plan", "--model", str(LLAMA_7B), "--memory-budget", "8GiB")
    assert code == 0 and "AdamW, all in memory" in out


def test_plan_bad_input_and_impossible_budget(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    code, _, err = _cli(capsys, "plan", "--model", str(bad))
    assert code == 2 and "missing" in err
    (bad / "config.json").write_text(json.dumps({"model_type": "no_such_family"}))
    code, _, err = _cli(capsys, "plan", "--model", str(bad))
    assert code == 2 and "'no_such_family' is not a causal LM" in err
    code, _, err = _cli(capsys, "plan", "--model", str(LLAMA_7B), "--memory-budget", "100MiB")
    assert code == 3 and "smallest budget" in err


def test_runtime_memory_budget_uses_the_planner(tmp_path):
    model = make_tiny_model(tmp_path, "llama", tied=True)
    with pytest.raises(DoesNotFit, match="smallest budget"):
        Runtime(model, rule=SGD(lr=1e-3), work_dir=tmp_path / "w1", memory_budget="64MiB", seq_len=16)
    with Runtime(model, rule=SGD(lr=1e-3), work_dir=tmp_path / "w2", memory_budget="4GiB", seq_len=16,
                 batch_size=2) as rt:
        spec = ModelSpec.from_config(rt.checkpoint.config)
        assert rt.weights_budget == spec.total_bytes  # everything fits: nothing streams
        _run_steps(rt, steps=1)


def test_predicted_peak_host_memory_within_10_percent(tmp_path):
    """One configuration of tools/plan_accuracy.py: a fresh process trains, its peak RSS is measured."""
    sys.path.insert(0, str(ROOT / "tools"))
    import plan_accuracy

    from lomo_runtime.probe import measure_framework_bytes

    model = plan_accuracy.make_model(tmp_path / "small", plan_accuracy.MODELS["small"])
    config = json.loads((model / "config.json").read_text())
    machine = Machine(host_memory_bytes=64 * 2**30, framework_bytes=measure_framework_bytes())
    run = RunConfig(seq_len=256, batch_size=1)
    run.weights_budget = plan(config, run, machine).min_weights_budget  # force streaming
    predicted = plan(config, run, machine).peak_host_bytes
    measured = plan_accuracy.run_child(dict(model_dir=str(model), work_root=str(tmp_path), seq_len=256,
                                            batch_size=1, steps=2, weights_budget=run.weights_budget))
    assert abs(predicted - measured["peak_rss_bytes"]) / measured["peak_rss_bytes"] < 0.10


@pytest.mark.parametrize("rule,dtype,master,accum", [
    ("sgd", "fp32", False, False), ("adamw", "fp32", False, True), ("adalomo", "bf16", True, False),
])
def test_unit_bytes_match_the_runtime_store_for_every_rule(tmp_path, rule, dtype, master, accum) -> None:
    """The planner's unit sizes (weights + state + master + accumulation) are the store's, byte for byte."""
    import torch

    from lomo_runtime import Runtime
    from lomo_runtime.checkpoint.checkpoint import load_config
    from lomo_runtime.planner.spec import ModelSpec
    from lomo_runtime.rules import rule_by_name

    from helpers import make_tiny_model

    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    with Runtime(model_dir, rule_by_name(rule, lr=1e-3), work_dir=tmp_path / "w", dtype=torch_dtype,
                 master_weights=master, grad_accumulation=accum) as rt:
        actual = {name: rec.nbytes for name, rec in rt.store.units.items()}
    spec = ModelSpec.from_config(load_config(model_dir), dtype, rule, master_weights=master, grad_accumulation=accum)
    assert {u.name: u.nbytes for u in spec.units} == actual


def _independent_replay(sizes: dict[str, int], tied: bool, blocks: int, budget: int | None, steps: int) -> list[int] | None:
    """Reads per step of Belady eviction without prefetch, written from the rules alone (not from
    planner/residency.py or the scheduler): a step acquires each segment's units in forward order
    (embed; each block; the final norm; lm_head, which also needs the embedding when tied), then in
    reverse for backward; a missing unit is read, and while it does not fit the budget the resident
    unit, not needed by the segment, whose next use is farthest away is evicted (across the step
    boundary the next step repeats this one). A tied embedding cannot leave between the lm_head's
    backward and its own (it holds a partial gradient). None: a segment cannot be served."""
    segments = [["embed"]] + [[f"block.{i}"] for i in range(blocks)] + [["head"], ["head", "embed"] if tied else ["head"]]
    order = segments + segments[::-1]
    sequence = [u for seg in order for u in seg]
    resident: set[str] = set()
    reads = []
    for _ in range(steps):
        count = 0
        position = 0
        pending = False
        for index, seg in enumerate(order):
            backward = index >= len(segments)
            for unit in seg:
                position += 1
                if unit in resident:
                    continue
                while budget is not None and sum(sizes[u] for u in resident) + sizes[unit] > budget:
                    def next_use(name: str, position: int = position) -> int:
                        later = [p for p in range(position, len(sequence)) if sequence[p] == name]
                        return later[0] if later else len(sequence) + sequence.index(name)
                    candidates = [u for u in resident if u not in seg and not (u == "embed" and pending)]
                    if not candidates:
                        return None
                    resident.discard(max(candidates, key=next_use))
                resident.add(unit)
                count += 1
            if backward and tied and seg == ["head", "embed"]:
                pending = True
            if backward and seg == ["embed"]:
                pending = False
        reads.append(count)
    return reads


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("budget", [None, 49152, 65536, 69632, 86016, 102400, 120000])
@pytest.mark.parametrize("depth", [0, 2])
def test_replay_matches_an_independent_replay_and_measured_reads(tmp_path, tied, budget, depth):
    """The planner's replay against reads measured where they happen (every `read_unit` call on the
    real store, counted per step; the staging pool's bytes in use at every acquire for the peak),
    and, without prefetch, against `_independent_replay` above. Exact counts."""
    model = make_tiny_model(tmp_path, "llama", tied=tied)
    spec = ModelSpec.from_config(tiny_config("llama", tied=tied).to_dict())
    sizes = {u.name: u.nbytes for u in spec.units}
    sim = simulate(spec, budget, depth=depth, steps=3, commit_every=1)
    if depth == 0:
        independent = _independent_replay(sizes, tied, spec.dims.num_layers, budget, steps=3)
        assert (independent is not None) == sim.feasible
        if independent is not None:
            assert sim.reads_per_step == independent
    if not sim.feasible:
        return
    with Runtime(model, rule=SGD(lr=1e-3), work_dir=tmp_path / "w", weights_budget=budget, prefetch_depth=depth, split_blocks=False,
                 commit_every=1) as rt:
        calls = []
        real_read = rt.store.read_unit
        rt.store.read_unit = lambda name, *args, **kwargs: (calls.append(name), real_read(name, *args, **kwargs))[1]
        in_use = []
        real_acquire = rt.pool.acquire
        rt.pool.acquire = lambda n: (real_acquire(n), in_use.append(rt.pool.bytes_in_use))[0]
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        per_step = []
        for _ in range(3):
            before = len(calls)
            rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            rt.scheduler.drain()  # the step's prefetches have reached the store before counting
            per_step.append(len(calls) - before)
    assert per_step == sim.reads_per_step
    assert max(in_use) == sim.peak_resident_bytes
    if budget is not None:
        assert max(in_use) <= budget


# ---- device cuda: the GPU's figures from a probe, a named GPU's published figures, or flags ----

CUDA_JOB = ("plan", "--model", str(LLAMA_7B), "--device", "cuda", "--dtype", "bf16", "--seq-len", "512",
            "--batch-size", "4", "--json")


def test_plan_cuda_with_a_named_gpu_uses_its_published_figures(capsys):
    from lomo_runtime.planner.gpus import GPUS

    code, out, _ = _cli(capsys, *CUDA_JOB, "--gpu", "h100")
    assert code == 0
    p = json.loads(out)
    assert p["machine_source"] == "published figures for h100"
    assert p["machine"]["source"]["flops_per_s"] == "gpu h100"
    flops = 0.7 * 989e12  # the datasheet's dense bf16 peak times the table's sustained fraction
    assert p["machine"]["flops_per_s"] == pytest.approx(flops)
    assert p["machine"]["h2d_bps"] == pytest.approx(0.8 * 63.0e9)  # PCIe 5.0 x16
    assert p["budget_bytes"] == GPUS["h100"].memory_bytes  # no --memory-budget: the GPU's memory
    # The planner counts forward + recompute + backward (2 + 2 + 4 FLOPs per parameter and token) from
    # its trace; the embedding lookup costs none and the head is not recomputed, so the trace is a few
    # percent below 8 x params x tokens.
    tokens = 4 * 512
    assert p["times_s"]["compute"] == pytest.approx(p["memory"]["step_flops"] / flops)
    assert p["times_s"]["compute"] == pytest.approx(8 * p["params"] * tokens / flops, rel=0.05)
    assert 0 < p["tokens_per_s"] < float("inf")
    assert p["tokens_per_s"] == pytest.approx(tokens / p["est_step_time_s"])
    code, out, _ = _cli(capsys, *CUDA_JOB[:-1], "--gpu", "h100")
    assert code == 0 and "machine    published figures for h100: 692 TFLOP/s, H2D 50.4 / D2H 50.4 GB/s" in out


def test_plan_cuda_flags_override_the_table(capsys):
    code, out, _ = _cli(capsys, *CUDA_JOB, "--gpu", "rtx3090", "--flops", "2e13", "--pcie-bandwidth", "1e10",
                        "--memory-budget", "20GiB")
    p = json.loads(out)
    assert code == 0 and p["machine"]["flops_per_s"] == 2e13 and p["machine"]["h2d_bps"] == 1e10
    assert p["machine"]["d2h_bps"] == 1e10 and p["budget_bytes"] == 20 * 2**30
    assert p["machine_source"] == "published figures for rtx3090; --flops, --pcie-bandwidth from flags"
    assert p["times_s"]["compute"] == pytest.approx(p["memory"]["step_flops"] / 2e13)
    # Flags alone, with --h2d-bw as --pcie-bandwidth's other name.
    code, out, _ = _cli(capsys, *CUDA_JOB, "--flops", "2e13", "--h2d-bw", "1e10", "--memory-budget", "20GiB")
    p = json.loads(out)
    assert code == 0 and p["machine_source"] == "flags" and p["machine"]["h2d_bps"] == 1e10


def test_plan_cuda_without_figures_refuses_in_one_line(capsys):
    for extra in ((), ("--flops", "2e13")):
        code, out, err = _cli(capsys, *CUDA_JOB, "--memory-budget", "24GiB", *extra)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1
        assert "--gpu NAME" in err and "--pcie-bandwidth" in err and "lomo-run probe --device cuda" in err


def test_plan_cuda_prefers_a_cuda_probe_and_says_so(tmp_path, capsys):
    from lomo_runtime.probe import cache_path

    probe = {"flops_per_s.cpu.bf16": 1e11,  # the CPU figures beside the CUDA ones, never used for cuda
             "flops_per_s.cuda.bf16": 5e14, "flops_per_s.cuda.fp16": 5e14, "flops_per_s.cuda.fp32": 5e13,
             "h2d_bps": 2.5e10, "d2h_bps": 2.0e10, "device_memory_bytes.cuda": 40 * 2**30,
             "device_name.cuda": "NVIDIA A100-PCIE-40GB"}
    cache_path().parent.mkdir(parents=True)
    cache_path().write_text(json.dumps(probe))
    code, out, _ = _cli(capsys, *CUDA_JOB)
    p = json.loads(out)
    assert code == 0 and p["machine_source"] == f"probe ({cache_path()})"
    assert p["machine"]["flops_per_s"] == 5e14 and p["machine"]["d2h_bps"] == 2.0e10
    assert p["budget_bytes"] == 40 * 2**30  # the probed device memory
    assert p["times_s"]["host-device"] == pytest.approx(p["read_bytes_per_step"] / 2.5e10
                                                        + p["write_bytes_per_step"] / 2.0e10)
    code, out, _ = _cli(capsys, *CUDA_JOB[:-1])
    assert code == 0 and f"machine    probe ({cache_path()}): 500 TFLOP/s, H2D 25 / D2H 20 GB/s" in out
    # A named GPU is an explicit request: it wins over the probe.
    code, out, _ = _cli(capsys, *CUDA_JOB, "--gpu", "a100")
    assert code == 0 and json.loads(out)["machine_source"] == "published figures for a100"


def test_slow_plan_prints_significant_figures_not_zero(capsys):
    code, out, _ = _cli(capsys, "plan", "--model", str(ROOT / "configs" / "models" / "llama-65b"), "--dtype", "fp16",
                        "--device", "cuda", "--memory-budget", "24GiB", "--seq-len", "512", "--batch-size", "8",
                        "--flops", "1e9", "--pcie-bandwidth", "1.2e10")
    line = next(x for x in out.splitlines() if x.startswith("step time"))
    rate = float(line.rsplit(", ", 1)[1].split()[0])
    assert code == 0 and 0 < rate < 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
def test_probe_cuda_without_cuda_exits_2_in_one_line(tmp_path, capsys):
    code, out, err = _cli(capsys, "probe", "--device", "cuda", "--offload-dir", str(tmp_path / "scratch"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "sees no CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "scratch").exists()  # refused before measuring anything


def test_plan_cuda_three_tiers_disk_sees_only_what_neither_tier_holds(capsys):
    """--device cuda with a device budget below the weights: every unit in host memory (no host
    budget) means no disk reads and disk writes only at commits (total / commit_every); a host
    budget below the weights brings disk reads and per-step writes; the host-device traffic is the
    same either way (the device's misses)."""
    job = (*CUDA_JOB, "--gpu", "h200", "--weights-budget", "4GiB", "--commit-every", "10",
           "--disk-read-bw", "1e9", "--disk-write-bw", "1e9")
    code, out, _ = _cli(capsys, *job)
    assert code == 0
    all_host = json.loads(out)
    total = all_host["nvme_bytes"] // 2  # the committed generation and the one being written
    code, out, _ = _cli(capsys, *job, "--host-memory-budget", "4GiB")
    assert code == 0
    some_host = json.loads(out)
    assert all_host["times_s"]["host-device"] == some_host["times_s"]["host-device"] > 0
    assert some_host["times_s"]["disk"] > 5 * all_host["times_s"]["disk"]
    assert some_host["peak_host_bytes"] < all_host["peak_host_bytes"]
    assert all_host["times_s"]["disk"] == pytest.approx(-(-total // 10) / 1e9, rel=0.01)
