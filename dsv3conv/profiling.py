"""Where a run's time goes, stage by stage: off unless `DSV3CONV_PROFILE=1`.

The engine times each stage of each batch: `read` (reader threads), `wait_buffer` (a reader waiting for a
free read buffer), `wait_read` (the converting thread waiting for read data), `wait_arena` (waiting for a
free output buffer), `convert` (on a GPU: enqueuing the batch), `wait_convert` (a writer waiting for an
asynchronous conversion to finish), `write` (writer threads, commit included) and `wait_write` (the end of
the run, waiting for the last writes). A CUDA backend adds `h2d`, `kernel`, `d2h` (GPU time between CUDA
events on the batch's stream). At the end of each engine run one line goes to stderr:

    dsv3conv profile: {"wall_s": 19.8, "start_s": 4.1, "first_write_s": 4.9, "stages": {"read": {"s": 12.1,
    "bytes": 11700000000, "calls": 180, "threads": 4}, ...}}

`start_s` and `first_write_s` are seconds since the process started (the fixed cost before the engine, and
the first byte written); so are the steps before the engine, when the runner marks them (`mark`):
`planned_s` (source opened and planned), `torch_s` (torch imported), `backend_s` (devices ready), and
`first_read_s` (the first batch read). A stage's seconds are summed over the threads that ran it (`threads`), so they may
add up to more than `wall_s`. Off, the engine pays one function call per stage and batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_NOTHING = contextlib.nullcontext()
_current: contextvars.ContextVar[Profile | None] = contextvars.ContextVar("dsv3conv_profile", default=None)
_marks: dict[str, float | None] = {}  # steps before the engine (`mark`), shown by the next engine run


def enabled() -> bool:
    return os.environ.get("DSV3CONV_PROFILE", "") not in ("", "0")


def process_age() -> float | None:
    """Seconds since this process started (Linux; None elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class Profile:
    """Seconds, bytes and calls per stage, added from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self.stages: dict[str, dict] = {}
        self.marks: dict[str, float | None] = {**_marks, "start_s": process_age()}
        _marks.clear()  # shown once, by the engine run they lead to

    def add(self, name: str, seconds: float, nbytes: int = 0) -> None:
        with self._lock:
            s = self.stages.setdefault(name, {"s": 0.0, "bytes": 0, "calls": 0, "threads": set()})
            s["s"] += seconds
            s["bytes"] += nbytes
            s["calls"] += 1
            s["threads"].add(threading.get_ident())

    def mark_once(self, name: str) -> None:
        """Remember when `name` first happened (seconds since the process started)."""
        if name not in self.marks:
            with self._lock:
                self.marks.setdefault(name, process_age())

    @contextlib.contextmanager
    def stage(self, name: str, nbytes: int = 0) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start, nbytes)

    def summary(self) -> dict:
        with self._lock:
            stages = {k: {**v, "s": round(v["s"], 4), "threads": len(v["threads"])} for k, v in self.stages.items()}
            marks = {k: None if v is None else round(v, 3) for k, v in self.marks.items()}
        return {"wall_s": round(time.perf_counter() - self._start, 4), **marks, "stages": stages}


class StreamSpans:
    """GPU time between points of the current CUDA stream: events are recorded only when profiling."""

    def __init__(self, profile: Profile | None):
        self.profile = profile
        self.events: list = []

    def point(self) -> None:
        if self.profile is not None:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def report(self, *spans: tuple[str, int]) -> None:
        """Once the stream is synchronized: the time from point i to point i + 1 is `spans[i]` (name, bytes)."""
        if self.profile is not None:
            for (name, nbytes), a, b in zip(spans, self.events, self.events[1:]):
                self.profile.add(name, a.elapsed_time(b) / 1e3, nbytes)


def mark(name: str, first: bool = False) -> None:
    """When profiling: remember when the start-up step `name` happened, for the next engine run's line.
    `first`: the first step of a command (what an earlier command of this process marked is forgotten)."""
    if enabled():
        if first:
            _marks.clear()
        _marks[name] = process_age()


def stage(profile: Profile | None, name: str, nbytes: int = 0):
    """A context manager timing `name` into `profile`; nothing at all when `profile` is None."""
    return _NOTHING if profile is None else profile.stage(name, nbytes)


def current() -> Profile | None:
    """The profile of the engine run this thread converts for (what a backend reports to), or None."""
    return _current.get()


@contextlib.contextmanager
def run_profile() -> Iterator[Profile | None]:
    """A profile for one engine run when DSV3CONV_PROFILE is set (its line printed at the end), else None."""
    if not enabled():
        yield None
        return
    profile = Profile()
    token = _current.set(profile)
    try:
        yield profile
    finally:
        _current.reset(token)
        sys.stderr.write("dsv3conv profile: " + json.dumps(profile.summary()) + "\n")
        sys.stderr.flush()
