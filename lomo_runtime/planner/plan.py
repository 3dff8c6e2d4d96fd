"""`plan(model, run, machine) -> Plan`: will the job fit, where does each unit live, how fast is a step.

Memory, in the design's categories (the runtime's measured peaks use the same):

    peak host (CPU) = framework        RSS after importing torch + transformers and building
                                       the empty-parameter model (~400 MiB here, `probe` measures it)
                    + staging          the staging pool; on CPU parameters are views into it, so this
                                       IS the resident weights. It caches freed buffers per size, so it
                                       holds, per unit size, the most units of that size ever resident
                    + activations      traced (planner.activations): saved segment inputs
                                       (B*T*hidden*itemsize per block), one block's recompute, logits,
                                       fp32 loss temporaries, and the gradient transients of the fused
                                       update (one gradient at a time; a tied embedding's held from the
                                       head's backward to the embedding's)
                    + allocator slack  freed memory glibc keeps mapped: 2 x min(32 MiB, largest tensor)

On CUDA the device holds the resident weights and the activations (plus the
CUDA context); the host holds the framework and the pinned staging buffers.

Step time is the largest of three bounds, assuming prefetch overlaps I/O with
compute: compute (traced FLOPs / probed FLOP/s), disk (units read / read
bandwidth + units written / write bandwidth: streamed units every step,
resident ones at each commit, averaged over `commit_every` steps) and, on
CUDA, host-device copies (units read / H2D bandwidth + units written / D2H
bandwidth). On CUDA the device's figures come from a CUDA probe, a named GPU's
published figures (`planner.gpus`) or flags; `Plan.machine_source` says which.

Several ranks (`nproc` W): every figure is per rank, at the per-rank batch. With
`parallel="replicate"` each rank holds its own full store and streams it as one process would,
so memory, disk and I/O per rank are one process's, plus the fp32 gradients of one unit whose
all-reduce is still in flight while the next unit's backward runs (`reduce_in_flight_bytes`);
a node running W ranks needs W times the host memory and disk. The all-reduce moves every fp32
gradient once per step; it overlaps backward, so it is a fourth bound ("network"), at
`allreduce_bps`. With `parallel="shard"` disk bytes and disk I/O per rank are 1/W (each rank
stores its slice of every unit) and every unit read also gathers the other (W-1)/W of it over
the network; memory per rank stays one process's (whole units under the weights budget).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import DoesNotFit, UserError
from ..rules import row_updates_exact
from ..sizes import format_size
from .activations import trace_step
from .residency import Residency, min_weights_budget, simulate
from .spec import Machine, ModelSpec, RunConfig


@dataclass
class Alternative:
    """What a user would run instead, sized the same way."""

    name: str
    peak_device_bytes: int
    fits: bool
    note: str


@dataclass
class Plan:
    """Everything `lomo-run plan` reports; `to_json` is the CLI contract."""

    fits: bool
    reason: str
    model_type: str
    params: int
    device: str
    dtype: str
    rule: str
    seq_len: int
    batch_size: int
    peak_device_bytes: int
    peak_host_bytes: int
    nvme_bytes: int
    io_bytes_per_step: int            # read + written on disk per step (steady state)
    read_bytes_per_step: int
    write_bytes_per_step: int
    est_step_time_s: float
    bound: str                        # "compute", "disk" or "host-device"
    times_s: dict[str, float]
    tokens_per_s: float
    weights_budget: int               # resident weight bytes the scheduler may hold
    min_weights_budget: int
    prefetch_depth: int
    placement: dict[str, str]         # unit -> "resident" | "streamed"
    memory: dict[str, int]            # the categories behind the peaks
    budget_bytes: int                 # the memory the plan had to fit (device; host on CPU)
    suggestion: str
    nproc: int = 1                    # ranks; with more than one every figure above is per rank
    parallel: str | None = None
    allreduce_bytes_per_step: int = 0  # gradient bytes each rank all-reduces per step
    gather_bytes_per_step: int = 0    # shard: bytes each rank receives gathering the units it reads
    alternatives: list[Alternative] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    machine_source: str = ""          # where the device's figures came from ("probe (PATH)", "published figures for h100", ...)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


# ---- memory -----------------------------------------------------------------------------------

def _fixed_bytes(spec: ModelSpec, run: RunConfig, machine: Machine) -> tuple[int, dict[str, int]]:
    """Bytes on the budgeted memory that do not depend on the weights budget."""
    rows = run.row_updates
    if rows is None:  # the plan assumes the default weight decay (0) and no value clipping
        rows = row_updates_exact(run.rule, 0.0, None, spec.dtype, spec.dims.tied, run.grad_accumulation)
    act = trace_step(spec, run.batch_size, run.seq_len, row_updates=rows)
    largest = spec.largest_tensor
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}[spec.dtype]
    # Informational split of what the trace includes: the largest gradient, its isfinite
    # mask (1 B/elem), fp32 copies of param and gradient for 16-bit weights (8 B/elem).
    transient = largest * (itemsize + 1 + (0 if spec.dtype == "fp32" else 8))
    if spec.dims.tied:
        transient += spec.unit("embed").params * itemsize  # pending tied gradient
    framework = machine.framework_bytes if run.device == "cpu" else machine.device_framework_bytes
    slack = 0
    if run.device == "cpu":
        slack = run.heap_keep + (allocator_slack(act.largest_bytes) if run.heap_trim == "step" else 0)
    cats = {
        "framework_bytes": framework,
        "allocator_slack_bytes": slack,
        "activation_bytes": act.peak_bytes,
        "gradient_transient_bytes": transient,
        "activation_per_block_bytes": act.per_block_bytes,
        "step_flops": act.flops,
    }
    return framework + slack + act.peak_bytes, cats


MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's largest dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)."""


def allocator_slack(largest_tensor_bytes: int) -> int:
    """Freed memory glibc malloc keeps in the process (RSS) while live bytes are below their peak.

    After a freed mmapped chunk of S bytes, glibc raises its mmap threshold to S
    (at most 32 MiB) and its trim threshold to 2 S: tensors below S then come
    from the heap, and up to 2 S of free heap top stays mapped. Measured here on
    the small Llama of tools/plan_accuracy.py: 25-60 MiB above live bytes, and
    within 2% of the trace once MALLOC_MMAP_THRESHOLD_ pins the threshold.
    """
    return 2 * min(MMAP_THRESHOLD_MAX, largest_tensor_bytes)


def _budget(run: RunConfig, machine: Machine) -> int:
    if run.memory_budget is not None:
        return run.memory_budget
    if run.device == "cuda":
        if machine.device_memory_bytes is None:
            raise UserError("device cuda: give the device memory (--memory-budget)")
        return machine.device_memory_bytes
    return machine.host_memory_bytes


def _weights_budget_for(spec: ModelSpec, run: RunConfig, fixed: int, budget: int, floor: int) -> tuple[int, Residency]:
    """The largest weights budget whose plan fits `budget` (or the floor, infeasible, if none)."""
    everything = simulate(spec, None, run.prefetch_depth)
    if fixed + everything.pool_bytes <= budget:
        return spec.total_bytes, everything
    lo_res = simulate(spec, floor, run.prefetch_depth)
    if fixed + lo_res.pool_bytes > budget:
        return floor, lo_res
    lo, hi = floor, spec.total_bytes  # fits at lo, not at hi
    while hi - lo > 4096:
        mid = (lo + hi) // 2 // 4096 * 4096
        res = simulate(spec, mid, run.prefetch_depth)
        if fixed + res.pool_bytes <= budget:
            lo, lo_res = mid, res
        else:
            hi = mid
    return lo, lo_res


# ---- the plan ---------------------------------------------------------------------------------

def plan(model: ModelSpec | dict[str, Any], run: RunConfig, machine: Machine) -> Plan:
    """Plan one training job: placement, peaks, I/O, step time, fit. Pure: allocates no model memory."""
    run.check()
    config = model.config if isinstance(model, ModelSpec) else model
    # Always sized from the run: dtype, rule, master weights and accumulation buffers all change unit bytes.
    spec = ModelSpec.from_config(config, run.dtype, run.rule, master_weights=run.master_weights,
                                 grad_accumulation=run.grad_accumulation, split=run.split)
    max_pos = spec.dims.max_positions
    if run.seq_len > max_pos:
        raise UserError(f"seq_len {run.seq_len} exceeds the model's {max_pos} positions")
    budget = _budget(run, machine)
    fixed, cats = _fixed_bytes(spec, run, machine)
    if run.nproc > 1:
        # The previous unit's fp32 gradients, held until their all-reduce lands (runtime._finish_reductions).
        in_flight = 4 * max(u.params for u in spec.units)
        cats["reduce_in_flight_bytes"] = in_flight
        fixed += in_flight
    floor = min_weights_budget(spec, run.prefetch_depth)
    if run.weights_budget is not None:
        if run.weights_budget < floor:
            raise DoesNotFit(
                f"weights budget {format_size(run.weights_budget, 'down')} is below the {format_size(floor, 'up')} "
                f"one step needs at once (largest unit, plus the tied embedding's pending gradient); raise it to at "
                f"least {format_size(floor, 'up')}")
        wbudget, res = run.weights_budget, simulate(spec, run.weights_budget, run.prefetch_depth)
    else:
        wbudget, res = _weights_budget_for(spec, run, fixed, budget, floor)
    weights_dev = res.pool_bytes
    total = spec.total_bytes
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}[spec.dtype]

    if run.device == "cpu":
        peak_device = fixed + weights_dev
        peak_host = peak_device
        host_staging = weights_dev
    else:
        peak_device = fixed + weights_dev
        # Host: framework plus pinned staging; every unit stays in host memory when it fits,
        # else depth+1 buffers of the largest unit (reads ahead plus one write-back).
        largest_unit = max(u.nbytes for u in spec.units)
        host_all = machine.framework_bytes + total
        if run.host_budget is not None:  # the host pool may fill up to its budget (pinned, exact sizes)
            host_staging = min(total, run.host_budget)
        else:
            host_staging = total if host_all <= machine.host_memory_bytes else (run.prefetch_depth + 1) * largest_unit
        peak_host = machine.framework_bytes + host_staging
    cats.update(staging_bytes=host_staging, weights_resident_bytes=res.peak_resident_bytes,
                device_weights_bytes=weights_dev if run.device == "cuda" else 0)

    read_bytes = res.read_bytes_per_step[-1]
    # A streamed unit is written whenever it leaves memory updated: every step. A resident one
    # only at a commit: 1/commit_every of the steps, averaged.
    def written(resident_units: set[str]) -> int:
        resident = sum(u.nbytes for u in spec.units if u.name in resident_units)
        return (total - resident) + -(-resident // max(1, run.commit_every))

    write_bytes = written(res.resident_units)
    disk_read = read_bytes
    if run.device == "cuda":
        # Three tiers: device misses are copied from host memory (H2D) and updated units leaving
        # the device are copied back (D2H); the disk sees only what neither tier holds: the host
        # tier evicts copies of units the device holds first (tiers.py), so the two budgets act
        # as one cache of their sum, replayed with the same Belady order, plus the commits.
        host = res if host_staging >= total else simulate(spec, max(host_staging + wbudget, floor), run.prefetch_depth)
        h2d_bytes, d2h_bytes = read_bytes, write_bytes
        disk_read = 0 if host_staging >= total else host.read_bytes_per_step[-1]
        write_bytes = written(set(u.name for u in spec.units) if host_staging >= total else host.resident_units)
    times = {
        "compute": cats["step_flops"] / machine.flops_per_s,
        "disk": disk_read / machine.disk_read_bps + write_bytes / machine.disk_write_bps,
    }
    if run.device == "cuda":
        times["host-device"] = h2d_bytes / machine.h2d_bps + d2h_bytes / machine.d2h_bps
    comm_bytes = gather_bytes = 0
    if run.nproc > 1:
        comm_bytes = 4 * spec.params  # fp32 gradients, all-reduced once per step
        if run.parallel == "shard":
            # Disk holds, reads and writes this rank's slice; each unit read gathers the other slices.
            w = run.nproc
            gather_bytes = res.read_bytes_per_step[-1] * (w - 1) // w
            write_bytes //= w
            disk_read //= w
        times["network"] = (comm_bytes + gather_bytes) / machine.allreduce_bps
    times["disk"] = disk_read / machine.disk_read_bps + write_bytes / machine.disk_write_bps
    bound = max(times, key=lambda k: times[k])
    step_s = times[bound]

    nvme = 2 * total  # the committed generation plus the one being written
    if run.parallel == "shard":
        nvme //= run.nproc
    reasons = []
    if not res.feasible:
        reasons.append(f"weights budget {format_size(wbudget)}: {res.blocked}")
    if peak_device > budget:
        reasons.append(f"peak {format_size(peak_device, 'up')} exceeds the {format_size(budget, 'down')} budget")
    if run.device == "cuda" and peak_host > machine.host_memory_bytes:
        reasons.append(f"host peak {format_size(peak_host, 'up')} exceeds {format_size(machine.host_memory_bytes, 'down')}")
    if machine.nvme_free_bytes is not None and nvme > machine.nvme_free_bytes:
        reasons.append(f"working store needs {format_size(nvme, 'up')}, {format_size(machine.nvme_free_bytes, 'down')} free")
    fits = not reasons
    min_peak = fixed + simulate(spec, floor, run.prefetch_depth).pool_bytes
    suggestion = "" if fits else (
        f"smallest budget that runs this job: {format_size(min_peak, 'up')} (weights budget {format_size(floor, 'up')}); "
        f"or lower --batch-size / --seq-len")

    placement = {u.name: ("resident" if u.name in res.resident_units else "streamed") for u in spec.units}
    params = spec.params
    act = cats["activation_bytes"]
    fw = cats["framework_bytes"]
    alternatives = [
        Alternative("AdamW, all in memory", fw + 16 * params + act, fw + 16 * params + act <= budget,
                    "weights + grads + fp32 master/m/v: 16 B/param"),
        Alternative("SGD, all in memory", fw + 8 * params + act, fw + 8 * params + act <= budget,
                    "weights + grads (+ fp32 master for 16-bit): 8 B/param"),
        Alternative("LOMO, no offload", fixed + total, fixed + total <= budget,
                    f"weights {itemsize} B/param + one gradient"),
        Alternative("lomo-run (this plan)", peak_device, fits, "streamed units, fused update"),
    ]
    return Plan(
        fits=fits, reason="; ".join(reasons), model_type=spec.config.get("model_type", ""), params=params,
        device=run.device, dtype=spec.dtype, rule=spec.rule, seq_len=run.seq_len, batch_size=run.batch_size,
        peak_device_bytes=peak_device, peak_host_bytes=peak_host, nvme_bytes=nvme,
        io_bytes_per_step=disk_read + write_bytes, read_bytes_per_step=disk_read, write_bytes_per_step=write_bytes,
        est_step_time_s=step_s, bound=bound, times_s=times,
        tokens_per_s=run.batch_size * run.seq_len / step_s if step_s > 0 else float("inf"),
        weights_budget=wbudget, min_weights_budget=floor, nproc=run.nproc, parallel=run.parallel,
        allreduce_bytes_per_step=comm_bytes, gather_bytes_per_step=gather_bytes,
        prefetch_depth=run.prefetch_depth, placement=placement, memory=cats, budget_bytes=budget,
        suggestion=suggestion, alternatives=alternatives, machine=asdict(machine), machine_source=machine.origin,
    )


def largest_fitting(model: ModelSpec | dict[str, Any], run: RunConfig, machine: Machine, what: str) -> Plan:
    """The plan for the largest batch size (`what="batch_size"`) or seq_len that fits."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec.from_config(model, run.dtype, run.rule)
    limit = spec.dims.max_positions if what == "seq_len" else 1 << 20

    def attempt(n: int) -> Plan | None:
        try:
            p = plan(spec, replace(run, **{what: n}), machine)
        except DoesNotFit:
            return None
        return p if p.fits else None

    best = attempt(1)
    if best is None:
        raise DoesNotFit(f"even {what} 1 does not fit: {plan(spec, replace(run, **{what: 1}), machine).reason}")
    lo, hi = 1, 2
    while hi <= limit and (p := attempt(hi)) is not None:
        best, lo, hi = p, hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p = attempt(mid)
        if p is not None:
            best, lo = p, mid
        else:
            hi = mid
    return best


def _figure(x: float) -> str:
    """Three significant figures, never "0" for a small positive rate: 0.0962, 48.1, 1,234."""
    return f"{x:,.0f}" if abs(x) >= 100 or x == 0 else f"{x:.3g}"


def format_plan(p: Plan) -> str:
    """A readable table: the plan, its categories, and the alternatives beside it."""
    m = p.memory
    mach = p.machine
    streamed = [u for u, s in p.placement.items() if s == "streamed"]
    lines = [
        f"model      {p.model_type}, {p.params / 1e9:.3g}B params, {p.dtype}, rule {p.rule}",
        f"job        batch {p.batch_size} x seq {p.seq_len} = {p.batch_size * p.seq_len:,} tokens/step on {p.device}"
        + (f", per rank of {p.nproc} ({p.parallel}; figures per rank)" if p.nproc > 1 else ""),
        f"fits       {'yes' if p.fits else 'NO: ' + p.reason}",
        f"budget     {format_size(p.budget_bytes)}",
        f"machine    {p.machine_source}: {_figure(mach.get('flops_per_s', 0) / 1e12)} TFLOP/s"
        + (f", H2D {_figure(mach.get('h2d_bps', 0) / 1e9)} / D2H {_figure(mach.get('d2h_bps', 0) / 1e9)} GB/s"
           if p.device == "cuda" else "")
        + f", disk read {_figure(mach.get('disk_read_bps', 0) / 1e9)} / write {_figure(mach.get('disk_write_bps', 0) / 1e9)} GB/s",
        "",
        "memory                         bytes",
        f"  framework                    {format_size(m['framework_bytes']):>10}",
        f"  staging (weights)            {format_size(m['staging_bytes']):>10}"
        + ("   (host, pinned)" if p.device == "cuda" else ""),
        *([f"  device weights               {format_size(m['device_weights_bytes']):>10}"] if p.device == "cuda" else []),
        f"  allocator slack              {format_size(m['allocator_slack_bytes']):>10}",
        f"  activations + transients     {format_size(m['activation_bytes']):>10}"
        f"   (+{format_size(m['activation_per_block_bytes'])}/block; gradient transient "
        f"{format_size(m['gradient_transient_bytes'])})",
        *([f"  all-reduce in flight         {format_size(m['reduce_in_flight_bytes']):>10}   (one unit's fp32 gradients)"]
          if p.nproc > 1 else []),
        f"  peak device                  {format_size(p.peak_device_bytes):>10}",
        f"  peak host                    {format_size(p.peak_host_bytes):>10}",
        f"  working store (NVMe)         {format_size(p.nvme_bytes):>10}",
        "",
        f"placement  weights budget {format_size(p.weights_budget)} (min {format_size(p.min_weights_budget)}), "
        f"prefetch depth {p.prefetch_depth}",
        f"           {len(p.placement) - len(streamed)} units resident, {len(streamed)} streamed"
        + (f" ({streamed[0]} .. {streamed[-1]})" if streamed else ""),
        f"io/step    read {format_size(p.read_bytes_per_step)}, write {format_size(p.write_bytes_per_step)}"
        + (f", all-reduce {format_size(p.allreduce_bytes_per_step)}" if p.nproc > 1 else "")
        + (f", gathers {format_size(p.gather_bytes_per_step)}" if p.gather_bytes_per_step else ""),
        "step time  " + ", ".join(f"{k} {v:.3g} s" for k, v in p.times_s.items())
        + f"  ->  {p.est_step_time_s:.3g} s ({p.bound}-bound), {_figure(p.tokens_per_s)} tokens/s",
        "",
        f"{'alternative':<24} {'peak':>10}  fits  note",
    ]
    for a in p.alternatives:
        lines.append(f"{a.name:<24} {format_size(a.peak_device_bytes):>10}  {'yes' if a.fits else 'no ':<4}  {a.note}")
    if p.suggestion:
        lines += ["", "suggestion: " + p.suggestion]
    return "\n".join(lines)
