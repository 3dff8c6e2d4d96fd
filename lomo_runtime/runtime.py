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
* A step is all or nothing: a non-finite loss or gradient (an fp16 overflow
  included) drops it; the units it touched are re-read from the last commit.
* Rule state, fp32 master weights and gradient-accumulation buffers are extra
  tensors in the unit's file (`<param>::<key>`), so they stream with the unit
  and are committed with it.
* The store's committed step always equals `Runtime.step`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .checkpoint import Checkpoint
from .checkpoint.safetensors_file import DTYPES
from .errors import DoesNotFit, UserError
from .io import aligned_empty
from .memory import current_rss_bytes, peak_rss_bytes, release_freed_heap, reset_peak_rss
from .native import stochastic_round_bf16_native
from .rules import SGD, UpdateContext, UpdateRule
from .scheduler import Scheduler, Unit, UnitState
from .segments import Segment, SegmentHooks, wrap_segment
from .sizes import format_size, parse_size
from .skeleton import build_skeleton
from .staging import StagingPool
from .store import WorkingStore, dtype_name, layout, tensor_views

STATE_SEP = "::"  # "<param name>::<state key>" names a state tensor in a unit file


class _StepFailed(Exception):
    """Raised inside backward to abandon a step whose gradients are not finite."""


@dataclass
class _ParamInfo:
    """Per-parameter bookkeeping for the fused update."""

    name: str
    index: int                  # position in the model's parameter order (seeds stochastic rounding)
    unit: Unit
    uses_total: int = 0         # segment uses in this step's forward
    uses_left: int = 0          # uses whose gradient has not arrived yet in the current backward pass
    pending: bool = False       # holds a partial gradient sum (tied weight between its two uses)
    held: torch.Tensor | None = None   # clipped fp32 gradient waiting for its unit's norm (clip_mode="unit")
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepResult:
    """What one `Runtime.backward` did."""

    step: int                   # the committed step after this call
    dropped: bool               # True if the step was dropped (non-finite loss or gradient)
    reason: str = ""
    accumulated: bool = False   # a micro-batch whose gradient was accumulated (nothing committed yet)
    grad_norm: float | None = None
    loss_scale: float | None = None
    backward_s: float = 0.0
    commit_s: float = 0.0


@dataclass
class LossScaler:
    """Dynamic loss scaling for fp16 weights: halve on overflow, double after `window` good steps."""

    scale: float = 2.0 ** 16
    factor: float = 2.0
    window: int = 1000
    min_scale: float = 1.0
    good_steps: int = 0

    def overflowed(self) -> None:
        self.scale = max(self.min_scale, self.scale / self.factor)
        self.good_steps = 0

    def succeeded(self) -> None:
        self.good_steps += 1
        if self.good_steps % self.window == 0:
            self.scale *= self.factor

    def state(self) -> dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps}


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
        stochastic_rounding: bool | None = None,
        master_weights: bool = False,
        grad_accumulation: bool = False,
        loss_scaler: LossScaler | None = None,
        seed: int = 0,
        checkpoint: Checkpoint | None = None,
        heap_keep: str | int = 0,
    ) -> None:
        if device != "cpu":
            raise UserError(f"device {device!r}: only 'cpu' is implemented so far")
        self.model_dir = Path(model_dir)
        self.rule: UpdateRule = rule if rule is not None else SGD()
        self.device = device
        self.dtype = dtype
        self.work_dir = Path(work_dir)
        # Freed heap kept mapped for reuse between units (memory.release_freed_heap); the planner adds it.
        self.heap_keep = parse_size(heap_keep, "heap_keep") if heap_keep else 0
        # bf16 loses small updates to round-to-nearest; stochastic rounding keeps them on average.
        self.stochastic_rounding = (dtype == torch.bfloat16) if stochastic_rounding is None else stochastic_rounding
        self.master_weights = master_weights and dtype != torch.float32
        self.grad_accumulation = grad_accumulation
        self.seed = seed
        # What the process holds before any weight arrives: torch, transformers, the interpreter.
        self.framework_bytes = current_rss_bytes()
        # A caller that already validated the checkpoint (the trainer) passes it, so headers are read once.
        self.checkpoint = checkpoint if checkpoint is not None else Checkpoint.open(self.model_dir)
        self.store = self._open_store(resume)
        self.step = self.store.step
        self.model = build_skeleton(str(self.model_dir), dtype)
        self._params: dict[nn.Parameter, _ParamInfo] = {}
        self._generation = 1 + max(rec.generation for rec in self.store.units.values())
        self._add_state_slots()
        units = self._build_units()
        self.weights_budget = self._resolve_budget(memory_budget, weights_budget, seq_len, batch_size)
        # Capped at the weights budget: freed buffers of one size are dropped before another size overflows it.
        self.pool = StagingPool(self.weights_budget)
        self.scheduler = Scheduler(units, self.store, self.pool, self.weights_budget, prefetch_depth, io_threads)
        self.segments = self._build_segments()
        self._check_minimum_budget()
        self._forward_sequence = [n for s in self.segments for n in s.needs]
        backward_sequence = [n for s in reversed(self.segments) for n in s.needs]
        passes = 2 if self.rule.clip_grad_norm and self.rule.clip_mode in ("exact", "previous") else 1
        self._train_sequence = self._forward_sequence + backward_sequence * passes
        self._outstanding: dict[str, int] = {name: 0 for name in self.scheduler.units}  # backwards still to run
        self._forward_calls: dict[str, int] = dict(self._outstanding)                   # segment calls this step
        self._unit_sq_norm: dict[str, float] = {}
        self._in_step = False
        self._mode = "update"       # "norm": first pass of exact clipping; "accumulate"; "update"
        self._lr = self.rule.lr
        self._clip_coef = 1.0
        self._norms: list[torch.Tensor] = []
        self._failed: str | None = None
        self._last_norm: float | None = self.store.meta.get("last_grad_norm")
        self.scaler = loss_scaler if loss_scaler is not None else (LossScaler() if dtype == torch.float16 else None)
        if self.scaler is not None and "loss_scaler" in self.store.meta:
            self.scaler.scale = self.store.meta["loss_scaler"]["scale"]
            self.scaler.good_steps = self.store.meta["loss_scaler"]["good_steps"]
        self._hook_handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        self.track_gradients = False  # tests set it to record max_grads_alive
        self.max_grads_alive = 0      # largest number of parameters holding a gradient at once

    # ---- construction ----------------------------------------------------------------------
    def _open_store(self, resume: bool) -> WorkingStore:
        manifest = self.work_dir / "manifest.json"
        if resume and manifest.exists():
            store = WorkingStore.open(self.work_dir)
            stored = store.meta.get("dtype")
            if stored != dtype_name(self.dtype):
                store.close()
                raise UserError(f"{self.work_dir}: the store holds {stored} weights; resume with the same --dtype")
            return store
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
                "dtype": dtype_name(dtype)}
        return WorkingStore.create(self.work_dir, units, meta)

    def _state_entries(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The state tensors a weight needs under this configuration: (key, dtype, shape)."""
        entries = [(key, dt, tuple(sh)) for key, (sh, dt) in self.rule.state_spec(shape).items()]
        if self.master_weights:
            entries.append(("master", torch.float32, shape))
        if self.grad_accumulation:
            entries.append(("grad_accum", torch.float32, shape))
        return entries

    def _add_state_slots(self) -> None:
        """Give every unit file the state tensors this run needs (zeros; master = the weights).

        Done once, as one commit at the current step, so a resumed run finds them.
        """
        records = {}
        for name, rec in self.store.units.items():
            have = {slot.name for slot in rec.tensors}
            missing = []
            for slot in rec.tensors:
                if STATE_SEP in slot.name:
                    continue
                for key, dt, shape in self._state_entries(slot.name, tuple(slot.shape)):
                    if f"{slot.name}{STATE_SEP}{key}" not in have:
                        missing.append((f"{slot.name}{STATE_SEP}{key}", dtype_name(dt), shape))
            if not missing:
                continue
            old = aligned_empty(rec.nbytes)
            self.store.read_unit(name, old)
            slots, nbytes = layout([(s.name, s.dtype, tuple(s.shape)) for s in rec.tensors] + missing)
            new = aligned_empty(nbytes)
            old_views = tensor_views(old, rec.tensors)
            for slot_name, view in tensor_views(new, slots).items():
                if slot_name in old_views:
                    view.copy_(old_views[slot_name])
                elif slot_name.endswith(STATE_SEP + "master"):
                    view.copy_(old_views[slot_name.split(STATE_SEP)[0]])
                else:
                    view.zero_()
            records[name] = self.store.write_unit(name, new, self._generation, tensors=slots)
        if records:
            self.store.commit(self.store.step, records)
            self._generation += 1

    def _build_units(self) -> list[Unit]:
        units = []
        index = {name: i for i, (name, _) in enumerate(self.model.named_parameters())}
        for name, record in self.store.units.items():
            unit = Unit(name=name, nbytes=record.nbytes, params=[])
            for slot in record.tensors:
                if STATE_SEP in slot.name:
                    continue
                param = self.model.get_parameter(slot.name)
                unit.params.append((param, DTYPES[slot.dtype], tuple(slot.shape), slot.offset, slot.nbytes))
                self._params[param] = _ParamInfo(name=slot.name, index=index[slot.name], unit=unit)
            for slot in record.tensors:
                if STATE_SEP in slot.name:
                    weight, key = slot.name.split(STATE_SEP)
                    info = self._params[self.model.get_parameter(weight)]
                    unit.states.append((info.state, key, DTYPES[slot.dtype], tuple(slot.shape), slot.offset, slot.nbytes))
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

    def minimum_weights_budget(self) -> int:
        """The smallest weights budget that can run a step: the largest set of units one segment
        needs at once, plus the tied embedding, which holds a pending gradient from the head's
        backward until its own."""
        sizes = {name: unit.nbytes for name, unit in self.scheduler.units.items()}
        tied = any(segment.owner != "embed" and "embed" in segment.needs for segment in self.segments)
        need = 0
        for segment in self.segments:
            units = set(segment.needs) | ({"embed"} if tied else set())
            need = max(need, sum(sizes[u] for u in units))
        return need

    def _check_minimum_budget(self) -> None:
        if self.weights_budget is None:
            return
        need = self.minimum_weights_budget()
        if self.weights_budget < need:
            raise DoesNotFit(
                f"weights budget {format_size(self.weights_budget)} is below the {format_size(need)} one step needs "
                f"at once (the largest unit with its update-rule state, plus a tied embedding's pending gradient); "
                f"raise it to at least {format_size(need)}"
            )

    def _resolve_budget(self, memory_budget, weights_budget, seq_len, batch_size) -> int | None:
        """The weights budget: given directly, derived from the memory budget by the planner, or both
        (then the direct one must fit inside what the memory budget allows)."""
        explicit = None if weights_budget is None else parse_size(weights_budget, "weights_budget")
        if memory_budget is None:
            return explicit
        from .planner import weights_budget_for_memory  # imported late: it pulls in the tracer

        memory = parse_size(memory_budget, "memory_budget")
        allowed = weights_budget_for_memory(self, memory, seq_len=seq_len, batch_size=batch_size)
        if explicit is None:
            return allowed
        if explicit > allowed:
            raise DoesNotFit(
                f"weights budget {format_size(explicit)} does not fit the memory budget {format_size(memory)}, "
                f"which leaves {format_size(allowed)} for weights; lower --weights-budget or raise --memory-budget"
            )
        return explicit

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
            self._forward_calls[segment.owner] += 1
            for param in segment.params:
                info = self._params[param]
                info.uses_total += 1
                info.uses_left += 1

    def segment_forward_end(self, segment: Segment, grad: bool) -> None:
        self.scheduler.release(segment.needs)
        release_freed_heap(self.heap_keep)  # the unit's temporaries are gone: keep RSS at what is really live

    def segment_backward_begin(self, segment: Segment) -> None:
        self.scheduler.acquire(segment.needs)
        if self._mode != "norm":
            self.scheduler.ensure_writable(segment.needs)  # the update writes into these buffers

    def segment_backward_end(self, segment: Segment) -> None:
        self.scheduler.release(segment.needs)
        release_freed_heap(self.heap_keep)
        self._outstanding[segment.owner] -= 1
        for name in segment.needs:
            self._maybe_finish_unit(self.scheduler.units[name])

    def _maybe_finish_unit(self, unit: Unit) -> None:
        """All of the unit's gradients are in: apply held ones (per-unit clipping), then write it back."""
        if self._outstanding[unit.name] or unit.pending_grads or self._failed is not None or self._mode == "norm":
            return
        if unit.name in self._unit_sq_norm:
            coef = min(1.0, self.rule.clip_grad_norm / (math.sqrt(self._unit_sq_norm.pop(unit.name)) + 1e-6))
            for param, *_ in unit.params:
                info = self._params[param]
                if info.held is not None:
                    grad, info.held = info.held, None
                    self._apply(param, info, grad.mul_(coef))
        if unit.dirty and unit.state is UnitState.RESIDENT:
            self.scheduler.write_back(unit.name, generation=self._generation)

    # ---- the fused update ----------------------------------------------------------------------
    def _on_grad(self, param: torch.Tensor) -> None:
        info = self._params[param]
        unit = info.unit
        self.scheduler.poll()  # mid-backward: start reads that a finished write-back unblocked
        if self.track_gradients:  # O(parameters) per hook: for tests only
            alive = sum(1 for p in self._params if p.grad is not None)
            self.max_grads_alive = max(self.max_grads_alive, alive)
        info.uses_left -= 1
        if info.uses_left > 0:
            # More contributions will come (a tied weight used by another segment): keep the sum.
            if not info.pending:
                info.pending = True
                unit.pending_grads += 1
            return
        if info.pending:
            info.pending = False
            unit.pending_grads -= 1
        grad = param.grad
        param.grad = None
        if self._failed is not None:
            return  # the step is already lost: free gradients, touch nothing
        grad = grad.to(torch.float32)  # no copy for fp32 gradients: we own .grad now
        if self.scaler is not None:
            grad.div_(self.scaler.scale)
        if not bool(torch.isfinite(grad).all()):
            self._failed = f"non-finite gradient for {info.name}"
            raise _StepFailed(self._failed)  # stop backward now: nothing after this point is worth computing
        if self._mode == "accumulate":
            info.state["grad_accum"].add_(grad)
            unit.updated = unit.dirty = True
            return
        if self.grad_accumulation:
            accum = info.state["grad_accum"]
            if self._mode == "norm":
                grad = grad + accum
            else:
                grad = accum.add_(grad).clone()
                accum.zero_()
                unit.updated = unit.dirty = True
        norm = grad.norm(2.0) if self.rule.clip_grad_norm else None
        if self._mode == "norm":
            self._norms.append(norm)
            return
        if self.rule.clip_grad_value is not None:
            grad.clamp_(-self.rule.clip_grad_value, self.rule.clip_grad_value)
        if norm is not None and self.rule.clip_mode == "unit":
            self._unit_sq_norm[unit.name] = self._unit_sq_norm.get(unit.name, 0.0) + float(norm) ** 2
            info.held = grad
            return
        if norm is not None:
            self._norms.append(norm)  # this step's norm, for clip_mode="previous"
        if self._clip_coef != 1.0:
            grad.mul_(self._clip_coef)
        self._apply(param, info, grad)

    def _apply(self, param: torch.Tensor, info: _ParamInfo, grad: torch.Tensor) -> None:
        """Run the rule on fp32 values and store the result in the parameter's dtype."""
        ctx = UpdateContext(lr=self._lr, step=self.step + 1)
        weight = param.data
        with torch.no_grad():
            if weight.dtype == torch.float32:
                self.rule.apply(weight, grad, info.state, ctx)  # in place, no copy
            else:
                work = info.state["master"] if self.master_weights else weight.to(torch.float32)
                self.rule.apply(work, grad, info.state, ctx)
                if self.stochastic_rounding and weight.dtype == torch.bfloat16:
                    # Seeded by (run seed, step, parameter): reproducible whatever the streaming order.
                    seed = hash((self.seed, self.step, info.index)) & ((1 << 63) - 1)
                    rounded = stochastic_round_bf16_native(work, seed)  # one pass in C++, ~3x faster
                    if rounded is None:
                        rounded = stochastic_round_bf16(work, torch.Generator().manual_seed(seed))
                    weight.copy_(rounded)
                else:
                    weight.copy_(work)
        info.unit.updated = info.unit.dirty = True

    # ---- step ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, lr: float | None = None, commit_meta: dict | None = None,
                 accumulate: bool = False) -> StepResult:
        """Backpropagate `loss`, updating every parameter inside backward, then commit the step.

        `lr` overrides the rule's learning rate for this step (schedules);
        `commit_meta` (JSON-able) is committed atomically with the weights, so a
        trainer's data position always matches the committed step.
        `accumulate=True` adds this micro-batch's gradients to per-parameter fp32
        buffers (streamed with the units; `grad_accumulation=True`) and commits
        nothing; the next call without it applies the sum. Scale each micro-batch
        loss by 1/k yourself for a mean.
        """
        if not self._in_step:
            raise RuntimeError("backward() needs a training forward (grad enabled) through rt.model first")
        if accumulate and not self.grad_accumulation:
            raise UserError("backward(accumulate=True) needs Runtime(grad_accumulation=True)")
        self._lr = self.rule.lr if lr is None else lr
        started = time.perf_counter()
        if not bool(torch.isfinite(loss.detach()).all()):
            return self._drop("non-finite loss")
        scaled = loss * self.scaler.scale if self.scaler is not None else loss
        grad_norm = None
        try:
            if accumulate:
                self._mode = "accumulate"
                scaled.backward()
            else:
                clip = self.rule.clip_grad_norm
                exact = clip and (self.rule.clip_mode == "exact" or (self.rule.clip_mode == "previous" and self._last_norm is None))
                if exact:
                    self._mode = "norm"
                    self._norms = []
                    scaled.backward(retain_graph=True)
                    grad_norm = float(torch.norm(torch.stack(self._norms), 2.0)) if self._norms else 0.0
                    self._clip_coef = min(1.0, clip / (grad_norm + 1e-6))
                    # The second pass sees every use and every segment again.
                    for info in self._params.values():
                        info.uses_left = info.uses_total
                    self._outstanding = dict(self._forward_calls)
                elif clip and self.rule.clip_mode == "previous":
                    self._clip_coef = min(1.0, clip / (self._last_norm + 1e-6))
                self._mode = "update"
                self._norms = []
                scaled.backward()
        except _StepFailed:
            return self._drop(self._failed or "non-finite gradient", time.perf_counter() - started)
        except BaseException:
            self._abandon_step()
            raise
        backward_s = time.perf_counter() - started
        if self._failed is not None:
            return self._drop(self._failed, backward_s)
        started = time.perf_counter()
        self.scheduler.drain()
        if accumulate:
            self._end_pass()
            return StepResult(step=self.step, dropped=False, accumulated=True, backward_s=backward_s)
        if self.rule.clip_grad_norm and self.rule.clip_mode == "previous" and self._norms:
            self._last_norm = float(torch.norm(torch.stack(self._norms), 2.0))
        if self.scaler is not None:
            self.scaler.succeeded()
        meta = {**self.store.meta, **(commit_meta or {})}
        if self.scaler is not None:
            meta["loss_scaler"] = self.scaler.state()
        if self._last_norm is not None:
            meta["last_grad_norm"] = self._last_norm
        self.store.commit(self.step + 1, self.scheduler.written_records(), meta)
        self.scheduler.committed()
        self.step += 1
        self._generation += 1
        self._end_pass()
        return StepResult(step=self.step, dropped=False, grad_norm=grad_norm,
                          loss_scale=None if self.scaler is None else self.scaler.scale,
                          backward_s=backward_s, commit_s=time.perf_counter() - started)

    def _drop(self, reason: str, backward_s: float = 0.0) -> StepResult:
        self._abandon_step()
        if self.scaler is not None:
            self.scaler.overflowed()
        return StepResult(step=self.step, dropped=True, reason=reason, backward_s=backward_s,
                          loss_scale=None if self.scaler is None else self.scaler.scale)

    def _end_pass(self) -> None:
        self._in_step = False
        self._failed = None
        self._mode = "update"
        self._clip_coef = 1.0
        self._norms = []
        self._unit_sq_norm = {}
        for name in self._outstanding:
            self._outstanding[name] = self._forward_calls[name] = 0
        for param, info in self._params.items():
            info.uses_left = info.uses_total = 0
            info.pending = False
            info.held = None
            param.grad = None

    def _abandon_step(self) -> None:
        """Drop the current step (every micro-batch of it): no unit keeps any part of its update."""
        self.scheduler.rollback()
        self.store.discard_uncommitted()
        self._end_pass()

    # ---- outputs -------------------------------------------------------------------------------
    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the committed weights, without rule state."""
        return ((name, t) for name, t in self.store.iter_tensors() if STATE_SEP not in name)

    def export(self, out_dir: str | os.PathLike) -> Path:
        """Write the committed weights in Hugging Face layout (config, tokenizer, sharded safetensors)."""
        from .checkpoint.export import export_hf

        out = Path(out_dir)
        # Export reads unit by unit and holds about one shard: free the resident units first and keep
        # shards within half the weights budget (but never below the largest tensor), so exporting
        # stays inside the memory the run was given.
        self.scheduler.evict_all()
        self.pool.trim()
        largest = max(slot.nbytes for rec in self.store.units.values() for slot in rec.tensors)
        shard = max(largest, (self.weights_budget or 2 * 2**30) // 2)
        export_hf(out, self.checkpoint.config, self.iter_weights(), self.model_dir, max_shard_bytes=shard)
        return out

    def reset_peaks(self) -> None:
        """Start a new measurement window for `memory_report` (the trainer calls it every step)."""
        self.scheduler.stats.peak_resident_bytes = self.scheduler.resident_bytes()
        self.pool.reset_peak()
        reset_peak_rss()

    def memory_report(self) -> dict[str, int]:
        """Measured peaks since `reset_peaks`, in the planner's categories where they can be told apart.

        On CPU the device is the host: `peak_host_bytes` is the process's peak RSS. Weights resident
        and staging are exact (the scheduler's and the pool's own accounting); framework is the RSS
        before the first weight arrived; the rest (activations, checkpoints, gradient transients,
        allocator retention, and what the run allocated after start: the module tree, the tokenised
        data) is `other_bytes`, the rest of the peak.
        """
        peak = peak_rss_bytes()
        staging = self.pool.peak_bytes
        return {
            "peak_host_bytes": peak,
            "peak_device_bytes": peak,
            "weights_resident_peak_bytes": self.scheduler.stats.peak_resident_bytes,
            "staging_peak_bytes": staging,
            "framework_bytes": self.framework_bytes,
            "other_bytes": max(0, peak - staging - self.framework_bytes),
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


def stochastic_round_bf16(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round fp32 `values` to bf16 stochastically: up with probability equal to the dropped fraction.

    bf16 is the top 16 bits of fp32. Adding a uniform 16-bit integer to the fp32
    bit pattern and truncating the low half rounds the magnitude up with
    probability (low bits / 2^16), which makes E[round(x)] = x (unbiased).
    """
    bits = values.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, values.shape, generator=generator, dtype=torch.int32)
    rounded = (bits + noise).bitwise_and_(-65536).view(torch.float32)  # -65536 == 0xFFFF0000
    return rounded.to(torch.bfloat16)
