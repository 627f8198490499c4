"""Where a run computes: `--device` names, CPU threads and I/O threads, checked without importing torch.

A mistyped device or thread count is refused at once, and so is a GPU index beyond the GPUs the driver lists
(`check_gpu_index`); whether a CUDA device exists and starts is asked of torch later, by
`dsv3conv.gpu.check_device`, once every other check has passed, and only where a GPU may exist
(`cuda_possible`): the CPU path never imports torch.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

from dsv3conv.errors import UsageError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, cuda:all or a list (cuda:0,cuda:1)"
_ONE_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
THREADS_ENV = "DSV3CONV_CPU_THREADS"
READERS_ENV, WRITERS_ENV = "DSV3CONV_READERS", "DSV3CONV_WRITERS"  # measurement knobs (docs/environment.md)
KERNEL_ENV = "DSV3CONV_CPU_KERNEL"
CPU_KERNELS = ("auto", "numba", "numpy", "torch")  # `kernels.fp8_block_host.KERNELS`
NVIDIA_PROC = Path("/proc/driver/nvidia")  # Linux's NVIDIA driver: `gpus/<PCI address>/` for each GPU


def parse_devices(spec: str) -> list[str]:
    """The devices `spec` names, in order: one name, `cuda:all` (expanded once torch is asked), or a list."""
    names = [d.strip() for d in spec.split(",") if d.strip()]
    if names == ["cuda:all"] or (names and all(_ONE_DEVICE.fullmatch(n) for n in names)):
        return names
    raise UsageError(f"{{device}} {spec!r}: choose {DEVICE_CHOICES}", "device")


def cuda_possible() -> bool:
    """Whether `auto` could find a GPU, told without torch: the GPU path needs triton, and on Linux an NVIDIA
    driver (or WSL's GPU device) and CUDA_VISIBLE_DEVICES not hiding every GPU. False: `auto` is the CPU."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):  # a broken install: no GPU path
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    if sys.platform.startswith("linux"):
        return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg"))
    return True


def visible_gpus() -> int | None:
    """At most how many CUDA devices this process can see, told without torch or CUDA; None where that
    cannot be told cheaply and surely (then torch is asked, as the backend starts).

    Read from the NVIDIA driver's /proc entries (one directory per GPU) and CUDA_VISIBLE_DEVICES (CUDA sees
    no more devices than it lists, up to the first invalid index): a directory listing, no library loaded.
    Not NVML through ctypes: it counts the same physical GPUs, for a library load and an init more; not the
    driver's cuInit and cuDeviceGetCount: that start is the slow part the backend's thread runs beside the
    copies. None without those entries (WSL, other systems), where they list no GPU, and where MIG instances
    exist (one GPU may then be several CUDA devices, or none)."""
    try:
        gpus = len(os.listdir(NVIDIA_PROC / "gpus"))
        if not gpus or any((NVIDIA_PROC / "capabilities").glob("gpu*/mig/gi*")):
            return None  # none listed: a container may hide the entries of the GPUs it passes through
    except OSError:
        return None
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return gpus
    count = 0
    for entry in (e.strip() for e in listed.split(",")):
        if entry.lstrip("-").isdigit() and not 0 <= int(entry) < gpus:
            break  # an invalid index: CUDA reads no further
        count += bool(entry)
    return min(count, gpus)


def check_gpu_index(names: list[str]) -> None:
    """Refuse a `cuda` or `cuda:N` beyond the GPUs `visible_gpus` counts, before any work and without torch."""
    wanted = [n for n in names if n == "cuda" or (n.startswith("cuda:") and n[5:].isdigit())]
    count = visible_gpus() if wanted else None
    for name in wanted if count is not None else ():
        if int(name[5:] or 0) >= count:
            raise gpu_missing(name, count)


def gpu_missing(device: str, count: int) -> UsageError:
    """The refusal of `device` where `count` CUDA devices are visible (none: use the CPU)."""
    if not count:
        return UsageError(f"{{device}} {device}: no CUDA GPU is visible; use {{device}} cpu", "device")
    visible = "1 CUDA device is visible (cuda:0)" if count == 1 else \
        f"{count} CUDA devices are visible (cuda:0 to cuda:{count - 1})"
    return UsageError(f"{{device}} {device}: only {visible}", "device")


def cpu_threads() -> int:
    """Threads of the CPU backend: `DSV3CONV_CPU_THREADS`, else half the cores this process may run on (at
    least one): the reader and writer threads need the other half (docs/performance.md has the numbers)."""
    return _env_count(THREADS_ENV) or max(1, _cores() // 2)


def cpu_kernel() -> str:
    """The CPU backend's dequant and quant kernel: `DSV3CONV_CPU_KERNEL` (auto, numba, numpy, torch), else auto."""
    kernel = os.environ.get(KERNEL_ENV, "").strip() or "auto"
    if kernel not in CPU_KERNELS:
        raise UsageError(f"{KERNEL_ENV}={kernel!r}: choose one of {', '.join(CPU_KERNELS)}")
    return kernel


def io_threads() -> tuple[int, int]:
    """(readers, writers) of the engine. Reads are large and sequential: a few suffice. Writes need more in
    flight (on tmpfs one writer copies ~1.5 GB/s, eight ~5 GB/s), up to one per core. `DSV3CONV_READERS` and
    `DSV3CONV_WRITERS` set either count (for measurements)."""
    cores = _cores()
    return (_env_count(READERS_ENV) or max(2, min(4, cores // 4)),
            _env_count(WRITERS_ENV) or max(2, min(8, cores)))


def _env_count(name: str) -> int | None:
    """The whole number, 1 or more, in environment variable `name`; None when unset or empty."""
    env = os.environ.get(name, "").strip()
    if not env:
        return None
    if not env.isdigit() or int(env) < 1:
        raise UsageError(f"{name}={env!r}: give a whole number of threads, 1 or more")
    return int(env)


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
