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
  included) drops it. A non-finite loss is caught before any update, so only
  that step is lost. A non-finite gradient is caught mid-backward, after some
  units were updated: every unit goes back to the last commit, and so do the
  completed steps since it (`StepResult.rolled_back` of them; the caller
  replays their batches, as the trainer does). With `commit_every=1` (every
  step committed) nothing but the dropped step is ever rolled back.
* Commits every `commit_every` steps (or `commit_interval_s` seconds, whichever
  comes first), at `commit()`, at `export()` and at `close()`. Between commits a
  unit that stays resident is not written at all; one evicted with updates is
  written to the interval's uncommitted generation, never over the committed
  file (scheduler). `Runtime.step` counts completed steps, `committed_step` the
  durable ones; after a crash the store is at `committed_step` and a caller
  that replays the steps since (data, dropout seeds, learning rate and rounding
  seeds as functions of the step) ends bit-identical to an uninterrupted run.
* Several ranks (`parallel="replicate"`, under torchrun; `lomo_runtime.dist`): each rank
  keeps its own store in `work_dir/rank-<r>`, every parameter's gradient is averaged over the
  ranks before its fused update (as DistributedDataParallel averages), every decision about a
  step is the same on every rank, and commits are two-phase. `commit`, `export`,
  `iter_weights` and `close` are collective then: every rank calls them.
* Rule state, fp32 master weights and gradient-accumulation buffers are extra
  tensors in the unit's file (`<param>::<key>`), so they stream with the unit
  and are committed with it. The store records the rule and the settings that
  give that state its meaning; a resume with others is refused.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

import torch
from torch import nn

from .aio import open_engine
from .checkpoint import Checkpoint
from .checkpoint.safetensors_file import DTYPES
from .device import Device, open_device
from .dist import COMMIT_RECORD, Parallel, PeerLost, rank_dir, read_commit_record
from .dist.shard import ShardedStore
from .errors import DoesNotFit, LomoError, UserError
from .io import aligned_empty
from .loss import install as install_loss
from .memory import current_rss_bytes, peak_rss_bytes, pin_mmap_threshold, release_freed_heap, reset_peak_rss
from .native import rounding_seed, stochastic_round_bf16
from .progress import SilentStream, WorkProgress
from .rules import SGD, UpdateContext, UpdateRule, row_updates_exact
from .scheduler import Scheduler, Unit, UnitState
from .segments import KeptGraph, Segment, SegmentHooks, access_sequences, parent_indices, wrap_segment
from .sizes import format_size, parse_size
from .head import RowChunkedLinear, rows_per_chunk
from .lora import LoraAdapters, LoraSettings
from .skeleton import build_skeleton, unbind
from .staging import StagingPool
from .tiers import DeviceTier
from .store import WorkingStore, dtype_name, layout, tensor_views

STATE_SEP = "::"  # "<param name>::<state key>" names a state tensor in a unit file

# Commit every 10 steps by default. A commit writes every unit still dirty in memory and fsyncs
# the manifest; all-resident, that is the whole model (the demo's SmolLM2-135M: 0.54 GB of
# weights plus AdaLomo state). At 10 steps its cost is a few percent of the interval's time, and a
# crash loses at most 9 steps of work, which resume replays.
DEFAULT_COMMIT_EVERY = 10


def _dense_part(grad: torch.Tensor) -> torch.Tensor:
    """The values of a (coalesced) sparse row gradient, or the dense gradient itself."""
    return grad.values() if grad.is_sparse else grad


def _scale(grad: torch.Tensor, coef: float) -> torch.Tensor:
    """`grad * coef`, in place where the layout allows."""
    return grad * coef if grad.is_sparse else grad.mul_(coef)


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

    step: int                   # completed steps after this call (`Runtime.step`); the weights are at this step
    dropped: bool               # True if the step was dropped (non-finite loss or gradient)
    reason: str = ""
    accumulated: bool = False   # a micro-batch whose gradient was accumulated (nothing applied yet)
    committed: bool = False     # this call ended with a commit (the store is at `step`)
    committed_step: int = 0     # the durable step after this call
    rolled_back: int = 0        # completed steps undone by a drop: replay steps `step` .. `step + rolled_back - 1`
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
        host_budget: str | int | None = None,
        device: "str | Device" = "cpu",
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
        heap_trim: str | None = None,
        commit_every: int = DEFAULT_COMMIT_EVERY,
        commit_interval_s: float | None = None,
        progress_stream: TextIO | None = None,
        row_updates: bool | None = None,
        parallel: "str | Parallel | None" = None,
        io_engine: str = "posix",
        split_blocks: bool | None = None,
    ) -> None:
        # A compute device below the host (CUDA; the tests' simulated device): three tiers (tiers.py).
        # On CPU the host is the device: two tiers, the `Scheduler` alone.
        self.compute_device: Device | None = open_device(device)
        if self.compute_device is not None and parallel is not None:
            raise UserError(f"device {device!r} with parallel=: several ranks on a device are not built yet "
                            "(NCCL and the device tier are each untested together); run one process per job")
        if not isinstance(commit_every, int) or isinstance(commit_every, bool) or commit_every < 1:
            raise UserError(f"commit_every must be a positive integer, got {commit_every!r}")
        if commit_interval_s is not None and not (math.isfinite(commit_interval_s) and commit_interval_s > 0):
            raise UserError(f"commit_interval_s must be a positive number of seconds, got {commit_interval_s!r}")
        self.commit_every = commit_every
        self.commit_interval_s = commit_interval_s
        # How unit files move (aio.py): "posix" (O_DIRECT preadv/pwritev) or "aio" (DeepSpeed's async
        # I/O; loaded, or built the first time, here: before any store work, so a machine that cannot
        # build it fails at once with one line).
        self.io_engine = io_engine
        self.io = open_engine(io_engine, progress_stream)
        # Long work (creating the store, exporting, a step of minutes) reports here; None: silent.
        self.progress_stream = progress_stream
        self._unit_clock = 0.0  # when the last in-step progress line was printed
        self._pass_clock = time.monotonic()  # when the current forward pass (a step, an eval batch) began
        self.model_dir = Path(model_dir)
        self.rule: UpdateRule = rule if rule is not None else SGD()
        self.device = "cpu" if self.compute_device is None else self.compute_device.name  # "cuda:0", "sim"
        self.dtype = dtype
        # With several ranks: the run's directory holds the commit record and one store per rank.
        self.parallel: Parallel | None = Parallel(parallel, device=device) if isinstance(parallel, str) else parallel
        self._owns_parallel = isinstance(parallel, str)  # made here: closed here (a caller's stays open)
        self.run_dir = Path(work_dir)
        self.work_dir = self.run_dir if self.parallel is None else rank_dir(self.run_dir, self.parallel.rank)
        # Freed heap kept mapped for reuse between units (memory.release_freed_heap); the planner adds it.
        self.heap_keep = parse_size(heap_keep, "heap_keep") if heap_keep else 0
        # When freed heap goes back to the OS: "step", a few times a step (before the head's forward, where
        # the logits and their gradient make the step's peak, every TRIM_EVERY_BLOCKS blocks' backward, and
        # before the embedding's backward); "unit", after every
        # unit's forward and backward (lowest RSS between units, most page faults). Measured on the
        # demo model (SmolLM2-135M, 8 x 128 tokens, 2 cores): all resident 6.2 s against 7.2 s a step,
        # peak RSS 1.586 against 1.582 GiB; streamed at a quarter 7.2-7.8 s against 8.6-9.0 s, peak
        # 1.202 against 1.200 GiB (tools/bench_side_by_side.py's workers, one run each, alternated).
        # But between trims freed temporaries stay mapped: on tools/plan_accuracy.py's 110M
        # tied Llama that is 92-174 MiB of RSS the planner does not model (measured 999 MiB against
        # 825 MiB with "unit", seq 512 streamed). So the default is "unit" when a memory budget is
        # to be kept (the plan's figures then hold), "step" otherwise.
        if heap_trim is None:
            heap_trim = "unit" if memory_budget is not None else "step"
        if heap_trim not in ("step", "unit"):
            raise UserError(f"heap_trim must be 'step' or 'unit', got {heap_trim!r}")
        self._trim = heap_trim
        if heap_trim == "unit":
            # RSS that follows live memory, the plan's premise: large allocations are mmapped and
            # returned when freed (memory.pin_mmap_threshold; without it peaks drift up step by step).
            pin_mmap_threshold()
        # bf16 loses small updates to round-to-nearest; stochastic rounding keeps them on average.
        self.stochastic_rounding = (dtype == torch.bfloat16) if stochastic_rounding is None else stochastic_rounding
        self.master_weights = master_weights and dtype != torch.float32
        self.grad_accumulation = grad_accumulation
        self.seed = seed
        # What the process holds before any weight arrives: torch, transformers, the interpreter.
        self.framework_bytes = current_rss_bytes()
        self.planned_framework_bytes: int | None = None  # what the memory budget's plan counted (planner)
        # A caller that already validated the checkpoint (the trainer) passes it, so headers are read once.
        self.checkpoint = checkpoint if checkpoint is not None else Checkpoint.open(self.model_dir)
        # A new store cuts each block in two (`block.{i}`, `block.{i}.mlp`: architectures.py) when
        # it is to stream; a store being resumed keeps the units it has.
        self.checkpoint = self.checkpoint.with_split(
            self._wants_split(split_blocks, budgeted=memory_budget is not None or weights_budget is not None))
        self.store = self._open_store(resume) if self.parallel is None else self._open_rank_store(resume)
        self.checkpoint = self.checkpoint.with_split(any(name.endswith(".mlp") for name in self.store.units))
        self._shard = isinstance(self.store, ShardedStore)  # units are slices on disk, gathered on read
        self.step = self.store.step  # completed steps; the store's committed step lags it by < commit_every
        self.model = build_skeleton(str(self.model_dir), dtype)
        install_loss(self.model)  # the same loss and gradient, without a saved [tokens, vocab] log-softmax (loss.py)
        self._params: dict[nn.Parameter, _ParamInfo] = {}
        self._generation = 1 + max(rec.generation for rec in self.store.units.values())
        self._add_state_slots()
        units = self._build_units()
        self.row_updates = self._set_row_updates(row_updates)  # before the budget: the planner counts it
        self.weights_budget = self._resolve_budget(memory_budget, weights_budget, seq_len, batch_size)
        # Capped at the weights budget: freed buffers of one size are dropped before another size overflows it.
        # With a device the weights budget caps device memory and the host tier has its own budget.
        if self.compute_device is None:
            if host_budget is not None:
                raise UserError("host_budget (--host-memory-budget) is for a compute device; on CPU the host "
                                "is the device: use weights_budget or memory_budget")
            self.host_budget = self.weights_budget
        elif host_budget is not None:
            self.host_budget = parse_size(host_budget, "host_budget")
        else:
            self.host_budget = self._default_host_budget(units)
        self.pool = StagingPool(self.host_budget, pin=self.compute_device is not None and self.compute_device.pin_host)
        self.scheduler: Scheduler | DeviceTier = Scheduler(
            units, self.store, self.pool, self.host_budget, prefetch_depth, io_threads, collective=self._shard,
            slice_rank=self.parallel.rank if self._shard else 0, bind=self.compute_device is None)
        self._tier: DeviceTier | None = None
        if self.compute_device is not None:
            self._tier = DeviceTier(self.scheduler, self.compute_device, self.weights_budget, prefetch_depth)
            self.scheduler = self._tier
            self._to_device(self.model)
        self.scheduler.generation = self._generation
        self.scheduler.on_pressure = self._drop_kept_graphs
        self.segments = self._build_segments()
        self._check_minimum_budget()
        self._forward_sequence, self._backward_sequence = access_sequences(self.segments)
        self._passes = 2 if self.rule.clip_grad_norm and self.rule.clip_mode in ("exact", "previous") else 1
        self._train_sequence = self._forward_sequence + self._backward_sequence * self._passes
        self._outstanding: dict[str, int] = {name: 0 for name in self.scheduler.units}  # backwards still to run
        self._forward_calls: dict[str, int] = dict(self._outstanding)                   # segment calls this step
        self._unit_sq_norm: dict[str, float] = {}
        self._in_step = False
        self._mode = "update"       # "norm": first pass of exact clipping; "accumulate"; "update"
        self._lr = self.rule.lr
        self._clip_coef = 1.0
        self._norms: list[torch.Tensor] = []
        self._failed: str | None = None
        # On a device: per-parameter "gradient finite" flags, kept on the device and read once at the
        # end of backward (no host synchronisation per parameter); on CPU each is checked at once.
        self._finite: torch.Tensor | None = None
        if self.compute_device is not None:
            self._finite = torch.ones(len(self._params), dtype=torch.bool, device=self.compute_device.torch_device)
        self._touched = False        # this step's backward changed some unit (a drop must roll back)
        self._kept_pins: list[tuple[Segment, KeptGraph]] = []  # kept graphs whose backward has not run
        self._forwards = 0           # training forwards in the current step (a loss may use several)
        # Gradient all-reduces in flight (several ranks): (param, info, gradient, work), oldest first.
        self._reductions: list[tuple[nn.Parameter, _ParamInfo, torch.Tensor, Any]] = []
        self._reduce_mark = 0
        self.reduce_wait_s = 0.0     # time the compute thread waited on them (cumulative)
        self._head_first = next(s for s in self.segments if s.may_keep_graph and s.parent is None)
        self._trim_after = self._backward_trim_points() if self._trim == "step" else set()
        self._accumulating = False   # micro-batches accumulated, their step not yet applied
        self._commit_meta: dict = {}  # the caller's latest commit_meta, committed with the next commit
        self._commit_due = False     # this step ends with a commit: write units as soon as they are done
        self._last_commit_time = time.monotonic()
        self._scaler_at: dict[int, dict[str, float]] = {}  # loss-scaler state at the start of each uncommitted step
        self._last_norm: float | None = self.store.meta.get("last_grad_norm")
        self.scaler = loss_scaler if loss_scaler is not None else (LossScaler() if dtype == torch.float16 else None)
        if self.scaler is not None and "loss_scaler" in self.store.meta:
            self.scaler.scale = self.store.meta["loss_scaler"]["scale"]
            self.scaler.good_steps = self.store.meta["loss_scaler"]["good_steps"]
        self._hook_handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        # Parameter names the rule's weight decay skips (the HF Trainer drop-in passes biases and
        # norms, as transformers.Trainer's optimizer groups do); empty: every weight decays.
        self.no_weight_decay: set[str] = set()
        self.adapters: LoraAdapters | None = None  # add_lora
        self.track_gradients = False  # tests set it to record max_grads_alive
        self.max_grads_alive = 0      # largest number of parameters holding a gradient at once

    # ---- construction ----------------------------------------------------------------------
    HOST_SHARE = 0.8  # of the RAM available at start, the most the host tier takes by default

    def _wants_split(self, requested: bool | None, budgeted: bool) -> bool:
        """Cut blocks in two for a new store? By default when a budget is given, so weights may stream:
        the half a block computes on and the next half then fit where whole blocks could not be
        double-buffered (on SmolLM2 at a quarter of its weights, the tied embedding leaves room for
        1.5 blocks). Not under per-unit clipping, whose groups are the units."""
        unit_clipping = bool(self.rule.clip_grad_norm) and self.rule.clip_mode == "unit"
        if requested and unit_clipping:
            raise UserError("split_blocks=True with clip_mode='unit': per-unit clipping clips whole blocks; "
                            "use clip_mode 'exact' or 'previous', or leave split_blocks unset")
        return (budgeted and not unit_clipping) if requested is None else requested

    def _default_host_budget(self, units: list[Unit]) -> int | None:
        """With a device and no host budget: every unit in host memory when they fit in 80% of the
        RAM available now (None: unbounded), else that 80% (the planner's default says the same)."""
        import psutil

        allowed = int(self.HOST_SHARE * psutil.virtual_memory().available)
        return None if sum(u.nbytes for u in units) <= allowed else allowed

    def _to_device(self, model: nn.Module) -> None:
        """Buffers (rotary frequencies, masks) to the device, and inputs moved there on every call,
        so `rt.model(input_ids=ids)` takes host tensors as it does on CPU."""
        target = self.compute_device.torch_device
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(target)

        def move(value):
            return value.to(target, non_blocking=True) if isinstance(value, torch.Tensor) else value

        def inputs_to_device(module, args, kwargs):
            return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

        model.register_forward_pre_hook(inputs_to_device, with_kwargs=True)

    def _open_store(self, resume: bool) -> WorkingStore:
        manifest = self.work_dir / "manifest.json"
        if resume and manifest.exists():
            store = WorkingStore.open(self.work_dir, io=self.io)
            try:
                self._check_resume(store)
            except BaseException:
                store.close()
                raise
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
        total = sum(math.prod(self.checkpoint.tensors[self.checkpoint.resolve(t)].entry.shape)
                    for u in self.checkpoint.units for t in u.tensor_names) * dtype.itemsize
        with self._work_progress("creating working store", total) as shown:
            return WorkingStore.create(self.work_dir, units, self._store_meta(), on_unit=self._unit_progress(shown, units),
                                       io=self.io)

    def _store_meta(self) -> dict[str, Any]:
        """What a new store records about its run: source, config, dtype, rule, master weights."""
        return {"source_dir": str(self.model_dir.resolve()), "config": self.checkpoint.config,
                "dtype": dtype_name(self.dtype), "rule": self._rule_identity(), "master_weights": self.master_weights}

    @staticmethod
    def _unit_progress(shown: WorkProgress, units: list):
        """`on_unit` for store creation: bytes done, the unit, units done of all."""
        return lambda name, n, done: shown.update(done, f"{name}, {n}/{len(units)} units")

    def _open_rank_store(self, resume: bool) -> WorkingStore:
        """This rank's store under the run directory, opened at the step the run's commit record
        names (or created, with the record at step 0). Every rank agrees before any goes on."""
        par = self.parallel
        record = None
        problem = ""
        if par.is_main:
            try:
                record = read_commit_record(self.run_dir)
            except UserError as e:
                problem = str(e)
            if record is None and not problem and resume and (self.work_dir / "manifest.json").exists():
                problem = f"{self.run_dir} has no {COMMIT_RECORD}: it is not a multi-process run's store"
            if record is not None and not resume:
                problem = (f"{self.run_dir} already holds a multi-process run's stores; pass resume=True (--resume) "
                           "to continue it, or choose an empty work directory")
            if record is not None and record.get("world_size") != par.world:
                problem = (f"{self.run_dir} was trained on {record.get('world_size')} ranks, this run has {par.world}; "
                           f"resume with --nproc-per-node {record.get('world_size')}, or export it (lomo-run export) "
                           "and start a new run from the export")
            if record is not None and record.get("parallel") != par.mode:
                problem = f"{self.run_dir} was trained with --parallel {record.get('parallel')}, not {par.mode}"
        record, problem = par.broadcast((record, problem), "opening the working stores")
        if problem:
            raise UserError(problem)
        store, problem = None, ""
        try:
            if record is not None:
                if not (self.work_dir / "manifest.json").exists():
                    raise UserError(f"rank {par.rank}: {self.work_dir} holds no working store to resume from")
                store = WorkingStore.open(self.work_dir, committed_step=int(record["step"]), io=self.io)
                if par.mode == "shard":
                    store = ShardedStore(store, par)
                self._check_resume(store)
            else:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                store = self._open_store(resume=False) if par.mode == "replicate" else self._create_sharded()
        except LomoError as e:
            problem = f"rank {par.rank}: {e}"
        problems = [p for p in par.gather(problem, "opening the working stores") if p]
        if problems:
            if store is not None:
                store.close()
            raise UserError(problems[0] + (f" (and {len(problems) - 1} more ranks)" if len(problems) > 1 else ""))
        if record is None:
            par.commit_step(self.run_dir, 0, lambda: None, lambda: None)
        return store

    def _create_sharded(self) -> "ShardedStore":
        """This rank's slice store (`dist.shard`), its units laid out whole with the state this run
        needs (zeros; master = the weights), as `_add_state_slots` would lay them out."""
        dtype = self.dtype
        ckpt = self.checkpoint

        def weight(name: str):
            return lambda: ckpt.read_tensor(name).to(dtype)

        def zeros(shape, dt):
            return lambda: torch.zeros(shape, dtype=dt)

        units = []
        for unit in ckpt.units:
            weights, states = [], []
            for t in unit.tensor_names:
                shape = tuple(ckpt.tensors[ckpt.resolve(t)].entry.shape)
                weights.append((t, dtype_name(dtype), shape, weight(t)))
                for key, dt, sh in self._state_entries(t, shape):
                    load = (lambda t=t: ckpt.read_tensor(t).to(torch.float32)) if key == "master" else zeros(sh, dt)
                    states.append((f"{t}{STATE_SEP}{key}", dtype_name(dt), sh, load))
            units.append((unit.name, weights + states))
        with self._work_progress("creating working store (this rank's slices)") as shown:
            return ShardedStore.create(self.work_dir, units, self._store_meta(), self.parallel,
                                       on_unit=self._unit_progress(shown, units), io=self.io)

    def _work_progress(self, label: str, total: int | None = None) -> WorkProgress:
        """A byte-progress display on `progress_stream` (a silent one without a stream)."""
        return WorkProgress(label, total, stream=self.progress_stream or SilentStream(), min_interval_s=2.0)

    def _rule_identity(self) -> dict[str, Any]:
        """The rule and the settings that give its state a meaning (recorded in the store).

        lr, weight decay and clipping may change on resume (a new schedule); these may not:
        AdamW's moments are averages under its betas and eps, and its bias correction uses the
        global step, so fresh or differently-made moments at step 1000 take a wrong-sized step;
        AdaLomo's second moments are averages under its decay rate and eps.
        """
        rule = self.rule
        settings: dict[str, Any] = {}
        for name in ("betas", "eps", "decay_rate"):
            if hasattr(rule, name):
                value = getattr(rule, name)
                settings[name] = list(value) if isinstance(value, tuple) else value
        return {"name": type(rule).__name__.lower(), "settings": settings}

    def _check_resume(self, store: WorkingStore) -> None:
        """Refuse a resume whose dtype, rule, rule state settings or master-weights setting differ
        from the store's: continuing would add zeroed state or reinterpret the stored one."""
        where = f"--resume from {self.work_dir} (step {store.step})"
        stored = store.meta.get("dtype")
        if stored != dtype_name(self.dtype):
            raise UserError(f"{where}: the store holds {stored} weights; resume with the same --dtype, not {dtype_name(self.dtype)}")
        mine = self._rule_identity()
        theirs = store.meta.get("rule")
        if theirs is None:  # a store from before the rule was recorded: judge by the state it holds
            keys = {slot.name.split(STATE_SEP)[1] for rec in store.units.values() for slot in rec.tensors
                    if STATE_SEP in slot.name}
            keys -= {"master", "grad_accum"}
            needed = {key for rec in store.units.values() for slot in rec.tensors if STATE_SEP not in slot.name
                      for key in self.rule.state_spec(tuple(slot.shape))}
            if store.step > 0 and keys != needed:
                raise UserError(f"{where}: the store holds update-rule state {sorted(keys) or 'none'}, "
                                f"rule {mine['name']} needs {sorted(needed) or 'none'}; resume with the rule it was trained with")
        else:
            if theirs.get("name") != mine["name"]:
                raise UserError(f"{where}: the store was trained with rule {theirs.get('name')}, "
                                f"not {mine['name']}; resume with --rule {theirs.get('name')}")
            if theirs.get("settings") != mine["settings"]:
                raise UserError(f"{where}: rule {mine['name']} was run with {theirs.get('settings')}, "
                                f"now {mine['settings']}; its stored state only means something under the same settings")
        stored_master = store.meta.get("master_weights")
        if stored_master is not None and bool(stored_master) != self.master_weights:
            raise UserError(f"{where}: the store was trained {'with' if stored_master else 'without'} fp32 master "
                            f"weights; resume with the same --master-weights setting")

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
            if self._shard:
                raise UserError(f"--resume from {self.work_dir}: the sharded store has no {missing[0][0]}; a sharded "
                                "run keeps the state layout it started with (same --grad-accum-steps, rule, master weights)")
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
            unit = Unit(name=name, nbytes=record.nbytes, params=[],
                        disk_nbytes=record.nbytes // self.parallel.world if self._shard else 0)
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
        segments: list[Segment] = []
        paths = list(self.checkpoint.arch.segments(self.checkpoint.config, self.checkpoint.split))
        last_owner = paths[-1][1]
        parents = parent_indices([path for path, _ in paths])
        for index, (path, owner) in enumerate(paths):
            module = self.model.get_submodule(path)
            # A block's MLP segment sits inside the block's: the block's own parameters are the rest.
            inner = {id(p) for (other, _), up in zip(paths, parents) if up == index
                     for p in self.model.get_submodule(other).parameters()}
            params = [p for p in module.parameters() if id(p) not in inner]
            needs = [owner] + sorted({self._params[p].unit.name for p in params} - {owner})
            parent = None if parents[index] is None else segments[parents[index]]
            # The last unit (final norm, lm_head) is used again right after its forward: keep its graph
            # rather than recompute the lm_head matmul (segments.py). A nested MLP segment keeps its
            # graph too: it runs with grad only inside its block's recompute, whose backward follows.
            segment = Segment(path=path, owner=owner, needs=needs, module=module, forward=module.forward,
                              params=params, may_keep_graph=owner == last_owner or parent is not None,
                              parent=parent)  # keep_graph: set per step
            if parent is not None:
                parent.children.append(segment)
            wrap_segment(segment, self)
            segments.append(segment)
        if self._chunked_head():
            head = self.model.get_output_embeddings()
            segment = next(s for s in segments if s.module is head)
            segment.forward = self._head_forward(head.weight)
        return segments

    def _chunked_head(self) -> bool:
        """Apply the lm_head's gradient in row blocks (head.py)? Where row updates are exact (the
        same settings), the head is a plain bias-free Linear, and no clipping holds whole gradients."""
        head = self.model.get_output_embeddings()
        return (self.row_updates and isinstance(head, nn.Linear) and head.bias is None
                and not (self.rule.clip_grad_norm and self.rule.clip_mode == "unit"))

    def _head_forward(self, weight: nn.Parameter):
        info = self._params[weight]
        shape = next(shape for param, _, shape, _, _ in info.unit.params if param is weight)
        rows = rows_per_chunk(shape[-1])

        def on_rows(block: slice, grad: torch.Tensor) -> None:
            if self._failed is None:
                self._update_from(weight, info, grad, rows=block)

        return lambda x: RowChunkedLinear.apply(x, lambda: weight.data, on_rows, rows)

    def row_updates_exact(self) -> bool:
        """Whether this run's embedding may take row updates (`rules.row_updates_exact`)."""
        return isinstance(self.model.get_input_embeddings(), nn.Embedding) and row_updates_exact(
            self._rule_identity()["name"], self.rule.weight_decay, self.rule.clip_grad_value,
            "fp32" if self.dtype == torch.float32 else str(self.dtype),
            self.checkpoint.arch.tied(self.checkpoint.config), self.grad_accumulation)

    def _set_row_updates(self, wanted: bool | None) -> bool:
        """Row updates for the input embedding: a sparse gradient of the rows the batch used instead
        of a dense vocab x hidden one (on a 152k x 2048 fp32 embedding, 1.2 GB), where exact."""
        exact = self.row_updates_exact() and self.parallel is None  # a sparse all-reduce is not built
        if wanted and self.parallel is not None:
            raise UserError("row_updates=True: not with parallel= yet (the gradient all-reduce is dense)")
        if wanted and not exact:
            raise UserError("row_updates=True: only exact for SGD without weight decay or value clipping, fp32 "
                            "weights, an untied embedding and no gradient accumulation")
        use = exact if wanted is None else wanted
        self.model.get_input_embeddings().sparse = use
        return use

    def minimum_weights_budget(self) -> int:
        """The smallest weights budget that can run a step: the largest set of units one segment
        needs at once, plus the tied embedding, which holds a pending gradient from the head's
        backward until its own."""
        sizes = {name: unit.nbytes for name, unit in self.scheduler.units.items()}
        tied = any(segment.owner != "embed" and "embed" in segment.needs for segment in self.segments)
        need = 0
        for segment in self.segments:
            units = set(segment.needs) | set(segment.parent.needs if segment.parent else ()) | ({"embed"} if tied else set())
            need = max(need, sum(sizes[u] for u in units))
        return need

    def _check_minimum_budget(self) -> None:
        if self.weights_budget is None:
            return
        need = self.minimum_weights_budget()
        if self.weights_budget < need:
            raise DoesNotFit(
                f"weights budget {format_size(self.weights_budget, 'down')} is below the {format_size(need, 'up')} one step needs "
                f"at once (the largest unit with its update-rule state, plus a tied embedding's pending gradient); "
                f"raise it to at least {format_size(need, 'up')}"
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
                f"weights budget {format_size(explicit, 'up')} does not fit the memory budget {format_size(memory)}, "
                f"which leaves {format_size(allowed, 'down')} for weights; lower --weights-budget or raise --memory-budget"
            )
        return explicit

    TRIM_EVERY_BLOCKS = 15  # heap_trim "step": freed heap back after every this many blocks' backward, too

    def _backward_trim_points(self) -> set[int]:
        """The blocks (top-level segments between the embedding and the head) after whose backward
        heap_trim "step" also trims: every TRIM_EVERY_BLOCKS-th in backward order, not the last one
        (the trim before the embedding's backward follows it). Ids, as segments compare by value.

        Through the blocks' backward glibc serves new temporaries from free heap pages the last trim
        returned and keeps the pages it frees mapped, so RSS drifts up block by block while the live
        heap falls: on the demo streamed (SmolLM2-135M, 30 blocks, tools/bench_side_by_side.py's
        streamed worker) from 877 to 1100 MiB, making the step's peak 1.09-1.21 GiB depending on where
        the free space lies, above the head's 1.04 GiB. A trim costs the re-faulting of what it
        returns, so it is spaced by blocks (the drift grows with depth): one mid-backward trim on the
        demo. Lock-step A/B runs against the code without it (tools/bench_side_by_side.py workers, 14-16
        steps each): every 15 blocks, step peaks 1.033-1.061 GiB at 1.001 and 0.987 of the speed;
        every 12 (two trims) 0.978; every 10 (two) 0.983; a trim whenever RSS had grown 64 MiB 0.934.
        None when every unit stays resident: there the head's phase, with all the weights, stays the
        peak (all resident on the demo, step peaks 1.412-1.415 GiB with and without, at 0.987 of the speed).
        None with a compute device: the temporaries that drift are the CPU compute's, and a trim
        (about 29 ms on the demo) would only lengthen a device's short step."""
        if self.compute_device is not None:
            return set()
        if self.weights_budget is None or self.weights_budget >= sum(u.nbytes for u in self.scheduler.units.values()):
            return set()
        blocks = [s for s in self.segments[1:] if s.parent is None and not s.may_keep_graph][::-1]
        every = self.TRIM_EVERY_BLOCKS
        return {id(s) for s in blocks[every - 1:-1:every]}

    # ---- segment hooks -------------------------------------------------------------------------
    def segment_forward_begin(self, segment: Segment, grad: bool) -> None:
        if grad and not self._in_step:
            self._begin_step()  # the step's first segment with grad (the embedding, unless inputs_embeds)
        elif segment is self.segments[0]:
            if grad:
                self._another_forward()
            elif not self._in_step:
                self.scheduler.begin_pass(self._forward_sequence)  # an evaluation or generation pass
        if self._kept_pins and not segment.may_keep_graph:
            # Another forward runs before backward: a kept head graph would keep its units pinned
            # beside everything that forward needs. Its backward recomputes instead (segments.py).
            self._drop_kept_graphs()
        if self._trim == "step" and segment is self._head_first:
            release_freed_heap(self.heap_keep)  # ahead of the step's peak (logits and their gradient)
        self.scheduler.acquire(segment.needs)
        if grad and segment.parent is None:
            # A nested segment runs with grad only in its block's recompute, during backward: its
            # use is counted here, with the block's, once per training forward.
            for seg in (segment, *segment.children):
                self._outstanding[seg.owner] += 1
                self._forward_calls[seg.owner] += 1
                for param in seg.params:
                    info = self._params[param]
                    info.uses_total += 1
                    info.uses_left += 1

    def _begin_step(self) -> None:
        self._in_step = True
        self._forwards = 1
        self._pass_clock = time.monotonic()
        self._set_keep_graph()
        self.scheduler.begin_pass(self._train_sequence)

    def _another_forward(self) -> None:
        """A second (third, ...) training forward before `backward`: a loss over several forwards
        (contrastive, preference pairs). Every use counts; the scheduler now expects this forward,
        then the backward of all of them."""
        self._forwards += 1
        self.scheduler.begin_pass(self._forward_sequence + self._backward_sequence * self._passes * self._forwards)

    def _set_keep_graph(self) -> None:
        # Exact clipping runs backward twice with every unit streamed in between: a kept graph
        # would pin the head through the first pass, beyond the minimum budget. Recompute then.
        two_pass = self._two_pass_clipping()
        for seg in self.segments:
            seg.keep_graph = seg.may_keep_graph and not two_pass

    def segment_forward_end(self, segment: Segment, grad: bool, kept: KeptGraph | None = None) -> None:
        if kept is not None:
            self._kept_pins.append((segment, kept))  # its graph points into these units' buffers until its backward
        else:
            self.scheduler.release(segment.needs)
        if self._trim == "unit":
            release_freed_heap(self.heap_keep)  # the unit's temporaries are gone: keep RSS at what is really live
        if self.progress_stream is not None:
            self._note_unit("forward" if grad else "forward (no grad)", segment)

    PROGRESS_AFTER_S = 30.0  # a step running longer than this prints where it is ...
    PROGRESS_EVERY_S = 10.0  # ... about this often

    def _note_unit(self, phase: str, segment: Segment) -> None:
        """Inside a step past PROGRESS_AFTER_S (a big model on a slow disk), a line every
        PROGRESS_EVERY_S, so a step of minutes never looks hung: where it is, and how long it has run."""
        now = time.monotonic()
        started = self._pass_clock
        if now - started < self.PROGRESS_AFTER_S or now - self._unit_clock < self.PROGRESS_EVERY_S:
            return
        self._unit_clock = now
        index = self.segments.index(segment) + 1
        self.progress_stream.write(f"  step {self.step + 1}: {phase} {index}/{len(self.segments)} "
                                   f"({segment.owner}), {now - started:.0f}s into the step\n")
        self.progress_stream.flush()

    def segment_backward_begin(self, segment: Segment) -> None:
        if self._trim == "step" and segment is self.segments[0]:
            # What the blocks' recomputes freed, before the embedding's backward adds its dense
            # gradient beside a tied one held since the head's: the step's second peak.
            release_freed_heap(self.heap_keep)
        self._reduce_mark = len(self._reductions)  # reductions launched before this segment's backward
        self.scheduler.acquire(segment.needs)
        if self._mode != "norm":
            self.scheduler.ensure_writable(segment.needs)  # the update writes into these buffers

    def segment_backward_end(self, segment: Segment, kept: KeptGraph | None = None) -> None:
        self.scheduler.release(segment.needs)
        entry = next((e for e in self._kept_pins if e[1] is kept), None) if kept is not None else None
        if entry is not None and self._mode != "norm":  # exact clipping's second pass needs the graph too
            self._kept_pins.remove(entry)
            self.scheduler.release(segment.needs)
        if self._trim == "unit" or id(segment) in self._trim_after:
            release_freed_heap(self.heap_keep)
        if self.progress_stream is not None:
            self._note_unit("backward", segment)
        self._outstanding[segment.owner] -= 1
        if self._reductions:
            # The previous segment's all-reduces overlapped this one's backward: apply them now,
            # and leave this segment's in flight over the next one's.
            self._finish_reductions(keep=len(self._reductions) - self._reduce_mark)
        for name in segment.needs:
            self._maybe_finish_unit(self.scheduler.units[name])

    def _maybe_finish_unit(self, unit: Unit) -> None:
        """All of the unit's gradients are in: apply held ones (per-unit clipping), then write it back."""
        if (self._outstanding[unit.name] or unit.pending_grads or unit.reducing or self._failed is not None
                or self._mode == "norm"):
            return
        if unit.name in self._unit_sq_norm:
            coef = min(1.0, self.rule.clip_grad_norm / (math.sqrt(self._unit_sq_norm.pop(unit.name)) + 1e-6))
            self.scheduler.pin_resident(unit.name)  # resident already, unless the budget needed it meanwhile
            try:
                for param, *_ in unit.params:
                    info = self._params[param]
                    if info.held is not None:
                        grad, info.held = info.held, None
                        unit.held_grads -= 1
                        self._apply(param, info, _scale(grad, coef))
            finally:
                self.scheduler.release([unit.name])
        if self._tier is not None:
            self._tier.settle(unit, self._commit_due)  # copied out now if due; the host tier writes it
            return
        if unit.dirty:
            unit.settled = True  # its updates of this step are complete: it may now be written and evicted
            # Write now, overlapping the rest of backward, if this step commits or the unit will be
            # evicted before its next use anyway; otherwise it stays in memory, unwritten, until then.
            if unit.state is UnitState.RESIDENT and (self._commit_due or self.scheduler.likely_evicted(unit.name)):
                self.scheduler.write_back(unit.name)
            self.scheduler.rest(unit.name)  # shard: down to its slice unless it is needed soon

    def _settle_pass(self) -> None:
        """End of a backward pass: what the loss did not reach is complete too.

        A loss need not reach every use of every parameter: a loss on hidden states never reaches
        the lm_head (so a tied embedding gets one of its two gradients), a loss on block 0's output
        none of the later blocks, a frozen parameter gets none at all. A parameter holding a partial
        sum has all the gradient it will get: it is applied now, as torch.optim would apply it. A
        parameter with no gradient is left alone (torch.optim skips it). Units whose segments got
        no backward are finished (held per-unit-clipped gradients applied, written when due)."""
        for param, info in self._params.items():
            if info.pending:
                self.scheduler.pin_resident(info.unit.name)
                try:
                    self._consume_grad(param, info)
                finally:
                    self.scheduler.release([info.unit.name])
        self._finish_reductions()
        for name, left in self._outstanding.items():
            if left:
                self._outstanding[name] = 0
                self._maybe_finish_unit(self.scheduler.units[name])

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
        self._consume_grad(param, info)

    def _consume_grad(self, param: torch.Tensor, info: _ParamInfo) -> None:
        """`param`'s gradient for this pass is complete: check it, then clip, accumulate or apply it."""
        unit = info.unit
        if info.pending:
            info.pending = False
            unit.pending_grads -= 1
        grad = param.grad
        param.grad = None
        if grad is not None and grad.is_sparse:  # row updates: the embedding rows this batch used
            grad = grad.coalesce()
        if self._failed is not None:
            return  # the step is already lost: free gradients, touch nothing
        grad = grad.to(torch.float32)  # no copy for fp32 gradients: we own .grad now
        if self.scaler is not None:
            grad.div_(self.scaler.scale)
        # Several ranks: the gradient is averaged over them before it is used. Under "replicate" a
        # micro-batch's gradient is accumulated locally first (each rank's store is its own), and
        # only the sum is reduced, at the last micro-batch. Under "shard" the accumulation buffer
        # is part of a unit whose slices the ranks store, so it must be the same on every rank:
        # every micro-batch's gradient is reduced, then accumulated.
        if self.parallel is not None and (self._shard or self._mode != "accumulate"):
            if not self._shard:
                grad = self._with_accumulated(info, grad)
            # Averaged asynchronously: the next segment's backward overlaps the all-reduce, and
            # the gradient is used when it lands (`_finish_reductions`). Every rank then holds
            # the same gradient, so the same decisions follow.
            self._reductions.append((param, info, grad, self.parallel.start_sum(grad)))
            unit.reducing += 1  # the unit is not finished (nor evicted, but as a last resort) until then
            return
        self._use_grad(param, info, grad)

    def _use_grad(self, param: torch.Tensor, info: _ParamInfo, grad: torch.Tensor) -> None:
        """Accumulate `grad` (a micro-batch's, reduced where it must be) or update from it."""
        if self._mode == "accumulate":
            # Replicate accumulates unreduced gradients: a non-finite micro-batch makes the sum
            # non-finite, which every rank sees after the final micro-batch's reduction.
            if self.parallel is None or self._shard:
                self._check_finite(grad, info)
            info.state["grad_accum"].add_(grad)
            self._mark_updated(info.unit)
            return
        if self.parallel is None or self._shard:
            grad = self._with_accumulated(info, grad)
        self._update_from(param, info, grad)

    def _with_accumulated(self, info: _ParamInfo, grad: torch.Tensor) -> torch.Tensor:
        """The step's whole gradient: `grad` plus what earlier micro-batches accumulated (the
        buffer is emptied, except in the norm pass of exact clipping, which the update pass follows)."""
        if not self.grad_accumulation:
            return grad
        accum = info.state["grad_accum"]
        if self._mode == "norm":
            return grad + accum
        grad = accum.add_(grad).clone()
        accum.zero_()
        self._mark_updated(info.unit)
        return grad

    def _update_from(self, param: torch.Tensor, info: _ParamInfo, grad: torch.Tensor,
                     rows: slice | None = None) -> None:
        """The complete (reduced) fp32 gradient of `param` (or of its `rows`, from the chunked
        head): check it, then clip and apply it."""
        unit = info.unit
        self._check_finite(grad, info)
        norm = _dense_part(grad).norm(2.0) if self.rule.clip_grad_norm else None
        if self._mode == "norm":
            self._norms.append(norm)
            return
        if self.rule.clip_grad_value is not None:
            grad.clamp_(-self.rule.clip_grad_value, self.rule.clip_grad_value)
        if norm is not None and self.rule.clip_mode == "unit":
            assert rows is None, "per-unit clipping holds whole gradients: the head is not chunked then"
            self._unit_sq_norm[unit.name] = self._unit_sq_norm.get(unit.name, 0.0) + float(norm) ** 2
            info.held = grad
            unit.held_grads += 1  # the unit stays resident until they are applied
            return
        if norm is not None:
            self._norms.append(norm)  # this step's norm, for clip_mode="previous"
        if self._clip_coef != 1.0:
            grad = _scale(grad, self._clip_coef)
        self._apply(param, info, grad, rows)

    def _finish_reductions(self, keep: int = 0) -> None:
        """Wait for the gradient all-reduces in flight but the newest `keep`, and apply their updates."""
        finished: dict[str, Unit] = {}  # in order, once each
        try:
            while len(self._reductions) > keep:
                param, info, grad, work = self._reductions[0]
                waited = time.perf_counter()
                self.parallel.wait(work, "a gradient all-reduce")
                self.reduce_wait_s += time.perf_counter() - waited
                self._reductions.pop(0)
                info.unit.reducing -= 1
                finished[info.unit.name] = info.unit
                if self._failed is not None:
                    continue  # the step is lost already: the gradient is only freed
                grad.div_(self.parallel.world)
                self.scheduler.pin_resident(info.unit.name)  # resident already, unless the budget needed it
                try:
                    self._use_grad(param, info, grad)
                finally:
                    self.scheduler.release([info.unit.name])
        finally:
            for unit in finished.values():
                self._maybe_finish_unit(unit)

    def _drain_reductions(self) -> None:
        """Wait for every all-reduce in flight and forget its gradient (a dropped or abandoned step):
        every rank launched the same ones, so they all complete."""
        for _, info, _, work in self._reductions:
            try:
                self.parallel.wait(work, "a gradient all-reduce")
            finally:
                info.unit.reducing -= 1
        self._reductions = []

    def _check_finite(self, grad: torch.Tensor, info: _ParamInfo) -> None:
        if self._finite is not None:  # on a device: a flag on the device, read at the end of backward
            self._finite[info.index] = torch.isfinite(_dense_part(grad).sum())
            return
        # One reduction instead of isfinite().all() (a bool tensor, then a second pass: 18x slower,
        # 106 ms against 5.7 ms on the demo's 28M-element embedding). An inf or NaN anywhere makes
        # the sum inf or NaN; so would finite values summing past 3.4e38, a gradient broken anyway.
        if not math.isfinite(float(_dense_part(grad).sum())):
            self._failed = f"non-finite gradient for {info.name}"
            raise _StepFailed(self._failed)  # stop backward now: nothing after this point is worth computing

    def _apply(self, param: torch.Tensor, info: _ParamInfo, grad: torch.Tensor, rows: slice | None = None) -> None:
        """Run the rule on fp32 values and store the result in the parameter's dtype (`rows`: on
        those rows of it only, a block of the chunked head's gradient)."""
        ctx = UpdateContext(lr=self._lr, step=self.step + 1, decay=info.name not in self.no_weight_decay)
        weight = param.data if rows is None else param.data[rows]
        with torch.no_grad():
            if weight.dtype == torch.float32:
                self.rule.apply(weight, grad, info.state, ctx)  # in place, no copy
            else:
                work = info.state["master"] if self.master_weights else weight.to(torch.float32)
                self.rule.apply(work, grad, info.state, ctx)
                if self.stochastic_rounding and weight.dtype == torch.bfloat16:
                    # Seeded by (run seed, step, parameter): reproducible whatever the streaming order.
                    # C++ kernel where built, else the same bits in PyTorch: identical with or without it.
                    seed = rounding_seed(self.seed, self.step, info.index)
                    weight.copy_(stochastic_round_bf16(work, seed))
                else:
                    weight.copy_(work)
        self._mark_updated(info.unit)

    def _mark_updated(self, unit: Unit) -> None:
        """`unit` changed in this step: it is dirty (unwritten) and not settled until its segment ends,
        and a drop of this step must now roll back."""
        if self._tier is not None:
            self._tier.mark_updated(unit)  # the device copy is the newer one
        else:
            unit.updated = unit.dirty = True
            unit.settled = False
        self._touched = True

    def _device_gradients_finite(self) -> None:
        """On a device: read the pass's finite flags once; a non-finite gradient fails the step,
        naming the first parameter (in model order) that had one."""
        if self._finite is None or self._failed is not None:
            return
        if not bool(self._finite.all()):
            index = int((~self._finite).nonzero()[0])
            name = next(info.name for info in self._params.values() if info.index == index)
            self._failed = f"non-finite gradient for {name}"

    # ---- step ----------------------------------------------------------------------------------
    def _two_pass_clipping(self) -> bool:
        """Does this step's global-norm clipping need a first backward pass for the norm?
        Always for "exact"; for "previous" only while no earlier norm is known."""
        return bool(self.rule.clip_grad_norm) and (
            self.rule.clip_mode == "exact" or (self.rule.clip_mode == "previous" and self._last_norm is None))

    @property
    def last_grad_norm(self) -> float | None:
        """The global gradient norm of the last step that measured one (clip_mode "previous")."""
        return self._last_norm

    @property
    def committed_step(self) -> int:
        """The step the working store holds durably (what a crash would resume from)."""
        return self.store.step

    def _commit_is_due(self, step: int) -> bool:
        """Does completing `step` (the count after it) call for a commit?"""
        if step - self.store.step >= self.commit_every:
            return True
        return self.commit_interval_s is not None and time.monotonic() - self._last_commit_time >= self.commit_interval_s

    def backward(self, loss: torch.Tensor, lr: float | None = None, commit_meta: dict | None = None,
                 accumulate: bool = False, adapter_lr: float | None = None) -> StepResult:
        """Backpropagate `loss`, updating every parameter inside backward; commit when due.

        `lr` overrides the rule's learning rate for this step (schedules);
        `commit_meta` (JSON-able) is committed atomically with the weights of
        this step, so a trainer's data position always matches the committed
        step (the latest one given is what the next commit writes).
        `accumulate=True` adds this micro-batch's gradients to per-parameter fp32
        buffers (streamed with the units; `grad_accumulation=True`) and applies
        nothing; the next call without it applies the sum. Scale each micro-batch
        loss by 1/k yourself for a mean.

        A commit happens when `commit_every` steps (or `commit_interval_s`) have
        passed since the last one. On a dropped step (`result.dropped`), the
        weights are at `result.step`: when `result.rolled_back` > 0 the step's
        non-finite gradient was found after some units had been updated, every
        unit went back to the last commit, and the caller replays the batches of
        steps `result.step` .. `result.step + result.rolled_back - 1` (their
        outcomes are deterministic) before going on past the dropped batch.

        With LoRA adapters (`add_lora`), they take one AdamW step after a good
        backward, at `adapter_lr` (default: their lr scaled as `lr` scales the rule's).
        """
        if self.adapters is None and self.store.meta.get("adapters"):
            raise UserError(f"{self.work_dir} was trained with LoRA adapters ({self.store.meta['adapters']}); "
                            "resume with the same --lora-rank (Runtime.add_lora) so they are not lost")
        if not self._in_step:
            raise RuntimeError("backward() needs a training forward (grad enabled) through rt.model first")
        if accumulate and not self.grad_accumulation:
            raise UserError("backward(accumulate=True) needs Runtime(grad_accumulation=True)")
        self._lr = self.rule.lr if lr is None else lr
        started = time.perf_counter()
        if self.scaler is not None:
            # A replayed step uses the scale its first run used; a step retried after an overflow, the lowered one.
            start_state = self._scaler_at.setdefault(self.step, self.scaler.state())
            self.scaler.scale, self.scaler.good_steps = start_state["scale"], int(start_state["good_steps"])
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.parallel is not None:
            finite = self.parallel.all_true(finite, "agreeing on the loss")  # one rank's NaN drops the step everywhere
        if not finite:
            return self._drop("non-finite loss")
        self._commit_due = not accumulate and self._commit_is_due(self.step + 1)
        scaled = loss * self.scaler.scale if self.scaler is not None else loss
        grad_norm = None
        try:
            if accumulate:
                self._mode = "accumulate"
                scaled.backward()
            else:
                clip = self.rule.clip_grad_norm
                if self._two_pass_clipping():
                    self._mode = "norm"
                    self._norms = []
                    kept = None if self.adapters is None else {n: p.grad for n, p in self.adapters.params.items()}
                    scaled.backward(retain_graph=True)
                    self._settle_pass()
                    self._device_gradients_finite()
                    if self._failed is not None:
                        raise _StepFailed(self._failed)
                    if kept is not None:  # the norm pass must not add to the adapters' gradients
                        for n, p in self.adapters.params.items():
                            p.grad = kept[n]
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
            self._settle_pass()
            self._device_gradients_finite()
        except _StepFailed:
            return self._drop(self._failed or "non-finite gradient", time.perf_counter() - started)
        except BaseException:
            self._abandon_step()
            raise
        backward_s = time.perf_counter() - started
        if self._failed is not None:
            return self._drop(self._failed, backward_s)
        if accumulate:
            self._accumulating = True
            self._end_pass()
            return StepResult(step=self.step, dropped=False, accumulated=True, committed_step=self.store.step,
                              backward_s=backward_s)
        self._accumulating = False
        if self.adapters is not None:
            grads = [p.grad for p in self.adapters.params.values() if p.grad is not None]
            if self.parallel is not None:
                for g in grads:
                    self.parallel.mean_(g)
            if grads and not math.isfinite(float(sum(g.float().sum() for g in grads))):
                return self._drop("non-finite adapter gradient", backward_s)
            if self.scaler is not None:
                for g in grads:
                    g.div_(self.scaler.scale)
            if adapter_lr is None:
                adapter_lr = self.adapters.settings.lr * (self._lr / self.rule.lr if self.rule.lr else 1.0)
            self.adapters.step(adapter_lr)
        if self.rule.clip_grad_norm and self.rule.clip_mode == "previous" and self._norms:
            self._last_norm = float(torch.norm(torch.stack(self._norms), 2.0))
        if self.scaler is not None:
            self.scaler.succeeded()
        self.step += 1
        self._commit_meta = dict(commit_meta or {})
        commit_s = 0.0
        committed = self._commit_due
        # Every update of the step is in; a unit a skipped segment never finished is complete now too.
        if self._tier is not None:
            self._tier.settle_all()
        for unit in self.scheduler.units.values():
            unit.settled = True
        try:
            if committed:
                commit_s = self._commit()
        except BaseException:
            self._abandon_step()
            raise
        self._end_pass()
        self.scheduler.prefetch()  # the next step's first units, now that this step's pins are gone
        return StepResult(step=self.step, dropped=False, committed=committed, committed_step=self.store.step,
                          grad_norm=grad_norm, loss_scale=None if self.scaler is None else self.scaler.scale,
                          backward_s=backward_s, commit_s=commit_s)

    def _commit(self) -> float:
        """Write what is not in the store yet and commit `self.step` atomically; return the seconds taken."""
        started = time.perf_counter()
        self.scheduler.flush()
        meta = {**self.store.meta, **self._commit_meta, "rule": self._rule_identity(),
                "master_weights": self.master_weights}
        if self.scaler is not None:
            meta["loss_scaler"] = self.scaler.state()
        if self._last_norm is not None:
            meta["last_grad_norm"] = self._last_norm
        if self.adapters is not None:
            meta["adapters"] = self.adapters.write(self.work_dir, self.step)
        records = self.scheduler.written_records()
        if self.parallel is None:
            self.store.commit(self.step, records, meta)
        else:
            self.parallel.commit_step(self.run_dir, self.step, lambda: self.store.prepare(self.step, records, meta),
                                      self.store.finish_prepared)
        if self.adapters is not None:
            self.adapters.committed(self.work_dir, meta["adapters"])
        self.scheduler.committed()
        self._generation += 1
        self.scheduler.generation = self._generation
        self._last_commit_time = time.monotonic()
        self._scaler_at = {k: v for k, v in self._scaler_at.items() if k >= self.step}
        return time.perf_counter() - started

    def commit(self) -> int:
        """Make every completed step durable now; return the committed step.

        Call it between steps (not between the micro-batches of one). A no-op
        when nothing changed since the last commit.
        """
        if self._in_step:
            raise RuntimeError("commit() between steps only: the current forward's backward() has not run")
        if self._accumulating:
            raise RuntimeError("commit() between steps only: micro-batches of the current step are accumulated")
        if self.step != self.store.step or any(u.updated for u in self.scheduler.units.values()) or (
                self.adapters is not None and self.store.meta.get("adapters") is None):
            self._commit()
        return self.store.step

    def _drop(self, reason: str, backward_s: float = 0.0) -> StepResult:
        undone = self._abandon_step()
        if self.scaler is not None:
            self.scaler.overflowed()
            self._scaler_at[self.step + undone] = self.scaler.state()  # the retried step starts lower
        return StepResult(step=self.step, dropped=True, reason=reason, backward_s=backward_s,
                          committed_step=self.store.step, rolled_back=undone,
                          loss_scale=None if self.scaler is None else self.scaler.scale)

    def _drop_kept_graphs(self) -> bool:
        """Unpin the units of keep_graph segments whose backward has not run (the step ended, was
        dropped, or the budget needs their room: a loss that never reaches the logits leaves the
        head's graph unused); a backward still to come recomputes. Whether any was dropped."""
        dropped = bool(self._kept_pins)
        for segment, kept in self._kept_pins:
            kept.drop()
            self.scheduler.release(segment.needs)
        self._kept_pins = []
        return dropped

    def _end_pass(self) -> None:
        self._drop_kept_graphs()
        if self._finite is not None:
            self._finite.fill_(True)
        self._drain_reductions()
        self._in_step = False
        self._failed = None
        self._touched = False
        self._commit_due = False
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
        for unit in self.scheduler.units.values():
            unit.pending_grads = unit.held_grads = unit.reducing = 0
        self._forwards = 0
        self._set_keep_graph()  # for the next step: whether it clips in two passes is known now

    def _abandon_step(self) -> int:
        """Drop the current step (every micro-batch of it): no unit keeps any part of its update.

        If nothing was updated yet (a non-finite loss, an error before backward) only this step
        goes. Otherwise every unit returns to the last commit, and with it the completed steps
        since: their count is returned, `self.step` is the committed step again.
        """
        undone = 0
        self._drop_kept_graphs()
        if self.adapters is not None:
            self.adapters.zero_grad()
        if self._touched or self._accumulating:
            self.scheduler.rollback()
            self.store.discard_uncommitted()
            undone = self.step - self.store.step
            self.step = self.store.step
            self._last_norm = self.store.meta.get("last_grad_norm")
            self._accumulating = False
            self._generation += 1  # the discarded generation's files are gone; never reuse its number
            self.scheduler.generation = self._generation
            if self.adapters is not None:
                self.adapters.rollback()
        self._end_pass()
        return undone

    # ---- outputs -------------------------------------------------------------------------------
    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the weights after the last completed step, without rule state (commits first)."""
        self.commit()
        return ((name, t) for name, t in self.store.iter_tensors() if STATE_SEP not in name)

    def add_lora(self, settings: LoraSettings, train_base: bool = True) -> LoraAdapters:
        """Train LoRA adapters (peft, AdamW, in memory) beside the fused update of every base weight,
        or (`train_base=False`) instead of it: classic LoRA, the base weights frozen and streamed.

        Call it before the first step. On a resumed store that has adapters, their committed state
        (and AdamW's) is loaded; its rank, alpha, dropout and targets must match."""
        if self.adapters is not None:
            raise RuntimeError("add_lora() was called already")
        if self._tier is not None:
            raise UserError("add_lora(): LoRA adapters on a device are not built yet; train them on CPU")
        if self._in_step:
            raise RuntimeError("add_lora() between steps only")
        # peft reads a base layer's weight shape (GPT-2's Conv1D): give unbound parameters a
        # zero-stride stand-in of the right shape, 4 bytes, while it builds the adapters.
        stand_ins = []
        for unit in self.scheduler.units.values():
            if not unit.bound:
                for param, dtype, shape, *_ in unit.params:
                    param.data = torch.zeros((), dtype=dtype).expand(shape)
                    stand_ins.append(param)
        try:
            self.adapters = LoraAdapters.inject(self.model, settings, seed=self.seed)
        finally:
            for param in stand_ins:
                unbind(param)
        if not train_base:
            for param in self._params:
                param.requires_grad_(False)
        name = self.store.meta.get("adapters")
        if name:
            where = f"--resume from {self.work_dir} (step {self.store.step})"
            self.adapters.load_state(torch.load(self.work_dir / name, weights_only=False), where)
        return self.adapters

    def export(self, out_dir: str | os.PathLike, adapters: str = "merged") -> Path:
        """Write the committed weights in Hugging Face layout (config, tokenizer, sharded safetensors).

        With LoRA adapters: `adapters="merged"` writes W + B A * alpha / r in place of each adapted
        weight; `"separate"` writes the trained base weights and a peft adapter in `out_dir/adapter`."""
        from .checkpoint.export import export_hf

        if adapters not in ("merged", "separate"):
            raise UserError(f"export adapters= must be 'merged' or 'separate', got {adapters!r}")
        out = Path(out_dir)
        self.commit()  # export what was trained, all of it
        if self.parallel is not None and not self.parallel.is_main:
            if self._shard:
                self.scheduler.evict_all()
                for _ in self.iter_weights():  # rank 0 gathers every unit: take part, write nothing
                    pass
            self.parallel.barrier(f"exporting to {out} (rank 0 writes)")  # every rank's store holds the same weights
            return out
        # Export reads unit by unit and holds about one shard: free the resident units first and keep
        # shards within half the weights budget (but never below the largest tensor), so exporting
        # stays inside the memory the run was given.
        self.scheduler.evict_all()
        self.pool.trim()
        largest = max(slot.nbytes for rec in self.store.units.values() for slot in rec.tensors)
        shard = max(largest, (self.weights_budget or 2 * 2**30) // 2)
        with self._work_progress(f"exporting to {out}") as shown:
            weights = self.iter_weights()
            if self.adapters is not None and adapters == "merged":
                weights = self.adapters.merged(weights)
            export_hf(out, self.checkpoint.config, weights, self.model_dir, max_shard_bytes=shard,
                      on_tensor=lambda name, n, done, total: shown.update(done, name, total_bytes=total))
        if self.adapters is not None and adapters == "separate":
            self.adapters.save_adapter(out / "adapter")
        if self.parallel is not None:
            self.parallel.barrier(f"exporting to {out} (rank 0 writes)")
        return out

    def reset_peaks(self) -> None:
        """Start a new measurement window for `memory_report` (the trainer calls it every step)."""
        self.scheduler.stats.peak_resident_bytes = self.scheduler.resident_bytes()
        self.scheduler.stats.peak_slice_bytes = self.scheduler.sliced_bytes()
        self.pool.reset_peak()
        reset_peak_rss()
        if self._tier is not None:
            self._tier.dev_stats.peak_device_weights_bytes = self._tier.resident_bytes()
            self.compute_device.reset_peak()

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
        report = {
            "peak_host_bytes": peak,
            "peak_device_bytes": peak,
            "weights_resident_peak_bytes": self.scheduler.stats.peak_resident_bytes,
            "staging_peak_bytes": staging,
            "framework_bytes": self.framework_bytes,
            "other_bytes": max(0, peak - staging - self.framework_bytes),
        }
        if self._shard:  # of the resident weights, the slices held at rest (the rest: whole units in use)
            report["weights_at_rest_peak_bytes"] = self.scheduler.stats.peak_slice_bytes
        if self._tier is not None:
            # Three tiers: the device's peak is what its allocator handed out (CUDA: max_memory_allocated),
            # weights on the device are the device tier's; the host holds the units' staging buffers
            # (pinned on CUDA, exact sizes) under the host budget.
            report.update({
                "peak_device_bytes": self.compute_device.peak_allocated_bytes(),
                "weights_resident_peak_bytes": self._tier.dev_stats.peak_device_weights_bytes,
                "host_units_peak_bytes": self._tier.host.stats.peak_resident_bytes,
                "pinned_host_bytes": staging if self.pool.pin else 0,
            })
        return report

    def close(self, commit: bool = True) -> None:
        """Commit the completed steps (unless `commit=False`), stop the I/O threads, unlock the store.

        A forward without its backward, or micro-batches of an unfinished step, are dropped first;
        they never changed a weight.
        """
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        try:
            if self._in_step or self._accumulating:
                self._abandon_step()
            if commit and not self.store.closed:
                self.commit()
        finally:
            try:
                self.scheduler.close()
                self.pool.trim()  # pinned buffers are unregistered before they go
            finally:
                self.store.close()
                if self._owns_parallel:
                    self.parallel.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        # After an error inside the runtime it has rolled back to a consistent step already; after
        # one in the caller's code the completed steps are consistent too. A failing I/O device is
        # the exception: then committing would only raise again, so do not try.
        from .errors import StoreError

        self.close(commit=exc_type is None or not issubclass(exc_type, (StoreError, OSError, PeerLost)))
