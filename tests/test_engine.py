"""The engine with an asynchronous backend, on the CPU: a stand-in whose results exist only once its fence is
waited for (as a GPU's copies back), so a writer that wrote before waiting, or a read buffer reused before
its batch was converted, shows as different bytes. Pools stay within their counts."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest

from dsv3conv import batches, engine
from dsv3conv.backend import CpuBackend, OutputArena, Spread, host_buffer
from dsv3conv.checkpoint import Checkpoint
from dsv3conv.dequant import plan_dequant
from dsv3conv.devices import io_threads
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.runner import execute


class _Later:
    """A fence: the batch's conversion runs when waited for; `fail` raises there instead (a host-side check)."""

    def __init__(self, jobs, fail: str | None):
        self.jobs, self.fail = jobs, fail

    def wait(self) -> None:
        if self.fail:
            raise Dsv3Error(self.fail)
        for job in self.jobs:
            job()


class LateBackend:
    """Dequant into the engine's arena, but only when the batch's fence is waited for."""

    host_buffer = staticmethod(host_buffer)

    def __init__(self, name: str = "late", fail_on: str | None = None):
        self.name, self.fail_on = name, fail_on
        self.cpu = CpuBackend(1)
        self.jobs: list = []
        self.fail: str | None = None
        self.batches = 0

    def dequant_block_fp8(self, buf, items, out: OutputArena):
        dsts = [out.take(it.rows * it.cols * 2, 2) for it in items]
        snapshot = buf.copy()  # what the batch's bytes were when enqueued

        def convert() -> None:
            assert np.array_equal(buf, snapshot), "the read buffer was reused before its fence"
            done = self.cpu.dequant_block_fp8(buf, items, OutputArena(0))
            for dst, (view,) in zip(dsts, done):
                dst[:] = np.frombuffer(view, dtype=np.uint8)

        self.jobs.append(convert)
        if self.fail_on is not None and any(it.name == self.fail_on for it in items):
            self.fail = f"tensor `{self.fail_on}`: refused by the check after the conversion"
        return [[memoryview(dst)] for dst in dsts]

    def quant_block_fp8(self, buf, items, out):
        raise AssertionError("not used here")

    def dequant_mxfp4(self, buf, items, out):
        raise AssertionError("not used here")

    def fence(self) -> _Later:
        self.batches += 1
        fence = _Later(self.jobs, self.fail)
        self.jobs, self.fail = [], None
        return fence

    def close(self) -> None:
        self.cpu.close()


def _same_files(out, ref) -> None:
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.parametrize("n_backends", [1, 2])
def test_async_backend_many_batches_in_flight_same_bytes(tmp_path, src_ref, n_backends):
    """Small steps (many batches of several files in flight), one or two asynchronous backends taking turns:
    the CPU's bytes exactly."""
    src, ref = src_ref
    backends = [LateBackend(f"late{i}") for i in range(n_backends)]
    backend = backends[0] if n_backends == 1 else Spread(backends)
    try:
        stats = execute(plan_dequant(Checkpoint.open(src), tmp_path / "out"), backend, chunk_bytes=8192)
    finally:
        backend.close()
    assert stats.finalized
    assert all(b.batches > 3 for b in backends), [b.batches for b in backends]
    _same_files(tmp_path / "out", ref)


def test_a_failing_fence_fails_the_run_and_leaves_no_final_file(tmp_path, src_ref):
    """What the fence raises (a check on the converted bytes) is the run's error; the shard that holds the
    tensor is never under its final name, nor is config.json."""
    src, _ = src_ref
    plan = plan_dequant(Checkpoint.open(src), tmp_path / "out")
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = next(f.name for f in plan.files for t in f.tensors if t.name == name)
    backend = LateBackend(fail_on=name)
    try:
        with pytest.raises(Dsv3Error, match=f"`{name}`"):
            execute(plan, backend, chunk_bytes=8192)
    finally:
        backend.close()
    assert not (tmp_path / "out" / shard).exists()
    assert not (tmp_path / "out" / "config.json").exists()
    assert not list((tmp_path / "out").glob(".*partial"))


def test_buffers_and_arenas_stay_within_their_counts(tmp_path, src_ref, monkeypatch):
    """However many batches, at most readers + depth read buffers and writers + depth arenas are made."""
    src, ref = src_ref
    made = {"buffers": 0, "arenas": 0}
    make_buffer, arena_take = engine._buffer, OutputArena.take

    def counting_buffer(*args, **kwargs):
        made["buffers"] += 1
        return make_buffer(*args, **kwargs)

    def counting_take(self, nbytes, align=1):
        if self._buf is None:
            made["arenas"] += 1
        return arena_take(self, nbytes, align)

    monkeypatch.setattr(engine, "_buffer", counting_buffer)
    monkeypatch.setattr(OutputArena, "take", counting_take)
    backend = CpuBackend(1)
    try:
        plan = plan_dequant(Checkpoint.open(src), tmp_path / "out")
        specs = [s for k, f in enumerate(plan.files) for s in batches.batch_specs(k, f, 8192)]
        execute(plan, backend, chunk_bytes=8192, depth=1)
    finally:
        backend.close()
    readers, writers = io_threads()
    assert len(specs) > 4 * (readers + writers + 2)
    assert 1 <= made["buffers"] <= readers + 1, made
    assert 1 <= made["arenas"] <= writers + 1, made
    _same_files(tmp_path / "out", ref)


def test_reader_and_writer_counts_from_the_environment(tmp_path, src_ref, monkeypatch):
    """DSV3CONV_READERS and DSV3CONV_WRITERS set the engine's thread counts (measurements); anything but a
    whole number from 1 is refused, naming the variable."""
    src, ref = src_ref
    monkeypatch.setenv("DSV3CONV_READERS", "3")
    monkeypatch.setenv("DSV3CONV_WRITERS", "5")
    assert io_threads() == (3, 5)
    seen = []
    init = engine._Run.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append((self.n_readers, self.n_writers))

    monkeypatch.setattr(engine._Run, "__init__", spy)
    backend = LateBackend()
    try:
        execute(plan_dequant(Checkpoint.open(src), tmp_path / "out"), backend, chunk_bytes=8192)
    finally:
        backend.close()
    assert seen == [(3, 5)]
    _same_files(tmp_path / "out", ref)
    monkeypatch.delenv("DSV3CONV_READERS")
    assert io_threads()[0] >= 2 and io_threads()[1] == 5
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("DSV3CONV_WRITERS", bad)
        with pytest.raises(UsageError, match=f"DSV3CONV_WRITERS='{bad}'"):
            io_threads()


def test_batches_of_a_few_files_take_turns():
    """Writes into one file wait on each other: the batches of `window` files alternate, each file's in order,
    and no more than `window` files are begun and unfinished at any moment."""
    per_file = [[(k, i) for i in range(n)] for k, n in enumerate([3, 1, 0, 2, 4])]
    order = batches.interleaved(per_file, 2)
    assert order == [(0, 0), (1, 0), (0, 1), (3, 0), (0, 2), (3, 1), (4, 0), (4, 1), (4, 2), (4, 3)]
    for window in (1, 2, 3, 8):
        order = batches.interleaved(per_file, window)
        assert sorted(order) == sorted(b for f in per_file for b in f)
        for k, file_batches in enumerate(per_file):
            assert [b for b in order if b[0] == k] == file_batches
        for n in range(len(order) + 1):
            begun = {k for k, _ in order[:n]}
            open_files = [k for k in begun if sum(b[0] == k for b in order[:n]) < len(per_file[k])]
            assert len(open_files) <= window, (window, order[:n])


def test_mapped_writes_from_several_threads_are_the_bytes_written(tmp_path):
    """tmpfs output goes through mappings of the file's pages: pieces from several threads at unaligned
    offsets, large and small (small ones through write()), are the file's bytes; its size is reserved first."""
    import threading

    from dsv3conv.writer import MAP_MIN_BYTES, AtomicFile

    size = 8 * MAP_MIN_BYTES + 12345
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    cuts = [0, 7, 100, MAP_MIN_BYTES + 3, 3 * MAP_MIN_BYTES + 1, 3 * MAP_MIN_BYTES + 9, 6 * MAP_MIN_BYTES - 5, size]
    out = AtomicFile(tmp_path / "x.bin")
    out.map_writes(size)
    assert (tmp_path / ".x.bin.dsv3conv-partial").stat().st_size == size
    threads = [threading.Thread(target=out.pwrite, args=(memoryview(data)[a:b], a)) for a, b in zip(cuts, cuts[1:])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out.written == size
    out.commit()
    assert (tmp_path / "x.bin").read_bytes() == data


def test_a_full_file_system_is_refused_when_the_file_is_opened(tmp_path, monkeypatch):
    """Mapped writes reserve the file's size first: no space is one line (disk full, --resume), never SIGBUS."""
    import errno

    from dsv3conv.writer import AtomicFile

    def no_space(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", no_space)
    out = AtomicFile(tmp_path / "x.bin")
    with pytest.raises(Dsv3Error, match="disk full"):
        out.map_writes(1 << 30)
    out.abort()


def test_conversion_into_tmpfs_maps_its_writes(tmp_path, src_ref, monkeypatch):
    """DSV3CONV_MAP_WRITES=1 and an output on tmpfs (the engine asks the mount): written through mappings,
    the same bytes."""
    from dsv3conv import writer

    src, ref = src_ref
    mapped = []
    real = writer.AtomicFile.map_writes
    monkeypatch.setenv("DSV3CONV_MAP_WRITES", "1")
    monkeypatch.setattr(engine, "fs_type", lambda path: "tmpfs")
    monkeypatch.setattr(writer, "MAP_MIN_BYTES", 4096)
    monkeypatch.setattr(writer.AtomicFile, "map_writes", lambda self, size: (mapped.append(size), real(self, size)))
    backend = CpuBackend(1)
    try:
        plan = plan_dequant(Checkpoint.open(src), tmp_path / "out")
        execute(plan, backend, chunk_bytes=1 << 16)
    finally:
        backend.close()
    assert sorted(mapped) == sorted(f.size for f in plan.files)
    _same_files(tmp_path / "out", ref)


def test_file_system_type_of_a_path():
    from pathlib import Path

    from dsv3conv.writer import fs_type

    assert fs_type(Path("/proc/self")) == "proc"
    assert fs_type(Path("/")) not in ("", "proc")


def test_pools_stay_within_the_memory_budget():
    """Arenas go first, then read buffers, never under two each; a pool within budget is left as asked."""
    mib = 1 << 20
    assert engine.pool_counts(7, 11, 32 * mib, 64 * mib) == (7, 11)  # a GPU's default: 0.9 GiB
    buffers, arenas = engine.pool_counts(7, 11, 64 * mib, 128 * mib)  # a 16-core CPU's default
    assert (buffers, arenas) == (7, 6) and 7 * 64 * mib + 6 * 128 * mib <= engine.POOL_BUDGET_BYTES
    assert engine.pool_counts(7, 11, 1 << 30, 2 << 30) == (2, 2)  # --buffer-size 1GiB: what it asks for


def test_while_the_backend_starts_batches_that_convert_nothing_are_read_first():
    """Readers take the next batch that converts nothing (within the lookahead) while the backend starts, the
    batches in run order otherwise and once it is there."""
    specs = [SimpleNamespace(n=n, converts=c) for n, c in enumerate([True, True, False, True, False, False, True])]
    starting = [True]
    schedule = batches.Schedule(specs, lambda: starting[0], 3)
    # 2 is among the next 3; then none of 0, 1, 3 converts nothing: 0; then 4 is among 1, 3, 4
    assert [schedule.next().n for _ in range(3)] == [2, 0, 4]
    starting[0] = False
    assert [schedule.next().n for _ in range(4)] == [1, 3, 5, 6] and schedule.next() is None


class _Recording(engine.FileSink):
    """Records whether each batch written converted; `on_put(converts_so_far)` after each."""

    def __init__(self, plan, on_put):
        super().__init__(plan)
        self.order: list[bool] = []
        self.lock = threading.Lock()
        self.on_put = on_put

    def put(self, spec, outs):
        super().put(spec, outs)
        with self.lock:
            self.order.append(spec.converts)
            self.on_put(self.order)


def _plan_and_copies(src, dst):
    plan = plan_dequant(Checkpoint.open(src), dst)
    todo = list(enumerate(plan.files))
    copies = sum(not s.converts for k, f in todo for s in batches.batch_specs(k, f, 8192))
    assert 0 < copies < batches.LOOKAHEAD
    dst.mkdir()
    return plan, todo, copies


class _OwnMemory(LateBackend):
    """Makes its own memory (as a GPU backend pins it): counts the conversions of each read buffer it did not
    make, told by the buffer's address at the time."""

    def __init__(self):
        super().__init__()
        self.made: dict[int, np.ndarray] = {}
        self.others: Counter = Counter()

    def host_buffer(self, nbytes: int) -> np.ndarray:
        buf = np.empty(nbytes, dtype=np.uint8)
        self.made[buf.ctypes.data] = buf
        return buf

    def dequant_block_fp8(self, buf, items, out):
        if buf.ctypes.data not in self.made:
            self.others[buf.ctypes.data] += 1
        return super().dequant_block_fp8(buf, items, out)


@pytest.mark.parametrize("own_memory", [False, True])
def test_copies_are_written_while_the_backend_starts_then_the_rest(tmp_path, src_ref, own_memory, monkeypatch):
    """The backend (a Future) is there only once every batch that converts nothing is written and a batch that
    converts was read meanwhile: none that converts is written before, and the output is the CPU's bytes. A read
    buffer made meanwhile (plain memory) converts at most once, then the pool makes the backend's own in its place."""
    src, ref = src_ref
    plan, todo, copies = _plan_and_copies(src, tmp_path / "out")
    backend, starting = (_OwnMemory() if own_memory else LateBackend()), Future()
    lock, seen = threading.Lock(), {"copies written": False, "converting batch read": False}

    def saw(what):  # the backend arrives once every copy is written and a converting batch is read meanwhile
        with lock:
            seen[what] = True
            if all(seen.values()) and not starting.done():
                starting.set_result(backend)

    def on_put(order):
        if order.count(False) == copies:
            saw("copies written")

    read = engine._read_batch

    def read_noting_conversions(spec, buf, handles, scales):
        items = read(spec, buf, handles, scales)
        if spec.converts:
            saw("converting batch read")
        return items

    monkeypatch.setattr(engine, "_read_batch", read_noting_conversions)
    sink = _Recording(plan, on_put)
    try:
        engine.run_batches(plan, starting, todo, sink, chunk_bytes=8192)
    finally:
        backend.close()
    assert sink.order[:copies] == [False] * copies and all(sink.order[copies:]), sink.order
    assert sink.files_written == len(plan.files)
    if own_memory:
        assert backend.made and backend.others and max(backend.others.values()) == 1, backend.others
    for f in plan.files:
        assert (tmp_path / "out" / f.name).read_bytes() == (ref / f.name).read_bytes(), f.name


def test_a_copy_taken_while_converting_batches_fill_the_pool_is_still_read(tmp_path, src_ref, monkeypatch):
    """While the backend starts, two readers and a pool of two buffers: one reader takes the first batch that
    converts nothing and is held there (before it reads) until the other has taken every other batch, written
    the copies and waits for a buffer with converting batches holding the rest. The held batch must still be
    read and written, so the start (completed here once every copy is written) comes and the run ends."""
    src, ref = src_ref
    plan, todo, copies = _plan_and_copies(src, tmp_path / "out")
    backend, starting = LateBackend(), Future()
    monkeypatch.setattr(engine, "io_threads", lambda: (2, 1))
    starved, lock, held = threading.Event(), threading.Lock(), []

    def on_put(order):
        if order.count(False) == copies and not starting.done():
            starting.set_result(backend)

    sink = _Recording(plan, on_put)
    take, get = batches.Schedule.next, engine._Pool.get

    def take_holding_the_first_copy(schedule):
        spec = take(schedule)
        with lock:
            first = spec is not None and not spec.converts and not held
            if first:
                held.append(spec)
        if first:
            starved.wait()
        return spec

    def get_watched(pool, check):
        def waiting():  # called while no buffer is free and none may be made
            with sink.lock:
                others_written = sink.order.count(False) == copies - 1
            if others_written and threading.current_thread().name.startswith("dsv3conv-reader"):
                starved.set()
            check()

        return get(pool, waiting)

    monkeypatch.setattr(batches.Schedule, "next", take_holding_the_first_copy)
    monkeypatch.setattr(engine._Pool, "get", get_watched)
    cancel, failed = threading.Event(), []

    def run():
        try:
            engine.run_batches(plan, starting, todo, sink, chunk_bytes=8192, depth=0, cancel=cancel)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            failed.append(exc)

    engine_thread = threading.Thread(target=run, daemon=True)
    engine_thread.start()
    # A watchdog, not synchronisation: the run ends in seconds, or never (the deadlock); the limit only turns
    # a hang into a failure, then releases the held reader and cancels the run so that nothing is left running
    engine_thread.join(timeout=300)
    hung = engine_thread.is_alive()
    if hung:
        starved.set()
        cancel.set()
        engine_thread.join()
    backend.close()
    assert not hung, f"the run hung: the held batch never got a buffer ({sink.order.count(False)} of {copies} copies)"
    assert not failed, failed
    assert held and held[0].span_len > 0 and starved.is_set()
    assert sink.order[:copies] == [False] * copies and all(sink.order[copies:]), sink.order
    assert sink.files_written == len(plan.files)
    for f in plan.files:
        assert (tmp_path / "out" / f.name).read_bytes() == (ref / f.name).read_bytes(), f.name


def test_a_backend_that_fails_to_start_fails_the_run(tmp_path, src_ref, monkeypatch):
    """The start's error (no GPU after all) is the run's, once the copies written so far are in; a shard with
    a converted tensor never gets its final name, and no partial file stays."""
    src, _ = src_ref
    plan, _, _ = _plan_and_copies(src, tmp_path / "out")
    tmp_path.joinpath("out").rmdir()
    starting = Future()
    put = engine.FileSink.put

    def put_then_fail(self, spec, outs):  # the first batch written, the start fails
        put(self, spec, outs)
        if not starting.done():
            starting.set_exception(UsageError("{device} cuda: no CUDA GPU is visible to torch", "device"))

    monkeypatch.setattr(engine.FileSink, "put", put_then_fail)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        execute(plan, starting, chunk_bytes=8192)
    out = tmp_path / "out"
    for f in plan.files:
        if any(t.converts for t in f.tensors):
            assert not (out / f.name).exists(), f.name
    assert not (out / "config.json").exists() and not list(out.glob(".*partial"))


@pytest.mark.parametrize("start_fails, stand_in", [(False, False), (True, False), (False, True)])
def test_one_gpu_starts_in_a_thread_while_the_run_goes_on(tmp_path, src_ref, monkeypatch, start_fails, stand_in):
    """Where a GPU may exist, a run on one device hands the engine the backend's start (a Future made in its
    own thread) and reports the device it got; a start that fails is the run's error; DSV3CONV_STAND_IN=1
    puts a CPU backend on the Future. Here the start makes a test backend."""
    from dsv3conv import compute, devices, runner

    src, ref = src_ref
    if stand_in:
        monkeypatch.setenv("DSV3CONV_STAND_IN", "1")
    made_in, given = [], []

    def resolve(device):
        made_in.append(threading.current_thread().name)
        if start_fails:
            raise UsageError("{device} cuda: no CUDA GPU is visible to torch", "device")
        return ["late"]

    init = engine._Run.__init__

    def spy(self, plan, backend, *args, **kwargs):
        given.append((type(backend), type(getattr(backend, "stand_in", None))))
        init(self, plan, backend, *args, **kwargs)

    monkeypatch.setattr(runner, "cuda_possible", lambda: True)
    monkeypatch.setattr(devices, "NVIDIA_PROC", tmp_path / "no-driver-entries")  # the GPU count left to the start
    monkeypatch.setattr(compute, "resolve_devices", resolve)
    monkeypatch.setattr(compute, "make_backends", lambda devices, threads: LateBackend(devices[0]))
    monkeypatch.setattr(engine._Run, "__init__", spy)
    plan = plan_dequant(Checkpoint.open(src), tmp_path / "out")
    if start_fails:
        with pytest.raises(UsageError, match="no CUDA GPU"):
            runner.run_plan(plan, device="cuda")
        assert not (tmp_path / "out" / "config.json").exists()
    else:
        summary = runner.run_plan(plan, device="cuda")
        assert summary["device"] == "late" and "gpu_peak_bytes" not in summary
        _same_files(tmp_path / "out", ref)
    assert made_in == ["dsv3conv-backend-start"]
    assert given == [(Future, CpuBackend if stand_in else type(None))]


class _CountingCpu(CpuBackend):
    """The CPU backend as a stand-in: counts its conversions; `after_first()` once the first is done."""

    def __init__(self, after_first):
        super().__init__(1)
        self.after_first, self.converted = after_first, 0

    def dequant_block_fp8(self, buf, items, out):
        outs = super().dequant_block_fp8(buf, items, out)
        self.converted += 1
        if self.converted == 1:
            self.after_first()
        return outs


def test_a_stand_in_converts_while_the_backend_starts(tmp_path, src_ref):
    """With a stand-in on the Future (the CPU while a GPU starts), batches convert on it until the backend is
    there, then on the backend: the same bytes; read buffers made meanwhile convert on the backend at most
    once before the backend's own memory takes their place."""
    src, ref = src_ref
    plan, todo, _ = _plan_and_copies(src, tmp_path / "out")
    backend, starting = _OwnMemory(), Future()
    starting.stand_in = _CountingCpu(lambda: starting.set_result(backend))
    try:
        engine.run_batches(plan, starting, todo, engine.FileSink(plan), chunk_bytes=8192)
    finally:
        backend.close()
        starting.stand_in.close()
    assert starting.stand_in.converted >= 1 and backend.batches >= 1
    assert not backend.others or max(backend.others.values()) == 1, backend.others
    for f in plan.files:
        assert (tmp_path / "out" / f.name).read_bytes() == (ref / f.name).read_bytes(), f.name
