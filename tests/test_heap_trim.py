"""Where heap_trim "step" returns freed heap: before the head's forward, after every
Runtime.TRIM_EVERY_BLOCKS blocks' backward when weights stream (nested segments not counted),
before the embedding's backward; heap_trim "unit" after every unit's forward and backward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lomo_runtime.runtime as runtime_module
from helpers import make_tiny_model
from lomo_runtime import SGD, Runtime
from lomo_runtime.device import SimulatedDevice

BLOCKS = 7


def _events(monkeypatch, tmp_path: Path, heap_trim: str, every: int, budget: str | None = "half", device="cpu"):
    """One step's sequence of "trim" and "fwd/bwd OWNER" (top-level segments' ends), step 2 of 2, and
    whether blocks were split. `budget`: None (all resident), "half" of the weights, or "smallest"."""
    model_dir = make_tiny_model(tmp_path, "llama", tied=True, num_hidden_layers=BLOCKS)
    weights_budget = None
    if budget is not None:
        with Runtime(model_dir, SGD(lr=0.05), work_dir=tmp_path / "probe", weights_budget=1 << 40) as rt:
            total = sum(rec.nbytes for rec in rt.store.units.values())
            weights_budget = total // 2 if budget == "half" else rt.minimum_weights_budget()
    monkeypatch.setattr(Runtime, "TRIM_EVERY_BLOCKS", every)
    events: list[str] = []
    monkeypatch.setattr(runtime_module, "release_freed_heap", lambda keep=0: events.append("trim"))
    fwd_end, bwd_begin, bwd_end = Runtime.segment_forward_end, Runtime.segment_backward_begin, Runtime.segment_backward_end

    def note(kind, segment):
        if segment.parent is None:
            events.append(f"{kind} {segment.owner}")

    def forward_end(self, segment, grad, kept=None):
        note("fwd", segment)
        fwd_end(self, segment, grad, kept)

    def backward_begin(self, segment):
        note("bwd-begin", segment)
        bwd_begin(self, segment)

    def backward_end(self, segment, kept=None):
        note("bwd", segment)  # a trim in it then follows its note
        bwd_end(self, segment, kept)

    monkeypatch.setattr(Runtime, "segment_forward_end", forward_end)
    monkeypatch.setattr(Runtime, "segment_backward_begin", backward_begin)
    monkeypatch.setattr(Runtime, "segment_backward_end", backward_end)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with Runtime(model_dir, SGD(lr=0.05), work_dir=tmp_path / "store", heap_trim=heap_trim,
                 weights_budget=weights_budget, device=device) as rt:
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        events.clear()
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        split = any(s.parent is not None for s in rt.segments)
    return events, split


def _trimmed_after(events: list[str]) -> list[str]:
    """The event just before each trim."""
    return [events[i - 1] if i else "start" for i, e in enumerate(events) if e == "trim"]


def test_step_trim_every_n_blocks_of_backward(monkeypatch, tmp_path):
    events, _ = _events(monkeypatch, tmp_path, "step", every=3)
    # Backward runs block.6 ... block.0: trims after the 3rd (block.4) and 6th (block.1) block,
    # before the head's forward (after the last block's forward) and before the embedding's backward.
    assert _trimmed_after(events) == ["fwd block.6", "bwd block.4", "bwd block.1", "bwd-begin embed"]


def test_step_trim_skips_the_last_block_and_counts_only_top_level_blocks(monkeypatch, tmp_path):
    # Every 7 blocks: the 7th is block.0, whose trim the embedding's would repeat at once.
    events, _ = _events(monkeypatch, tmp_path, "step", every=BLOCKS)
    assert _trimmed_after(events) == ["fwd block.6", "bwd-begin embed"]


def test_step_trim_with_split_blocks_counts_blocks_not_nested_segments(monkeypatch, tmp_path):
    # The smallest budget splits each block in two (block.i and a nested block.i.mlp).
    events, split = _events(monkeypatch, tmp_path, "step", every=3, budget="smallest")
    assert split
    assert _trimmed_after(events) == ["fwd block.6", "bwd block.4", "bwd block.1", "bwd-begin embed"]


def test_step_trim_all_resident_only_before_the_head_and_the_embedding(monkeypatch, tmp_path):
    events, _ = _events(monkeypatch, tmp_path, "step", every=3, budget=None)
    assert _trimmed_after(events) == ["fwd block.6", "bwd-begin embed"]


def test_step_trim_on_a_device_only_before_the_head_and_the_embedding(monkeypatch, tmp_path):
    # Weights stream through device memory at half the weights, but the compute is not the CPU's.
    events, _ = _events(monkeypatch, tmp_path, "step", every=3, device=SimulatedDevice())
    assert _trimmed_after(events) == ["fwd block.6", "bwd-begin embed"]


def test_unit_trim_after_every_unit(monkeypatch, tmp_path):
    events, _ = _events(monkeypatch, tmp_path, "unit", every=3, budget=None)
    top = [e for e in events if e.startswith(("fwd", "bwd "))]
    assert events.count("trim") == len(top) == 2 * (BLOCKS + 3)  # embed, blocks, norm+head (2 segments)


@pytest.mark.parametrize("every", [1, 2])
def test_step_trim_count_follows_depth(monkeypatch, tmp_path, every):
    events, _ = _events(monkeypatch, tmp_path, "step", every=every)
    assert events.count("trim") == 2 + (BLOCKS - 1) // every
