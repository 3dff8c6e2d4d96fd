"""What the planner reads: the model's units (from `config.json` alone), the run, and the machine.

Unit bytes are computed exactly as the working store lays a unit out: every
tensor starts at a 4 KiB boundary, so a unit file is the sum over its tensors
of `align_up(numel * itemsize, 4096)` (a Llama block has 9 tensors, so
padding costs under 36 KiB a block). On CPU that is also the unit's staging
buffer and its resident weight memory: parameters are views into it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..checkpoint.architectures import Architecture, ModelDims, architecture_for, assign_units
from ..errors import UserError
from ..io import align_up

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RULES = ("sgd", "adamw", "adalomo")


def dtype_name(dtype: torch.dtype | str) -> str:
    """`torch.bfloat16` or "bf16" -> "bf16"; `UserError` for anything else."""
    if isinstance(dtype, str):
        name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    else:
        name = next((k for k, v in DTYPES.items() if v == dtype), str(dtype))
    if name not in DTYPES:
        raise UserError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    return name


def state_slot_bytes(rule: str, shape: tuple[int, ...], master_weights: bool = False,
                     grad_accumulation: bool = False) -> list[int]:
    """Bytes of each state tensor the runtime keeps beside one weight (each is its own 4 KiB-aligned slot).

    sgd: none (LOMO's point). adamw: m and v, 4 B/element each. adalomo: Adafactor's
    factored second moment, a row and a column vector for a matrix, the full vector
    for a 1-D tensor. fp32 master weights (16-bit runs): 4 B/element. Gradient
    accumulation: an fp32 buffer, 4 B/element.
    """
    numel = math.prod(shape)
    if rule == "sgd":
        slots = []
    elif rule == "adamw":
        slots = [4 * numel, 4 * numel]
    elif rule == "adalomo":
        slots = [4 * math.prod(shape[:-1]), 4 * math.prod(shape[:-2] + shape[-1:])] if len(shape) >= 2 else [4 * numel]
    else:
        raise UserError(f"update rule {rule!r}: one of {', '.join(RULES)}")
    if master_weights:
        slots.append(4 * numel)
    if grad_accumulation:
        slots.append(4 * numel)
    return slots


def state_bytes(rule: str, shape: tuple[int, ...], master_weights: bool = False, grad_accumulation: bool = False) -> int:
    """Update-rule state (plus master weights / accumulation buffers) beside one tensor, as laid out."""
    return sum(align_up(b) for b in state_slot_bytes(rule, shape, master_weights, grad_accumulation))


@dataclass(frozen=True)
class UnitSpec:
    """One unit as the store lays it out."""

    name: str
    tensors: dict[str, tuple[int, ...]]  # canonical name -> shape
    weight_bytes: int                     # sum of align_up(numel * itemsize): the unit file
    state_bytes: int                      # update-rule state streamed beside it (aligned likewise)
    params: int                           # elements

    @property
    def nbytes(self) -> int:
        """Bytes of one staging buffer for this unit (weights plus rule state)."""
        return self.weight_bytes + self.state_bytes


@dataclass(frozen=True)
class ModelSpec:
    """A model reduced to what the planner needs: dimensions and units in forward order."""

    config: dict[str, Any]
    arch: Architecture
    dims: ModelDims
    dtype: str
    rule: str
    units: tuple[UnitSpec, ...]
    split: bool = False  # blocks cut in two: block.{i} and block.{i}.mlp (architectures.py)

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest tensor (LOMO's gradient transient)."""
        return max(math.prod(s) for u in self.units for s in u.tensors.values())

    def unit(self, name: str) -> UnitSpec:
        return next(u for u in self.units if u.name == name)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: str = "fp32", rule: str = "sgd",
                    path: str = "config.json", master_weights: bool = False,
                    grad_accumulation: bool = False, split: bool = False) -> "ModelSpec":
        """Units and their exact byte sizes from a `config.json` dict (no weights needed)."""
        arch = architecture_for(config, path)
        dims = arch.dims(config, path)
        itemsize = DTYPES[dtype_name(dtype)].itemsize
        by_unit: dict[str, dict[str, tuple[int, ...]]] = {n: {} for n in arch.unit_names(config, split)}
        shapes = arch.expected_shapes(config)
        for name, unit in assign_units(arch, shapes, config, split).items():
            by_unit[unit][name] = tuple(shapes[name])
        units = tuple(
            UnitSpec(
                name=name,
                tensors=tensors,
                weight_bytes=sum(align_up(math.prod(s) * itemsize) for s in tensors.values()),
                state_bytes=sum(state_bytes(rule, s, master_weights and dtype_name(dtype) != "fp32", grad_accumulation)
                                for s in tensors.values()),
                params=sum(math.prod(s) for s in tensors.values()),
            )
            for name, tensors in by_unit.items()
        )
        return cls(dict(config), arch, dims, dtype_name(dtype), rule, units, split)


@dataclass
class RunConfig:
    """The job: what `lomo-run plan` and `train` both read."""

    seq_len: int = 512
    """Tokens per sequence."""
    batch_size: int = 1
    """Sequences per step (no gradient accumulation: LOMO consumes each gradient at once)."""
    dtype: str = "fp32"
    """Weight dtype in the store and in compute: fp32, bf16 or fp16."""
    rule: str = "sgd"
    """Update rule: sgd (no state), adamw (8 B/param fp32 state), adalomo (factored state)."""
    device: str = "cpu"
    """Compute device: cpu (the device is the host) or cuda."""
    memory_budget: int | None = None
    """Device memory to plan for (on CPU: the process's resident memory); None: the machine's."""
    weights_budget: int | None = None
    """Cap on resident weight bytes, overriding what the memory budget would allow."""
    host_budget: int | None = None
    """cuda: host memory for units between device uses (`--host-memory-budget`, pinned); None: every
    unit when the model fits in RAM, else a few staging buffers."""
    prefetch_depth: int = 2
    """Units the scheduler reads ahead (the runtime's default)."""
    master_weights: bool = False
    """fp32 master weights kept beside 16-bit weights in the store (+4 B/param of disk and I/O)."""
    grad_accumulation: bool = False
    """Micro-batch gradient accumulation: an fp32 buffer per weight streamed with its unit (+4 B/param)."""
    heap_keep: int = 0
    """Freed heap the runtime leaves mapped for reuse (`Runtime(heap_keep=)`): counted as allocator slack."""
    heap_trim: str = "unit"
    """The runtime's heap policy (`Runtime(heap_trim=)`): "unit", what a memory budget selects, keeps
    RSS at live memory (trimmed per unit, mmap threshold pinned: no allocator slack); "step" leaves
    what glibc's dynamic threshold keeps (`allocator_slack`)."""
    keep_logits: bool = True
    """The caller holds the output (and its logits) during backward, as `out = rt.model(...)` does."""
    row_updates: bool | None = None
    """The input embedding's gradient is the rows a batch used (`Runtime.row_updates_exact`); None:
    where exact with the default weight decay of 0 (sgd, fp32, untied, no accumulation)."""

    split_blocks: bool | None = None
    """Each block's MLP a unit of its own (`Runtime(split_blocks=)`); None: as the runtime chooses
    for a new store, when a memory or weights budget is given."""
    commit_every: int = 10
    """Steps between commits (`--commit-every`; the runtime's default is 10). Units that stay
    resident are written only at a commit; streamed ones whenever they leave memory updated."""
    nproc: int = 1
    """Ranks (`torchrun --nproc-per-node`, times nodes); batch_size is per rank."""
    parallel: str | None = None
    """With nproc > 1: "replicate" (every rank stores the model) or "shard" (1/W of every unit
    per rank, gathered on read); gradients all-reduced in both."""

    @property
    def split(self) -> bool:
        """Blocks cut in two (`Runtime._wants_split`)."""
        if self.split_blocks is not None:
            return self.split_blocks
        return self.memory_budget is not None or self.weights_budget is not None

    def check(self) -> None:
        if self.nproc < 1:
            raise UserError(f"nproc must be >= 1, got {self.nproc}")
        if self.nproc > 1 and self.parallel not in ("replicate", "shard"):
            raise UserError("--nproc above 1 needs --parallel replicate or --parallel shard")
        if self.seq_len < 1 or self.batch_size < 1:
            raise UserError(f"seq_len and batch_size must be >= 1, got {self.seq_len} and {self.batch_size}")
        self.dtype = dtype_name(self.dtype)
        if self.rule not in RULES:
            raise UserError(f"update rule {self.rule!r}: one of {', '.join(RULES)}")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"device {self.device!r}: cpu or cuda")


@dataclass
class Machine:
    """What the machine offers; bandwidths come from `lomo-run probe` (cached) or defaults."""

    host_memory_bytes: int
    """RAM available to the process."""
    device_memory_bytes: int | None = None
    """Memory of the compute device (CUDA); None on CPU."""
    nvme_free_bytes: int | None = None
    """Free space where the working store lives; None: unknown (not checked)."""
    disk_read_bps: float = 1.2e9
    disk_write_bps: float = 1.0e9
    flops_per_s: float = 5.0e10
    """Sustained matmul FLOP/s in the run's dtype on the compute device."""
    h2d_bps: float = 1.2e10
    """Host-to-device copy bandwidth from pinned memory (CUDA; ~12 GB/s for PCIe 3 x16)."""
    d2h_bps: float = 1.2e10
    """Device-to-host copy bandwidth into pinned memory (CUDA)."""
    allreduce_bps: float = 1.2e9
    """All-reduce algorithm bandwidth between ranks (bytes reduced per second)."""
    framework_bytes: int = 390 * 2**20
    """Host RSS of a process that imported torch + transformers and built the empty model."""
    device_framework_bytes: int = 512 * 2**20
    """CUDA context and allocator slack on the device (not in torch's counters)."""
    source: dict[str, str] = field(default_factory=dict)
    """Where each figure came from ("probe", "default", "flag", "gpu h100")."""
    origin: str = "defaults"
    """Where the compute device's figures came from, in words: "probe (PATH)", "published figures
    for h100", "flags", "defaults" (nothing measured or given), plus any flags over them."""
