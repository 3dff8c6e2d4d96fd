"""Export a model back to Hugging Face layout, loadable by `from_pretrained`.

Output: `config.json`, the tokenizer files found in the source directory,
`model-0000i-of-0000n.safetensors` shards written with
`safetensors.torch.save_file` (metadata {"format": "pt"}), and
`model.safetensors.index.json` (always written, even for one shard).

Invariants:
- Tensors stream in: at most one shard (`max_shard_bytes`, or one tensor if
  larger) is held for writing at a time.
- Progress is reported per tensor (`on_tensor`), not per shard: a model
  smaller than `max_shard_bytes` (4 GiB by default) is one shard, which would
  report once, at the end. A tensor counts when it has been read and copied
  into the shard being built; the shard's `save_file` (about 1 s per GiB)
  runs between two reports.
- The exported set is checked against the architecture before anything
  becomes visible: every expected tensor once, with its shape; a tied
  `lm_head.weight` is dropped, as transformers does when saving.
- Everything is written into a staging directory beside `out_dir` and moved
  into place at the end, so `out_dir` never holds a half export. An existing
  `out_dir` is replaced only if it holds nothing but export files.
- `source_dir` is only read, and `out_dir` may not be `source_dir`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..sizes import parse_size
from .architectures import architecture_for
from .checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "generation_config.json", "chat_template.jinja", "added_tokens.json",
)
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3  # 4 GiB: few files for real models, each well under filesystem limits
TensorProgress = Callable[[str, int, int, int], None]
"""``on_tensor(tensor name, tensors done, bytes done, total bytes (an estimate, see `export_hf`))``."""


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _is_export_file(name: str) -> bool:
    return (
        name in TOKENIZER_FILES or name in (CONFIG_NAME, INDEX_NAME, SINGLE_NAME)
        or (name.startswith("model-") and name.endswith(".safetensors"))
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_hf(
    out_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    source_dir: str | os.PathLike[str] | None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    *,
    on_tensor: TensorProgress | None = None,
) -> Path:
    """Write `tensors` (canonical names) with `config` to `out_dir` in HF layout; return `out_dir`.

    Tokenizer and generation files present in `source_dir` are copied.
    `on_tensor(name, tensors done, bytes done, total bytes)` is called after each
    exported tensor (a dropped tied alias is not one). The total is estimated
    as the bytes done plus the expected tensors still to come at the itemsize of
    the latest tensor: exact for a single-dtype model, and exact by the last call.
    Raises `ValueError` if the tensors do not match the architecture's expected
    set (a caller bug), `UserError` for unusable output paths.
    """
    out_dir = Path(out_dir)
    limit = parse_size(max_shard_bytes, "max_shard_bytes")
    if limit <= 0:
        raise UserError(f"max_shard_bytes must be positive, got {max_shard_bytes!r}")
    if source_dir is not None and out_dir.resolve() == Path(source_dir).resolve():
        raise UserError(f"{out_dir}: refusing to export over the source checkpoint")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"{out_dir}: exists and is not a directory")
        strangers = sorted(p.name for p in out_dir.iterdir() if not _is_export_file(p.name))
        if strangers:
            raise UserError(f"{out_dir}: holds files an export would not write ({', '.join(strangers[:3])}); pick an empty directory")
    arch = architecture_for(config)
    expected = arch.expected_shapes(config)
    aliases = arch.tied_pairs(config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        weight_map, dtypes = _write_shards(stage, tensors, expected, aliases, limit, on_tensor)
        total = sum(
            (torch.Size(shape).numel() * dtypes[name].itemsize) for name, shape in expected.items()
        )
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (stage / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (stage / CONFIG_NAME).write_text(json.dumps(_export_config(config, set(dtypes.values())), indent=2) + "\n")
        if source_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(source_dir) / name
                if src.is_file():
                    shutil.copyfile(src, stage / name)
        _move_into_place(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir


def _write_shards(
    stage: Path, tensors: Iterable[tuple[str, torch.Tensor]], expected: Mapping[str, tuple[int, ...]],
    aliases: Mapping[str, str], limit: int, on_tensor: TensorProgress | None = None,
) -> tuple[dict[str, str], dict[str, torch.dtype]]:
    """Write shards under temporary names, then rename to `model-i-of-n`; return (weight_map, dtypes)."""
    shard_of: dict[str, int] = {}
    dtypes: dict[str, torch.dtype] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    count = 0
    done_bytes = 0
    numel_left = sum(torch.Size(shape).numel() for shape in expected.values())  # for on_tensor's total

    def flush() -> None:
        nonlocal pending, pending_bytes, count
        if pending:
            count += 1
            save_file(pending, str(stage / f"shard-{count}.tmp"), metadata={"format": "pt"})
            pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        if name in aliases:  # the tied lm_head is the embedding; transformers re-ties it on load
            continue
        if name not in expected:
            raise ValueError(f"export: tensor {name!r} is not part of this model")
        if name in dtypes:
            raise ValueError(f"export: tensor {name!r} given twice")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"export: tensor {name!r} has shape {tuple(tensor.shape)}, config implies {expected[name]}")
        # save_file needs contiguous CPU tensors that share no storage.
        data = tensor.detach().to("cpu").contiguous().clone()
        nbytes = data.numel() * data.element_size()
        if pending and pending_bytes + nbytes > limit:
            flush()
        pending[name] = data
        pending_bytes += nbytes
        shard_of[name] = count + 1
        dtypes[name] = data.dtype
        if on_tensor is not None:
            done_bytes += nbytes
            numel_left -= data.numel()
            on_tensor(name, len(dtypes), done_bytes, done_bytes + max(numel_left, 0) * data.element_size())
    flush()
    missing = [n for n in expected if n not in dtypes]
    if missing:
        raise ValueError(f"export: {len(missing)} tensors missing, first {missing[0]!r}")
    for i in range(1, count + 1):
        os.replace(stage / f"shard-{i}.tmp", stage / _shard_name(i, count))
    return {name: _shard_name(i, count) for name, i in shard_of.items()}, dtypes


def _export_config(config: Mapping[str, Any], dtypes: set[torch.dtype]) -> dict[str, Any]:
    """`config` with its dtype field set to the exported dtype, so `dtype="auto"` loads what was written."""
    out = dict(config)
    if len(dtypes) == 1:
        (dtype,) = dtypes
        for key in ("dtype", "torch_dtype"):
            if key in out:
                out[key] = _dtype_name(dtype)
    return out


def _move_into_place(stage: Path, out_dir: Path) -> None:
    """Swap the staged export in for `out_dir` (which holds only export files, if it exists)."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
        os.replace(stage, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out_dir)
    # tempfile.mkdtemp makes 0700 directories; an export is an ordinary output.
    os.chmod(out_dir, 0o755)
