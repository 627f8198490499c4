"""A reader that goes away (`dsv3conv dequant SRC DST | head -1`) changes nothing but what is shown: the exit
code stays the run's own, and the process exits without a message about the lost output.

Each run gets a real pipe whose read end the test has already closed, so every write the process makes to it
fails (EPIPE) whatever the timing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ENV, TIMEOUT, cli


def run_reader_gone(*args, stderr_gone: bool = False) -> tuple[int, str]:
    """`dsv3conv ARGS` with stdout (and with `stderr_gone`, stderr: `2>&1 | head`) a pipe without a reader;
    the exit code and whatever stderr said."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        proc = subprocess.run([sys.executable, "-m", "dsv3conv", *map(str, args)], stdout=write_fd,
                              stderr=write_fd if stderr_gone else subprocess.PIPE, text=True, env=ENV,
                              timeout=TIMEOUT, check=False)
    finally:
        os.close(write_fd)
    return proc.returncode, proc.stderr or ""


@pytest.mark.parametrize("stderr_gone, json_out", [(False, False), (True, False), (False, True)])
def test_a_finished_conversion_exits_0_when_its_reader_has_gone(tiny_src, tmp_path, stderr_gone, json_out):
    """`set -o pipefail` with `| head`: a good conversion must not fail the job."""
    args = ["dequant", tiny_src, tmp_path / "out", "--device", "cpu"] + (["--json"] if json_out else [])
    code, stderr = run_reader_gone(*args, stderr_gone=stderr_gone)
    assert code == 0, (code, stderr)
    assert "error" not in stderr and "Exception" not in stderr and "Traceback" not in stderr, stderr
    cli("verify", tmp_path / "out", "--against", tiny_src, "--full", check=0)


def test_a_failed_run_keeps_its_exit_code_and_its_message(tiny, tmp_path):
    """inspect of a damaged checkpoint: its table is lost with stdout, its one-line error and exit 1 are not."""
    src, _ = tiny
    shard = sorted(src.glob("*.safetensors"))[0]
    shard.unlink()
    code, stderr = run_reader_gone("inspect", src)
    assert code == 1 and stderr.startswith("dsv3conv: error: ") and "found (listed on stdout)" in stderr, (code, stderr)
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr


@pytest.mark.parametrize("args, expected", [(["--version"], 0), (["inspect", "--bogus"], 2), (["--help"], 0),
                                            (["dequant", "--help"], 0), ([], 2)])
def test_usage_and_version_keep_their_exit_codes_when_both_readers_have_gone(args, expected):
    assert run_reader_gone(*args, stderr_gone=True) == (expected, "")
