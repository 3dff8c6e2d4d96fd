"""A Hugging Face checkpoint directory, opened read-only and validated whole.

A checkpoint is `config.json` plus either `model.safetensors` or shards named
by `model.safetensors.index.json` (transformers' order of preference: the
single file wins when both exist).

Invariants once `Checkpoint.open` returns:
- every safetensors header is valid (see `safetensors_file`); every shard the
  index names exists and holds exactly the tensors the index maps to it;
- tensor names are canonical (see `architectures`), each appears once, known
  buffers are skipped, and the set equals the architecture's expected set with
  every shape as `config.json` implies and a floating-point dtype;
- a tied checkpoint that also stores `lm_head.weight` is accepted (same shape
  as the embedding) but that copy is never read: the embedding is the tensor.
Nothing here writes to the directory: the user's input is never modified.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import UserError
from .architectures import Architecture, architecture_for, assign_units
from .safetensors_file import TensorEntry, read_header, read_tensor_data

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes are: the file and its validated header entry (`entry.name` is the on-disk name)."""

    path: Path
    entry: TensorEntry


@dataclass(frozen=True)
class MergedLocation:
    """A model tensor that transformers builds from several file tensors (Mixtral's per-expert
    matrices, stacked and concatenated into one 3-D tensor per layer): its sources in file order,
    and an `entry` describing the merged tensor (the model's name, dtype, shape and bytes)."""

    path: Path                                   # the first source's file, for messages
    entry: TensorEntry
    sources: dict[str, list[TensorLocation]]     # converter source pattern -> file tensors


@dataclass(frozen=True)
class UnitSpec:
    """A unit and its canonical tensor names, in state-dict order."""

    name: str
    tensor_names: list[str] = field(default_factory=list)


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read {what} ({err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not well-formed JSON ({err})") from None


def load_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate `model_dir/config.json` alone (no weights needed); return it as a dict.

    Checks that the model_type is supported and that every dimension the
    architecture needs is present and sane.
    """
    path = Path(model_dir) / CONFIG_NAME
    config = _read_json(path, "model config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: must hold a JSON object")
    architecture_for(config, path).dims(config, path)
    return config


def _weight_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None, Path]:
    """Return (files, index weight_map or None, the file that lists the tensors) for `model_dir`."""
    single, index_path = model_dir / SINGLE_NAME, model_dir / INDEX_NAME
    if single.exists():
        return [single], None, single
    if not index_path.exists():
        others = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if others:
            raise UserError(f"{model_dir}: found {', '.join(others)} but no {INDEX_NAME} to say which tensor is where")
        bins = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" ({', '.join(bins)} is PyTorch pickle; convert it to safetensors)" if bins else ""
        raise UserError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
    index = _read_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise UserError(f"{index_path}: needs a 'weight_map' object mapping tensor names to shard files")
    files: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        # Shards are plain file names beside the index; anything else could
        # read outside the checkpoint directory.
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise UserError(f"{index_path}: tensor '{tensor}': shard {shard!r} is not a plain file name")
        if shard not in files:
            if not (model_dir / shard).is_file():
                raise UserError(f"{model_dir / shard}: shard missing (the index maps tensor '{tensor}' to it)")
            files[shard] = model_dir / shard
    return sorted(files.values()), weight_map, index_path


class Checkpoint:
    """A validated, read-only view of an HF checkpoint directory; build it with `Checkpoint.open`."""

    def __init__(
        self, model_dir: Path, config: dict[str, Any], arch: Architecture,
        tensors: dict[str, TensorLocation | MergedLocation], units: list[UnitSpec], files: list[Path],
        conversion: Any = None,
    ) -> None:
        self.dir = model_dir
        self.config = config
        self.arch = arch
        self.tensors = tensors
        self.units = units
        self.files = files
        self.conversion = conversion  # architectures.Conversion where transformers renames or merges file tensors
        self.split = any(u.name.endswith(".mlp") for u in units)  # blocks cut in two (architectures.py)

    def with_split(self, split: bool) -> "Checkpoint":
        """This checkpoint with its blocks cut in two (`block.{i}` and `block.{i}.mlp`) or whole."""
        if split == self.split:
            return self
        units = _units(self.arch, self.config, self.tensors, split)
        return Checkpoint(self.dir, self.config, self.arch, self.tensors, units, self.files, self.conversion)

    @classmethod
    def open(cls, model_dir: str | os.PathLike[str]) -> "Checkpoint":
        """Open `model_dir`, validating config and every weight file; `UserError` naming file and tensor if bad."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise UserError(f"{model_dir}: not a directory")
        config = load_config(model_dir)
        config_path = model_dir / CONFIG_NAME
        arch = architecture_for(config, config_path)
        expected = arch.expected_shapes(config)
        tied_alias = arch.tied_pairs(config)
        files, weight_map, listing = _weight_files(model_dir)
        # Families whose file tensors transformers renames or merges when loading (GPT-NeoX, MoE):
        # the same transforms, by transformers' own functions (architectures.Conversion).
        conversion = arch.conversion(config) if hasattr(arch, "conversion") else None
        merged: dict[str, dict[str, list[TensorLocation]]] = {}

        found: dict[str, TensorLocation | MergedLocation] = {}
        on_disk: dict[str, TensorEntry] = {}  # every tensor as the files name it, buffers included
        for path in files:
            header = read_header(path)
            if weight_map is not None:
                # The index and the shards must agree both ways, or a loader
                # trusting one of them would miss a tensor.
                for name in header:
                    if weight_map.get(name) != path.name:
                        raise UserError(f"{path}: tensor '{name}': not mapped to this shard by {INDEX_NAME}")
            for name, entry in header.items():
                pattern = None
                if conversion is not None and not arch.is_buffer(name):
                    canonical, pattern = conversion.rename(name)
                else:
                    canonical = arch.canonical_name(name)
                if arch.is_buffer(canonical):
                    continue
                if pattern is not None:  # one of several file tensors transformers merges into `canonical`
                    merged.setdefault(canonical, {}).setdefault(pattern, []).append(TensorLocation(path, entry))
                    continue
                if canonical in found:
                    other = found[canonical]
                    raise UserError(
                        f"{path}: tensor '{name}': duplicates '{other.entry.name}' in {other.path}"
                    )
                found[canonical] = TensorLocation(path, entry)
            on_disk.update(header)
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in on_disk:
                    raise UserError(f"{model_dir / shard}: tensor '{name}': listed in {INDEX_NAME} but not in the shard")
        for target, sources in merged.items():
            found[target] = _merged_location(target, sources, conversion)

        for alias, target in tied_alias.items():
            loc = found.pop(alias, None)
            if loc is not None and target in found and loc.entry.shape != found[target].entry.shape:
                raise UserError(
                    f"{loc.path}: tensor '{loc.entry.name}': shape {loc.entry.shape} differs from tied "
                    f"'{target}' {found[target].entry.shape}"
                )
        missing = [name for name in expected if name not in found]
        unexpected = [loc for name, loc in found.items() if name not in expected]
        if missing and unexpected:
            # transformers 5 renames or merges some families' tensors when it loads them (per-expert
            # MoE weights into one 3-D tensor; GPT-NeoX's embed_out into lm_head): the file and the
            # model disagree on names, which is not a damaged checkpoint.
            raise UserError(
                f"{unexpected[0].path}: tensor '{unexpected[0].entry.name}' is not one the {arch.name} model of "
                f"{config_path} has, and its '{missing[0]}' is not in the files: the weights are not this "
                "config's, or they are in a layout this transformers cannot convert to its model's")
        for name, shape in expected.items():
            loc = found.get(name)
            if loc is None:
                raise UserError(f"{listing}: tensor '{name}': missing; a {arch.name} model needs it")
            if loc.entry.shape != shape:
                raise UserError(
                    f"{loc.path}: tensor '{loc.entry.name}': shape {loc.entry.shape} but {config_path} implies {shape}"
                )
            if not loc.entry.torch_dtype.is_floating_point:
                raise UserError(f"{loc.path}: tensor '{loc.entry.name}': dtype {loc.entry.dtype} is not floating point")
        for name, loc in found.items():
            if name not in expected:
                raise UserError(f"{loc.path}: tensor '{loc.entry.name}': not part of a {arch.name} model per {config_path}")

        tensors = {name: found[name] for name in expected}  # canonical, unit order
        return cls(model_dir, config, arch, tensors, _units(arch, config, tensors), files, conversion)

    def resolve(self, name: str) -> str:
        """The canonical name for `name` (tied aliases and alternative spellings resolved); `KeyError` if unknown."""
        canonical = self.arch.canonical_name(name)
        canonical = self.arch.tied_pairs(self.config).get(canonical, canonical)
        if canonical not in self.tensors:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        return canonical

    def read_tensor(self, name: str) -> torch.Tensor:
        """Read tensor `name` from disk with plain file reads; dtype and shape as in the header."""
        loc = self.tensors[self.resolve(name)]
        if isinstance(loc, MergedLocation):  # transformers' merge of its file tensors, as from_pretrained does
            sources = {p: [read_tensor_data(s.path, s.entry) for s in locs] for p, locs in loc.sources.items()}
            return self.conversion.merge(loc.entry.name, sources).contiguous()
        return read_tensor_data(loc.path, loc.entry)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor as (canonical name, tensor), unit by unit in forward order."""
        for unit in self.units:
            for name in unit.tensor_names:
                yield name, self.read_tensor(name)

    def unit_nbytes(self, unit: str) -> int:
        """Bytes on disk of `unit`'s tensors."""
        spec = next(u for u in self.units if u.name == unit)
        return sum(self.tensors[n].entry.nbytes for n in spec.tensor_names)

    @property
    def nbytes(self) -> int:
        """Bytes on disk of all tensors (a stored tied lm_head copy not counted)."""
        return sum(loc.entry.nbytes for loc in self.tensors.values())


def _units(arch: Any, config: dict[str, Any], tensors: dict[str, Any], split: bool = False) -> list[UnitSpec]:
    """The units of `tensors` (canonical names, unit order), each with its tensors in that order."""
    units = [UnitSpec(u) for u in arch.unit_names(config, split)]
    by_name = {u.name: u for u in units}
    for name, unit in assign_units(arch, tensors, config, split).items():
        by_name[unit].tensor_names.append(name)
    return units


def _merged_location(target: str, sources: dict[str, list[TensorLocation]], conversion: Any) -> MergedLocation:
    """Check that `sources` merge into one tensor (dtypes agree; transformers' ops run on meta
    tensors for the merged shape) and describe it; `UserError` naming a source file and tensor."""
    from transformers.core_model_loading import dot_natural_key

    ordered = {p: sorted(locs, key=lambda loc: dot_natural_key(loc.entry.name)) for p, locs in sources.items()}
    first = next(iter(ordered.values()))[0]
    for locs in ordered.values():
        for loc in locs:
            if loc.entry.dtype != first.entry.dtype:
                raise UserError(f"{loc.path}: tensor '{loc.entry.name}': dtype {loc.entry.dtype} differs from "
                                f"'{first.entry.name}' ({first.entry.dtype}), merged with it into '{target}'")
    meta = {p: [torch.empty(loc.entry.shape, dtype=loc.entry.torch_dtype, device="meta") for loc in locs]
            for p, locs in ordered.items()}
    try:
        shape = tuple(conversion.merge(target, meta).shape)
    except Exception as exc:
        raise UserError(f"{first.path}: tensor '{first.entry.name}': cannot be merged with the others into "
                        f"'{target}' as transformers does ({type(exc).__name__}: {exc})") from None
    nbytes = math.prod(shape) * first.entry.torch_dtype.itemsize
    entry = TensorEntry(name=target, dtype=first.entry.dtype, shape=shape, start=0, end=nbytes)
    return MergedLocation(first.path, entry, ordered)
