"""The engine's memory while the backend starts (a Future): read buffers and arenas made meanwhile are plain
numpy; once the backend is there and makes its own (pinned for a GPU), each gives way to the backend's the
next time it passes its pool, and is forgotten. Here a test backend makes its own memory and knows it."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest

from dsv3conv import engine
from dsv3conv.backend import OutputArena
from tests.test_engine import LateBackend, _plan_and_copies


class _Marking(LateBackend):
    """An asynchronous test backend that makes its own memory (as a GPU's is pinned) and knows it."""

    def __init__(self):
        super().__init__()
        self.made: list[np.ndarray] = []

    def host_buffer(self, nbytes: int) -> np.ndarray:
        buf = np.empty(nbytes, dtype=np.uint8)
        self.made.append(buf)
        return buf

    def owns(self, memory) -> bool:
        return any(memory is buf for buf in self.made)


def _no_wait() -> None:
    """A pool's check while waiting: every pool here has memory to give, so nothing waits."""


def _starting_run(tmp_path, src) -> tuple[engine._Run, Future]:
    """An engine run over a tiny plan whose backend is still starting; its threads are not started."""
    plan, todo, _ = _plan_and_copies(src, tmp_path / "out")
    starting = Future()
    return engine._Run(plan, starting, todo, engine.FileSink(plan), 8192, 3, None), starting


def _arrives(run: engine._Run, starting: Future, backend) -> None:
    """The backend is there: what the run's thread does when the start ends."""
    starting.set_result(backend)
    run.backend, run.starting = backend, None


@pytest.mark.parametrize("own_memory", [True, False])
def test_memory_made_while_the_backend_starts_gives_way_once_it_is_there(tmp_path, src_ref, own_memory):
    """Buffers and an arena made while the backend starts, back in their pools when it arrives: with a
    backend that makes its own memory, none is handed out again, the pools make the backend's instead; with
    one that makes plain memory (the CPU) they are reused. Either way they are no longer tracked."""
    run, starting = _starting_run(tmp_path, src_ref[0])
    bufs = [run.pool.get(_no_wait) for _ in range(2)]
    arena = run.arenas.get(_no_wait)
    arena.take(16)
    for buf in bufs:
        run.pool.put(buf)
    run.arenas.put(arena)
    backend = _Marking() if own_memory else LateBackend()
    _arrives(run, starting, backend)
    again = [run.pool.get(_no_wait) for _ in range(2)]
    arena_again = run.arenas.get(_no_wait)
    arena_again.take(16)
    if own_memory:
        assert all(backend.owns(buf) for buf in again) and backend.owns(arena_again.memory)
    else:
        assert {id(b) for b in again} == {id(b) for b in bufs} and arena_again is arena
    assert not run.interim, "memory made while the backend started is still tracked once it is there"
    backend.close()


def test_a_buffer_made_as_the_backend_arrives_gives_way_too(tmp_path, src_ref, monkeypatch):
    """The backend arrives while a read buffer is being made as plain memory (it was not there when the pool
    asked): that buffer is still one made while it started, and gives way when it comes back."""
    run, starting = _starting_run(tmp_path, src_ref[0])
    backend, plain = _Marking(), engine.host_buffer

    def made_as_it_arrives(nbytes: int) -> np.ndarray:
        _arrives(run, starting, backend)
        return plain(nbytes)

    monkeypatch.setattr(engine, "host_buffer", made_as_it_arrives)
    buf = run.pool.get(_no_wait)
    monkeypatch.setattr(engine, "host_buffer", plain)
    assert not backend.owns(buf)
    run.pool.put(buf)
    again = run.pool.get(_no_wait)
    assert backend.owns(again), "a plain buffer made as the backend arrived was kept for the rest of the run"
    backend.close()


def test_a_run_takes_only_the_backends_memory_once_it_is_there(tmp_path, src_ref, monkeypatch):
    """A whole run whose backend arrives while a reader makes its first (plain) buffer, the reader going on
    only once the run has taken the backend: every buffer and arena its pools hand out from then on is the
    backend's, and the output is the CPU's bytes."""
    src, ref = src_ref
    plan, todo, _ = _plan_and_copies(src, tmp_path / "out")
    backend, starting, taken = _Marking(), Future(), threading.Event()
    plain, get = engine.host_buffer, engine._Pool.get

    class Watched(engine._Run):
        """Sets `taken` when the run takes the backend."""

        @property
        def backend(self):
            return self.__dict__.get("_backend")

        @backend.setter
        def backend(self, value):
            self.__dict__["_backend"] = value
            if value is not None:
                taken.set()

    def made_as_it_arrives(nbytes: int) -> np.ndarray:
        if not starting.done():
            starting.set_result(backend)
            assert taken.wait(300), "the run never took the backend"  # a watchdog: the run takes it at once
        return plain(nbytes)

    handed_out = []

    def watched_get(pool, check):
        after = taken.is_set()
        item = get(pool, check)
        if after:
            handed_out.append(item)
        return item

    monkeypatch.setattr(engine, "_Run", Watched)
    monkeypatch.setattr(engine, "host_buffer", made_as_it_arrives)
    monkeypatch.setattr(engine._Pool, "get", watched_get)
    try:
        engine.run_batches(plan, starting, todo, engine.FileSink(plan), chunk_bytes=8192)
    finally:
        backend.close()
    memory = [item.memory if isinstance(item, OutputArena) else item for item in handed_out]
    assert memory and all(m is None or backend.owns(m) for m in memory), \
        f"{sum(m is not None and not backend.owns(m) for m in memory)} of {len(memory)} not the backend's"
    for f in plan.files:
        assert (tmp_path / "out" / f.name).read_bytes() == (ref / f.name).read_bytes(), f.name
