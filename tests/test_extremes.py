"""Legal inputs at their extremes: zero-element quantized weights; a quantization_config of the wrong kind;
the longest file names; the most MTP tensors.

- A shard name may be 255 bytes: its temporary name (`.NAME.dsv3conv-partial`) would exceed that, so a long
  name gets a hashed temporary name; dequant, split-mtp (whole-shard copies) and quant write it.
- `--mtp drop` on an MTP layer of 120,000 tensors plans in linear time (a quadratic scan there would take
  many minutes: the planning process, given TIMEOUT, would be killed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3conv.checkpoint import INDEX_NAME
from dsv3conv.synthetic import tiny_config, write_checkpoint
from dsv3conv.writer import partial_path
from tests.conftest import ENV, TIMEOUT, cli


@pytest.fixture(scope="module")
def zero_rows(tmp_path_factory) -> Path:
    """A BF16 checkpoint with a zero-row weight of a kind quant quantizes, beside a normal one."""
    import torch

    from dsv3conv.synthetic import tensor_bytes

    root = tmp_path_factory.mktemp("zero") / "bf16"
    w = torch.randn(300, 200, dtype=torch.bfloat16)
    config = dict(tiny_config(), num_hidden_layers=1, num_nextn_predict_layers=0)
    config.pop("quantization_config", None)
    write_checkpoint(root, [[("model.layers.0.mlp.gate_proj.weight", "BF16", (0, 200), lambda: b""),
                             ("model.layers.0.mlp.up_proj.weight", "BF16", (300, 200), lambda: tensor_bytes(w))]],
                     config)
    return root


def test_zero_element_weights_convert_and_verify(zero_rows, tmp_path):
    fp8, back = tmp_path / "fp8", tmp_path / "back"
    cli("quant", zero_rows, fp8, "--device", "cpu", "--quiet", check=0)
    cli("verify", fp8, "--against", zero_rows, "--full", "--device", "cpu", "--quiet", check=0)
    cli("dequant", fp8, back, "--device", "cpu", "--quiet", check=0)
    cli("verify", back, "--against", fp8, "--full", "--device", "cpu", "--quiet", check=0)


@pytest.mark.parametrize("value", ["fp8", ["fp8"], 1, True, {"weight_block_size": [112, 112]}],
                         ids=["string", "list", "number", "bool", "block-112"])
def test_verify_against_a_quant_output_with_a_bad_quantization_config(zero_rows, tmp_path, value):
    fp8 = tmp_path / "fp8"
    cli("quant", zero_rows, fp8, "--device", "cpu", "--quiet", check=0)
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = value
    (fp8 / "config.json").write_text(json.dumps(config))
    proc = cli("verify", fp8, "--against", zero_rows, "--full", "--device", "cpu", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    failed = {c["name"]: c["detail"] for c in json.loads(proc.stdout)["checks"] if not c["ok"]}
    assert "quantization_config" in failed["config"], failed


@pytest.mark.parametrize("name", ["a" * 239 + ".safetensors",  # 251 bytes
                                  "b" * 243 + ".safetensors",  # 255 bytes: the most a name may have
                                  "\u00e9" * 121 + ".safetensors"],  # 254 bytes of two-byte characters
                         ids=["251", "255", "utf8-254"])
def test_longest_shard_names(tiny_src, tmp_path, name):
    src = Path(shutil.copytree(tiny_src, tmp_path / "src"))
    first = sorted(src.glob("*.safetensors"))[0]
    first.rename(src / name)
    index = json.loads((src / INDEX_NAME).read_text())
    index["weight_map"] = {k: name if v == first.name else v for k, v in index["weight_map"].items()}
    (src / INDEX_NAME).write_text(json.dumps(index))
    assert len(partial_path(src / name).name.encode()) <= 255
    cli("dequant", src, tmp_path / "bf16", "--device", "cpu", "--quiet", check=0)
    cli("split-mtp", src, "--main-out", tmp_path / "main", "--quiet", check=0)
    cli("quant", tmp_path / "bf16", tmp_path / "fp8", "--device", "cpu", "--quiet", check=0)
    for out in ("bf16", "main", "fp8"):
        assert (tmp_path / out / name).is_file(), out
        assert not [p for p in (tmp_path / out).iterdir() if "partial" in p.name], out


def test_partial_names_stay_apart_and_short():
    names = ["x" * 243 + ".safetensors", "y" * 243 + ".safetensors", "model-00001-of-000163.safetensors"]
    partials = [partial_path(Path("/d") / n).name for n in names]
    assert len(set(partials)) == 3 and all(len(p.encode()) <= 255 for p in partials)
    assert partials[2] == ".model-00001-of-000163.safetensors.dsv3conv-partial"


_PLAN = """
import sys
from pathlib import Path
from dsv3conv.checkpoint import Checkpoint
from dsv3conv.dequant import plan_dequant
plan = plan_dequant(Checkpoint.open(sys.argv[1]), Path(sys.argv[2]), mtp="drop")
print(len(plan.dropped))
"""


@pytest.mark.slow
def test_mtp_drop_of_many_tensors_plans_in_linear_time(tmp_path):
    n = 60_000  # weights; with their scales 120,000 MTP tensors
    layer0 = [("model.layers.0.input_layernorm.weight", "BF16", (8,), None)]
    mtp = []
    for i in range(n):
        w = f"model.layers.1.mlp.experts.{i}.down_proj.weight"
        mtp += [(w, "F8_E4M3", (128, 128), None), (w + "_scale_inv", "F32", (1, 1), None)]
    config = dict(tiny_config(), num_hidden_layers=1, num_nextn_predict_layers=1)
    write_checkpoint(tmp_path / "src", [layer0, mtp], config, sparse=True)
    proc = subprocess.run([sys.executable, "-c", _PLAN, str(tmp_path / "src"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=ENV, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) == 2 * n
