"""The runner: the one place that carries out a plan, start to finish.

Destination first (checked, locked, leftovers of interrupted runs removed), then the output files through
the engine on one device or one worker per device, then the other files, the index and config.json last:
a checkpoint is loadable only once everything is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from dsv3conv import profiling
from dsv3conv.checkpoint import CONFIG_NAME, INDEX_NAME
from dsv3conv.dest import (
    FINALIZE_LOCK_NAME,
    LOCK_NAME,
    DestLock,
    check_claim,
    claim_dest,
    held_files,
    is_complete,
    prepare_dest,
    release_dest,
    remove_partials,
)
from dsv3conv.devices import (
    check_gpu_index,
    cpu_kernel,
    cpu_threads,
    cuda_possible,
    io_threads,
    parse_devices,
)
from dsv3conv.errors import Dsv3Error, HeaderError, UsageError, counted
from dsv3conv.ops import Copy
from dsv3conv.plan import BUFFER_RANGE, MIN_BUFFER_BYTES, Plan, assign_parts, parse_part, parse_size
from dsv3conv.preflight import check_space, space_free, space_needed
from dsv3conv.progress import ByteProgress
from dsv3conv.writer import copy_file_fast, write_bytes_atomic

STAND_IN_ENV = "DSV3CONV_STAND_IN"  # a measurement knob (docs/environment.md)


@dataclass
class Stats:
    files_written: int = 0
    files_skipped: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    finalized: bool = False
    waiting_for: list[str] = field(default_factory=list)  # shards other parts have yet to write


def buffer_bytes(buffer_size: str | int | None) -> int | None:
    """--buffer-size in bytes (None: the device's default). A program may pass a smaller integer (tests)."""
    if buffer_size is None:
        return None
    if isinstance(buffer_size, str):
        return parse_size(buffer_size, "buffer_size", BUFFER_RANGE)
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or not (
            MIN_BUFFER_BYTES <= buffer_size <= BUFFER_RANGE[1]):
        raise UsageError(f"{{buffer_size}} {buffer_size!r}: give bytes from {MIN_BUFFER_BYTES} to {BUFFER_RANGE[1]}",
                         "buffer_size")
    return buffer_size


def run_plan(plan: Plan, *, device: str = "auto", resume: bool = False, overwrite: bool = False,
             dry_run: bool = False, progress: bool = False, buffer_size: str | int | None = None,
             part: str | tuple[int, int] | None = None, space_check: bool = True,
             started: float | None = None) -> dict:
    """Run (or, `dry_run`, describe) a plan; return the summary `--json` prints.

    Refused before any work and before torch is imported, and the same in a dry run: bad options or device
    names (a GPU index beyond those the driver lists included: `devices.check_gpu_index`), a DST that is not
    absent or empty (unless `resume`/`overwrite`), and, unless `space_check` is False, a DST without room for
    the bytes this run writes.
    `started`: `time.perf_counter()` when the command began (default: now); `seconds` in the summary is the
    wall time from then to the end, `startup_seconds` the part of it before the engine starts.
    """
    started = time.perf_counter() if started is None else started
    part = parse_part(part)
    chunk = buffer_bytes(buffer_size)
    summary = plan.summary()
    mine = plan.files
    if part is not None:
        owner = assign_parts(plan.files, part[1])
        mine = [f for f, k in zip(plan.files, owner) if k == part[0]]
        summary.update(
            part=f"{part[0]}/{part[1]}", part_shards=[f.name for f in mine],
            part_tensors_converted=sum(t.converts for f in mine for t in f.tensors),
            part_tensors_copied=sum(isinstance(t.op, Copy) for f in mine for t in f.tensors),
            part_bytes_out=sum(f.size for f in mine),
        )
    if part is not None and overwrite:
        raise UsageError("{part} and {overwrite} exclude each other: parts share DST; empty it first",
                         "part", "overwrite")
    names = parse_devices(device) if plan.converted else []
    if (len(names) > 1 or names == ["cuda:all"]) and (part is not None or overwrite):
        raise UsageError(f"{{device}} {device}: several devices run as parts of one job; "
                         "not with {part} (one device per job) or {overwrite} (empty DST first)",
                         "device", "part", "overwrite")
    check_gpu_index(names)  # a GPU the driver does not list: torch is asked only once the run has begun
    threads = cpu_threads() if any(n in ("auto", "cpu") for n in names) else None
    io_threads()  # a bad DSV3CONV_READERS or DSV3CONV_WRITERS is refused here, before any work
    if threads:
        cpu_kernel()  # a mistyped DSV3CONV_CPU_KERNEL refused now, not once the backend starts
    # The refusals a run would give, before any work (the run creates DST later)
    prepare_dest(plan.dest, resume=resume or part is not None, overwrite=overwrite, source=plan.source, create=False)
    if (resume or part is not None) and plan.dest.is_dir():
        check_claim(plan)  # DST begun under another plan
    summary.update(bytes_needed=space_needed(plan, mine, resume=resume or part is not None, overwrite=overwrite),
                   bytes_free=space_free(plan.dest))
    if space_check:
        check_space(plan.dest, summary["bytes_needed"], summary["bytes_free"])
    if dry_run:
        summary["files"] = [
            {"name": f.name, "tensors": len(f.tensors), "converted": sum(t.converts for t in f.tensors),
             "bytes": f.size, "copy_of": f.copy_of}
            for f in plan.files
        ]
        summary["dropped"] = plan.dropped
        summary["config"] = plan.config
        return summary
    profiling.mark("planned_s", first=True)
    from dsv3conv.compute import on_cpu, resolve_devices
    from dsv3conv.engine import DEFAULT_CHUNK_BYTES

    starting = None
    if len(names) == 1 and names != ["cuda:all"] and not on_cpu(names[0]) and cuda_possible():
        starting = _start_backend(names[0], threads)  # one GPU: torch and CUDA start while the copies go on
        devices = names
    else:  # a missing GPU refused before any work starts (torch imported only where a GPU may be used)
        devices = resolve_devices(device) if plan.converted else []
        profiling.mark("torch_s")
    on_gpu = starting is not None or any(d.startswith("cuda") for d in devices)
    # A GPU converts asynchronously: smaller steps keep the pinned memory small and the writes many.
    chunk = chunk or (DEFAULT_CHUNK_BYTES // 2 if on_gpu else DEFAULT_CHUNK_BYTES)
    with ByteProgress(sum(f.size for f in mine), plan.dest.name, enabled=progress) as bar:
        def report(nbytes: int, k: int, name: str, skipped: bool = False) -> None:
            (bar.skip if skipped else bar.advance)(nbytes, f"shard {k + 1}/{len(plan.files)} {name}")

        if len(devices) > 1:
            startup = time.perf_counter() - started
            stats, gpu_peak = execute_on_devices(plan, devices, resume=resume, progress=report, chunk_bytes=chunk)
        else:
            if starting is None:
                starting = _backend(devices, threads)  # None: nothing to convert
                profiling.mark("backend_s")
            startup = time.perf_counter() - started
            stats, devices = _execute_one(plan, starting, devices, resume=resume, overwrite=overwrite,
                                          progress=report, chunk_bytes=chunk, part=part)
            on_gpu = any(d.startswith("cuda") for d in devices)
            gpu_peak = _gpu_peak(devices)
    summary.update(
        device=",".join(devices) if devices else "none", shards_skipped=stats.files_skipped,
        bytes_written=stats.bytes_written, seconds=round(time.perf_counter() - started, 3),
        startup_seconds=round(startup, 3), buffer_bytes=chunk, finalized=stats.finalized,
        waiting_for=stats.waiting_for,
    )
    if on_gpu:
        summary["gpu_peak_bytes"] = gpu_peak
    return summary


def _start_backend(device: str, threads: int | None) -> Future:
    """The backend of `device` made in a thread (torch imported, the device checked): a Future of it; with
    DSV3CONV_STAND_IN=1 the CPU converts meanwhile (its `stand_in`)."""
    starting: Future = Future()
    starting.set_running_or_notify_cancel()
    if os.environ.get(STAND_IN_ENV, "") == "1":
        from dsv3conv.backend import CpuBackend

        starting.stand_in = CpuBackend(threads)

    def start() -> None:
        try:
            from dsv3conv.compute import make_backends, resolve_devices

            starting.set_result(make_backends(resolve_devices(device), threads))
        except BaseException as exc:  # the run's error, once it needs the backend
            starting.set_exception(exc)

    threading.Thread(target=start, name="dsv3conv-backend-start", daemon=True).start()
    return starting


def _execute_one(plan: Plan, backend, devices: list[str], **options) -> tuple[Stats, list[str]]:
    """`execute` on one backend (or none), given or starting (a Future); the stats and the devices used. A
    start that failed fails the run, even one that needed no conversion (as a missing GPU does), its error
    saying what DST keeps."""
    try:
        stats = execute(plan, backend, **options)
        if isinstance(backend, Future):
            devices = [backend.result().name]
    except Dsv3Error as exc:
        started = isinstance(backend, Future) and backend.done() and backend.exception() is exc
        said = _kept(exc, plan) if started else exc  # the start's error: with what DST keeps
        if said is exc:
            raise
        raise said from exc
    finally:
        if isinstance(backend, Future):
            if getattr(backend, "stand_in", None) is not None:
                backend.stand_in.close()
            wait([backend])  # a start cannot be stopped midway: let it end, close what it made
            backend = None if backend.exception() else backend.result()
        if backend is not None:
            backend.close()
    return stats, devices


def _kept(exc: Dsv3Error, plan: Plan) -> Dsv3Error:
    """The backend's failed start, said with what DST holds: the files written while it started are complete
    (the run removed its partial ones), and a rerun with --resume keeps them."""
    kept = len(held_files(plan.dest)) if plan.dest.is_dir() else 0
    if not kept:
        return exc
    err = type(exc)(f"{exc.message}; {plan.dest} keeps the {counted(kept, 'file')} written so far: rerun with {{resume}} to finish it",
                    *exc.params, "resume")
    err.exit_code = exc.exit_code
    return err


def execute(
    plan: Plan, backend, *, resume: bool = False, overwrite: bool = False, progress=None,
    chunk_bytes: int | None = None, depth: int = 3, part: tuple[int, int] | None = None,
    cancel: threading.Event | None = None,
) -> Stats:
    """Write the plan's output. `progress(nbytes, file_index, file_name, skipped=False)` is called as bytes are
    written, and with skipped=True for the files a resumed run finds complete.

    `cancel`: set by another thread to stop this run as Ctrl-C would (partial files removed).
    `part=(k, n)`: write only the shards of part k of n (see `plan.assign_parts`); N such jobs may run at once
    into one DST. Whichever run finds every shard complete writes the other files, the index and the config.
    """
    start = time.perf_counter()
    if part is not None and overwrite:
        raise UsageError("{part} and {overwrite} exclude each other: parts share DST; empty it first",
                         "part", "overwrite")
    prepare_dest(plan.dest, resume=resume or part is not None, overwrite=overwrite, source=plan.source)
    stats = Stats()
    mine = list(enumerate(plan.files))
    if part is not None:
        owner = assign_parts(plan.files, part[1])
        mine = [(k, f) for k, f in mine if owner[k] == part[0]]
    lock = LOCK_NAME if part is None else f"{LOCK_NAME}.part-{part[0]}-of-{part[1]}"
    with DestLock(plan.dest, lock):
        remove_partials(plan.dest, None if part is None else [f for _, f in mine])
        if overwrite:
            for name in (INDEX_NAME, CONFIG_NAME):
                (plan.dest / name).unlink(missing_ok=True)
            for p in plan.dest.glob("*.safetensors"):
                p.unlink()
        claim_dest(plan, resume=resume or part is not None)
        todo = []
        for k, f in mine:
            if (resume or part is not None) and is_complete(plan.dest / f.name, f):
                stats.files_skipped += 1
                if progress:
                    progress(f.size, k, f.name, True)  # skipped: done, but not throughput
            else:
                todo.append((k, f))
        try:
            if todo:
                from dsv3conv.engine import DEFAULT_CHUNK_BYTES, run_files

                chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
                stats.files_written, stats.bytes_written = run_files(plan, backend, todo, progress, chunk_bytes,
                                                                     depth, cancel)
            if part is None:
                _finalize(plan)
                stats.finalized = True
            else:
                with DestLock(plan.dest, FINALIZE_LOCK_NAME, wait=True):
                    missing = [f.name for f in plan.files if not is_complete(plan.dest / f.name, f)]
                    if not missing:
                        _finalize(plan)
                        stats.finalized = True
                    stats.waiting_for = missing
        finally:
            remove_partials(plan.dest, None if part is None else [f for _, f in mine])
    stats.seconds = time.perf_counter() - start
    return stats


def execute_on_devices(
    plan: Plan, devices: list[str], *, resume: bool = False, progress=None, chunk_bytes: int | None = None,
) -> tuple[Stats, int]:
    """Several devices (`--device cuda:all` or a list); returns the stats and the largest GPU memory peak.

    By default one engine in this process spreads its batches over the devices in turn: one set of reader
    and writer threads feeds them all. `DSV3CONV_WORKERS=processes`: one spawned process per device instead,
    process i writing part i+1 of N (shards balanced by bytes), the last to finish writing the index and
    config, as separate `--part` jobs do.
    """
    if os.environ.get("DSV3CONV_WORKERS", "threads") != "processes":
        backend = _backend(devices, None)
        profiling.mark("backend_s")
        try:
            stats = execute(plan, backend, resume=resume, progress=progress, chunk_bytes=chunk_bytes)
        finally:
            backend.close()
        return stats, _gpu_peak(devices)
    return _execute_in_processes(plan, devices, resume=resume, progress=progress, chunk_bytes=chunk_bytes)


def _execute_in_processes(plan: Plan, devices: list[str], *, resume: bool, progress, chunk_bytes: int | None,
                          ) -> tuple[Stats, int]:
    """One spawned process per device, each a part (see `execute_on_devices`)."""
    import multiprocessing

    prepare_dest(plan.dest, resume=resume, overwrite=False, source=plan.source)
    if not resume:
        release_dest(plan.dest)  # a record left by a run stopped before its first shard: not this run's
    n = len(devices)
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or thread state
    events = ctx.Queue()
    threads_each = max(1, cpu_threads() // max(1, sum(d == "cpu" for d in devices)))  # CPU workers share the cores
    workers = [
        ctx.Process(target=_device_worker, name=f"dsv3conv-{d}",
                    args=(plan, d, (i + 1, n), resume, chunk_bytes, events, threads_each, progress is not None))
        for i, d in enumerate(devices)
    ]
    start = time.perf_counter()
    for w in workers:
        w.start()
    results: dict[int, tuple] = {}
    try:
        while len(results) < n:
            # Gone before the wait, and still no result after it: a worker puts its result before it ends.
            gone = [k for k, w in enumerate(workers) if not w.is_alive()]
            try:
                kind, i, payload = events.get(timeout=0.5)
            except queue.Empty:
                dead = [k for k in gone if k not in results]
                if dead:  # killed without a word (out of memory, a signal): say which one
                    k = dead[0]
                    raise Dsv3Error(f"the worker for {{device}} {devices[k]} (part {k + 1}/{n}) died with exit code "
                                    f"{workers[k].exitcode}; rerun with {{resume}} to finish the "
                                    "remaining shards", "device", "resume") from None
                continue
            if kind == "progress":
                progress(*payload)
            else:
                results[i] = (kind, payload)
                if kind == "error":
                    raise _worker_error(devices[i], i, n, payload)
    except BaseException:
        for w in workers:
            if w.is_alive():
                os.kill(w.pid, signal.SIGTERM)  # each removes its partial files, as on Ctrl-C
        raise
    finally:
        for w in workers:
            while w.is_alive():
                w.join(timeout=0.1)
                with contextlib.suppress(queue.Empty):  # a process cannot end while its messages wait
                    while True:
                        events.get_nowait()
        events.close()
    seconds = time.perf_counter() - start
    gpu_peak = max(peak for _, (_, peak) in results.values())
    return _merged([stats for _, (stats, _) in results.values()], seconds), gpu_peak


def _backend(devices: list[str], threads: int | None):
    """The backend of `devices` (checked): None for none, one device's, or several spread."""
    from dsv3conv.compute import make_backends

    return make_backends(devices, threads)


def _merged(parts: list[Stats], seconds: float) -> Stats:
    """The stats of a run made of parts: counts added; waiting for nothing once one part finalized."""
    total = Stats(seconds=seconds)
    for stats in parts:
        total.files_written += stats.files_written
        total.files_skipped += stats.files_skipped
        total.bytes_written += stats.bytes_written
        total.finalized |= stats.finalized
    total.waiting_for = [] if total.finalized else sorted({f for stats in parts for f in stats.waiting_for})
    return total


def _device_worker(plan, device, part, resume, chunk_bytes, events, threads, report) -> None:
    """One worker process of `execute_on_devices`: its part on its device; progress, result or error to the parent."""
    from dsv3conv.compute import make_backend

    i = part[0] - 1

    def stop(signum, frame):  # once: a second signal must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        backend = make_backend(device, threads)
        progress = (lambda *a: events.put(("progress", i, a))) if report else None
        try:
            stats = execute(plan, backend, resume=True, progress=progress, chunk_bytes=chunk_bytes, part=part)
        finally:
            backend.close()
        peak = _gpu_peak([device])
        result = ("done", i, (stats, peak))
    except KeyboardInterrupt:
        result = ("error", i, ("KeyboardInterrupt", "interrupted", (), 130, ""))
    except BaseException as exc:  # handed to the parent, which exits with it
        import traceback

        ours = isinstance(exc, Dsv3Error)
        message, params = (exc.message, exc.params) if ours else (str(exc), ())
        result = ("error", i, (type(exc).__name__, message, params, exc.exit_code if ours else 1,
                               traceback.format_exc()))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: a late stop from the parent changes nothing
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    events.put(result)


def _gpu_peak(devices: list[str]) -> int:
    """The largest GPU memory peak of `devices` (0 without a GPU)."""
    from dsv3conv.compute import gpu_peak

    return gpu_peak(devices)


def _worker_error(device: str, i: int, n: int, payload) -> BaseException:
    name, message, params, code, tb = payload
    if name == "KeyboardInterrupt":
        return KeyboardInterrupt()
    err_type = {"UsageError": UsageError, "HeaderError": HeaderError}.get(name, Dsv3Error)
    if err_type is Dsv3Error and name != "Dsv3Error":
        message = f"the worker for {{device}} {device} (part {i + 1}/{n}) failed: {name}: {message}"
        params = (*params, "device")
    err = err_type(message, *params)
    err.exit_code = code
    err.worker_traceback = tb  # shown with --debug
    return err


def _finalize(plan: Plan) -> None:
    """Other files first, then the index, then config.json: a checkpoint is loadable only once all is there.
    The plan record stays (`dest.plan_record`): a later `--resume` is held to the same job."""
    for rel in plan.extra_files:
        copy_file_fast(plan.source / rel, plan.dest / rel)
    if plan.index is not None:
        write_bytes_atomic(plan.dest / INDEX_NAME, (json.dumps(plan.index, indent=2) + "\n").encode())
    if plan.config is not None:
        write_bytes_atomic(plan.dest / CONFIG_NAME, (json.dumps(plan.config, indent=2) + "\n").encode())
