"""The typed configuration of a training run; YAML is only its serialised form.

`plan` and `train` read the same `TrainConfig`. Precedence: defaults < YAML
file (`--config`) < command-line flags. Unknown YAML keys and wrong types are
refused with a message naming the key, so a typo never silently falls back to
a default. The resolved config is written beside the run's output
(`OUT/config.yaml`).
"""
from __future__ import annotations

import re

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import UserError
from .sizes import parse_size

DTYPE_NAMES = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything one `lomo-run train` needs."""

    model: str = ""                      # HF model directory (config.json + safetensors + tokenizer)
    data: str = ""                       # JSONL ({"text"} or {"prompt","completion"}) or plain text
    out: str = ""                        # output directory: metrics.jsonl, plan.json, model/
    steps: int = 100                     # optimizer steps (one batch each)
    lr: float = 1e-3                     # peak learning rate
    schedule: str = "constant"           # constant | linear | cosine (HF conventions)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    clip_grad_value: float | None = None
    clip_grad_norm: float | None = None  # global gradient-norm clipping threshold
    clip_mode: str = "exact"             # exact (two backward passes) | previous (last step's norm) | unit
    rule: str = "sgd"                    # update rule: sgd | adamw | adalomo
    grad_accum_steps: int = 1            # micro-batches of --batch-size per optimizer step
    master_weights: bool = False         # keep fp32 master weights in the store (bf16/fp16 runs)
    stochastic_rounding: bool | None = None  # round updates into bf16 stochastically (default: on for bf16)
    seq_len: int = 256                   # tokens per packed sequence
    batch_size: int = 1                  # sequences per step
    dtype: str = "fp32"                  # training dtype of the weights: fp32 | bf16 | fp16
    device: str = "cpu"                  # compute device: cpu | cuda | cuda:N
    memory_budget: str | None = None     # process RSS (CPU) or device memory (cuda) the run must stay within
    host_memory_budget: str | None = None  # cuda: host memory for units (pinned); default: what fits in RAM
    weights_budget: str | None = None    # cap on resident weight bytes (experts, tests)
    heap_keep: str | None = None         # freed heap kept mapped between units: fewer page faults, more RSS
    heap_trim: str | None = None         # freed heap back a few times a step ("step") or after every unit ("unit");
                                         # default: "unit" with --memory-budget (the plan holds), else "step"
    offload_dir: str | None = None       # working store location (default OUT/store)
    seed: int = 0
    eval_fraction: float = 0.05          # share of examples held out for eval loss
    eval_data: str | None = None         # multiple-choice JSONL ({"prompt","completion","choices"}) for accuracy
    eval_every: int = 0                  # steps between eval passes (0: only at the end)
    eval_batches: int = 8                # batches per eval pass
    export_every: int = 0                # also export OUT/checkpoint-<step>/ every N steps (0: never)
    prefetch_depth: int = 2              # units read ahead of use
    io_threads: int = 2
    io_engine: str = "posix"             # how unit files move: posix (O_DIRECT) | aio (DeepSpeed async I/O, libaio)
    threads: int | None = None           # torch intra-op threads (default: torch's choice)
    max_dropped_steps: int = 5           # stop after this many consecutive dropped (non-finite) steps
    commit_every: int = 10               # make the step durable every N steps (and at the end, exports, exit)
    commit_interval: str | None = None   # ... or after this much time, whichever comes first: "10m", "90s", "1h"
    resume: bool = False
    lora_rank: int = 0                   # LoRA adapters of this rank beside the fused update (0: none)
    lora_alpha: float | None = None      # adapter scaling alpha / rank (default 2 x rank)
    lora_dropout: float = 0.0
    lora_lr: float = 1e-4                # the adapters' AdamW learning rate (follows --schedule)
    lora_targets: str | None = None      # comma-separated module names (default: peft's for the model type)
    lora_only: bool = False              # freeze every base weight: classic LoRA, streamed
    lora_export: str = "merged"          # merged (W + BA) | separate (base model + OUT/model/adapter)
    parallel: str | None = None          # several ranks under torchrun: replicate (data parallel)

    def validate(self) -> "TrainConfig":
        """Check values a user can get wrong; raise UserError naming the setting."""
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        _positive_int("steps", self.steps)
        _positive_int("seq_len", self.seq_len)
        _positive_int("batch_size", self.batch_size)
        _nonneg_int("warmup_steps", self.warmup_steps)
        _nonneg_int("eval_every", self.eval_every)
        _positive_int("eval_batches", self.eval_batches)
        _nonneg_int("export_every", self.export_every)
        _positive_int("prefetch_depth", self.prefetch_depth)
        _positive_int("io_threads", self.io_threads)
        _positive_int("max_dropped_steps", self.max_dropped_steps)
        _positive_int("commit_every", self.commit_every)
        if self.commit_interval is not None:
            parse_duration(self.commit_interval, "--commit-interval")
        if self.threads is not None:
            _positive_int("threads", self.threads)
        _finite("lr", self.lr, minimum=0.0, strict=True)
        _finite("weight_decay", self.weight_decay, minimum=0.0)
        _finite("min_lr_ratio", self.min_lr_ratio, minimum=0.0)
        if self.clip_grad_value is not None:
            _finite("clip_grad_value", self.clip_grad_value, minimum=0.0, strict=True)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise UserError(f"--schedule must be constant, linear or cosine, got {self.schedule!r}")
        if self.dtype not in DTYPE_NAMES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.rule not in ("sgd", "adamw", "adalomo"):
            raise UserError(f"--rule must be sgd, adamw or adalomo, got {self.rule!r}")
        if self.heap_trim not in (None, "step", "unit"):
            raise UserError(f"--heap-trim must be step or unit, got {self.heap_trim!r}")
        if self.clip_mode not in ("exact", "previous", "unit"):
            raise UserError(f"--clip-mode must be exact, previous or unit, got {self.clip_mode!r}")
        if self.clip_grad_norm is not None:
            _finite("clip_grad_norm", self.clip_grad_norm, minimum=0.0, strict=True)
        _positive_int("grad_accum_steps", self.grad_accum_steps)
        _nonneg_int("lora_rank", self.lora_rank)
        if self.lora_rank:
            _finite("lora_lr", self.lora_lr, minimum=0.0)
            if self.lora_alpha is not None:
                _finite("lora_alpha", self.lora_alpha, minimum=0.0, strict=True)
            if not 0.0 <= self.lora_dropout < 1.0:
                raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        elif self.lora_only:
            raise UserError("--lora-only needs --lora-rank")
        if self.io_engine not in ("posix", "aio"):
            raise UserError(f"--io-engine must be posix or aio, got {self.io_engine!r}")
        if self.parallel not in (None, "replicate", "shard"):
            raise UserError(f"--parallel must be replicate or shard, got {self.parallel!r}")
        if self.lora_export not in ("merged", "separate"):
            raise UserError(f"--lora-export must be merged or separate, got {self.lora_export!r}")
        if not (self.device in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(self.device))):
            raise UserError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.host_memory_budget is not None and self.device == "cpu":
            raise UserError("--host-memory-budget is for --device cuda; on CPU use --memory-budget")
        for name in ("memory_budget", "weights_budget", "heap_keep", "host_memory_budget"):
            if getattr(self, name) is not None:
                parse_size(getattr(self, name), f"--{name.replace('_', '-')}")
        if self.warmup_steps > self.steps:
            raise UserError(f"--warmup-steps ({self.warmup_steps}) is more than --steps ({self.steps})")
        return self

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """Seconds from "90", "90s", "10m", "1.5h"; a UserError naming `what` for anything else."""
    raw = str(text).strip().lower()
    number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in _DURATION_UNITS else (raw, "s")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{what}: expected a positive duration such as 90s, 10m or 1h, got {text!r}")
    return seconds


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict of known keys (values checked by `merge`)."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {file} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        # PyYAML's own message spans several lines with a caret drawing; keep one line.
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        detail = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {file} is not valid YAML{where}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {file}: expected a mapping of settings, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"config file {file}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data


def merge(*layers: Mapping[str, Any]) -> TrainConfig:
    """Build a TrainConfig from layers of settings, later layers winning; None means 'not given'."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            values[key] = _coerce(key, value, types[key])
    return TrainConfig(**values)


def _coerce(key: str, value: Any, declared: str) -> Any:
    base = declared.replace(" | None", "")
    try:
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base == "str":
            if isinstance(value, (dict, list, bool)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"setting {key}: expected {base}, got {value!r}") from None
    return value


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def _nonneg_int(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise UserError(f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")


def _finite(name: str, value: float, minimum: float, strict: bool = False) -> None:
    bad = not math.isfinite(value) or value < minimum or (strict and value == minimum)
    if bad:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise UserError(f"--{name.replace('_', '-')} must be a finite number {bound}, got {value!r}")
