"""Progress on stderr: shard k/N, bytes written, throughput, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def byte_progress(enabled: bool) -> Progress:
    """A rich progress bar on stderr counting bytes: description, bar, bytes, throughput, ETA."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled, transient=False,
    )


class ByteProgress:
    def __init__(self, plan, enabled: bool = True):
        self.enabled = enabled
        self.n_files = len(plan.files)
        self.total = sum(f.size for f in plan.files)
        self._progress = byte_progress(enabled)
        self._task = None

    def __enter__(self) -> "ByteProgress":
        self._progress.__enter__()
        self._task = self._progress.add_task(f"shard 0/{self.n_files}", total=self.total)
        return self

    def advance(self, nbytes: int, file_index: int, file_name: str) -> None:
        self._progress.update(self._task, advance=nbytes, description=f"shard {file_index + 1}/{self.n_files} {file_name}")

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)
