"""`Runtime`: the library face. A Hugging Face model whose units stream from the
working store, and a `backward(loss)` that updates every parameter inside
backward, writes updated units back and commits the step.

    rt = Runtime(model_dir, rule=SGD(lr=1e-3), weights_budget="160KB", work_dir=scratch)
    out = rt.model(input_ids=ids, labels=ids)
    rt.backward(out.loss)
    rt.export(out_dir)
    rt.close()

Invariants this module keeps:

* A parameter's update is applied once per step, when its last gradient
  contribution has arrived (a tied embedding gets two: from the head and from
  the embedding segment), and its gradient is freed right after.
* A step is all or nothing: a non-finite loss or gradient drops it, the units
  it touched are re-read from the last committed generation.
* The store's committed step always equals `Runtime.step`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint
from .checkpoint.safetensors_file import DTYPES
from .errors import UserError
from .memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from .rules import SGD, UpdateRule
from .scheduler import Scheduler, Unit
from .segments import Segment, SegmentHooks, wrap_segment
from .sizes import parse_size
from .skeleton import build_skeleton
from .staging import StagingPool
from .store import WorkingStore

_TORCH_TO_ST = {v: k for k, v in DTYPES.items()}


@dataclass
class _ParamInfo:
    """Per-parameter bookkeeping for the fused update."""

    name: str
    unit: Unit
    uses_left: int = 0          # segment uses this step whose gradient has not arrived yet
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepResult:
    """What one `Runtime.backward` did."""

    step: int                   # the committed step after this call
    dropped: bool               # True if the step was dropped (non-finite loss or gradient)
    reason: str = ""
    backward_s: float = 0.0
    commit_s: float = 0.0


class Runtime(SegmentHooks):
    """Streamed full-parameter training of a Hugging Face causal LM with a fused update rule."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        rule: UpdateRule | None = None,
        *,
        work_dir: str | os.PathLike,
        memory_budget: str | int | None = None,
        weights_budget: str | int | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        prefetch_depth: int = 2,
        io_threads: int = 2,
        resume: bool = False,
        seq_len: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if device != "cpu":
            raise UserError(f"device {device!r}: only 'cpu' is implemented so far")
        self.model_dir = Path(model_dir)
        self.rule: UpdateRule = rule if rule is not None else SGD()
        self.device = device
        self.dtype = dtype
        self.work_dir = Path(work_dir)
        self.checkpoint = Checkpoint.open(self.model_dir)
        self.store = self._open_store(resume)
        self.step = self.store.step
        self.model = build_skeleton(str(self.model_dir), dtype)
        self._params: dict[nn.Parameter, _ParamInfo] = {}
        units = self._build_units()
        self.weights_budget = self._resolve_budget(memory_budget, weights_budget, seq_len, batch_size)
        self.pool = StagingPool(None)
        self.scheduler = Scheduler(units, self.store, self.pool, self.weights_budget, prefetch_depth, io_threads)
        self.segments = self._build_segments()
        self._forward_sequence = [n for s in self.segments for n in s.needs]
        self._train_sequence = self._forward_sequence + [n for s in reversed(self.segments) for n in s.needs]
        self._outstanding: dict[str, int] = {name: 0 for name in self.scheduler.units}
        self._in_step = False
        self._lr = self.rule.lr
        self._nonfinite: str | None = None
        self._hook_handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        self.track_gradients = False  # tests set it to record max_grads_alive
        self.max_grads_alive = 0      # largest number of parameters holding a gradient at once

    # ---- construction ----------------------------------------------------------------------
    def _open_store(self, resume: bool) -> WorkingStore:
        manifest = self.work_dir / "manifest.json"
        if resume and manifest.exists():
            return WorkingStore.open(self.work_dir)
        if manifest.exists():
            raise UserError(
                f"{self.work_dir} already holds a working store; pass resume=True (--resume) to continue it, "
                "or choose an empty work directory"
            )
        dtype = self.dtype

        def loader(name: str):
            return lambda: self.checkpoint.read_tensor(name).to(dtype)

        units = [(u.name, [(t, loader(t)) for t in u.tensor_names]) for u in self.checkpoint.units]
        meta = {"source_dir": str(self.model_dir.resolve()), "config": self.checkpoint.config,
                "dtype": _TORCH_TO_ST[dtype]}
        return WorkingStore.create(self.work_dir, units, meta)

    def _build_units(self) -> list[Unit]:
        units = []
        for name, record in self.store.units.items():
            unit = Unit(name=name, nbytes=record.nbytes, params=[])
            for slot in record.tensors:
                param = self.model.get_parameter(slot.name)
                unit.params.append((param, DTYPES[slot.dtype], tuple(slot.shape), slot.offset, slot.nbytes))
                self._params[param] = _ParamInfo(name=slot.name, unit=unit)
            units.append(unit)
        missing = [n for n, p in self.model.named_parameters() if p not in self._params]
        if missing:
            raise UserError(f"{self.model_dir}: the store has no weights for {', '.join(missing[:5])}")
        return units

    def _build_segments(self) -> list[Segment]:
        segments = []
        for path, owner in self.checkpoint.arch.segments(self.checkpoint.config):
            module = self.model.get_submodule(path)
            params = list(module.parameters())
            needs = [owner] + sorted({self._params[p].unit.name for p in params} - {owner})
            segment = Segment(path=path, owner=owner, needs=needs, module=module, forward=module.forward, params=params)
            wrap_segment(segment, self)
            segments.append(segment)
        return segments

    def _resolve_budget(self, memory_budget, weights_budget, seq_len, batch_size) -> int | None:
        if weights_budget is not None:
            return parse_size(weights_budget, "weights_budget")
        if memory_budget is None:
            return None
        from .planner import weights_budget_for_memory

        return weights_budget_for_memory(
            self, parse_size(memory_budget, "memory_budget"), seq_len=seq_len, batch_size=batch_size
        )

    # ---- segment hooks -------------------------------------------------------------------------
    def segment_forward_begin(self, segment: Segment, grad: bool) -> None:
        if segment is self.segments[0]:
            if grad and self._in_step:
                raise RuntimeError("a new training forward began before backward() of the previous one")
            self.scheduler.begin_pass(self._train_sequence if grad else self._forward_sequence)
            self._in_step = grad
        self.scheduler.acquire(segment.needs)
        if grad:
            self._outstanding[segment.owner] += 1
            for param in segment.params:
                self._params[param].uses_left += 1

    def segment_forward_end(self, segment: Segment, grad: bool) -> None:
        self.scheduler.release(segment.needs)

    def segment_backward_begin(self, segment: Segment) -> None:
        self.scheduler.acquire(segment.needs)

    def segment_backward_end(self, segment: Segment) -> None:
        self.scheduler.release(segment.needs)
        self._outstanding[segment.owner] -= 1
        for name in segment.needs:
            self._maybe_write_back(self.scheduler.units[name])

    def _maybe_write_back(self, unit: Unit) -> None:
        if self._outstanding[unit.name] == 0 and unit.pending_grads == 0 and unit.updated and unit.written is None \
                and self._nonfinite is None:
            self.scheduler.write_back(unit.name, generation=self.step + 1)

    # ---- the fused update ----------------------------------------------------------------------
    def _on_grad(self, param: torch.Tensor) -> None:
        info = self._params[param]
        unit = info.unit
        if self.track_gradients:  # O(parameters) per hook: for tests only
            alive = sum(1 for p in self._params if p.grad is not None)
            self.max_grads_alive = max(self.max_grads_alive, alive)
        if info.uses_left > 1:
            # More contributions will come (a tied weight used by another segment): keep the sum.
            info.uses_left -= 1
            if not getattr(param, "_lomo_pending", False):
                param._lomo_pending = True  # type: ignore[attr-defined]
                unit.pending_grads += 1
            return
        info.uses_left = 0
        if getattr(param, "_lomo_pending", False):
            param._lomo_pending = False  # type: ignore[attr-defined]
            unit.pending_grads -= 1
        grad = param.grad
        param.grad = None
        if self._nonfinite is not None:
            return  # the step is already lost: free gradients, touch nothing
        if not bool(torch.isfinite(grad).all()):
            self._nonfinite = f"non-finite gradient for {info.name}"
            return
        with torch.no_grad():
            self.rule.apply(param.data, grad, info.state, self._lr)
        unit.updated = True

    # ---- step ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, lr: float | None = None, commit_meta: dict | None = None) -> StepResult:
        """Backpropagate `loss`, updating every parameter inside backward, then commit the step.

        `lr` overrides the rule's learning rate for this step (schedules);
        `commit_meta` (JSON-able) is committed atomically with the weights, so a
        trainer's data position always matches the committed step.
        """
        if not self._in_step:
            raise RuntimeError("backward() needs a training forward (grad enabled) through rt.model first")
        self._lr = self.rule.lr if lr is None else lr
        started = time.perf_counter()
        if not bool(torch.isfinite(loss.detach()).all()):
            self._abandon_step()
            return StepResult(step=self.step, dropped=True, reason="non-finite loss")
        try:
            loss.backward()
        except BaseException:
            self._abandon_step()
            raise
        backward_s = time.perf_counter() - started
        if self._nonfinite is not None:
            reason = self._nonfinite
            self._abandon_step()
            return StepResult(step=self.step, dropped=True, reason=reason, backward_s=backward_s)
        started = time.perf_counter()
        self.scheduler.drain()
        meta = None if commit_meta is None else {**self.store.meta, **commit_meta}
        self.store.commit(self.step + 1, self.scheduler.written_records(), meta)
        self.scheduler.committed()
        self.step += 1
        self._end_step()
        return StepResult(step=self.step, dropped=False, backward_s=backward_s, commit_s=time.perf_counter() - started)

    def _end_step(self) -> None:
        self._in_step = False
        self._nonfinite = None
        for name in self._outstanding:
            self._outstanding[name] = 0
        for param, info in self._params.items():
            info.uses_left = 0
            param.grad = None
            if getattr(param, "_lomo_pending", False):
                param._lomo_pending = False  # type: ignore[attr-defined]

    def _abandon_step(self) -> None:
        """Drop the current step: no unit keeps any part of its update."""
        self.scheduler.rollback()
        self.store.discard_uncommitted()
        self._end_step()

    # ---- outputs -------------------------------------------------------------------------------
    def export(self, out_dir: str | os.PathLike) -> Path:
        """Write the committed weights in Hugging Face layout (config, tokenizer, sharded safetensors)."""
        from .checkpoint.export import export_hf

        out = Path(out_dir)
        export_hf(out, self.checkpoint.config, self.store.iter_tensors(), self.model_dir)
        return out

    def memory_report(self) -> dict[str, int]:
        """Measured figures, in the planner's categories where they can be measured."""
        return {
            "weights_resident_bytes": self.scheduler.stats.peak_resident_bytes,
            "staging_bytes": self.pool.peak_bytes,
            "peak_host_bytes": peak_rss_bytes(),
            "rss_bytes": current_rss_bytes(),
        }

    def close(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        try:
            if self._in_step:
                self._abandon_step()
            self.scheduler.close()
        finally:
            self.store.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
