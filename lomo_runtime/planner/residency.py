"""Which units stay in memory, which stream, and what that costs in reads: a replay of the scheduler.

This mirrors `lomo_runtime.scheduler` without importing it (the planner must
not allocate or touch a store): the access sequence of a step (forward
segments in order, then backward segments in reverse, each needing its own
unit and, for a tied lm_head, the embed unit), Belady eviction (the resident
unit used farthest in the future goes first), prefetch of up to `depth` units
ahead that evicts only units used later than the one it fetches, and the two
things that pin a unit beyond its segment: a pending gradient (the tied
embedding, from the head's backward until the embedding's) and outstanding
segments (a unit with several segments is written back after the last).

Write-back follows the runtime's rule between commits: a unit whose update is
complete is written at once (and is then clean) if the step commits or Belady
would evict it before its next use anyway; otherwise it stays resident and
dirty, and only a load needed now may evict it (after writing it), never a
prefetch. Prefetch looks past the end of a step into the next one, and runs
once more when a step's backward has released its units.

I/O is assumed to finish before the next access (the simulation has no clock);
it counts reads, and the staging pool's footprint: the pool caches released
buffers per rounded size and never frees them without a capacity, so it holds,
for each unit size, the most units of that size ever resident at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..segments import access_sequences, parent_indices
from .spec import ModelSpec

NEVER = 1 << 60


@dataclass(eq=False)
class SegmentUse:
    """One segment: the unit that owns it and the units it reads; a block's MLP segment (blocks
    split in two) is nested in the block's."""

    owner: str
    needs: tuple[str, ...]
    parent: "SegmentUse | None" = None
    children: list["SegmentUse"] = field(default_factory=list)


def segment_uses(spec: ModelSpec) -> list[SegmentUse]:
    """Segments in forward order with the units each needs (owner first), as `Runtime._build_segments`."""
    uses: list[SegmentUse] = []
    paths = spec.arch.segments(spec.config, spec.split)
    for (path, owner), up in zip(paths, parent_indices([path for path, _ in paths])):
        needs = [owner]
        if spec.dims.tied and path == spec.arch.lm_head_path(spec.config):
            needs.append("embed")  # lm_head.weight is the embedding
        parent = None if up is None else uses[up]
        use = SegmentUse(owner, tuple(needs), parent)
        if parent is not None:
            parent.children.append(use)
        uses.append(use)
    return uses


@dataclass
class Residency:
    """The outcome of replaying `steps` steps under a weights budget."""

    feasible: bool
    reads_per_step: list[int]             # units read in each step
    read_bytes_per_step: list[int]
    peak_resident_bytes: int              # most weight bytes loading/resident at once
    pool_bytes: int                       # staging pool footprint (per-size high-water marks)
    resident_units: list[str]             # never re-read in the last (steady) step
    blocked: str = ""                     # why an access could not be served


@dataclass
class _State:
    resident: bool = False
    pins: int = 0
    pending: bool = False
    dirty: bool = False


def simulate(spec: ModelSpec, budget: int | None, depth: int = 2, steps: int = 3, commit_every: int = 10) -> Residency:
    """Replay `steps` steps of the scheduler under `budget` weight bytes (None: unlimited),
    committing after every `commit_every`-th step."""
    sizes = {u.name: u.nbytes for u in spec.units}
    segs = segment_uses(spec)
    top = [s for s in segs if s.parent is None]
    forward, backward = access_sequences(segs)
    sequence = forward + backward
    positions: dict[str, list[int]] = {}
    for pos, name in enumerate(sequence):
        positions.setdefault(name, []).append(pos)
    state = {name: _State() for name in sizes}
    cursor = -1
    # The staging pool, as StagingPool keeps it: buffers in use and cached (free list) per size,
    # capped at the weights budget by dropping cached buffers, largest size first.
    in_use: dict[int, int] = {}
    cached: dict[int, int] = {}
    pool_peak = 0
    peak = 0
    reads: list[int] = []
    read_bytes: list[int] = []
    read_names: set[str] = set()

    def next_use(name: str) -> int:
        for pos in positions.get(name, ()):
            if pos > cursor:
                return pos
        return len(sequence) + positions[name][0] if name in positions else NEVER

    def resident_bytes() -> int:
        return sum(sizes[n] for n, s in state.items() if s.resident)

    def load(name: str) -> None:
        nonlocal peak
        state[name].resident = True
        size = sizes[name]
        pool_acquire(size)
        peak = max(peak, resident_bytes())
        reads[-1] += 1
        read_bytes[-1] += size
        read_names.add(name)

    def pool_acquire(size: int) -> None:
        nonlocal pool_peak
        if cached.get(size):
            cached[size] -= 1
        elif budget is not None:
            for cached_size in sorted((k for k, v in cached.items() if v), reverse=True):
                if _pool(in_use) + _pool(cached) + size <= budget:
                    break
                cached[cached_size] = 0
        in_use[size] = in_use.get(size, 0) + 1
        pool_peak = max(pool_peak, _pool(in_use) + _pool(cached))

    def evict(name: str) -> None:
        state[name].resident = False
        state[name].dirty = False  # written first if it was
        in_use[sizes[name]] -= 1
        cached[sizes[name]] = cached.get(sizes[name], 0) + 1

    def evictable(name: str, required: bool) -> bool:
        s = state[name]
        return s.resident and s.pins == 0 and not s.pending and (required or not s.dirty)

    def likely_evicted(name: str) -> bool:
        if budget is None:
            return False
        n = len(sequence)
        needed = {sequence[pos % n] for pos in range(cursor + 1, min(next_use(name), cursor + 1 + n))} - {name}
        return sizes[name] + sum(sizes[u] for u in needed) > budget

    def finish(name: str, commit_due: bool) -> None:
        state[name].dirty = not (commit_due or likely_evicted(name))

    def make_room(name: str, required: bool) -> bool:
        if budget is None:
            return True
        before = next_use(name)
        while resident_bytes() + sizes[name] > budget:
            candidates = [n for n in state if evictable(n, required)]
            if not required:
                candidates = [n for n in candidates if next_use(n) > before]
            if not candidates:
                return False
            evict(max(candidates, key=next_use))
        return True

    def prefetch() -> None:
        started, seen = 0, set()
        n = len(sequence)
        for pos in range(cursor + 1, cursor + 1 + n):  # past the end: the next step repeats this one
            if started >= depth:
                break
            name = sequence[pos % n]
            if name in seen:
                continue
            seen.add(name)
            if state[name].resident:
                continue
            if not make_room(name, required=False):
                break
            load(name)
            started += 1

    def acquire(needs: tuple[str, ...]) -> str:
        nonlocal cursor
        for name in needs:
            for pos in positions[name]:
                if pos > cursor:
                    cursor = pos
                    break
        for name in needs:
            state[name].pins += 1
        for name in needs:
            if not state[name].resident:
                if not make_room(name, required=True):
                    held = [n for n, s in state.items() if s.resident]
                    return f"{name} ({sizes[name]} B) does not fit beside {', '.join(held)}"
                load(name)
        prefetch()
        return ""

    def release(needs: tuple[str, ...]) -> None:
        for name in needs:
            state[name].pins -= 1

    for done in range(steps):
        commit_due = (done + 1) % commit_every == 0
        cursor = -1
        reads.append(0)
        read_bytes.append(0)
        read_names = set()
        for seg in top:  # forward: a nested segment runs inside its parent's
            blocked = acquire(seg.needs)
            for child in seg.children:
                blocked = blocked or acquire(child.needs)
                release(child.needs)
            if blocked:
                return Residency(False, reads, read_bytes, peak, pool_peak, [], blocked)
            release(seg.needs)
        for seg in reversed(top):  # backward: recompute, gradients, fused update
            blocked = acquire(seg.needs)
            for child in seg.children:  # the recompute's forward keeps the nested segments' graphs
                blocked = blocked or acquire(child.needs)
            for child in reversed(seg.children):  # their backward: updated, released twice, settled
                blocked = blocked or acquire(child.needs)
                release(child.needs)
                release(child.needs)
                finish(child.owner, commit_due)
            if blocked:
                return Residency(False, reads, read_bytes, peak, pool_peak, [], blocked)
            if seg.owner != "embed" and "embed" in seg.needs:
                state["embed"].pending = True  # the tied weight's gradient waits for the embedding's
            if seg.owner == "embed":
                state["embed"].pending = False
            release(seg.needs)
            finish(seg.owner, commit_due)  # its gradients are all in (a tied embedding's: at its own segment)
        if commit_due:
            for s in state.values():
                s.dirty = False
        prefetch()  # the runtime prefetches again once backward has released its units
    resident = [n for n in sizes if n not in read_names]
    return Residency(True, reads, read_bytes, peak, pool_peak, resident)


def _pool(pool: dict[int, int]) -> int:
    return sum(size * count for size, count in pool.items())


def min_weights_budget(spec: ModelSpec, depth: int = 2) -> int:
    """The smallest weights budget under which a step can run (4 KiB granularity)."""
    lo = max(u.nbytes for u in spec.units)   # infeasible below one unit
    hi = spec.total_bytes                    # everything resident always works
    if not simulate(spec, lo, depth, steps=2).feasible:
        while hi - lo > 4096:
            mid = (lo + hi) // 2 // 4096 * 4096
            if simulate(spec, mid, depth, steps=2).feasible:
                hi = mid
            else:
                lo = mid
        return hi
    return lo
