"""SIGTERM and SIGINT: one message, exit 130, never a traceback; once clean-up starts, later signals are ignored.

Each run is the real CLI (`cli.main`, which installs the handlers) in a process of its own; the process sends
itself the signals at chosen points (start-up, mid-conversion, during clean-up), so that nothing depends on
timing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ENV, TIMEOUT

# argv[1]: the signals to send at start-up ("start"), at the first conversion ("convert"), during the final
# clean-up of partial files ("cleanup") and after the message ("exit"), e.g. "convert:TERM,cleanup:TERM+INT";
# the rest: the command line.
_MAIN = r"""
import os, signal, sys
from contextlib import contextmanager
# as from a terminal, where Ctrl-C is heard: a background job of a shell without job control (CI's, nohup's)
# inherits SIGINT ignored, and the CLI leaves an ignored signal ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
from dsv3conv import backend, cli, runner

plan = dict(p.split(":") for p in sys.argv[1].split(",") if p)

def send(point):
    for name in filter(None, plan.get(point, "").split("+")):
        os.kill(os.getpid(), getattr(signal, "SIG" + name))

real_errors, real_run, real_remove = cli._errors, backend.CpuBackend.dequant_block_fp8, runner.remove_partials
calls = {"convert": 0, "remove": 0}

@contextmanager
def errors(*a, **kw):
    send("start")  # still start-up: no command has begun
    try:
        with real_errors(*a, **kw):
            yield
    finally:
        send("exit")  # the message is out; the process is on its way out

def run(self, *a, **kw):
    calls["convert"] += 1
    if calls["convert"] == 1:
        send("convert")
    return real_run(self, *a, **kw)

def remove(*a, **kw):
    calls["remove"] += 1
    if calls["remove"] == 2:  # the first call clears an earlier run's leftovers; the second is the clean-up
        send("cleanup")
    return real_remove(*a, **kw)

cli._errors, backend.CpuBackend.dequant_block_fp8, runner.remove_partials = errors, run, remove
sys.argv = ["dsv3conv", *sys.argv[2:]]
cli.main()
"""


def run(plan: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _MAIN, plan, *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=TIMEOUT, check=False)


def assert_interrupted(proc: subprocess.CompletedProcess) -> None:
    shown = f"exit {proc.returncode}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == 130, shown
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, shown
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv3conv: interrupted"), shown


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_signal_during_start_up(tiny_src, tmp_path, sig):
    proc = run(f"start:{sig}", "dequant", tiny_src, tmp_path / "out", "--device", "cpu", "--quiet")
    assert_interrupted(proc)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("plan", ["convert:TERM", "convert:INT", "convert:TERM,cleanup:TERM",
                                  "convert:TERM,cleanup:TERM+INT", "convert:INT,cleanup:INT+TERM+INT",
                                  "convert:TERM,exit:TERM", "convert:INT,exit:TERM+INT",
                                  "convert:TERM,cleanup:INT,exit:TERM"])
def test_signals_during_a_run_and_its_clean_up(tiny_src, tmp_path, plan):
    out = tmp_path / "out"
    proc = run(plan, "dequant", tiny_src, out, "--device", "cpu", "--quiet")
    assert_interrupted(proc)
    assert "--resume" in proc.stderr
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if "partial" in n], left  # the clean-up ran to its end
    assert "config.json" not in left and "model.safetensors.index.json" not in left, left


