"""`--device cuda[:N]` on one GPU, whose backend starts in a thread while the run writes what needs no
conversion: a GPU index the driver does not list is refused before anything is written (without torch);
a start that fails anyway (CUDA unusable) ends the run in one line, exit 2, leaving DST for --resume.

No GPU here: the driver's /proc entries are a directory the test makes, and torch's device check
(`gpu.check_device`) is a fake the test controls."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest

from dsv3conv import devices, gpu, runner, writer
from dsv3conv.checkpoint import Checkpoint
from dsv3conv.dequant import plan_dequant
from dsv3conv.dest import is_complete
from dsv3conv.errors import UsageError
from dsv3conv.synthetic import make_tiny
from tests.conftest import assert_one_line_error, cli
from tests.test_engine import _same_files


@pytest.fixture
def driver(tmp_path, monkeypatch):
    """A host whose NVIDIA driver lists `driver(n)` GPUs (None: no driver entries), CUDA_VISIBLE_DEVICES
    unset, a GPU path possible, and no CPU stand-in."""
    def lists(n: int | None, mig: bool = False):
        proc = Path(tempfile.mkdtemp(dir=tmp_path)) / "nvidia"  # a host of its own each call
        if n is not None:
            (proc / "gpus").mkdir(parents=True)
            for i in range(n):
                (proc / "gpus" / f"0000:{i + 1:02x}:00.0").mkdir(parents=True)
        if mig:
            (proc / "capabilities" / "gpu0" / "mig" / "gi1").mkdir(parents=True)
        monkeypatch.setattr(devices, "NVIDIA_PROC", proc)

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(runner.STAND_IN_ENV, raising=False)
    monkeypatch.setattr(runner, "cuda_possible", lambda: True)
    return lists


@pytest.mark.parametrize("gpus, mig, visible, count", [
    (2, False, None, 2), (2, False, "1", 1), (2, False, "1,0", 2), (2, False, "0,5,1", 1), (2, False, "0,-1,1", 1),
    (2, False, "GPU-8d2c6f1e", 1), (2, False, "0,0,1", 2), (1, False, "", 0), (0, False, None, None),
    (None, False, None, None), (2, True, None, None),
])
def test_visible_gpus_from_the_driver_and_cuda_visible_devices(driver, monkeypatch, gpus, mig, visible, count):
    """At most the GPUs the driver lists, and no more than CUDA_VISIBLE_DEVICES names before an invalid index;
    unknown without the driver's entries, where they list none (a container may hide them) or with MIG instances."""
    driver(gpus, mig)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert devices.visible_gpus() == count


def test_check_gpu_index(driver, monkeypatch):
    driver(2)
    devices.check_gpu_index(["cuda", "cuda:1", "cuda:all", "auto", "cpu"])
    with pytest.raises(UsageError, match=r"cuda:2: only 2 CUDA devices are visible \(cuda:0 to cuda:1\)"):
        devices.check_gpu_index(["cuda:0", "cuda:2"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UsageError, match="device cuda: no CUDA GPU is visible; use device cpu"):
        devices.check_gpu_index(["cuda"])


def _watched_device_check(monkeypatch, then):
    """torch's device check replaced: records each call, then `then(device)`."""
    asked = []

    def check_device(device: str) -> str:
        asked.append(device)
        return then(device)

    monkeypatch.setattr(gpu, "check_device", check_device)
    return asked


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_gpu_index_the_driver_does_not_list_is_refused_before_any_work(tiny_src, tmp_path, driver, monkeypatch,
                                                                         dry_run):
    """Two GPUs listed, `--device cuda:5`: one line, exit 2, DST never created, torch's check never asked (it
    would refuse too, but only once the run has begun)."""
    driver(2)

    def torch_refuses(device):
        raise UsageError(f"{{device}} {device}: only 2 CUDA devices are visible", "device")

    asked = _watched_device_check(monkeypatch, torch_refuses)
    dst = tmp_path / "out"
    run = cli("dequant", tiny_src, dst, "--device", "cuda:5", *(["--dry-run"] if dry_run else []))
    assert_one_line_error(run, 2, "--device cuda:5: only 2 CUDA devices are visible")
    assert not dst.exists() and asked == []


@pytest.fixture(scope="module")
def one_copied_shard(tmp_path_factory):
    """A checkpoint whose last shard converts nothing (written while the backend starts), and its conversion
    on the CPU."""
    root = tmp_path_factory.mktemp("copied")
    make_tiny(root / "src", num_hidden_layers=3, n_shards=6)
    plan = plan_dequant(Checkpoint.open(root / "src"), root / "ref")
    assert [f.name for f in plan.files if not any(t.converts for t in f.tensors)] == [plan.files[-1].name]
    cli("dequant", root / "src", root / "ref", "--device", "cpu", "-q", check=0)
    return root / "src", root / "ref"


def test_cuda_that_fails_to_start_ends_the_run_in_one_line_and_dst_resumes(one_copied_shard, tmp_path, driver,
                                                                          monkeypatch):
    """The driver's entries unknown (the index cannot be checked early): the start goes on in its thread while
    the shard that converts nothing is written; once it is in place, CUDA fails to start (as torch says it: an
    exception of its own, two lines). The run ends with one line, exit 2, naming what DST keeps; no file
    under a final name is incomplete, no partial file stays; `--resume --device cpu` finishes DST."""
    src, ref = one_copied_shard
    driver(None)
    committed, commit = threading.Event(), writer.AtomicFile.commit

    def commit_and_tell(self):
        commit(self)
        if self.final.suffix == ".safetensors":  # a shard in place (DST's plan record is committed first)
            committed.set()

    def cuda_fails(device):
        assert committed.wait(300), "no shard was written while the backend started"  # a watchdog
        raise RuntimeError("CUDA error: initialization error\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(writer.AtomicFile, "commit", commit_and_tell)
    asked = _watched_device_check(monkeypatch, cuda_fails)
    dst = tmp_path / "out"
    run = cli("dequant", src, dst, "--device", "cuda", "-q")
    assert_one_line_error(run, 2, "--device cuda: CUDA cannot start here (RuntimeError: CUDA error: initialization "
                          "error); fix the GPU setup or use --device cpu", f"{dst} keeps the 1 file written so far: "
                          "rerun with --resume to finish it")
    assert asked == ["cuda"]
    plan = plan_dequant(Checkpoint.open(src), dst)
    kept = [f for f in plan.files if (dst / f.name).exists()]
    assert [f.name for f in kept] == [plan.files[-1].name] and all(is_complete(dst / f.name, f) for f in kept)
    assert not list(dst.glob(".*partial")) and not (dst / "config.json").exists()
    cli("dequant", src, dst, "--device", "cpu", "--resume", "-q", check=0)
    _same_files(dst, ref)


def test_cuda_that_fails_before_anything_is_written_leaves_dst_to_a_plain_rerun(tiny_src, tmp_path, driver,
                                                                               monkeypatch):
    """A start that fails before any shard is in place: the same line without a word on DST, which holds only
    this tool's record, so a plain rerun on the CPU is accepted."""
    driver(None)

    def cuda_fails(device):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    _watched_device_check(monkeypatch, cuda_fails)
    dst = tmp_path / "out"
    line = assert_one_line_error(cli("dequant", tiny_src, dst, "--device", "cuda", "-q"), 2,
                                 "--device cuda: CUDA cannot start here (RuntimeError: CUDA driver version")
    assert "keeps" not in line
    cli("dequant", tiny_src, dst, "--device", "cpu", "-q", check=0)
