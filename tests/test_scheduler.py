"""The scheduler on its own, with a fake store whose reads and writes can be held, failed or
delayed at random, and a fake staging pool that measures the bytes it has handed out.

The pool's count of bytes handed out and not returned is measured independently of the
scheduler's own accounting (`resident_bytes`, `stats.peak_resident_bytes`): it is what memory
the units really hold. The store keeps every file's bytes, so a test can check that what
was written is what the unit held, and that a re-read returns it.

Then the same properties on a real `Runtime` whose store reads and writes sleep random times:
the weights equal torch.optim.SGD's (fp32, max abs difference <= 1e-6) and the budget holds.
"""
from __future__ import annotations

import errno
import random
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_model, torch_sgd_reference
from lomo_runtime import SGD, Runtime
from lomo_runtime.scheduler import Scheduler, Unit, UnitState

KB = 4096


class FakeStore:
    """Unit files in memory. `gate[name]` (an Event) holds that unit's writes until set;
    `fail[name]` makes its next write raise EIO; `delay()` returns the seconds each I/O sleeps."""

    def __init__(self, sizes: dict[str, int], delay=None) -> None:
        self.committed = {name: torch.zeros(n, dtype=torch.uint8) for name, n in sizes.items()}
        self.files: dict[tuple, torch.Tensor] = {}
        self.gate: dict[str, threading.Event] = {}
        self.fail: set[str] = set()
        self.delay = delay or (lambda: 0.0)
        self.lock = threading.Lock()
        self.log: list[tuple[str, str]] = []  # ("read"|"write-begin"|"write-end", unit), in time order
        self.writes_in_flight = 0
        self._seq = 0

    def _note(self, what: str, name: str) -> None:
        with self.lock:
            self.log.append((what, name))

    def read_unit(self, name: str, buffer: torch.Tensor, record=None) -> None:
        time.sleep(self.delay())
        self._note("read", name)
        buffer.copy_(self.files[record] if record is not None else self.committed[name])

    def write_unit(self, name: str, buffer: torch.Tensor, generation: int):
        self._note("write-begin", name)
        with self.lock:
            self.writes_in_flight += 1
        try:
            gate = self.gate.get(name)
            if gate is not None:
                assert gate.wait(10), "a held write was never released"
            time.sleep(self.delay())
            if name in self.fail:
                self.fail.discard(name)
                raise OSError(errno.EIO, "Input/output error (injected)", f"units/{name}.g{generation}.bin")
            data = buffer.clone()
            with self.lock:
                self._seq += 1
                record = (name, generation, self._seq)
                self.files[record] = data
            self._note("write-end", name)
            return record
        finally:
            with self.lock:
                self.writes_in_flight -= 1

    def commit(self, records: dict[str, tuple]) -> None:
        for name, record in records.items():
            self.committed[name] = self.files[record]


class FakePool:
    """Hands out zeroed buffers and measures the bytes out at once (the memory units really hold)."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.out = 0
        self.peak = 0
        self.over: list[int] = []  # every moment the bytes out exceeded the budget

    def acquire(self, nbytes: int) -> torch.Tensor:
        self.out += nbytes
        self.peak = max(self.peak, self.out)
        if self.budget is not None and self.out > self.budget:
            self.over.append(self.out)
        return torch.zeros(nbytes, dtype=torch.uint8)

    def release(self, buf: torch.Tensor) -> None:
        self.out -= buf.numel()


def _scheduler(sizes: dict[str, int], budget: int | None, depth: int = 2, delay=None):
    store = FakeStore(sizes, delay)
    pool = FakePool(budget)
    units = [Unit(name=n, nbytes=s, params=[]) for n, s in sizes.items()]
    return Scheduler(units, store, pool, budget, prefetch_depth=depth, io_threads=2), store, pool


def _update(sched: Scheduler, name: str, value: int) -> None:
    """What a fused update does to a unit: change its bytes in place, mark it changed and settled."""
    unit = sched.units[name]
    sched.ensure_writable([name])
    unit.buffer.fill_(value)
    unit.updated = unit.dirty = True
    unit.settled = True


def test_eviction_while_a_unit_is_being_written(tmp_path: Path) -> None:
    """A needed load must evict a unit whose write is in flight: it waits for the write, never
    frees the buffer under it, never exceeds the budget, and a later read returns the written bytes."""
    sizes = {"a": 2 * KB, "b": 2 * KB, "c": 2 * KB}
    sched, store, pool = _scheduler(sizes, budget=4 * KB, depth=0)
    try:
        sched.begin_pass(["a", "b", "c", "a"])
        sched.acquire(["a"])
        _update(sched, "a", 7)
        sched.release(["a"])
        store.gate["a"] = threading.Event()
        sched.write_back("a")
        assert sched.units["a"].state is UnitState.WRITING
        sched.acquire(["b"])  # b is pinned: a, being written, is the only unit c's load may evict
        threading.Timer(0.2, store.gate["a"].set).start()
        started = time.perf_counter()
        sched.acquire(["c"])
        waited = time.perf_counter() - started
        assert waited >= 0.15  # it waited for the write instead of dropping a's bytes
        assert sched.units["a"].state is UnitState.ON_DISK and sched.units["a"].buffer is None
        order = [e for e in store.log if e[1] in ("a", "c")]
        assert order.index(("write-end", "a")) < order.index(("read", "c"))  # c's bytes came after a's left
        assert pool.over == [] and pool.peak <= 4 * KB
        assert sched.stats.write_waits_s >= 0.15
        sched.release(["b", "c"])
        sched.acquire(["a"])  # re-read: the uncommitted generation just written, not the committed zeros
        assert bool((sched.units["a"].buffer == 7).all())
        sched.release(["a"])
    finally:
        for gate in store.gate.values():
            gate.set()
        sched.close()


def test_an_update_waits_for_the_write_in_flight(tmp_path: Path) -> None:
    """A unit being written is updated again (its next backward use): `ensure_writable` waits for the
    write, so the file holds the bytes of the moment the write began (the real store checksums them
    while writing: a buffer changed under it would be a torn, mis-checksummed file)."""
    sizes = {"a": 2 * KB}
    sched, store, pool = _scheduler(sizes, budget=None)
    try:
        sched.begin_pass(["a", "a"])
        sched.acquire(["a"])
        _update(sched, "a", 7)
        store.gate["a"] = threading.Event()
        sched.write_back("a")
        threading.Timer(0.2, store.gate["a"].set).start()
        started = time.perf_counter()
        _update(sched, "a", 9)  # ensure_writable first, as the runtime's segment_backward_begin does
        assert time.perf_counter() - started >= 0.15
        first = [data for (name, _, _), data in store.files.items() if name == "a"]
        assert len(first) == 1 and bool((first[0] == 7).all()), "the write saw bytes changed under it"
        sched.release(["a"])
        sched.flush()
        store.commit(sched.written_records())
        sched.committed()
        assert bool((store.committed["a"] == 9).all())
    finally:
        for gate in store.gate.values():
            gate.set()
        sched.close()


def test_failed_write_reaped_by_poll_keeps_the_bytes_and_retries(tmp_path: Path) -> None:
    """`poll()` (every gradient hook calls it) reaps a failed write: the error surfaces there, the unit
    stays resident and dirty with its bytes intact, and the next flush writes them."""
    sizes = {"a": KB, "b": KB}
    sched, store, pool = _scheduler(sizes, budget=None)
    try:
        sched.begin_pass(["a", "b"])
        sched.acquire(["a", "b"])
        _update(sched, "a", 3)
        store.fail.add("a")
        sched.write_back("a")
        deadline = time.monotonic() + 5
        while not sched.units["a"].future.done() and time.monotonic() < deadline:
            time.sleep(0.001)
        with pytest.raises(OSError, match="injected"):
            sched.poll()
        unit = sched.units["a"]
        assert unit.state is UnitState.RESIDENT and unit.dirty and unit.future is None
        assert bool((unit.buffer == 3).all())
        sched.release(["a", "b"])
        sched.flush()  # the write is retried with the same bytes
        store.commit(sched.written_records())
        sched.committed()
        assert bool((store.committed["a"] == 3).all())
    finally:
        sched.close()


def test_prefetch_blocked_by_a_write_starts_when_poll_sees_it_land(tmp_path: Path) -> None:
    """With the budget full and the only evictable unit being written, a prefetch neither waits nor
    evicts: it starts nothing. When the write lands, `poll()` starts it (not the next acquire)."""
    sizes = {"a": 2 * KB, "b": 2 * KB, "c": 2 * KB}
    sched, store, pool = _scheduler(sizes, budget=4 * KB, depth=1)
    gate = threading.Event()
    try:
        # a is used again only at the end, after c: Belady may evict it for c's prefetch.
        sched.begin_pass(["a", "b", "c", "a"])
        sched.acquire(["a"])
        _update(sched, "a", 5)
        sched.release(["a"])
        store.gate["a"] = gate
        sched.write_back("a")
        started = time.perf_counter()
        sched.acquire(["b"])  # prefetches c: blocked, a is being written
        assert time.perf_counter() - started < 0.5  # no waiting on the held write
        assert sched.units["c"].state is UnitState.ON_DISK
        assert sched.units["a"].state is UnitState.WRITING
        sched.poll()
        assert sched.units["c"].state is UnitState.ON_DISK  # still blocked: nothing landed
        gate.set()
        deadline = time.monotonic() + 5
        while sched.units["a"].future is not None and not sched.units["a"].future.done():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        sched.poll()  # as a gradient hook would, mid-backward
        assert sched.units["c"].state in (UnitState.LOADING, UnitState.RESIDENT)
        assert sched.units["a"].state is UnitState.ON_DISK
        assert pool.over == []
        sched.release(["b"])
        sched.acquire(["c"])
        assert store.log.count(("read", "c")) == 1  # c was read once, by the prefetch
        sched.release(["c"])
    finally:
        gate.set()
        sched.close()


def _simulate_training(sched: Scheduler, store: FakeStore, rng: random.Random, blocks: int, steps: int,
                       commit_every: int) -> dict[str, int]:
    """Drive the scheduler the way the runtime does for a tied model (embed, blocks, head needing the
    embedding): forward segments, then backward with an update per segment, write-backs of units
    Belady will evict (most of them: the others are written when a needed load evicts them), the tied embedding pending from the head's backward to its own, polls in
    between, commits every `commit_every` steps. Returns each unit's update count."""
    segs = [("embed", ["embed"])] + [(f"block.{i}", [f"block.{i}"]) for i in range(blocks)] + [("head", ["head", "embed"])]
    forward = [n for _, needs in segs for n in needs]
    backward = [n for _, needs in reversed(segs) for n in needs]
    updates = dict.fromkeys(sched.units, 0)
    for step in range(steps):
        sched.begin_pass(forward + backward)
        for _, needs in segs:
            sched.acquire(needs)
            if rng.random() < 0.5:
                sched.poll()
            sched.release(needs)
        for owner, needs in reversed(segs):
            sched.acquire(needs)
            sched.ensure_writable(needs)
            updates[owner] += 1
            _update(sched, owner, updates[owner] % 256)
            if owner == "head":
                sched.units["embed"].pending_grads += 1  # the tied weight waits for its second gradient
            if owner == "embed":
                sched.units["embed"].pending_grads -= 1
            for _ in range(rng.randint(0, 3)):
                sched.poll()
                time.sleep(rng.random() * 0.001)
            sched.release(needs)
            unit = sched.units[owner]
            # Mostly as the runtime does; sometimes not, so needed loads also evict dirty units (written first).
            if (unit.pending_grads == 0 and unit.state is UnitState.RESIDENT and sched.likely_evicted(owner)
                    and rng.random() < 0.7):
                sched.write_back(owner)
        if (step + 1) % commit_every == 0:
            sched.flush()
            store.commit(sched.written_records())
            sched.committed()
        sched.prefetch()
    sched.flush()
    store.commit(sched.written_records())
    sched.committed()
    return updates


@pytest.mark.parametrize("seed", range(6))
def test_budget_never_exceeded_and_no_update_lost_under_random_io_delays(seed: int) -> None:
    """Random unit sizes, budgets between the minimum and the whole model, reads and writes that sleep
    0-4 ms at random: the bytes the pool has out never exceed the budget (measured at every
    acquire), the scheduler's own peak agrees, and every unit's committed bytes carry its last update."""
    rng = random.Random(seed)
    blocks = 4
    sizes = {"embed": rng.randint(1, 4) * KB, "head": rng.randint(1, 3) * KB,
             **{f"block.{i}": rng.randint(1, 6) * KB for i in range(blocks)}}
    minimum = max(sizes["head"] + sizes["embed"], *(sizes[f"block.{i}"] + sizes["embed"] for i in range(blocks)))
    budget = rng.randint(minimum // KB, sum(sizes.values()) // KB) * KB
    sched, store, pool = _scheduler(sizes, budget, depth=rng.choice([1, 2, 3]),
                                    delay=lambda: rng.random() * 0.004)
    try:
        updates = _simulate_training(sched, store, rng, blocks, steps=5, commit_every=rng.choice([1, 2, 3]))
        assert pool.over == [], f"budget {budget} exceeded: {pool.over[:5]}"
        assert pool.peak <= budget and sched.stats.peak_resident_bytes <= budget
        assert sched.stats.peak_resident_bytes == pool.peak  # the scheduler's count is the memory held
        for name, count in updates.items():
            assert count == 5
            assert bool((store.committed[name] == count % 256).all()), f"{name}: an update was lost"
        if budget < sum(sizes.values()):
            assert sched.stats.writes > len(sizes)  # evictions wrote between commits: the path under test
    finally:
        sched.close()


def _sgd_reference_and_unit_sizes(model_dir: Path, tmp_path: Path, batches: list[torch.Tensor], lr: float):
    """The model after torch.optim.SGD over `batches` in memory, its starting weights, and the
    working store's unit sizes for `model_dir`."""
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    ref = torch_sgd_reference(model_dir, batches, lr)
    with Runtime(model_dir, SGD(lr=lr), work_dir=tmp_path / "sizes") as rt:
        sizes = {n: r.nbytes for n, r in rt.store.units.items()}
    return ref, start, sizes


def test_runtime_with_random_io_delays_matches_torch_sgd(tmp_path: Path) -> None:
    """A real streamed run whose unit reads and writes sleep 0-5 ms at random (a rough disk): the
    budget holds (the staging pool's bytes in use, measured at every acquire) and the weights equal
    torch.optim.SGD's, fp32, max abs difference <= 1e-6, with --commit-every 2."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(5)]
    lr = 0.05
    ref, start, sizes = _sgd_reference_and_unit_sizes(model_dir, tmp_path, batches, lr)
    budget = sizes["embed"] + max(v for k, v in sizes.items() if k.startswith("block."))  # the minimum
    rng = random.Random(5)
    lock = threading.Lock()
    with Runtime(model_dir, SGD(lr=lr), work_dir=tmp_path / "w", weights_budget=budget, commit_every=2) as rt:
        real_read, real_write = rt.store.read_unit, rt.store.write_unit

        def slow(fn):
            def wrapped(*args, **kwargs):
                with lock:
                    pause = rng.random() * 0.005
                time.sleep(pause)
                return fn(*args, **kwargs)
            return wrapped

        rt.store.read_unit, rt.store.write_unit = slow(real_read), slow(real_write)
        pool_acquire, out = rt.pool.acquire, []

        def measured(nbytes):
            buf = pool_acquire(nbytes)
            out.append(rt.pool.bytes_in_use)
            return buf

        rt.pool.acquire = measured
        for ids in batches:
            assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
        assert out and max(out) <= budget
        assert rt.scheduler.stats.peak_resident_bytes <= budget
        assert rt.scheduler.stats.writes > 0 and rt.scheduler.stats.reads > 4 * len(batches)
        trained = dict(rt.iter_weights())
    expected = ref.state_dict()
    for name, tensor in trained.items():
        diff = (tensor - expected[name]).abs().max().item()
        assert diff <= 1e-6, f"{name} differs by {diff}"
    assert max((expected[k] - start[k]).abs().max().item() for k in trained) > 1e-3


def test_runtime_write_failure_reaped_inside_a_gradient_hook(tmp_path: Path) -> None:
    """A write-back started mid-backward fails; the next gradient hook's `poll()` reaps it and the
    error leaves `backward()`. The step is abandoned (no partial update survives), the store stays at
    the last commit, and the same runtime then trains on: weights equal torch.optim.SGD's over the
    same batches (fp32, <= 1e-6), the failed step's batch retried."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    gen = torch.Generator().manual_seed(6)
    batches = [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(4)]
    lr = 0.05
    ref, _, sizes = _sgd_reference_and_unit_sizes(model_dir, tmp_path, batches, lr)
    budget = max(sizes.values()) * 2  # two units: every unit updated in backward is written at once
    with Runtime(model_dir, SGD(lr=lr), work_dir=tmp_path / "w", weights_budget=budget, commit_every=1) as rt:
        assert not rt.backward(rt.model(input_ids=batches[0], labels=batches[0]).loss).dropped
        committed = {k: v.clone() for k, v in rt.iter_weights()}
        real_write = rt.store.write_unit
        failed = []
        in_block_1 = threading.Event()

        def failing(name, buf, generation, *args, **kwargs):
            if name == "head" and not failed:
                failed.append(name)
                assert in_block_1.wait(10)
                raise OSError(errno.EIO, "Input/output error (injected)", f"units/{name}.g{generation}.bin")
            return real_write(name, buf, generation, *args, **kwargs)

        def first_gradient_of_block_1(grad):
            # Block 1's first gradient: the head's write (started when the head's update completed)
            # fails now, so the gradient hook that runs next is the first to see it.
            in_block_1.set()
            future = rt.scheduler.units["head"].future
            deadline = time.monotonic() + 10
            while future is not None and not future.done():
                assert time.monotonic() < deadline
                time.sleep(0.001)
            return grad

        rt.store.write_unit = failing
        handle = rt.model.get_parameter("model.layers.1.mlp.down_proj.weight").register_hook(first_gradient_of_block_1)
        out = rt.model(input_ids=batches[1], labels=batches[1])
        with pytest.raises(OSError, match="injected") as raised:
            rt.backward(out.loss)
        handle.remove()
        frames = [f.name for f in traceback.extract_tb(raised.value.__traceback__)]
        assert "_on_grad" in frames and "poll" in frames, frames  # reaped inside a gradient hook
        assert failed == ["head"]
        assert rt.step == 1 and rt.committed_step == 1
        assert all(torch.equal(committed[k], v) for k, v in rt.iter_weights())
        for ids in batches[1:]:  # the failed step's batch again, then the rest
            assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
        trained = dict(rt.iter_weights())
    expected = ref.state_dict()
    for name, tensor in trained.items():
        diff = (tensor - expected[name]).abs().max().item()
        assert diff <= 1e-6, f"{name} differs by {diff}"
