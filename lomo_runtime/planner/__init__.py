"""The planner: a pure function from (model config, run config, machine) to a plan.

    from lomo_runtime.planner import plan, RunConfig, ModelSpec
    from lomo_runtime.probe import load_machine
    p = plan(load_config("configs/models/llama-7b"), RunConfig(seq_len=512, dtype="bf16"), load_machine())

Modules: `spec` (units and their exact byte sizes from config.json; run and
machine records), `activations` (activation memory and FLOPs traced under
FakeTensorMode with the runtime's own segments), `residency` (a replay of the
scheduler's Belady eviction and prefetch: reads per step, staging footprint),
`plan` (the composition, alternatives, the largest job that fits, the table),
`gpus` (published figures of a few GPUs, for `plan --device cuda --gpu NAME`).
"""
from __future__ import annotations

from typing import Any

from ..errors import DoesNotFit
from ..sizes import format_size
from .plan import Alternative, Plan, format_plan, largest_fitting, plan
from .spec import Machine, ModelSpec, RunConfig, dtype_name

__all__ = ["Alternative", "Machine", "ModelSpec", "Plan", "RunConfig", "format_plan", "largest_fitting", "plan",
           "weights_budget_for_memory", "DEFAULT_SEQ_LEN"]

DEFAULT_SEQ_LEN = 2048
"""Sequence length assumed when a memory budget is given without one (capped by the model's positions)."""


FIRST_STEP_BYTES = 13 * 2**20
"""RSS a process gains in its first training step beyond live tensors (kernels', thread pools' and
autograd's state): measured here as the RSS after a warm step less the pool, against the RSS after
the runtime is built, with the mmap threshold pinned and MKL's buffer cache off: 394 -> 407 MiB for
4-layer 256-wide Llamas (32k and 152k vocabularies) and for a 24-layer 1024-wide one alike."""


def weights_budget_for_memory(runtime: Any, memory_budget: int, seq_len: int | None = None,
                              batch_size: int | None = None) -> int:
    """The weights budget that keeps `runtime`'s process within `memory_budget` bytes.

    Called by `Runtime` during construction (it has `.checkpoint.config`, `.dtype`,
    `.rule`, `.device`). The framework overhead is measured, not assumed: it is
    this process's RSS right now, with torch, transformers and the empty model in
    place. Raises `DoesNotFit` (exit 3) naming the smallest budget that works.
    """
    from ..memory import current_rss_bytes
    from ..probe import load_machine

    config = runtime.checkpoint.config
    rule = type(runtime.rule).__name__.lower()
    dtype = dtype_name(runtime.dtype)
    spec = ModelSpec.from_config(config, dtype, rule if rule in ("sgd", "adamw", "adalomo") else "sgd")
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, spec.dims.max_positions)
    device = "cuda" if runtime.device.startswith("cuda") else "cpu"  # "cuda:1" plans as cuda
    machine = load_machine(device, dtype)
    # This process now (its model's module tree built, a trainer's data loaded) plus what the first
    # step adds, or the warm figure of a probe or the default, whichever is larger.
    machine.framework_bytes = max(current_rss_bytes() + FIRST_STEP_BYTES, machine.framework_bytes)
    machine.source["framework_bytes"] = "measured"
    runtime.planned_framework_bytes = machine.framework_bytes  # the trainer's plan.json uses the same
    run = RunConfig(seq_len=seq_len, batch_size=batch_size or 1, dtype=dtype, rule=spec.rule,
                    device=device, memory_budget=memory_budget,
                    master_weights=runtime.master_weights, grad_accumulation=runtime.grad_accumulation,
                    row_updates=runtime.row_updates,
                    heap_keep=runtime.heap_keep, heap_trim=runtime._trim, split_blocks=runtime.checkpoint.split,
                    **({} if runtime.parallel is None else {"nproc": runtime.parallel.world, "parallel": runtime.parallel.mode}))
    p = plan(spec, run, machine)
    if not p.fits:
        raise DoesNotFit(f"memory budget {format_size(memory_budget)}: {p.reason}; {p.suggestion}")
    return p.weights_budget
