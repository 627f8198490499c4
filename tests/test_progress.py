"""Progress on stderr: plain lines in a log (a pipe, a file), rich on a terminal; resumed bytes are not speed."""

from __future__ import annotations

import itertools
import os
import re
import select
import subprocess
import sys
import threading

import pytest

from dsv3conv.progress import ByteProgress
from dsv3conv.synthetic import make_tiny
from tests.conftest import ENV, TIMEOUT, cli


@pytest.fixture
def clock(monkeypatch):
    """tqdm's clock advances one second per reading: every update after the first is a new line."""
    import tqdm.std

    ticks = itertools.count()
    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(ticks)))
    monkeypatch.setenv("DSV3CONV_PROGRESS_SECONDS", "0")


def test_log_lines_count_only_processed_bytes_as_speed(capsys, clock):
    with ByteProgress(10_000_000_000, "job") as bar:
        bar.skip(8_000_000_000, "shard 1/3 a")  # a resumed run: 8 GB found done
        bar.advance(1_000_000_000, "shard 2/3 b")
        bar.advance(1_000_000_000, "shard 3/3 c")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "job: starting, 10.0GB to do", lines
    assert lines[1].startswith("job: started after "), lines
    progress = [line for line in lines if "%" in line]
    assert progress and progress[-1].startswith("job shard 3/3 c: 100% 10.0GB/10.0GB"), lines
    # 2 GB processed in the clock's seconds: at most 2 GB/s, not the 10 GB/s that counting the skip would give
    rates = [re.search(r", ([\d.]+)([kMG])B/s\]$", line) for line in progress]
    assert all(rates) and max(float(m[1]) * 1000 ** " kMG".index(m[2]) for m in rates) <= 2e9, lines
    assert len(progress) == len(set(progress)), lines  # no line printed twice
    assert not any("\r" in line for line in lines)


def test_log_of_a_run_with_nothing_left_to_do(capsys, clock):
    with ByteProgress(5_000, "job") as bar:
        bar.skip(5_000, "shard 1/1 a")
    assert capsys.readouterr().err.splitlines() == ["job: starting, 5.00kB to do",
                                                    "job: 5.00kB already done, nothing else to do"]


_READER_GONE = """
import sys, threading
from dsv3conv.progress import ByteProgress

class Closing:  # stderr taking the first two lines (starting, started); then its reader is gone
    lines = 0
    def write(self, text):
        self.lines += 1
        if self.lines > 2:
            raise BrokenPipeError(32, "Broken pipe")
    def flush(self):
        pass

sys.stderr = Closing()
with ByteProgress(2_000, "job") as bar:
    worker = threading.Thread(target=bar.advance, args=(1_000, "shard 1/1 a"))  # as the engine's writers do
    worker.start()
    worker.join()
print("closed")
"""


def test_a_log_whose_reader_has_gone_stops_the_lines_not_the_run():
    """stderr a pipe whose reader quit (`... 2>&1 | head`): a writer thread's progress line fails, and the run
    still closes its progress (no lock left held by the thread whose line failed) and goes on."""
    env = dict(ENV, DSV3CONV_PROGRESS_SECONDS="0")
    try:
        proc = subprocess.run([sys.executable, "-c", _READER_GONE], capture_output=True, text=True, env=env,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("the progress never closed: a lock is held by the thread whose line failed")
    assert proc.returncode == 0 and proc.stdout == "closed\n", (proc.returncode, proc.stdout, proc.stderr)


def test_disabled_progress_prints_nothing(capsys):
    with ByteProgress(100, "job", enabled=False) as bar:
        bar.advance(100, "x")
    assert capsys.readouterr().err == ""


def test_terminal_bar_says_starting_until_bytes_are_processed(capsys, monkeypatch):
    """On a terminal (rich): skipped bytes restart the speed estimate, so no speed is shown for them."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    with ByteProgress(10_000_000_000, "job") as bar:
        bar.skip(1_000_000_000, "shard 1/3 a")
        bar.skip(1_000_000_000, "shard 2/3 b")
    err = capsys.readouterr().err
    assert "2.0/10.0 GB" in err and "starting" in err and "/s" not in err, err


def test_a_run_logs_progress_lines_while_it_runs(tmp_path, monkeypatch, clock):
    """stderr is a pipe (a batch log): progress lines arrive while the run is still converting."""
    import dsv3conv.backend as backend_mod
    from dsv3conv.api import dequantize

    make_tiny(tmp_path / "src", num_hidden_layers=4, n_shards=3)
    go = threading.Event()

    class HeldBackend(backend_mod.CpuBackend):
        calls = 0

        def _run_all(self, jobs):
            HeldBackend.calls += 1
            if HeldBackend.calls == 3:  # the run is under way; go on once the test has read a progress line
                go.wait()
            return super()._run_all(jobs)

    monkeypatch.setattr("dsv3conv.compute.make_backend", lambda *args: HeldBackend())  # the runner imports it per run
    read_fd, write_fd = os.pipe()
    log = os.fdopen(write_fd, "w", buffering=1)
    monkeypatch.setattr("sys.stderr", log)
    result = {}
    run = threading.Thread(target=lambda: result.update(dequantize(
        tmp_path / "src", tmp_path / "out", device="cpu", progress=True, buffer_size=4096)))
    run.start()
    seen = b""
    try:
        while b"%" not in seen:
            ready, _, _ = select.select([read_fd], [], [], 120)  # a guard against a hang, never a synchronisation
            assert ready, f"no progress line while the run waits; stderr so far: {seen!r}"
            seen += os.read(read_fd, 4096)
        assert not (tmp_path / "out" / "config.json").exists()  # still running: config.json is written last
    finally:
        go.set()
        run.join()
        log.close()
    rest = b"".join(iter(lambda: os.read(read_fd, 4096), b""))
    os.close(read_fd)
    lines = (seen + rest).decode().splitlines()
    assert result["finalized"] and lines[0].startswith("out: starting"), lines
    assert " 100% " in lines[-1] and lines[-1].startswith("out shard "), lines


def test_resumed_run_reports_skipped_shards_as_done_not_as_speed(tiny_src, tmp_path):
    cli("dequant", tiny_src, tmp_path / "out", "--device", "cpu", check=0)
    proc = cli("dequant", tiny_src, tmp_path / "out", "--device", "cpu", "--resume", check=0)
    assert "already done, nothing else to do" in proc.stderr and "/s" not in proc.stderr, proc.stderr
