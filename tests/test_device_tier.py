"""The three-tier scheduler (device, host, store) on a simulated device on CPU.

`SimulatedDevice` stands in for a GPU: its buffers are separate from the host's, its H2D and D2H
copies run on their own threads after a random delay, and it records any buffer reused, released
or computed on while a copy of it is in flight. So the ordinary suite runs the device tier with
copies that really are asynchronous: a missing wait shows up as a recorded violation or as wrong
numbers (fresh device memory is poisoned with 0xFF bytes).

References: the Hugging Face model in memory with torch.optim.SGD / torch.optim.AdamW (single
tensor path), fp32, max abs difference <= 1e-6; and, for bf16 with stochastic rounding, the CPU
path of lomo-run itself, bit for bit (the device path rounds with the PyTorch form of the
kernel, which must draw the same bits: the rounding test in test_native checks the two forms
against each other).

Budgets: the device holds one block (the minimum one step needs), the host half of the weights,
the rest is read from the working store; neither budget is ever passed.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import NanGrad, make_tiny_model, torch_adamw_reference, torch_sgd_reference
from lomo_runtime import SGD, Runtime
from lomo_runtime.device import SimulatedDevice
from lomo_runtime.errors import UserError
from lomo_runtime.rules import AdamW

TOL = 1e-6
LR = 0.05
STEPS = 4


def _batches(steps: int = STEPS, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 12), generator=gen) for _ in range(steps)]


def _sizes(model_dir: Path, tmp_path: Path, rule) -> tuple[dict[str, int], int]:
    with Runtime(model_dir, rule, work_dir=tmp_path / "sizes") as rt:
        return {n: u.nbytes for n, u in rt.scheduler.units.items()}, rt.minimum_weights_budget()


def _budgets(model_dir: Path, tmp_path: Path, rule) -> tuple[int, int]:
    """(device, host): the device the minimum one step needs (about one block), the host half the
    weights (never below what one unit in use and one being copied need)."""
    sizes, minimum = _sizes(model_dir, tmp_path, rule)
    host = max(sum(sizes.values()) // 2, 2 * max(sizes.values()))
    return minimum, host


def _train(rt: Runtime, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        assert not result.dropped, result.reason


def _weights(rt: Runtime) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in rt.iter_weights()}


def _assert_close(trained: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float = TOL) -> None:
    for name, tensor in trained.items():
        diff = (tensor.cpu() - expected[name]).abs().max().item()
        assert diff <= tol, f"{name} differs by {diff}"


def _check_budgets(rt: Runtime, device: SimulatedDevice, device_budget: int, host_budget: int) -> None:
    device.assert_clean()
    tier = rt._tier
    assert tier.dev_stats.peak_device_weights_bytes <= device_budget
    assert tier.pool.peak <= device_budget            # device buffers, cached ones included
    assert rt.pool.peak_bytes <= host_budget          # host staging, cached ones included
    assert rt.scheduler.host.stats.peak_resident_bytes <= host_budget


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_sgd_on_a_device_matches_torch_sgd(tmp_path: Path, tied: bool, seed: int) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=tied)
    batches = _batches(seed=seed + 1)
    ref = torch_sgd_reference(model_dir, batches, LR)
    device_budget, host_budget = _budgets(model_dir, tmp_path, SGD(lr=LR))
    device = SimulatedDevice(max_delay_s=0.004, seed=seed)
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "work", device=device, weights_budget=device_budget,
                 host_budget=host_budget, commit_every=2) as rt:
        _train(rt, batches)
        stats, dev = rt.scheduler.stats, rt._tier.dev_stats
        units = len(rt.scheduler.units)
        # Streamed through all three tiers: more copies in than one per unit and step, reads from
        # the store (the host holds half), updated units copied out every step.
        assert dev.h2d_copies > STEPS * units and dev.d2h_copies >= 2 * STEPS
        assert stats.reads > STEPS and stats.writes > 0
        _check_budgets(rt, device, device_budget, host_budget)
        trained = _weights(rt)
    device.close()
    _assert_close(trained, ref.state_dict())


def test_streamed_adamw_on_a_device_matches_torch_adamw(tmp_path: Path) -> None:
    """AdamW's moments stream with their units through both tiers (3x the bytes of SGD)."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    batches = _batches()
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = torch_adamw_reference(model_dir, batches, **settings)
    rule = AdamW(fused=False, **settings)
    device_budget, host_budget = _budgets(model_dir, tmp_path, rule)
    device = SimulatedDevice(max_delay_s=0.004, seed=7)
    with Runtime(model_dir, rule, work_dir=tmp_path / "work", device=device, weights_budget=device_budget,
                 host_budget=host_budget, commit_every=3) as rt:
        _train(rt, batches)
        _check_budgets(rt, device, device_budget, host_budget)
        assert rt.scheduler.stats.reads > STEPS
        trained = _weights(rt)
    device.close()
    _assert_close(trained, ref.state_dict())


def test_bf16_stochastic_rounding_on_a_device_equals_the_cpu_path_bit_for_bit(tmp_path: Path) -> None:
    """The device path updates in fp32 and rounds into bf16 with the PyTorch form of the kernel;
    the CPU path with the C++ kernel where it builds. Same seed, same bits."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    batches = _batches()
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "cpu", dtype=torch.bfloat16) as rt:
        _train(rt, batches)
        on_cpu = _weights(rt)
    device_budget, host_budget = _budgets(model_dir, tmp_path, SGD(lr=LR))
    device = SimulatedDevice(max_delay_s=0.002, seed=3)
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "dev", dtype=torch.bfloat16, device=device,
                 weights_budget=device_budget, host_budget=host_budget) as rt:
        assert rt.stochastic_rounding
        _train(rt, batches)
        on_device = _weights(rt)
        device.assert_clean()
    device.close()
    for name, tensor in on_cpu.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor.view(torch.int16), on_device[name].view(torch.int16)), name


def test_units_in_host_memory_need_no_disk_io_between_commits(tmp_path: Path) -> None:
    """Device budget of one block, host budget for every unit: after the first step's reads, a
    step moves units only between host and device, and nothing is written until the commit."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    sizes, minimum = _sizes(model_dir, tmp_path, SGD(lr=LR))
    device = SimulatedDevice(max_delay_s=0.001)
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "work", device=device, weights_budget=minimum,
                 host_budget=sum(sizes.values()) + max(sizes.values()), commit_every=10) as rt:
        _train(rt, _batches(1))
        reads, writes = rt.scheduler.stats.reads, rt.scheduler.stats.writes
        copies = rt._tier.dev_stats.h2d_copies
        _train(rt, _batches(3, seed=5))
        assert rt.scheduler.stats.reads == reads and rt.scheduler.stats.writes == writes == 0
        assert rt._tier.dev_stats.h2d_copies > copies + 3 * len(sizes)  # streamed to the device all the same
        assert rt.commit() == 4
        assert rt.scheduler.stats.writes == len(rt.store.units)  # the commit writes each updated unit once
        device.assert_clean()
    device.close()


def test_a_non_finite_gradient_on_a_device_drops_the_step_whole(tmp_path: Path) -> None:
    """The finite check stays on the device and is read once, at the end of backward: the step
    is dropped, every unit goes back to the last commit (units updated before the NaN included),
    and replaying the rolled-back steps then skipping the bad batch equals a clean run without it."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    batches = _batches(5, seed=4)
    poisoned_step = 3
    good = batches[:poisoned_step] + batches[poisoned_step + 1:]
    ref = torch_sgd_reference(model_dir, good, LR)
    device_budget, host_budget = _budgets(model_dir, tmp_path, SGD(lr=LR))
    device = SimulatedDevice(max_delay_s=0.002, seed=11)
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "work", device=device, weights_budget=device_budget,
                 host_budget=host_budget, commit_every=2) as rt:
        fire = {"armed": False}

        def poison(module, inputs, output):
            if torch.is_grad_enabled() and fire["armed"]:
                fire["armed"] = False
                return NanGrad.apply(output)
            return output

        rt.model.get_input_embeddings().register_forward_hook(poison)
        i = 0
        dropped = []
        while i < len(batches):
            ids = batches[i]
            fire["armed"] = i == poisoned_step and not dropped
            result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            if result.dropped:
                dropped.append(result)
                # Replay what was rolled back, then go on past the bad batch.
                for replay in batches[result.step:result.step + result.rolled_back]:
                    assert not rt.backward(rt.model(input_ids=replay, labels=replay).loss).dropped
                i += 1
                continue
            i += 1
        assert len(dropped) == 1
        assert dropped[0].reason == "non-finite gradient for model.embed_tokens.weight"
        assert dropped[0].rolled_back == 1  # step 3 followed the commit at step 2
        trained = _weights(rt)
        device.assert_clean()
    device.close()
    _assert_close(trained, ref.state_dict())


def test_resume_on_a_device_is_bit_identical(tmp_path: Path) -> None:
    """Close after 2 steps (a commit), resume, train 2 more: the same bits as 4 in one run."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    batches = _batches()
    device_budget, host_budget = _budgets(model_dir, tmp_path, SGD(lr=LR))

    def run(work: str, chunks: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        for n, chunk in enumerate(chunks):
            device = SimulatedDevice(max_delay_s=0.002, seed=n)
            with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / work, device=device, resume=n > 0,
                         weights_budget=device_budget, host_budget=host_budget) as rt:
                _train(rt, chunk)
                out = _weights(rt)
                device.assert_clean()
            device.close()
        return out

    straight = run("straight", [batches])
    resumed = run("resumed", [batches[:2], batches[2:]])
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_device_budget_below_one_step_and_misplaced_host_budget_are_refused(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    with pytest.raises(Exception, match="weights budget .* below"):
        Runtime(model_dir, SGD(), work_dir=tmp_path / "a", device=SimulatedDevice(), weights_budget=4096)
    with pytest.raises(UserError, match="host_budget"):
        Runtime(model_dir, SGD(), work_dir=tmp_path / "b", host_budget="1MB")
    with pytest.raises(UserError, match="device 'tpu'"):
        Runtime(model_dir, SGD(), work_dir=tmp_path / "c", device="tpu")


def test_an_update_waits_for_the_copy_out_still_reading_its_unit(tmp_path: Path) -> None:
    """A unit copied out (D2H, 0.2 s here) and then updated again: the update must come after the
    copy (on CUDA the compute stream waits on the copy's event; here the host does)."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    device = SimulatedDevice(min_delay_s=0.2, max_delay_s=0.2)
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "work", device=device) as rt:
        _train(rt, _batches(1))
        tier = rt._tier
        tier._copy_out("block.0")                 # as `settle` does for a unit it expects to evict
        assert tier.slots["block.0"].out is not None
        tier.pin_resident("block.0")              # an update outside any segment (pending gradients)
        tier.release(["block.0"])
        device.assert_clean()
        _train(rt, _batches(1, seed=9))
        device.assert_clean()
    device.close()


@pytest.mark.parametrize("setting", ["adamw-clip-exact", "sgd-accumulate", "adalomo-clip-previous", "fp16-sgd",
                                     "sgd-clip-unit"])
def test_the_device_path_equals_the_cpu_path_bit_for_bit(tmp_path: Path, setting: str) -> None:
    """The same run on the simulated device (three tiers, streamed) and on CPU (two tiers, all
    resident): the same operations on the same values, so the same bits, through exact and
    "previous" norm clipping (two backward passes), per-unit clipping (held gradients),
    gradient accumulation (a buffer streamed with each unit) and fp16 loss scaling."""
    from lomo_runtime.rules import AdaLomo

    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    accumulate = setting == "sgd-accumulate"
    rules = {
        "adamw-clip-exact": lambda: AdamW(lr=1e-2, clip_grad_norm=0.5),
        "sgd-accumulate": lambda: SGD(lr=LR),
        "adalomo-clip-previous": lambda: AdaLomo(lr=1e-2, clip_grad_norm=0.5, clip_mode="previous"),
        "fp16-sgd": lambda: SGD(lr=LR),
        "sgd-clip-unit": lambda: SGD(lr=LR, clip_grad_norm=0.2, clip_mode="unit"),
    }
    kwargs = dict(dtype=torch.float16 if setting == "fp16-sgd" else torch.float32, grad_accumulation=accumulate)
    batches = _batches()

    def run(rt: Runtime) -> dict[str, torch.Tensor]:
        with rt:
            for ids in batches:
                if accumulate:
                    assert rt.backward(rt.model(input_ids=ids[:1], labels=ids[:1]).loss / 2, accumulate=True).accumulated
                    result = rt.backward(rt.model(input_ids=ids[1:], labels=ids[1:]).loss / 2)
                else:
                    result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
                assert not result.dropped, result.reason
            return _weights(rt)

    on_cpu = run(Runtime(model_dir, rules[setting](), work_dir=tmp_path / "cpu", **kwargs))
    device_budget, host_budget = _budgets(model_dir, tmp_path, rules[setting]())
    if accumulate:  # the accumulation buffers stream with their units
        with Runtime(model_dir, rules[setting](), work_dir=tmp_path / "sizes-acc", **kwargs) as probe:
            sizes = {n: u.nbytes for n, u in probe.scheduler.units.items()}
            device_budget = probe.minimum_weights_budget()
        host_budget = max(sum(sizes.values()) // 2, 2 * max(sizes.values()))
    device = SimulatedDevice(max_delay_s=0.002, seed=5)
    on_device = run(Runtime(model_dir, rules[setting](), work_dir=tmp_path / "dev", device=device,
                            weights_budget=device_budget, host_budget=host_budget, **kwargs))
    device.assert_clean()
    device.close()
    for name, tensor in on_cpu.items():
        assert torch.equal(tensor, on_device[name]), f"{setting}: {name}"
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=kwargs["dtype"]).state_dict()
    assert all(not torch.equal(on_cpu[n], start[n]) for n in on_cpu if n.endswith("proj.weight"))  # it trained


def test_lomo_run_train_on_a_device_equals_the_cpu_run(tmp_path: Path, monkeypatch) -> None:
    """`lomo-run train --device cuda`, with the simulated device standing in for CUDA: the trainer's
    loop, metrics, commits, evaluation and export run on the three tiers and end with the CPU
    run's bits; metrics.jsonl reports the device peak and the pinned (here: staging) host bytes."""
    import json

    from fault_harness import train_in_process, weights
    from helpers import save_char_tokenizer
    from lomo_runtime import runtime as runtime_module

    model = make_tiny_model(tmp_path, arch="llama", tied=True)
    save_char_tokenizer(model)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"example number {i} of the device run."}) + "\n" for i in range(60)))
    job = {"model": model, "data": data}
    assert train_in_process(job, tmp_path / "cpu", "--steps", "5", "--commit-every", "2") == 0
    devices = []

    def simulated(device):
        if device == "cpu":
            return None
        devices.append(SimulatedDevice(max_delay_s=0.002, seed=len(devices)))
        return devices[-1]

    monkeypatch.setattr(runtime_module, "open_device", simulated)
    assert train_in_process(job, tmp_path / "dev", "--steps", "5", "--commit-every", "2", "--device", "cuda",
                            "--host-memory-budget", "120KB") == 0
    for device in devices:
        device.assert_clean()
        device.close()
    got, expected = weights(tmp_path / "dev" / "model"), weights(tmp_path / "cpu" / "model")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    records = [json.loads(line) for line in (tmp_path / "dev" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(0 < r["weights_resident_peak_bytes"] <= 70_000 for r in steps)
    assert all(0 < r["staging_peak_bytes"] <= 120 * 1024 and "pinned_host_bytes" in r for r in steps)


def test_the_gpu_check_script_runs_end_to_end_on_the_simulated_device(tmp_path: Path) -> None:
    """tools/gpu_check.py --simulate: the GPU check's own code (exactness, the four speed runs,
    planned against measured memory, the table and the JSON line) on CPU, so a GPU session does
    not spend its minutes on a broken script. Its exactness figures are real: streamed on the
    simulated device against torch.optim in memory."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--simulate", "--work", str(tmp_path / "work"),
                           "--steps", "1", "--json-out", str(out)], cwd=repo, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["exactness"]["sgd_max_abs_diff"] <= TOL and result["exactness"]["adamw_max_abs_diff"] <= TOL
    assert set(result["speed"]["runs"]) == {"pytorch", "resident", "pinned_quarter", "nvme_quarter"}
    assert result["speed"]["runs"]["nvme_quarter"]["disk_read_bytes_per_step"] > 0  # streamed from the store
    assert "checks:" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine: PYTHONPATH=. python -m "
                                                          "pytest -q tests/test_device_tier.py)")
@pytest.mark.parametrize("rule_name", ["sgd", "adamw"])
def test_on_cuda_streamed_training_matches_torch(tmp_path: Path, rule_name: str) -> None:
    """The same three-tier run on a real CUDA device (streams, events, registered host memory):
    against torch.optim on the CPU model, fp32, <= 1e-5 (GPU and CPU matmuls round differently)."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    batches = _batches()
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    if rule_name == "sgd":
        expected = torch_sgd_reference(model_dir, batches, LR).state_dict()
        rule = SGD(lr=LR)
    else:
        expected = torch_adamw_reference(model_dir, batches, **settings).state_dict()
        rule = AdamW(**settings)
    device_budget, host_budget = _budgets(model_dir, tmp_path, rule)
    with Runtime(model_dir, rule, work_dir=tmp_path / "work", device="cuda", weights_budget=device_budget,
                 host_budget=host_budget, commit_every=2) as rt:
        assert rt.pool.pin  # page-locked staging (cudaHostRegister)
        _train(rt, batches)
        assert rt._tier.dev_stats.peak_device_weights_bytes <= device_budget
        assert rt.pool.peak_bytes <= host_budget
        assert rt.scheduler.stats.reads > STEPS
        trained = _weights(rt)
    _assert_close(trained, expected, tol=1e-5)
