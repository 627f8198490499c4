"""Faults during a run: a full disk, a file-size limit, Ctrl-C, kill -9, two runs on one output.

After each: one clear line and the documented exit code, no partial file under a final name, no temporary
file left behind (kill -9 excepted: the next run removes it), and `--resume` finishes with bytes identical
to an uninterrupted run.

Runs that must be caught mid-way are `Paused` processes (conftest.py): the real CLI, stopped at a named
step (the conversion of a batch, the rename of a finished shard) until the test lets it go on, so that the
signal always lands mid-run, however busy the machine.
"""

from __future__ import annotations

import resource
import signal
import subprocess
from pathlib import Path

import pytest

from dsv3conv.checkpoint import INDEX_NAME
from dsv3conv.writer import PARTIAL_SUFFIX
from tests.conftest import Paused, assert_one_line_error, cli, cli_process


@pytest.fixture(scope="module")
def reference(tiny_src, tmp_path_factory) -> Path:
    """An uninterrupted conversion of the tiny checkpoint: what every interrupted run must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = cli("dequant", tiny_src, out, "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc
    return out


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def assert_nothing_damaged(dst: Path, reference: Path, *, leftovers_allowed: bool = False) -> list[str]:
    """Every file under a final name is byte-identical to the reference; no index or config before the end."""
    names = listing(dst)
    partials = [n for n in names if n.endswith(PARTIAL_SUFFIX)]
    if not leftovers_allowed:
        assert not partials, names  # (the lock file may stay: it is not a partial file)
    finals = [n for n in names if n.endswith(".safetensors")]
    for name in finals:
        assert (dst / name).read_bytes() == (reference / name).read_bytes(), f"{name}: damaged under its final name"
    if len(finals) < len([n for n in listing(reference) if n.endswith(".safetensors")]):
        assert INDEX_NAME not in names and "config.json" not in names, f"index/config written before the shards: {names}"
    return finals


def assert_resume_completes(src: Path, dst: Path, reference: Path) -> None:
    proc = cli("dequant", src, dst, "--resume", "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc
    assert listing(dst) == listing(reference)
    for name in listing(reference):
        assert (dst / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs after --resume"


# --------------------------------------------------------------------------------------- full disks
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MB tmpfs: the tiny conversion (4.3 MB of shards) fills it in its third shard."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mnt)], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_mid_write_then_resume(tiny_src, small_tmpfs, reference):
    dst = small_tmpfs / "out"
    # refused before any work: the filesystem reports too little free space
    assert_one_line_error(cli("dequant", tiny_src, dst, "--quiet", "--device", "cpu"), 1, "of free space",
                          "--no-space-check")
    assert not dst.exists()
    # told to go on anyway, the run fills the disk mid-way
    line = assert_one_line_error(cli("dequant", tiny_src, dst, "--quiet", "--device", "cpu", "--no-space-check"), 1,
                                 "disk full", "free space and rerun with --resume")
    assert str(dst) in line and ".safetensors" in line
    finals = assert_nothing_damaged(dst, reference)
    assert 1 <= len(finals) < 4, finals  # it did fill up mid-run
    subprocess.run(["mount", "-o", "remount,size=16M", str(small_tmpfs)], check=True)  # space freed
    assert_resume_completes(tiny_src, dst, reference)


def test_file_size_limit_mid_write_then_resume(tiny_src, tmp_path, reference):
    """RLIMIT_FSIZE: writes past it fail with EFBIG (SIGXFSZ is ignored) instead of killing the process."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_100_000, 1_100_000))  # the second shard is 1.2 MB

    dst = tmp_path / "out"
    proc = cli_process("dequant", tiny_src, dst, "--quiet", "--device", "cpu", preexec_fn=limit)
    assert proc.returncode != -signal.SIGXFSZ, "killed by SIGXFSZ: the signal must be ignored"
    assert_one_line_error(proc, 1, "file size limit", "rerun with --resume")
    finals = assert_nothing_damaged(dst, reference)
    assert len(finals) < 4, finals
    assert_resume_completes(tiny_src, dst, reference)


# ---------------------------------------------------------------------------------- interruptions
@pytest.mark.parametrize("landing", ["converting", "committing"])
def test_ctrl_c_mid_run_cleans_up_then_resume(tiny_src, tmp_path, reference, landing):
    dst = tmp_path / "out"
    if landing == "converting":
        run = Paused("dequant", tiny_src, dst, "--quiet", "--device", "cpu", pause=("convert",))
        run.wait_for("convert")
        run.go()
        run.wait_for("convert", 2)  # the second batch waits, the first may be on its way to the disk
    else:
        run = Paused("dequant", tiny_src, dst, "--quiet", "--device", "cpu", pause=("commit",))
        run.wait_for("commit")
        run.go()
        run.wait_for("commit", 2)  # the second shard is written in full, not yet renamed
        assert any(p.name.endswith(PARTIAL_SUFFIX) for p in dst.iterdir()), "no partial file: not mid-write"
    run.interrupt()
    rc, stderr = run.finish()
    assert rc == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr and "--resume" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert_nothing_damaged(dst, reference)
    assert_resume_completes(tiny_src, dst, reference)


def test_kill_9_mid_write_then_resume(tiny_src, tmp_path, reference):
    dst = tmp_path / "out"
    run = Paused("dequant", tiny_src, dst, "--quiet", "--device", "cpu", pause=("commit",))
    run.wait_for("commit")  # the first shard is written in full, not yet renamed
    assert any(p.name.endswith(PARTIAL_SUFFIX) for p in dst.iterdir())
    run.proc.kill()
    assert run.finish()[0] == -signal.SIGKILL
    assert_nothing_damaged(dst, reference, leftovers_allowed=True)
    # A plain rerun does not mistake the leftovers for an empty directory.
    assert_one_line_error(cli("dequant", tiny_src, dst, "--quiet", "--device", "cpu"), 2, "not empty", "--resume")
    assert_resume_completes(tiny_src, dst, reference)


def test_second_run_on_the_same_output_refuses(tiny_src, tmp_path, reference):
    dst = tmp_path / "out"
    first = Paused("dequant", tiny_src, dst, "--quiet", "--device", "cpu", pause=("commit",))
    first.wait_for("commit")  # holding the lock, mid-run, until the test lets it go on
    for flags, code, needles in ((["--resume"], 1, ["another dsv3conv run", str(dst)]),
                                 (["--overwrite"], 1, ["another dsv3conv run"]),
                                 ([], 2, ["not empty"])):
        second = cli("dequant", tiny_src, dst, "--quiet", "--device", "cpu", *flags)
        assert_one_line_error(second, code, *needles)
    assert first.proc.poll() is None, "the first run ended before the second tried: the test proves nothing"
    rc, stderr = first.finish()
    assert rc == 0, stderr
    assert listing(dst) == listing(reference)
    for name in listing(reference):
        assert (dst / name).read_bytes() == (reference / name).read_bytes(), name


def test_lock_holds_when_one_run_ends_as_another_starts(tmp_path, monkeypatch):
    """Run A ends between run B opening the lock file and locking it; then run C starts: B or C must refuse."""
    import fcntl

    from dsv3conv.dest import DestLock
    from dsv3conv.errors import Dsv3Error

    dst = tmp_path / "out"
    dst.mkdir()
    a = DestLock(dst).__enter__()
    real_flock = fcntl.flock
    calls = []

    def flock_after_a_ends(fd, op):
        if not calls:
            a.__exit__(None, None, None)  # A finishes right now
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_ends)
    b = DestLock(dst)
    try:
        b.__enter__()
    except Dsv3Error:
        return  # B noticed A's lock file went away and refused: never two holders
    try:
        with pytest.raises(Dsv3Error, match="another dsv3conv run"):
            DestLock(dst).__enter__()
    finally:
        b.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------ split-mtp
@pytest.fixture(scope="module")
def split_reference(tiny_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split-reference")
    proc = cli("split-mtp", tiny_src, "--main-out", out / "main", "--mtp-out", out / "mtp", "--quiet")
    assert proc.returncode == 0, proc
    return out


def assert_split_resume_completes(src: Path, out: Path, reference: Path) -> None:
    proc = cli("split-mtp", src, "--main-out", out / "main", "--mtp-out", out / "mtp", "--resume", "--quiet")
    assert proc.returncode == 0, proc
    assert listing(out) == listing(reference)
    for name in listing(reference):
        if (reference / name).is_file():
            assert (out / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs after --resume"


def test_split_mtp_disk_full_then_resume(tiny_src, tmp_path, split_reference):
    """1 MB fills during the main model's second shard (whole-file copies and rewritten shards alike)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], capture_output=True,
                      check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        proc = cli("split-mtp", tiny_src, "--main-out", mnt / "main", "--mtp-out", mnt / "mtp", "--quiet",
                   "--no-space-check")  # past the check of free space before the run, to fill the disk mid-way
        assert_one_line_error(proc, 1, "disk full", "rerun with --resume")
        for part in ("main", "mtp"):
            if (mnt / part).exists():
                assert_nothing_damaged(mnt / part, split_reference / part)
        subprocess.run(["mount", "-o", "remount,size=16M", str(mnt)], check=True)
        assert_split_resume_completes(tiny_src, mnt, split_reference)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_split_mtp_file_size_limit_then_resume(tiny_src, tmp_path, split_reference):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))  # every main shard is larger

    proc = cli_process("split-mtp", tiny_src, "--main-out", tmp_path / "main", "--mtp-out", tmp_path / "mtp", "--quiet",
                       preexec_fn=limit)
    assert_one_line_error(proc, 1, "file size limit", "rerun with --resume")
    for part in ("main", "mtp"):
        if (tmp_path / part).exists():
            assert_nothing_damaged(tmp_path / part, split_reference / part)
    assert_split_resume_completes(tiny_src, tmp_path, split_reference)
