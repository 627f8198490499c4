"""Progress on stderr, by bytes: a rich bar on a terminal, plain tqdm lines in a log (Slurm, CI, a pipe).

    with ByteProgress(total_bytes, "dequant") as bar:
        bar.skip(n, "shard 1/4 a.safetensors")      # already done (--resume): counts as done, not as speed
        bar.advance(n, "shard 2/4 b.safetensors")   # bytes processed now

Until the first `advance` the bar says "starting" (no speed or ETA yet); speed and ETA count only the bytes
processed since then. In a log a line is printed at most every DSV3CONV_PROGRESS_SECONDS (default 10).
"""

from __future__ import annotations

import os
import sys
import threading
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text
from tqdm import tqdm

from dsv3conv.errors import printable

LOG_INTERVAL_ENV = "DSV3CONV_PROGRESS_SECONDS"
DEFAULT_LOG_INTERVAL = 10.0


class ByteProgress:
    """Bytes done of `total`, on stderr. Thread-safe; does nothing when `enabled` is False."""

    def __init__(self, total: int, label: str, *, enabled: bool = True):
        self.total = total
        self.label = printable(label)
        self.enabled = enabled
        self._lock = threading.Lock()
        self._console = Console(stderr=True)
        self._view = None

    def __enter__(self) -> ByteProgress:
        if self.enabled:
            view = _TerminalView if self._console.is_terminal else _LogView
            self._view = view(self.total, self.label, self._console)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, nbytes: int, detail: str = "") -> None:
        """`nbytes` more processed now (they count in speed and ETA); `detail` says where (e.g. the shard)."""
        if self._view is not None:
            with self._lock:
                self._view.advance(nbytes, detail)

    def skip(self, nbytes: int, detail: str = "") -> None:
        """`nbytes` found already done (a resumed run): counted as done, never as speed."""
        if self._view is not None:
            with self._lock:
                self._view.skip(nbytes, detail)

    def close(self) -> None:
        if self._view is not None:
            with self._lock:
                self._view.close()
                self._view = None


def log_interval() -> float:
    """Seconds between two progress lines in a log (DSV3CONV_PROGRESS_SECONDS; 0 prints every step)."""
    raw = os.environ.get(LOG_INTERVAL_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_LOG_INTERVAL
    except ValueError:
        return DEFAULT_LOG_INTERVAL


# ------------------------------------------------------------------------------------------ terminal
class _Speed(TransferSpeedColumn):
    def render(self, task) -> Text:
        return Text("starting", style="progress.data.speed") if task.speed is None else super().render(task)


class _Eta(TimeRemainingColumn):
    def render(self, task) -> Text:
        return Text("") if task.speed is None and not task.finished else super().render(task)


class _TerminalView:
    """rich's live bar; a skip restarts rich's speed estimate, so skipped bytes never count as speed."""

    def __init__(self, total: int, label: str, console: Console):
        self.label = label
        self._p = Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), _Speed(), _Eta(),
                           console=console, transient=False)
        self._p.start()
        self._task = self._p.add_task(f"{label}: starting", total=total)

    def advance(self, nbytes: int, detail: str) -> None:
        self._p.update(self._task, advance=nbytes, description=_describe(self.label, detail))

    def skip(self, nbytes: int, detail: str) -> None:
        task = self._p.tasks[0]
        self._p.reset(self._task, completed=task.completed + nbytes, total=task.total,
                      description=_describe(self.label, detail))

    def close(self) -> None:
        self._p.stop()


# ----------------------------------------------------------------------------------------------- log
def _say(text: str) -> bool:
    """Write `text` to stderr; False once stderr is gone (a pipe whose reader quit): progress is not worth a
    failed conversion, and an exception inside tqdm's display would leave its lock held by a dead writer."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
        return True
    except (OSError, ValueError):  # BrokenPipeError, a closed file
        return False


class _Lines(tqdm):
    """tqdm writing one full line per refresh (a log keeps every line) instead of redrawing one with '\\r'."""

    monitor_interval = 0  # no monitor thread: lines come from updates

    def display(self, msg=None, pos=None) -> bool:
        if msg is not None:  # tqdm clearing its line: nothing to clear in a log
            return False
        if not _say(f"{self}\n"):
            self.disable = True  # no more lines, and none of tqdm's own writes at close
        return True


class _LogView:
    """A "starting" line at once; from the first processed byte a tqdm line every `log_interval()` seconds."""

    FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"

    def __init__(self, total: int, label: str, console: Console):
        self.total, self.label = total, label
        self.done = 0
        self._start = time.monotonic()
        self._bar: _Lines | None = None
        _say(f"{label}: starting, {_decimal(total)}B to do\n")

    def advance(self, nbytes: int, detail: str) -> None:
        if self._bar is None:
            _say(f"{self.label}: started after {time.monotonic() - self._start:.1f} s\n")
            # delay > 0: no line before there is a speed to show
            self._bar = _Lines(
                total=self.total, initial=self.done, desc=_describe(self.label, detail), bar_format=self.FORMAT,
                unit="B", unit_scale=True, unit_divisor=1000, mininterval=log_interval(), miniters=1,
                file=sys.stderr, leave=False, delay=1e-9,
            )
        self.done += nbytes
        self._bar.set_description_str(_describe(self.label, detail), refresh=False)
        self._bar.update(nbytes)

    def skip(self, nbytes: int, detail: str) -> None:
        self.done += nbytes
        if self._bar is not None:  # a skip after work began: done, but not speed
            self._bar.n += nbytes
            self._bar.initial += nbytes
            self._bar.last_print_n += nbytes

    def close(self) -> None:
        if self._bar is not None:
            if self._bar.last_print_n != self._bar.n:  # the last line is not the final state
                self._bar.refresh()
            self._bar.close()
        elif self.done:
            _say(f"{self.label}: {_decimal(self.done)}B already done, nothing else to do\n")


def _describe(label: str, detail: str) -> str:
    """The label and where the work is: one line, whatever the names hold."""
    return printable(f"{label} {detail}") if detail else label


def _decimal(n: int) -> str:
    return tqdm.format_sizeof(n, divisor=1000)
