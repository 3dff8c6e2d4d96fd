"""LoRA adapters trained beside the fused LOMO update.

The LOMO paper's finding (arXiv 2306.09782, section 4.3): LOMO on every weight
and LoRA adapters on top are complementary. Here peft injects the adapters into
the runtime's module tree in place (`inject_adapter_in_model`: no wrapper, the
runtime's segments and parameter objects stay the same), every base weight keeps
the fused, streamed update, and the adapters (a rank-r pair per targeted linear,
about 2 r (m + n) values: 0.3% of SmolLM2-135M's weights at r = 8 on q/v) live in
memory and step with `torch.optim.AdamW` after each backward. Their gradients
come out of the same checkpointed recompute as the base weights'.

Durability follows the store's: at every commit the adapters and their AdamW
state are written to `adapters-<step>.pt` in the work directory (fsynced, then
named by the commit's meta); a rollback to the last commit restores the
in-memory copy taken then, so a replayed step updates them exactly as the first
time. Export writes the merged model (`W + B A * alpha / r`) or, separately, the
trained base and a peft adapter directory.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import UserError

ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """What `--lora-rank` and its companions set."""

    rank: int
    alpha: float | None = None      # scaling alpha / rank; None: 2 x rank (scaling 2, a common choice)
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: peft's default for the model type (q/v projections for Llama)
    lr: float = 1e-4                # AdamW learning rate of the adapters (follows the run's schedule)
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise UserError(f"--lora-rank must be a positive integer, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        if not (0.0 <= self.dropout < 1.0):
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.dropout!r}")
        if not self.lr >= 0:
            raise UserError(f"--lora-lr must be >= 0, got {self.lr!r}")

    def identity(self) -> dict[str, Any]:
        """What a resume must match (lr and weight decay may change, as for the base rule)."""
        d = asdict(self)
        return {k: d[k] for k in ("rank", "alpha", "dropout", "target_modules")}


@dataclass
class LoraAdapters:
    """The injected adapters of one model, their optimizer, and the copy of both at the last commit."""

    settings: LoraSettings
    model: nn.Module
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict)  # base weight name -> the peft LoRA layer
    optimizer: torch.optim.Optimizer | None = None
    _committed: dict[str, Any] | None = None
    _written: dict[str, Any] | None = None  # the state `write` saved, until its commit is durable

    @classmethod
    def inject(cls, model: nn.Module, settings: LoraSettings, seed: int) -> "LoraAdapters":
        """Add adapters to `model` in place. Base parameters keep `requires_grad` (peft freezes them;
        here they train with LOMO). The adapters' initial values are a function of `seed`."""
        try:
            from peft import LoraConfig, inject_adapter_in_model
            from peft.tuners.lora import LoraLayer
        except ImportError:
            raise UserError("--lora-rank needs peft: pip install peft") from None
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=settings.target_modules, bias="none")
        if config.target_modules is None:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

            if model_type not in defaults:
                raise UserError(f"--lora-targets: peft has no default target modules for model_type {model_type!r}; "
                                "name them, e.g. --lora-targets q_proj,v_proj")
            config.target_modules = set(defaults[model_type])
        base = [p for p in model.parameters()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
            except ValueError as exc:
                raise UserError(f"--lora-targets: {exc}") from None
        for p in base:
            p.requires_grad_(True)
        adapters = cls(settings=settings, model=model)
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                adapters.modules[name.replace(".base_layer", "") + ".weight"] = module
        adapters.params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
        if not adapters.params:
            raise UserError(f"--lora-targets {sorted(config.target_modules)} matched no module of this model")
        adapters.optimizer = torch.optim.AdamW(adapters.params.values(), lr=settings.lr,
                                               weight_decay=settings.weight_decay)
        adapters._committed = adapters.state()
        return adapters

    # ---- the step ----------------------------------------------------------------------------------
    def step(self, lr: float) -> None:
        """One AdamW step of the adapters on the gradients this step's backward left in them."""
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    # ---- durability ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        assert self.optimizer is not None
        return {"params": {n: p.detach().clone() for n, p in self.params.items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "settings": self.settings.identity()}

    def load_state(self, state: dict[str, Any], where: str) -> None:
        assert self.optimizer is not None
        if state.get("settings") != self.settings.identity():
            raise UserError(f"{where}: the adapters were trained with {state.get('settings')}, now "
                            f"{self.settings.identity()}; resume with the same --lora-* settings")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._committed = self.state()

    def rollback(self) -> None:
        """Back to the state of the last commit (the runtime rolled the weights back there too)."""
        assert self._committed is not None
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self._committed["params"][name])
        assert self.optimizer is not None
        self.optimizer.load_state_dict(copy.deepcopy(self._committed["optimizer"]))
        self.zero_grad()

    def write(self, work_dir: Path, step: int) -> str:
        """Write the current state as `adapters-<step>.pt` (fsynced); the caller names it in its commit."""
        name = f"adapters-{step}.pt"
        tmp = work_dir / (name + ".tmp")
        self._written = self.state()  # what `committed` keeps for rollbacks: the bytes just written
        with open(tmp, "wb") as f:
            torch.save(self._written, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, work_dir / name)
        return name

    def committed(self, work_dir: Path, name: str) -> None:
        """The commit naming `name` is durable: keep its state for rollbacks, drop older files."""
        self._committed, self._written = self._written, None
        for old in work_dir.glob("adapters-*.pt*"):
            if old.name != name:
                old.unlink(missing_ok=True)

    # ---- export ------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged(self, weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The store's weights with each adapter's delta (B A * alpha / r) added to its base weight."""
        for name, tensor in weights:
            module = self.modules.get(name)
            if module is not None:
                delta = module.get_delta_weight(ADAPTER_NAME)
                tensor = (tensor.to(torch.float32) + delta.to(torch.float32)).to(tensor.dtype)
            yield name, tensor

    def save_adapter(self, out_dir: Path) -> None:
        """A peft adapter directory (`adapter_config.json`, `adapter_model.safetensors`) that applies
        to the trained base weights (an export with adapters="separate"):
        `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter")`."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        config = LoraConfig(r=self.settings.rank, lora_alpha=self.settings.alpha, lora_dropout=self.settings.dropout,
                            target_modules=sorted({n.split(".")[-2] for n in self.modules}), bias="none",
                            task_type="CAUSAL_LM",
                            fan_in_fan_out=any(getattr(m, "fan_in_fan_out", False) for m in self.modules.values()))
        config.save_pretrained(str(out_dir))
        tensors = {f"base_model.model.{n.replace('.' + ADAPTER_NAME, '')}": p.detach().contiguous()
                   for n, p in self.params.items()}
        save_file(tensors, str(out_dir / "adapter_model.safetensors"))
