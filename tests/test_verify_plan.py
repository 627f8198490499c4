"""`verify` holds a checkpoint to the plan of the conversion it claims to be (split-mtp parts included),
says what it cannot prove without a source, and `verify-combine` refuses reports that are not reports."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest

from dsv3conv.api import split_mtp, verify_checkpoint
from dsv3conv.checkpoint import Checkpoint
from dsv3conv.errors import Dsv3Error
from dsv3conv.verify import combine_reports
from tests.conftest import cli

FP8_WEIGHT = "model.layers.1.mlp.experts.0.up_proj.weight"


def failed(report: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def details(report: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in report["checks"]}


def flip(root: Path, tensor: str, byte: int = 3) -> None:
    info = Checkpoint.open(root).tensors[tensor]
    with open(root / info.file, "r+b") as f:
        f.seek(info.offset + byte)
        value = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([value ^ 0x01]))


# ----------------------------------------------------------------------------------- split-mtp parts
@pytest.fixture(scope="module")
def parts(tiny_src, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("split")
    split_mtp(tiny_src, main_out=root / "main", mtp_out=root / "sglang")
    split_mtp(tiny_src, mtp_out=root / "full", mtp_layout="full")
    return {k: root / k for k in ("main", "sglang", "full")}


@pytest.mark.parametrize("part, kind", [("main", "split-mtp main"), ("sglang", "split-mtp draft"),
                                        ("full", "split-mtp draft")])
def test_split_mtp_parts_pass_against_their_source(parts, tiny_src, part, kind):
    report = verify_checkpoint(parts[part], against=tiny_src, full=True)
    assert report["ok"] and report["mismatches"] == [], failed(report)
    d = details(report)
    assert f"as {kind} of the source makes them" in d["tensor_set"], d["tensor_set"]
    assert "bit-identical to the source" in d["data_vs_source"] and "copied" in d["data_vs_source"]
    if part != "main":
        assert f"layout {part}" in d["tensor_set"]


def test_split_mtp_draft_damage_is_named(parts, tiny_src, tmp_path):
    draft = Path(shutil.copytree(parts["sglang"], tmp_path / "draft"))
    name = "model.layers.0.mlp.experts.1.down_proj.weight"  # layer 3 of the source, renamed
    flip(draft, name)
    config = json.loads((draft / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (draft / "config.json").write_text(json.dumps(config))
    report = verify_checkpoint(draft, against=tiny_src, full=True)
    bad = failed(report)
    assert report["mismatches"] == [name] and "1 of " in bad["data_vs_source"], bad
    assert "`num_hidden_layers`: expected 1, found 2" in bad["config_vs_source"], bad


def test_split_mtp_main_missing_tensor(parts, tiny_src, tmp_path):
    main = Path(shutil.copytree(parts["main"], tmp_path / "main"))
    index = json.loads((main / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.3.enorm.weight"] = next(iter(index["weight_map"].values()))
    (main / "model.safetensors.index.json").write_text(json.dumps(index))
    bad = failed(verify_checkpoint(main, against=tiny_src))
    assert "model.layers.3.enorm.weight" in bad["files"], bad


# ------------------------------------------------------------------------------ without a source
def test_fp8_nan_code_found_without_a_source(tiny):
    root, _ = tiny
    report = verify_checkpoint(root, full=True)
    assert report["ok"] and "without --against" in details(report)["values"]  # what it cannot prove, said
    info = Checkpoint.open(root).tensors[FP8_WEIGHT]
    with open(root / info.file, "r+b") as f:
        f.seek(info.offset + 250)  # element [1, 50] of [144, 200]
        f.write(b"\xff")  # an e4m3 NaN code
    detail = failed(verify_checkpoint(root, full=True))["values"]
    assert f"`{FP8_WEIGHT}` (F8_E4M3" in detail and "1 NaN or Inf value (NaN first at [1, 50])" in detail, detail


# --------------------------------------------------------------------------- verify-combine input
def _report(k: int, n: int, **changes) -> dict:
    report = {"ok": True, "part": f"{k}/{n}", "part_shards": [f"s{k}.safetensors"],
              "checks": [{"name": "files", "ok": True, "detail": "fine"}], "mismatches": []}
    report.update(changes)
    return report


def _write(tmp_path: Path, name: str, report) -> Path:
    path = tmp_path / name
    path.write_text(report if isinstance(report, str) else json.dumps(report))
    return path


MALFORMED = [
    ("null", None, "holds null, not an object"),
    ("list", [1, 2], "holds a list, not an object"),
    ("checks-string", _report(2, 2, checks="files"), "`checks` is a string, not a list"),
    ("checks-null", _report(2, 2, checks=None), "`checks` is null, not a list"),
    ("checks-absent", {k: v for k, v in _report(2, 2).items() if k != "checks"}, "`checks` is missing"),
    ("check-not-object", _report(2, 2, checks=["files"]), "`checks[0]` is a string, not an object"),
    ("check-without-name", _report(2, 2, checks=[{"ok": True, "detail": ""}]), "`checks[0].name` is missing"),
    ("check-name-number", _report(2, 2, checks=[{"name": 7, "ok": True, "detail": ""}]),
     "`checks[0].name` is a number, not a string"),
    ("check-ok-string", _report(2, 2, checks=[{"name": "files", "ok": "true", "detail": ""}]),
     "`checks[0].ok` is a string, not true/false"),
    ("check-detail-null", _report(2, 2, checks=[{"name": "files", "ok": True, "detail": None}]),
     "`checks[0].detail` is null, not a string"),
    ("check-twice", _report(2, 2, checks=[{"name": "a", "ok": True, "detail": ""}] * 2), "check `'a'` appears twice"),
    ("ok-number", _report(2, 2, ok=1), "`ok` is a number, not true/false"),
    ("part-number", _report(2, 2, part=2), "`part` is a number, not a string"),
    ("part-zero", _report(2, 2, part="0/2"), "`part` is '0/2', not K/N"),
    ("part-huge-digits", _report(2, 2, part="1/" + "9" * 5000), "not K/N"),
    ("mismatches-numbers", _report(2, 2, mismatches=[1]), "`mismatches[0]` is a number, not a string"),
    ("shards-string", _report(2, 2, part_shards="s2"), "`part_shards` is a string, not a list"),
    ("nan", '{"ok": NaN, "part": "2/2", "part_shards": [], "checks": [], "mismatches": []}',
     "`ok` is a number, not true/false"),
    ("not-json", "{ok", "not a JSON report"),
]


@pytest.mark.parametrize("row, bad, needle", MALFORMED, ids=[r[0] for r in MALFORMED])
def test_combine_refuses_malformed_reports(tmp_path, row, bad, needle):
    good, path = _write(tmp_path, "p1.json", _report(1, 2)), _write(tmp_path, "p2.json", bad)
    with pytest.raises(Dsv3Error) as exc:
        combine_reports([good, path])
    message = str(exc.value)
    assert str(path) in message and needle in message and "\n" not in message, message


def test_combine_cli_malformed_is_one_line_exit_1(tmp_path):
    paths = [_write(tmp_path, "p1.json", _report(1, 2)), _write(tmp_path, "p2.json", _report(2, 2, checks="x"))]
    proc = cli("verify-combine", *paths, check=1)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv3conv: error: ") and "p2.json" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_combine_huge_part_count_names_a_few_and_counts_the_rest(tmp_path):
    path = _write(tmp_path, "p1.json", _report(1, 2_000_000_000))
    tracemalloc.start()
    try:
        with pytest.raises(Dsv3Error) as exc:
            combine_reports([path])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(exc.value)
    assert "part 2/2000000000, 3/2000000000, 4/2000000000 (and 1,999,999,996 more parts)" in message, message
    assert peak < 16 * 1024 * 1024, f"{peak} bytes for a report of part 1 of 2,000,000,000"


def test_combine_merges_well_formed_reports(tmp_path):
    bad = _report(2, 2, ok=False, checks=[{"name": "files", "ok": False, "detail": "broken"}], mismatches=["t"])
    paths = [_write(tmp_path, "p1.json", _report(1, 2)), _write(tmp_path, "p2.json", bad)]
    report = combine_reports(paths)
    assert report["ok"] is False and report["mismatches"] == ["t"] and report["parts"] == 2
    assert report["checks"] == [{"name": "files", "ok": False, "detail": "part 2/2: broken"}]


# ------------------------------------------------------------------------------- one set of checks
def test_a_layer_problem_reads_the_same_in_inspect_verify_and_dequant(tiny, tmp_path):
    """One line, written once: inspect lists it, verify's `layers` check shows it, dequant refuses with it;
    a huge declared layer count is shown as ranges, never as a list of 100,000 ids."""
    from dsv3conv.api import dequantize
    from dsv3conv.inspection import inspect_checkpoint

    root, _ = tiny
    config = json.loads((root / "config.json").read_text())
    config["num_hidden_layers"] = 100_000
    (root / "config.json").write_text(json.dumps(config))
    line = next(p for p in inspect_checkpoint(Checkpoint.open(root))["problems"] if "num_hidden_layers" in p)
    assert "no tensors for main layers 4-99999" in line and len(line) < 400, line
    assert failed(verify_checkpoint(root))["layers"] == line
    with pytest.raises(Dsv3Error) as exc:
        dequantize(root, tmp_path / "out", device="cpu")
    assert str(exc.value).startswith(line) and not (tmp_path / "out").exists()
