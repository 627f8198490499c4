"""Where a run computes: `--device` names and CPU threads, checked without importing torch.

A mistyped device or thread count is refused at once; whether a CUDA device exists is asked of torch later,
by `dsv3conv.backend.check_device`, once every other check has passed.
"""

from __future__ import annotations

import os
import re

from dsv3conv.errors import UsageError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, cuda:all or a list (cuda:0,cuda:1)"
_ONE_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
THREADS_ENV = "DSV3CONV_CPU_THREADS"


def parse_devices(spec: str) -> list[str]:
    """The devices `spec` names, in order: one name, `cuda:all` (expanded once torch is asked), or a list."""
    names = [d.strip() for d in spec.split(",") if d.strip()]
    if names == ["cuda:all"] or (names and all(_ONE_DEVICE.fullmatch(n) for n in names)):
        return names
    raise UsageError(f"{{device}} {spec!r}: choose {DEVICE_CHOICES}", "device")


def cpu_threads() -> int:
    """Threads of the CPU backend: `DSV3CONV_CPU_THREADS`, else every core this process may run on."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise UsageError(f"{THREADS_ENV}={env!r}: give a whole number of threads, 1 or more")
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
