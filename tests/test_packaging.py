"""`kernels/` installs as `dsv3conv.kernels`, never as a top-level `kernels` module, editable or not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each builds or installs the package with pip

REPO = Path(__file__).resolve().parent.parent
PROBE = (
    "import importlib.util, dsv3conv.kernels.fp8_block_dequant as m, dsv3conv.cli, dsv3conv.verify; "
    "print(m.__file__); print(importlib.util.find_spec('kernels'))"
)


def test_editable_install_imports_kernels_inside_the_namespace(tmp_path):
    # run from an unrelated directory, so that the repository root is not on sys.path
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    path, spec = proc.stdout.split()[0], proc.stdout.strip().splitlines()[1]
    assert Path(path) == REPO / "kernels" / "fp8_block_dequant.py"
    assert spec == "None", f"a top-level `kernels` module is importable: {spec}"


def test_regular_install_imports_kernels_inside_the_namespace(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(REPO)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert (target / "dsv3conv" / "kernels" / "fp8_block_dequant.py").is_file()
    assert (target / "dsv3conv" / "data" / "deepseek_v3_config.json").is_file()
    assert not (target / "kernels").exists(), "installed a top-level `kernels` package"
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {PROBE}"],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.split()[0]) == target / "dsv3conv" / "kernels" / "fp8_block_dequant.py"
