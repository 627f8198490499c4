"""config.json fields validated once (dsv3conv/config.py): usable configs pass, each fault is one line naming it.

The command-level rows (inspect, dequant, verify, split-mtp on each spelling) are CONFIG_ROWS in test_errors.py;
here: the validator itself, and `quant`, which takes a BF16 source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3conv.config import config_problems
from dsv3conv.layout import default_config
from dsv3conv.synthetic import tiny_config
from tests.conftest import assert_one_line_error, cli

PATH = Path("ckpt/config.json")


@pytest.mark.parametrize("config", [default_config(), tiny_config(), {}, {"quantization_config": None},
                                    {"num_nextn_predict_layers": 0, "architectures": []}])
def test_usable_configs_have_no_problems(config):
    assert config_problems(config, PATH) == []


@pytest.mark.parametrize("edit, field", [
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"num_hidden_layers": -3}, "num_hidden_layers"),
    ({"num_nextn_predict_layers": 1.5}, "num_nextn_predict_layers"),
    ({"first_k_dense_replace": "3"}, "first_k_dense_replace"),
    ({"architectures": [None]}, "architectures"),
    ({"dtype": 16}, "dtype"),
    ({"quantization_config": "fp8"}, "quantization_config"),
    ({"quantization_config": {"weight_block_size": [112, 112]}}, "quantization_config.weight_block_size"),
    ({"quantization_config": {"weight_block_size": [128, 128], "quant_method": None, "fmt": 8}},
     "quantization_config.fmt"),
])
def test_each_fault_is_one_line_naming_the_field(edit, field):
    problems = config_problems({**tiny_config(), **edit}, PATH)
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert problems[0].startswith(f"{PATH}: {field} is "), problems


def test_every_fault_is_listed_not_only_the_first():
    problems = config_problems({"num_hidden_layers": None, "architectures": "X", "quantization_config": 1}, PATH)
    assert [p.split(" is ")[0] for p in problems] == [
        f"{PATH}: num_hidden_layers", f"{PATH}: architectures", f"{PATH}: quantization_config"]


@pytest.fixture(scope="module")
def bf16_src(tmp_path_factory) -> Path:
    """A BF16 checkpoint (the tiny one dequantized): what quant takes."""
    from dsv3conv.api import dequantize
    from dsv3conv.synthetic import make_tiny

    root = tmp_path_factory.mktemp("cfg")
    make_tiny(root / "fp8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSV3CONV_NO_COMPILE", "1")  # eager: compiling would cost a minute here
        dequantize(root / "fp8", root / "bf16", device="cpu")
    return root / "bf16"


@pytest.mark.parametrize("key, value", [("num_hidden_layers", None), ("num_experts_per_tok", "2"),
                                        ("quantization_config", "fp8")])
def test_quant_refuses_a_bad_field(bf16_src, tmp_path, key, value):
    src = tmp_path / "src"
    src.mkdir()
    for p in bf16_src.iterdir():
        (src / p.name).hardlink_to(p)  # the same shards; a config of its own
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps({**json.loads((bf16_src / "config.json").read_text()), key: value}))
    assert_one_line_error(cli("quant", src, tmp_path / "out", "--quiet"), 1, "config.json", key)
    assert not (tmp_path / "out").exists()


# ------------------------------------------- JSON that readers read differently: refused by every command
def _dup_weight(text: str) -> str:
    first = text.index('"model.')
    line_end = text.index("\n", first)
    entry = text[first:line_end].rstrip(",")
    return text[:first] + entry + ",\n    " + text[first:]


AMBIGUOUS = [
    ("index", "dup-weight", _dup_weight, "appears more than once"),
    ("index", "dup-metadata", lambda t: t.replace('"metadata": {', '"metadata": {"total_size": 1, ', 1),
     "appears more than once"),
    ("index", "nan", lambda t: t.replace('"total_size": ', '"total_size": NaN, "x": ', 1), "NaN"),
    ("index", "infinity", lambda t: t.replace('"total_size": ', '"total_size": Infinity, "x": ', 1), "Infinity"),
    ("config", "dup-layers", lambda t: t.replace("{", '{"num_hidden_layers": 61, ', 1), "appears more than once"),
    ("config", "minus-infinity", lambda t: t.replace("{", '{"rope_theta": -Infinity, ', 1), "-Infinity"),
]


@pytest.mark.parametrize("which, tag, edit, needle", AMBIGUOUS, ids=[f"{a[0]}-{a[1]}" for a in AMBIGUOUS])
def test_ambiguous_json_is_refused_by_every_command(tiny_src, tmp_path, which, tag, edit, needle):
    """Decided: a repeated key or NaN/Infinity makes the file ambiguous; inspect, dequant and verify agree."""
    import shutil

    src = Path(shutil.copytree(tiny_src, tmp_path / "src"))
    path = src / ("model.safetensors.index.json" if which == "index" else "config.json")
    text = json.dumps(json.loads(path.read_text()), indent=4)
    path.write_text(edit(text))
    assert edit(text) != text
    if which == "index":
        assert_one_line_error(cli("inspect", src), 1, path.name, needle)
    else:
        proc = cli("inspect", src, "--json")
        assert proc.returncode == 1 and any(needle in p for p in json.loads(proc.stdout)["problems"])
    assert_one_line_error(cli("dequant", src, tmp_path / "out", "--quiet"), 1, path.name, needle)
    proc = cli("verify", src, "--json")
    failed = " ".join(c["detail"] for c in json.loads(proc.stdout)["checks"] if not c["ok"])
    assert proc.returncode == 1 and needle in failed, failed
