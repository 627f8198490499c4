"""Start-up: refusals and dry runs come before torch is imported; `seconds` is the run's wall time.

Each case runs the CLI in its own process (torch is already imported in this one) and reports, at exit,
whether torch was imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsv3conv.devices import parse_devices
from dsv3conv.errors import UsageError
from tests.conftest import ENV, TIMEOUT, Run, assert_one_line_error

MARK = "torch imported at exit: "
WRAPPER = (
    "import atexit, sys\n"
    f"atexit.register(lambda: sys.stdout.write('{MARK}' + str('torch' in sys.modules) + '\\n'))\n"
    "sys.argv = ['dsv3conv', *sys.argv[1:]]\n"
    "from dsv3conv.cli import app\n"  # the app, not main(): main() leaves a run that imported torch by os._exit
    "app()\n"
)


def run_watched(*args, env: dict | None = None, first: str = "") -> tuple[Run, bool]:
    """The CLI with `args` in a process of its own (`first`: code run before it); whether it imported torch."""
    proc = subprocess.run([sys.executable, "-c", first + WRAPPER, *map(str, args)], capture_output=True, text=True,
                          env=ENV if env is None else env, timeout=TIMEOUT, check=False)
    lines = proc.stdout.splitlines()
    assert lines and lines[-1].startswith(MARK), f"no report at exit\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    stdout = "\n".join(lines[:-1])
    return Run(proc.returncode, stdout, proc.stderr), lines[-1] == MARK + "True"


@pytest.fixture(scope="module")
def tiny_bf16(tiny_src, tmp_path_factory):
    """The tiny checkpoint dequantized: a source for quant."""
    from dsv3conv.commands import dequantize

    out = tmp_path_factory.mktemp("bf16") / "out"
    dequantize(tiny_src, out, device="cpu")
    return out


@pytest.fixture
def full_dst(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("something\n")
    return dst


@pytest.mark.parametrize("case", ["non-empty DST", "non-empty DST, dry run", "resume and overwrite",
                                  "missing SRC", "unknown device", "part and overwrite", "bad thread count",
                                  "bad writer count",
                                  "quant into a non-empty DST", "split-mtp into a non-empty DST, dry run",
                                  "example into a non-empty DST", "unknown example"])
def test_refusals_come_before_torch(case, tiny_src, tiny_bf16, full_dst, tmp_path):
    env = {"bad thread count": dict(ENV, DSV3CONV_CPU_THREADS="many"),
           "bad writer count": dict(ENV, DSV3CONV_WRITERS="0")}.get(case)
    fresh = tmp_path / "fresh"
    args, code, needle = {
        "non-empty DST": (("dequant", tiny_src, full_dst), 2, "not empty"),
        "non-empty DST, dry run": (("dequant", tiny_src, full_dst, "--dry-run"), 2, "not empty"),
        "resume and overwrite": (("dequant", tiny_src, fresh, "--resume", "--overwrite"), 2, "exclude each other"),
        "missing SRC": (("dequant", tmp_path / "nowhere", fresh), None, "nowhere"),
        "unknown device": (("dequant", tiny_src, fresh, "--device", "gpu0"), 2, "'gpu0'"),
        "part and overwrite": (("dequant", tiny_src, fresh, "--part", "1/2", "--overwrite"), 2, "exclude each other"),
        "bad thread count": (("dequant", tiny_src, fresh, "--device", "cpu"), 2, "DSV3CONV_CPU_THREADS='many'"),
        "bad writer count": (("dequant", tiny_src, fresh), 2, "DSV3CONV_WRITERS='0'"),
        "quant into a non-empty DST": (("quant", tiny_bf16, full_dst), 2, "not empty"),
        "split-mtp into a non-empty DST, dry run": (("split-mtp", tiny_src, "--mtp-out", full_dst, "--dry-run"), 2,
                                                    "not empty"),
        "example into a non-empty DST": (("example", "fp8", full_dst), 2, "not an empty directory"),
        "unknown example": (("example", "fp7", fresh), 2, "choose one of fp8, bf16"),
    }[case]
    proc, torch_imported = run_watched(*args, env=env)
    if code is None:  # exit code and wording belong to the checks that refuse; only one line is asserted here
        assert proc.returncode != 0 and proc.stderr.startswith("dsv3conv: error: ") and needle in proc.stderr, proc
    else:
        assert_one_line_error(proc, code, needle)
    assert not torch_imported, f"{case}: torch was imported before the refusal"
    assert not fresh.exists(), f"{case}: the refusal created {fresh}"


def test_dry_run_needs_no_torch(tiny_src, tmp_path):
    proc, torch_imported = run_watched("dequant", tiny_src, tmp_path / "out", "--dry-run", "--json")
    assert proc.returncode == 0, proc
    assert json.loads(proc.stdout)["tensors_converted"] > 0
    assert not torch_imported and not (tmp_path / "out").exists()


def test_header_only_examples_need_no_torch(tmp_path):
    """The replicas are headers and holes: only the examples with random values import torch (its generator)."""
    proc, torch_imported = run_watched("example", "v4-replica", tmp_path / "replica")
    assert proc.returncode == 0 and (tmp_path / "replica" / "config.json").exists(), proc
    assert not torch_imported, "example v4-replica imported torch"


def test_seconds_is_the_wall_time_with_startup_inside(tiny_src, tmp_path):
    proc, torch_imported = run_watched("dequant", tiny_src, tmp_path / "out", "--device", "cpu", "--json")
    assert proc.returncode == 0 and not torch_imported, proc
    summary = json.loads(proc.stdout)
    assert 0 < summary["startup_seconds"] < summary["seconds"], summary


NO_NUMBA = "import sys\nsys.modules['numba'] = None  # numba missing: `import numba` fails\n"


@pytest.mark.parametrize("how", ["numba installed", "numba missing", "kernel numba"])
def test_every_command_on_the_cpu_runs_without_torch(how, tiny_src, tmp_path):
    """dequant, quant, split-mtp and verify --against on the CPU never import torch, with numba or without;
    their outputs are the references' (verify holds each to its source bit for bit)."""
    first = NO_NUMBA if how == "numba missing" else ""
    env = dict(ENV, DSV3CONV_CPU_KERNEL="numba") if how == "kernel numba" else ENV
    bf16, fp8, main = tmp_path / "bf16", tmp_path / "fp8", tmp_path / "main"
    for args in (("dequant", tiny_src, bf16, "--device", "cpu"), ("quant", bf16, fp8, "--device", "auto"),
                 ("split-mtp", tiny_src, "--main-out", main),
                 ("verify", bf16, "--against", tiny_src, "--device", "cpu", "--json"),
                 ("verify", fp8, "--against", bf16, "--device", "cpu", "--json")):
        proc, torch_imported = run_watched(*args, env=env, first=first)
        assert proc.returncode == 0, (args, proc)
        assert not torch_imported, f"{how}: {args[0]} imported torch"
        if args[0] == "verify":
            assert json.loads(proc.stdout)["ok"], proc.stdout
    assert (main / "config.json").exists() and (fp8 / "config.json").exists()


def test_the_torch_kernel_still_converts_when_asked(tiny_src, tmp_path):
    """DSV3CONV_CPU_KERNEL=torch: the torch kernels, with numba missing; the same bytes as the default."""
    env = dict(ENV, DSV3CONV_CPU_KERNEL="torch")
    proc, torch_imported = run_watched("dequant", tiny_src, tmp_path / "torch", "--device", "cpu", env=env,
                                       first=NO_NUMBA)
    assert proc.returncode == 0 and torch_imported, proc
    proc, _ = run_watched("dequant", tiny_src, tmp_path / "auto", "--device", "cpu")
    assert proc.returncode == 0, proc
    for shard in sorted((tmp_path / "auto").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "torch" / shard.name).read_bytes(), shard.name


def test_a_mistyped_kernel_is_refused_before_work(tiny_src, tmp_path):
    proc, torch_imported = run_watched("dequant", tiny_src, tmp_path / "out", "--device", "cpu",
                                       env=dict(ENV, DSV3CONV_CPU_KERNEL="fast"))
    assert_one_line_error(proc, 2, "DSV3CONV_CPU_KERNEL='fast'")
    assert not torch_imported and not (tmp_path / "out").exists()


def test_parse_devices():
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:all") == ["cuda:all"]
    for bad in ("", "gpu", "cuda:x", "cuda:all,cpu", "cuda:-1", "cpu;rm"):
        with pytest.raises(UsageError, match="device"):
            parse_devices(bad)
