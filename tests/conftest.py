"""Shared fixtures and helpers: small checkpoints built by the tests themselves (no network, no hub), one
way to run the CLI, and the assertions several test modules make.

Running the CLI: `cli(...)` runs the Typer app in this process (the same error mapping and exit codes as
the `dsv3conv` command, without a second or two of interpreter and torch startup). `cli_process(...)` runs
a real `python -m dsv3conv`: use it only where a process is what is tested (the entry point, signals,
resource limits, several runs at once). `Paused` is a real process that stops at named steps until the
test lets it go on: the way to catch a run mid-way, never a sleep.

Markers (registered in pyproject.toml): `gpu` tests run only where CUDA is available (skipped elsewhere),
`interp` tests run Triton kernels under Triton's CPU interpreter (skipped without triton), `slow` marks
the tests that take the longest here (`pytest -m "not slow"` for a quick round).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv3conv.backend import CpuBackend
from dsv3conv.checkpoint import Checkpoint
from dsv3conv.dequant import plan_dequant
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.runner import execute
from dsv3conv.synthetic import make_tiny

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ)  # child processes
TIMEOUT = 120  # a run still going after this hangs: a failure, never a stuck test session
HAS_TRITON = importlib.util.find_spec("triton") is not None


# --------------------------------------------------------------------------------------------- markers
def pytest_collection_modifyitems(config, items) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU host)")
    no_triton = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "interp" in item.keywords and not HAS_TRITON:
            item.add_marker(no_triton)


# -------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def src_ref(tmp_path_factory):
    """A checkpoint of several shards and its CPU conversion (the engine's tests)."""
    root = tmp_path_factory.mktemp("engine")
    make_tiny(root / "src", num_hidden_layers=5, n_shards=6)
    backend = CpuBackend(1)
    try:
        execute(plan_dequant(Checkpoint.open(root / "src"), root / "ref"), backend)
    finally:
        backend.close()
    return root / "src", root / "ref"


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    """A tiny FP8 checkpoint (F32 scales, MTP at layer 3, a scale in another shard). Read-only for tests."""
    root = tmp_path_factory.mktemp("tiny") / "src"
    make_tiny(root)
    return root


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, dict]:
    """A fresh tiny checkpoint a test may damage, with its tensors."""
    root = tmp_path / "src"
    tensors = make_tiny(root)
    return root, tensors


# ------------------------------------------------------------------------------------- running the CLI
@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def _checked(run: Run, args, check: int | None) -> Run:
    if check is not None:
        assert run.returncode == check, (
            f"dsv3conv {' '.join(map(str, args))}: exit {run.returncode}, expected {check}\n"
            f"stdout: {run.stdout[-3000:]}\nstderr: {run.stderr[-3000:]}"
        )
    return run


def _invoke(args) -> Run:
    from typer.testing import CliRunner

    from dsv3conv.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "\nTraceback (escaped the CLI): " + "".join(traceback.format_exception(result.exception))
    return Run(result.exit_code, result.stdout, stderr)


def cli(*args, check: int | None = None, bounded: bool = False) -> Run:
    """`dsv3conv ARGS` through the Typer app in this process; optionally assert the exit code.

    An exception escaping the app (what a user would see as a traceback) shows as `Traceback` in stderr.
    `bounded`: fail instead of hanging the session if the command blocks (e.g. a FIFO opened for reading).
    """
    if not bounded:
        return _checked(_invoke(args), args, check)
    box: list[Run] = []
    worker = threading.Thread(target=lambda: box.append(_invoke(args)), daemon=True)
    worker.start()
    worker.join(TIMEOUT)
    assert box, f"dsv3conv {' '.join(map(str, args))} still running after {TIMEOUT} s: it hangs"
    return _checked(box[0], args, check)


def cli_process(*args, check: int | None = None, prefix: tuple = (), env: dict | None = None, **popen) -> Run:
    """`dsv3conv ARGS` as a separate process, exactly as a user runs it (costs a torch import)."""
    proc = subprocess.run([*prefix, sys.executable, "-m", "dsv3conv", *map(str, args)], capture_output=True,
                          text=True, env=ENV if env is None else env, timeout=TIMEOUT, check=False, **popen)
    return _checked(Run(proc.returncode, proc.stdout, proc.stderr), args, check)


# The wrapper `Paused` runs: the real CLI, with named steps that announce themselves on stderr and, when
# asked, wait until the test lets them go on (a line on stdin lets one step go on; closing stdin, all).
# A Ctrl-C is announced once the main thread has taken it. The seams it wraps are named here only.
_PAUSED_MAIN = r"""
import signal, sys, threading
from dsv3conv import backend, writer

pausing = set(filter(None, sys.argv[1].split(",")))
gate = threading.Condition()
state = {"go": 0, "open": False}

def say(text):
    sys.stderr.write(f"test-hook: {text}\n")
    sys.stderr.flush()

def control():
    for _ in sys.stdin:
        with gate:
            state["go"] += 1
            gate.notify_all()
    with gate:
        state["open"] = True
        gate.notify_all()

def step(name):
    say(name)
    if name in pausing:
        with gate:
            gate.wait_for(lambda: state["go"] or state["open"])
            if not state["open"]:
                state["go"] -= 1

def on_sigint(signum, frame):
    say("interrupted")
    raise KeyboardInterrupt

real_commit = writer.AtomicFile.commit

def commit(self):
    if self.final.name.endswith(".safetensors"):
        step("commit")
    real_commit(self)
    if self.final.name.endswith(".safetensors"):
        say("committed")

def announced(method):
    def run(self, *args, **kwargs):
        step("convert")
        return method(self, *args, **kwargs)
    return run

writer.AtomicFile.commit = commit
backend.CpuBackend.dequant_block_fp8 = announced(backend.CpuBackend.dequant_block_fp8)
backend.CpuBackend.quant_block_fp8 = announced(backend.CpuBackend.quant_block_fp8)
signal.signal(signal.SIGINT, on_sigint)
threading.Thread(target=control, daemon=True).start()
sys.argv = ["dsv3conv", *sys.argv[2:]]
from dsv3conv.cli import main
main()
"""


class Paused:
    """A dsv3conv process that stops at each `pause` step ("convert": a batch is about to be converted;
    "commit": a finished shard is about to be renamed into place) until the test calls `go()`; "committed"
    (never paused) follows each rename.

    Steps announce themselves (`test-hook: commit`) on stderr, which is read as it comes."""

    def __init__(self, *args, pause: tuple[str, ...] = (), **popen):
        self.proc = subprocess.Popen([sys.executable, "-c", _PAUSED_MAIN, ",".join(pause), *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=ENV, **popen)
        self.lines: list[str] = []
        self._eof = False
        self._cv = threading.Condition()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def wait_for(self, step: str, count: int = 1) -> None:
        """Until step `step` has been reached `count` times (a paused step stays there until `go`)."""
        marker = f"test-hook: {step}\n"

        def seen() -> int:
            return sum(line == marker for line in self.lines)

        with self._cv:
            self._cv.wait_for(lambda: seen() >= count or self._eof, TIMEOUT)
            assert seen() >= count, f"`{step}` x{count} never reached; stderr:\n{''.join(self.lines)}"

    def go(self, all_steps: bool = False) -> None:
        """Let the paused step go on; `all_steps`: pause no more."""
        if all_steps:
            self.proc.stdin.close()
        else:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()

    def interrupt(self) -> None:
        """Ctrl-C; once the run has taken it, let every paused step go on (so that the run can clean up)."""
        self.proc.send_signal(signal.SIGINT)
        self.wait_for("interrupted")
        self.go(all_steps=True)

    def finish(self) -> tuple[int, str]:
        """Exit status and stderr, less the hooks' own lines."""
        if not self.proc.stdin.closed:
            self.go(all_steps=True)
        rc = self.proc.wait(TIMEOUT)
        self._pump.join(TIMEOUT)
        return rc, "".join(line for line in self.lines if not line.startswith("test-hook:"))


# ------------------------------------------------------------------------------------------ assertions
def assert_one_line_error(proc: Run, code: int, *needles: str) -> str:
    """Exit `code`; stderr is exactly one `dsv3conv: error:` line holding every needle; no traceback."""
    shown = f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == code, shown
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, shown
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv3conv: error: "), shown
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in the message\n{shown}"
    return lines[0]


def load_all(root) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Every tensor of every shard under `root`, and each shard's metadata."""
    tensors, meta = {}, {}
    for p in sorted(Path(root).glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            meta[p.name] = f.metadata()
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors, meta


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def random_e4m3(rows: int, cols: int, gen: torch.Generator, device=None) -> torch.Tensor:
    """Uniformly random raw e4m3 bytes [rows, cols], the NaN codes 0x7F / 0xFF moved to their neighbours."""
    w = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=device, generator=gen)
    w[(w & 0x7F) == 0x7F] -= 1
    return w


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def assert_within_ulp(got: torch.Tensor, want: torch.Tensor, label: str, limit: int = 0) -> None:
    """`got` equals `want` bit for bit (limit 0), or within `limit` units in the last place; the message names
    how many values differ and the worst one."""
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{label}: got {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}"
    )
    it = _INT_OF_SIZE[got.element_size()]
    diff = (got.contiguous().view(it).to(torch.int64) - want.contiguous().view(it).to(torch.int64)).abs()
    worst = int(diff.max()) if diff.numel() else 0
    if worst > limit:
        i = int(diff.flatten().argmax())
        raise AssertionError(
            f"{label}: {int((diff > limit).sum())}/{diff.numel()} values off by more than {limit} ulp "
            f"(worst {worst} ulp at flat index {i}: got {got.flatten()[i].item()!r}, "
            f"expected {want.flatten()[i].item()!r})"
        )


def assert_value_errors(cases) -> None:
    """Each (call, needle) of `cases` raises ValueError with `needle` in its message."""
    for k, (call, needle) in enumerate(cases):
        try:
            call()
        except ValueError as e:
            assert needle in str(e), f"case {k}: ValueError {str(e)!r} does not mention {needle!r}"
        else:
            raise AssertionError(f"case {k}: no ValueError (expected one mentioning {needle!r})")


def assert_bit_exact(out: dict, src: dict, dtype=torch.bfloat16, names=None) -> int:
    """Every FP8 tensor of `src` dequantized bit-exactly in `out`, every other tensor copied; the count converted."""
    converted = 0
    for name, t in src.items():
        if name.endswith("_scale_inv") or (names is not None and name not in names):
            continue
        if t.dtype == torch.float8_e4m3fn:
            ref = reference_dequant(t, src[name + "_scale_inv"], dtype)
            got = out[name]
            assert got.dtype == dtype, name
            diff = (got.float() - ref.float()).abs().max().item()
            assert torch.equal(bits(got), bits(ref)), f"{name}: not bit-exact, max |diff| {diff}"
            converted += 1
        else:
            assert torch.equal(bits(out[name]), bits(t)), f"{name}: copied tensor changed"
    return converted


def write_at(root: Path, tensor: str, element: int, data: bytes) -> None:
    """Overwrite the bytes of `tensor` from element `element` on, in place in its shard."""
    info = Checkpoint.open(root).tensors[tensor]
    with open(root / info.file, "r+b") as f:
        f.seek(info.offset + element * info.itemsize)
        f.write(data)


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux /proc/self/io `rchar`)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar line")


# ------------------------------------------------------------------- Triton kernels under the interpreter
# TRITON_INTERPRET=1 must be set before any `@triton.jit` function is created, and another test in the same
# pytest process may already have imported a kernel module without it. So a kernel test module's `check_*`
# functions run once, in a child (`python -m <the test module> RESULT.json` from the repository root), and
# each test asserts on one result (fixture `interp_results`). The children start as soon as the tests are
# collected and run beside the other tests; a test waits for its module's child only when it needs it.
_interp_children: dict[str, tuple[subprocess.Popen, Path]] = {}


def collect_checks(namespace: dict) -> list[str]:
    return [name for name in namespace if name.startswith("check_")]


def interpreted_test(checks: list[str]):
    """A kernel test module's `test_interpreted`: one test per check, each asserting on its result."""

    @pytest.mark.interp
    @pytest.mark.slow  # the checks run in one child under the interpreter
    @pytest.mark.parametrize("check", checks)
    def test_interpreted(check: str, interp_results: dict[str, str]) -> None:
        assert interp_results.get(check) == "ok", f"{check}: {interp_results.get(check, 'not run')}"

    return test_interpreted


def run_checks(namespace: dict, result_path: str) -> None:
    """Child process body: run every check, write {name: "ok" | message} to `result_path`."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run me through interpreted(): TRITON_INTERPRET=1 is not set")
    torch.set_num_threads(2)
    results = {}
    for name in collect_checks(namespace):
        try:
            namespace[name]()
            results[name] = "ok"
        except AssertionError as e:
            results[name] = f"AssertionError: {e}"
        except Exception:  # a failing check is its result, whatever it raised
            results[name] = traceback.format_exc(limit=6)
    Path(result_path).write_text(json.dumps(results))


def _start_checks(module: str) -> None:
    out = Path(tempfile.mkdtemp(prefix=f"{module}-"))
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, str(out / "results.json")], cwd=REPO,
                                env=dict(os.environ, TRITON_INTERPRET="1"), stdout=log, stderr=subprocess.STDOUT)
    _interp_children[module] = (proc, out)


def pytest_collection_finish(session) -> None:
    if not HAS_TRITON or session.config.option.collectonly:
        return
    for item in session.items:
        module = getattr(item, "module", None)
        if item.get_closest_marker("interp") and hasattr(module, "CHECKS") and module.__name__ not in _interp_children:
            _start_checks(module.__name__)


def pytest_sessionfinish(session) -> None:
    for proc, out in _interp_children.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def interpreted(module: str) -> dict[str, str]:
    """`module`'s checks, run in a child with TRITON_INTERPRET=1: their results, or a failed test."""
    if module not in _interp_children:
        _start_checks(module)
    proc, out = _interp_children[module]
    try:
        proc.wait(600)
    except subprocess.TimeoutExpired:
        proc.kill()
    path = out / "results.json"
    if proc.returncode != 0 or not path.exists():
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{(out / 'log.txt').read_text()[-6000:]}")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def interp_results(request) -> dict[str, str]:
    """The results of the requesting module's `check_*` functions under Triton's interpreter."""
    return interpreted(request.module.__name__)
