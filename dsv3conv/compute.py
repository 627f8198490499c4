"""Which backend computes where: `--device` resolved and each device's backend made.

torch is imported only where a GPU may be used (`dsv3conv.gpu`): `cpu`, and `auto` on a host without a GPU
(`devices.cuda_possible`), run on numpy and numba alone and start in a fraction of a second.
"""

from __future__ import annotations

from contextlib import contextmanager

from dsv3conv.backend import CpuBackend, Spread
from dsv3conv.devices import cpu_threads, cuda_possible, parse_devices
from dsv3conv.errors import Dsv3Error, UsageError


def on_cpu(name: str) -> bool:
    """The device `name` is the CPU, told without torch."""
    return name == "cpu" or (name == "auto" and not cuda_possible())


def resolve_devices(device: str) -> list[str]:
    """The devices of `--device`, checked (`auto` resolved, `cuda:all` expanded, a missing GPU refused)."""
    names = parse_devices(device)
    if all(on_cpu(n) for n in names):
        return ["cpu"] * len(names)
    with gpu_start(device):
        from dsv3conv.gpu import check_device, device_list  # torch: only where a GPU may be used

        return [check_device(d) for d in device_list(device)]


def make_backend(device: str, threads: int | None = None):
    """The backend of one device (`auto`: a GPU when present); `threads`: the CPU backend's."""
    if on_cpu(device):
        return CpuBackend(threads)
    with gpu_start(device):
        from dsv3conv.gpu import make_backend as gpu_backend

        return gpu_backend(device, threads)


@contextmanager
def gpu_start(device: str):
    """torch, Triton or CUDA failing to start for `device` (an import, the driver, the device itself) said in
    one line, exit 2 as for a GPU that is not there: the device cannot be used here. With --debug, the cause."""
    try:
        yield
    except Dsv3Error:
        raise
    except Exception as exc:
        cause = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"{{device}} {device}: CUDA cannot start here ({type(exc).__name__}: {cause}); "
                         "fix the GPU setup or use {device} cpu", "device") from exc


def make_backends(devices: list[str], threads: int | None):
    """The backend of checked `devices`: None for none, one device's, or several spread (CPU backends share
    the cores)."""
    if len(devices) <= 1:
        return make_backend(devices[0], threads) if devices else None
    threads_each = max(1, cpu_threads() // max(1, devices.count("cpu")))
    backends = []
    try:
        for d in devices:
            backends.append(make_backend(d, threads_each))
    except BaseException:
        for b in backends:
            b.close()
        raise
    return Spread(backends)


def gpu_peak(devices: list[str]) -> int:
    """The largest GPU memory peak of `devices` (0 without a GPU: torch is not asked)."""
    gpus = [d for d in devices if d.startswith("cuda")]
    if not gpus:
        return 0
    import torch

    return max(torch.cuda.max_memory_allocated(torch.device(d)) for d in gpus)
