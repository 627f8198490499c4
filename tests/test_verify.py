"""`verify`: passes on fresh dequant output; fails, naming the tensor or file, on each kind of damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dsv3conv.api import dequantize, verify_checkpoint
from dsv3conv.checkpoint import INDEX_NAME, Checkpoint
from dsv3conv.errors import UsageError
from dsv3conv.safetensors_format import build_header
from dsv3conv.verify.sample import choose as _choose
from tests.conftest import cli, write_at

CONVERTED = "model.layers.1.mlp.experts.0.up_proj.weight"  # FP8 in the source, BF16 after dequant
COPIED = "model.layers.1.input_layernorm.weight"  # BF16 in both


@pytest.fixture(scope="module")
def outputs(tiny_src, tmp_path_factory) -> dict[str, Path]:
    """Fresh dequant outputs of the shared tiny source (read-only: tests damage copies)."""
    root = tmp_path_factory.mktemp("verify")
    out = {"keep": root / "keep", "drop": root / "drop"}
    dequantize(tiny_src, out["keep"], device="cpu")
    dequantize(tiny_src, out["drop"], device="cpu", mtp="drop")
    return out


@pytest.fixture
def damaged(outputs, tmp_path) -> Path:
    """A copy of the MTP-keeping output that a test may damage."""
    return Path(shutil.copytree(outputs["keep"], tmp_path / "out"))


def checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def failed(report: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def flip_byte(root: Path, tensor: str, element: int) -> None:
    info = Checkpoint.open(root).tensors[tensor]
    with open(root / info.file, "r+b") as f:
        f.seek(info.offset + element * info.itemsize + info.itemsize - 1)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x01]))


def remove_tensor(root: Path, name: str) -> None:
    """Rewrite the shard holding `name` without it, and drop it from the index."""
    ckpt = Checkpoint.open(root)
    info = ckpt.tensors[name]
    shard = ckpt.shards[info.file]
    keep = [e for e in shard.header.tensors if e.name != name]
    header, _ = build_header([(e.name, e.dtype, e.shape) for e in keep], shard.header.metadata)
    data = b"".join(bytes(ckpt.read(ckpt.tensors[e.name])) for e in keep)
    (root / info.file).write_bytes(header + data)
    index = json.loads((root / INDEX_NAME).read_text())
    del index["weight_map"][name]
    index["metadata"]["total_size"] -= info.nbytes
    (root / INDEX_NAME).write_text(json.dumps(index))


def edit_config(root: Path, **changes) -> None:
    path = root / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------- passing
@pytest.mark.parametrize("mtp", ["keep", "drop"])
@pytest.mark.parametrize("full", [False, True])
def test_fresh_output_passes_against_source(outputs, tiny_src, mtp, full):
    report = verify_checkpoint(outputs[mtp], against=tiny_src, full=full)
    assert report["ok"], failed(report)
    assert report["mismatches"] == []
    c = checks(report)
    assert list(c) == ["files", "headers", "total_size", "config", "layers", "mtp", "quantization_config",
                       "fp8_scales", "values", "source", "tensor_set", "config_vs_source", "data_vs_source"]
    assert ("all " in c["data_vs_source"]["detail"]) == full
    if mtp == "drop":
        assert "num_nextn_predict_layers 0" in c["config_vs_source"]["detail"]


def test_fresh_output_and_source_pass_alone(outputs, tiny_src):
    for root in (outputs["keep"], outputs["drop"], tiny_src):
        report = verify_checkpoint(root, full=True)
        assert report["ok"], (root, failed(report))
    assert "all 68 scales" in checks(verify_checkpoint(tiny_src))["values"]["detail"]


def test_float16_and_resharded_outputs_pass(tiny_src, tmp_path):
    dequantize(tiny_src, tmp_path / "f16", device="cpu", dtype="float16", max_shard_size="1MB")
    report = verify_checkpoint(tmp_path / "f16", against=tiny_src, full=True, chunk_bytes=4096)
    assert report["ok"], failed(report)
    assert "to F16" in checks(report)["tensor_set"]["detail"]


def test_sample_is_deterministic_and_covers_every_group():
    names = [f"t{i}" for i in range(200)]

    def group(n: str) -> str:
        return "rare" if n == "t17" else "common"

    first = _choose(names, group, 0.05)
    assert first == _choose(list(reversed(names)), group, 0.05)
    assert len(first) in (10, 11) and "t17" in first
    assert sorted(_choose(names, group, None)) == sorted(names)


# ------------------------------------------------------------------------------------- damage found
def test_flipped_byte_in_converted_tensor(damaged, tiny_src):
    flip_byte(damaged, CONVERTED, 1000)
    report = verify_checkpoint(damaged, against=tiny_src, full=True, chunk_bytes=4096)
    assert not report["ok"]
    assert report["mismatches"] == [CONVERTED]
    assert list(failed(report)) == ["data_vs_source"]
    detail = failed(report)["data_vs_source"]
    assert f"`{CONVERTED}`" in detail and "1 of " in detail and "largest difference" in detail, detail
    assert "first at [5, 0]" in detail, detail  # element 1000 of a [144, 200] tensor


def test_first_difference_is_the_lowest_of_pieces_compared_in_any_order(damaged, tiny_src):
    """Pieces of one tensor are compared by several writer threads; the report names the first element."""
    flip_byte(damaged, CONVERTED, 28000)  # [140, 0]: in the last piece of 4 KiB of source
    flip_byte(damaged, CONVERTED, 1000)  # [5, 0]: in the first
    detail = failed(verify_checkpoint(damaged, against=tiny_src, full=True, chunk_bytes=4096))["data_vs_source"]
    assert "2 of 28,800 elements" in detail and "first at [5, 0]" in detail, detail


def test_unreadable_source_piece_leaves_its_tensor_uncompared(tiny, tmp_path):
    """A source scale that is not finite and > 0 stops the comparison of its tensor only."""
    root, _ = tiny
    out = tmp_path / "out"
    dequantize(root, out, device="cpu")
    weight = "model.layers.0.self_attn.o_proj.weight"
    write_at(root, weight + "_scale_inv", 0, b"\x00\x00\x00\x00")
    report = verify_checkpoint(out, against=root, full=True)
    detail = failed(report)["data_vs_source"]
    assert detail.startswith("1 of the ") and f"tensor `{weight}`: not compared: " in detail, detail
    assert "not finite and positive" in detail and report["mismatches"] == [], detail


def test_flipped_byte_in_copied_tensor(damaged, tiny_src):
    flip_byte(damaged, COPIED, 3)
    report = verify_checkpoint(damaged, against=tiny_src, full=True)
    assert report["mismatches"] == [COPIED]
    assert "copied source" in failed(report)["data_vs_source"]


def test_truncated_shard(damaged):
    shard = damaged / Checkpoint.open(damaged).tensors[CONVERTED].file
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    report = verify_checkpoint(damaged)
    assert not report["ok"]
    assert shard.name in failed(report)["headers"] and "truncated" in failed(report)["headers"]


def test_deleted_shard(damaged):
    shard = damaged / Checkpoint.open(damaged).tensors[CONVERTED].file
    shard.unlink()
    report = verify_checkpoint(damaged)
    assert not report["ok"]
    assert f"{shard.name}: missing (listed in the index)" in failed(report)["files"]  # the reader's words


def test_stray_shard(damaged):
    shutil.copy(damaged / Checkpoint.open(damaged).tensors[CONVERTED].file, damaged / "model-extra.safetensors")
    report = verify_checkpoint(damaged)
    assert "model-extra.safetensors is not listed in the index" in failed(report)["files"]


def test_tensor_removed_from_index(damaged):
    index = json.loads((damaged / INDEX_NAME).read_text())
    del index["weight_map"][COPIED]
    (damaged / INDEX_NAME).write_text(json.dumps(index))
    report = verify_checkpoint(damaged)
    assert not report["ok"]
    assert f"`{COPIED}`" in failed(report)["files"] and "not in the index" in failed(report)["files"]


def test_tensor_listed_twice_in_index(damaged):
    text = (damaged / INDEX_NAME).read_text()
    entry = f'"{COPIED}": '
    start = text.index(entry)
    line = text[start : text.index("\n", start)]
    (damaged / INDEX_NAME).write_text(text.replace(line, line.rstrip(",") + ",\n    " + line.rstrip(",") + ",", 1))
    detail = failed(verify_checkpoint(damaged))["files"]
    assert f"key '{COPIED}' appears more than once" in detail and INDEX_NAME in detail, detail


@pytest.mark.parametrize("layers", [2, 4])
def test_config_with_wrong_layer_count(damaged, tiny_src, layers):
    edit_config(damaged, num_hidden_layers=layers)
    report = verify_checkpoint(damaged, against=tiny_src)
    bad = failed(report)
    assert not report["ok"]
    assert "mtp" in bad and "config.json" in bad["mtp"]
    assert "`num_hidden_layers`: expected 3, found " + str(layers) in bad["config_vs_source"]
    if layers == 2:
        assert "layers 3 hold tensors but are not declared" in bad["layers"]


def test_quantization_config_left_in_output(damaged, tiny_src):
    edit_config(damaged, quantization_config=json.loads((tiny_src / "config.json").read_text())["quantization_config"])
    bad = failed(verify_checkpoint(damaged, against=tiny_src))
    assert "quantization_config present but no F8_E4M3 tensors" in bad["quantization_config"]
    assert "`quantization_config`: expected absent" in bad["config_vs_source"]


def test_scale_removed_from_source(tiny, tmp_path):
    root, _ = tiny
    weight = "model.layers.1.self_attn.q_b_proj.weight"
    remove_tensor(root, weight + "_scale_inv")
    report = verify_checkpoint(root)
    assert not report["ok"]
    assert list(failed(report)) == ["fp8_scales"]
    assert f"`{weight}` is F8_E4M3 but `{weight}_scale_inv` is missing" in failed(report)["fp8_scales"]


def test_nan_in_bf16_tensor(damaged):
    write_at(damaged, CONVERTED, 777, b"\xc0\x7f")  # 0x7FC0: a BF16 quiet NaN
    report = verify_checkpoint(damaged, full=True)
    assert not report["ok"]
    detail = failed(report)["values"]
    assert f"`{CONVERTED}`" in detail and "1 NaN or Inf value (NaN first at [3, 177])" in detail, detail


def test_zero_scale_in_source(tiny):
    root, _ = tiny
    scale = "model.layers.0.self_attn.o_proj.weight_scale_inv"  # stored in another shard than its weight
    write_at(root, scale, 0, b"\x00\x00\x00\x00")
    detail = failed(verify_checkpoint(root))["values"]
    assert f"`{scale}`" in detail and "not finite and > 0" in detail, detail


def test_usage_errors(outputs, tmp_path):
    with pytest.raises(UsageError):
        verify_checkpoint(outputs["keep"], sample=0.1, full=True)
    with pytest.raises(UsageError):
        verify_checkpoint(outputs["keep"], sample=1.5)
    with pytest.raises(UsageError):
        verify_checkpoint(tmp_path / "absent")
    with pytest.raises(UsageError):
        verify_checkpoint(outputs["keep"], against=tmp_path / "absent")
    with pytest.raises(UsageError):
        verify_checkpoint(outputs["keep"], against=outputs["keep"], device="tpu")


# ------------------------------------------------------------------------------------ the command
def test_cli_json_shape(outputs, tiny_src):
    proc = cli("verify", outputs["drop"], "--against", tiny_src, "--sample", "0.2", "--device", "cpu", "--json",
                   check=0)
    report = json.loads(proc.stdout)
    assert set(report) == {"ok", "checks", "mismatches"}
    assert report["ok"] is True and report["mismatches"] == []
    for c in report["checks"]:
        assert set(c) == {"name", "ok", "detail"} and isinstance(c["ok"], bool) and isinstance(c["detail"], str)
    assert proc.stderr == ""  # no progress: --json and stderr is not a terminal


def test_cli_reports_mismatch(damaged, tiny_src):
    flip_byte(damaged, CONVERTED, 5)
    proc = cli("verify", damaged, "--against", tiny_src, "--full", "--device", "cpu", "--json", check=1)
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["mismatches"] == [CONVERTED]
    proc = cli("verify", damaged, "--against", tiny_src, "--full", "--device", "cpu", "--quiet", check=1)
    assert "data_vs_source" in proc.stdout and CONVERTED in proc.stdout and "1 of 13 checks failed" in proc.stdout


def test_cli_table_and_usage_errors(outputs, damaged):
    (damaged / Checkpoint.open(damaged).tensors[COPIED].file).unlink()
    proc = cli("verify", damaged, "-q", check=1)
    assert "files" in proc.stdout and "FAIL" in proc.stdout
    proc = cli("verify", outputs["keep"], "-q", check=0)
    assert "all 9 checks passed" in proc.stdout
    assert "exclude each other" in cli("verify", outputs["keep"], "--full", "--sample", "0.5", check=2).stderr


# ------------------------------------------------------------------------------------ --part K/N jobs
def verify_parts(root: Path, src: Path, tmp_path: Path, n: int = 3) -> list[Path]:
    """Run `verify --part k/n --against --full --json` for every part; the report files, in part order."""
    paths = []
    for k in range(1, n + 1):
        proc = cli("verify", root, "--against", src, "--full", "--device", "cpu", "--json", "--part", f"{k}/{n}")
        assert proc.returncode in (0, 1), proc.stderr
        path = tmp_path / f"verify-{k}.json"
        path.write_text(proc.stdout)
        paths.append(path)
    return paths


def test_parts_pass_and_combine(outputs, tiny_src, tmp_path):
    paths = verify_parts(outputs["keep"], tiny_src, tmp_path)
    reports = [json.loads(p.read_text()) for p in paths]
    for k, r in enumerate(reports, 1):
        assert r["ok"], failed(r)
        assert r["part"] == f"{k}/3" and r["part_shards"]
        assert list(checks(r)) == ["files", "headers", "total_size", "config", "layers", "mtp",
                                   "quantization_config", "fp8_scales", "values", "source", "tensor_set",
                                   "config_vs_source", "data_vs_source"]
    shards = [s for r in reports for s in r["part_shards"]]
    assert sorted(shards) == sorted(Checkpoint.open(outputs["keep"]).shards)  # each shard in exactly one part
    # the parts' data checks add up to the whole run's
    whole = verify_checkpoint(outputs["keep"], against=tiny_src, full=True)
    count = int(checks(whole)["data_vs_source"]["detail"].split()[1])
    assert sum(int(checks(r)["data_vs_source"]["detail"].split()[1]) for r in reports) == count

    proc = cli("verify-combine", *paths, "--json", check=0)
    combined = json.loads(proc.stdout)
    assert combined["ok"] and combined["mismatches"] == [] and combined["parts"] == 3
    assert [c["name"] for c in combined["checks"]] == [c["name"] for c in reports[0]["checks"]]
    assert "all 13 checks passed" in cli("verify-combine", *reversed(paths), check=0).stdout


def test_flipped_byte_fails_only_its_part(damaged, tiny_src, tmp_path):
    flip_byte(damaged, CONVERTED, 1000)
    shard = Checkpoint.open(damaged).tensors[CONVERTED].file
    paths = verify_parts(damaged, tiny_src, tmp_path)
    for p in paths:
        r = json.loads(p.read_text())
        if shard in r["part_shards"]:
            assert not r["ok"] and set(failed(r)) == {"data_vs_source"} and r["mismatches"] == [CONVERTED]
        else:
            assert r["ok"] and r["mismatches"] == [], failed(r)
    proc = cli("verify-combine", *paths, "--json", check=1)
    combined = json.loads(proc.stdout)
    assert set(failed(combined)) == {"data_vs_source"} and combined["mismatches"] == [CONVERTED]
    assert CONVERTED in failed(combined)["data_vs_source"]
    proc = cli("verify-combine", *paths, check=1)
    assert "1 of 13 checks failed" in proc.stdout and CONVERTED in proc.stdout


def test_combine_needs_every_part_once(outputs, tiny_src, tmp_path):
    paths = verify_parts(outputs["drop"], tiny_src, tmp_path)
    proc = cli("verify-combine", paths[0], paths[2], check=1)
    assert "part 2/3" in proc.stderr and proc.stdout == ""
    assert "given twice" in cli("verify-combine", *paths, paths[1], check=1).stderr
    (tmp_path / "other.json").write_text(json.dumps({"ok": True, "checks": [], "mismatches": []}))
    assert "--part" in cli("verify-combine", *paths, tmp_path / "other.json", check=1).stderr
    assert "--part" in cli("verify", outputs["drop"], "--part", "4/3", check=2).stderr


def test_device_is_checked_with_or_without_against(tiny_src):
    for bad in ("gpu", "cuda:all", "cpu,cpu"):
        proc = cli("verify", tiny_src, "--device", bad, check=2)
        assert "verify runs on one device" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.gpu
def test_cuda_report_is_the_cpu_report(outputs, damaged, tiny_src):
    """`verify --against --device cuda` converts on the GPU backend (pinned pools, fences) and finds what the
    CPU finds, word for word but the device."""
    flip_byte(damaged, CONVERTED, 1000)
    flip_byte(damaged, COPIED, 3)
    cpu = verify_checkpoint(damaged, against=tiny_src, full=True, device="cpu", chunk_bytes=4096)
    cuda = verify_checkpoint(damaged, against=tiny_src, full=True, device="cuda", chunk_bytes=4096)
    assert cuda["mismatches"] == cpu["mismatches"] == sorted([CONVERTED, COPIED])
    assert json.dumps(cuda).replace("cuda", "cpu") == json.dumps(cpu)
    clean = verify_checkpoint(outputs["keep"], against=tiny_src, full=True, device="cuda")
    assert clean["ok"] and " on cuda" in checks(clean)["data_vs_source"]["detail"]
