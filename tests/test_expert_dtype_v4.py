"""DeepSeek-V4's `expert_dtype` in config.json is a cross-check of what the headers say: a missing field (as in
published copies of the V4-Flash/Pro configs) lets the headers decide, end to end; only an explicit value the
routed experts contradict is refused, naming the tensor and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dsv3conv.api import dequantize, split_mtp, verify_checkpoint
from dsv3conv.synthetic_v4 import make_v4
from tests.conftest import cli, load_all
from tests.test_dequant_v4 import assert_dequantized, assert_refused
from tests.test_repack_v4 import assert_same_tensors
from tests.test_verify import failed

EXPERT = "layers.0.ffn.experts.0.w1.weight"  # the first routed expert the headers list


def _set_expert_dtype(root: Path, value: object) -> None:
    """config.json's `expert_dtype` set to `value`, or removed where `value` is `...`."""
    path = root / "config.json"
    config = json.loads(path.read_text())
    config.pop("expert_dtype", None)
    if value is not ...:
        config["expert_dtype"] = value
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def flash(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny V4 instruct checkpoint (packed-FP4 experts) with `expert_dtype: fp4`, as the release has it."""
    root = tmp_path_factory.mktemp("expert_dtype") / "flash"
    return root, make_v4(root, "flash")


@pytest.mark.parametrize("missing", [..., None], ids=["absent", "null"])
def test_missing_expert_dtype_headers_decide(flash, tmp_path, missing) -> None:
    root, tensors = flash
    src = Path(shutil.copytree(root, tmp_path / "src"))
    _set_expert_dtype(src, missing)

    report = json.loads(cli("inspect", src, "--json", check=0).stdout)
    assert report["problems"] == [] and report["formats"]["mxfp4 (E2M1 pairs, F8_E8M0 scale per 32)"] == 48

    summary = dequantize(src, tmp_path / "out", device="cpu")
    dequantize(root, tmp_path / "with_field", device="cpu")
    assert_same_tensors(tmp_path / "out", tmp_path / "with_field")
    assert assert_dequantized(load_all(tmp_path / "out")[0], tensors) == summary["tensors_converted"]
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_config == json.loads((tmp_path / "with_field" / "config.json").read_text())
    assert any("expert_dtype" in c for c in summary["config_changes"]) == (missing is None)  # a null is dropped
    assert verify_checkpoint(tmp_path / "out", against=src, full=True)["ok"]

    dequantize(src, tmp_path / "repacked", device="cpu", experts="fp8")
    assert json.loads((tmp_path / "repacked" / "config.json").read_text())["expert_dtype"] == "fp8"
    assert verify_checkpoint(tmp_path / "repacked", against=src, full=True)["ok"]
    split_mtp(src, main_out=tmp_path / "main")
    assert verify_checkpoint(tmp_path / "main", against=src, full=True)["ok"]


@pytest.mark.parametrize(("kind", "declared", "needle"), [
    ("flash", "fp8", f'`{EXPERT}` is packed FP4 but config.json says `expert_dtype: "fp8"`; set it to "fp4" or remove it'),
    ("flash", "bf16", f'`{EXPERT}` is packed FP4 but config.json says `expert_dtype: "bf16"`'),
    ("flash-base", "fp4", f'expert_dtype fp4 but routed expert `{EXPERT}` is not packed FP4; set it to "fp8"'),
])
def test_explicit_contradiction_refused(tmp_path, kind, declared, needle) -> None:
    """Exit 1 (docs/errors.md) from dequant with one line naming the tensor and the fix; inspect lists it and
    exits 1; verify fails its `quantization_config` check."""
    src = tmp_path / "src"
    make_v4(src, kind)
    _set_expert_dtype(src, declared)
    assert_refused(cli("dequant", src, tmp_path / "out", "--device", "cpu"), needle)
    assert not (tmp_path / "out" / "config.json").exists()
    proc = cli("inspect", src, "--json", check=1)
    assert any(needle in p for p in json.loads(proc.stdout)["problems"])
    assert needle in failed(verify_checkpoint(src))["quantization_config"]


def test_fp8_with_block_fp8_experts_accepted(tmp_path) -> None:
    """`expert_dtype: "fp8"` beside block-FP8 routed experts (what --experts fp8 and quant write) is what the
    headers say: inspect reports nothing, verify passes, dequant removes it."""
    src = tmp_path / "src"
    make_v4(src, "flash-base")
    _set_expert_dtype(src, "fp8")
    assert json.loads(cli("inspect", src, "--json", check=0).stdout)["problems"] == []
    assert verify_checkpoint(src, full=True)["ok"]
    summary = dequantize(src, tmp_path / "out", device="cpu")
    assert "expert_dtype" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert any(c.startswith("removed expert_dtype (was 'fp8'") for c in summary["config_changes"]), summary
    assert verify_checkpoint(tmp_path / "out", against=src, full=True)["ok"]


def test_repack_keeps_the_field_where_the_source_has_it(flash, tmp_path) -> None:
    """A source keeping `expert_dtype` inside `quantization_config`: --experts fp8 sets it there, adds none
    at the top level, and the output verifies against its source."""
    root, _ = flash
    src = Path(shutil.copytree(root, tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["expert_dtype"] = config.pop("expert_dtype")
    (src / "config.json").write_text(json.dumps(config))
    summary = dequantize(src, tmp_path / "out", device="cpu", experts="fp8", mtp="drop")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "expert_dtype" not in out and out["quantization_config"]["expert_dtype"] == "fp8"
    assert "quantization_config.expert_dtype: 'fp4' -> 'fp8'" in summary["config_changes"]
    assert json.loads(cli("inspect", tmp_path / "out", "--json", check=0).stdout)["problems"] == []
    assert verify_checkpoint(tmp_path / "out", against=src, full=True)["ok"]
