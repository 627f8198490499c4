"""What the benchmark scripts share: a timing loop and the end of a run (results to `--json`, exit status).

Run as `python scripts/bench_x.py`, a script finds this module beside it (its folder is first on sys.path).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def median_seconds(fn, repeat: int, gpu: bool = False) -> float:
    """Median seconds of `repeat` calls of `fn` after one warm-up call (compilation, page faults, thread pools):
    host wall time, or with `gpu` the time between CUDA events recorded around each call."""
    fn()
    times = []
    if gpu:
        import torch

        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def write_json(path: str | Path | None, results) -> None:
    """Write `results` as indented JSON to `path` (a script's `--json`); nothing when no path was given."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n")


def finish(results, json_path: str | Path | None, ok: bool = True) -> int:
    """The end of a benchmark run: `results` to `json_path` if given; the exit status, 1 if a check failed."""
    write_json(json_path, results)
    return 0 if ok else 1
