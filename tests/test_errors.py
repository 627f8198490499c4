"""Broken and hostile inputs: one clear line naming the file or tensor, a non-zero exit, no traceback.

Every row damages a copy of the tiny checkpoint in one way, then runs each command on it: `inspect` lists
the problem, `verify` fails a check, `dequant` and `split-mtp` refuse before writing anything. Commands run
through the Typer app in this process (the same error mapping, no startup cost); representatives, FIFO
rows and permission rows run in a real process. The error catalogue is in README.md.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv3conv.checkpoint import INDEX_NAME, Checkpoint
from dsv3conv.errors import Dsv3Error, HeaderError
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.safetensors_format import MAX_HEADER_BYTES, build_header, read_header
from dsv3conv.synthetic import make_tiny, quantize_blocks, tensor_bytes, tiny_config, write_checkpoint
from tests.conftest import Run, assert_one_line_error, cli, cli_process

SHARD1 = "model-00001-of-000004.safetensors"
SHARD2 = "model-00002-of-000004.safetensors"
SHARD3 = "model-00003-of-000004.safetensors"
WEIGHT = "model.layers.0.mlp.gate_proj.weight"  # F8_E4M3 [300, 200] in SHARD1
SCALE = WEIGHT + "_scale_inv"  # F32 [3, 2] in SHARD1, right after its weight
# Most rows run the Typer app in this process (the same error mapping, no startup). Representatives run
# in a real process too, to prove the entry point and exit status; `dequant` costs ~2 s there (torch).
INSPECT_IN_A_PROCESS = {"length-absurd", "name-with-newline", "index-is-fifo"}
DEQUANT_IN_A_PROCESS = {"length-absurd"}


# ---------------------------------------------------------------------------------------- helpers
def cli_bounded(*args) -> Run:
    return cli(*args, bounded=True)


def runner(row: str, in_a_process: set[str]):
    if row in in_a_process:
        return cli_process
    return cli_bounded if "fifo" in row else cli


def assert_inspect_flags(src: Path, *needles: str, run=cli) -> None:
    """`inspect` exits 1 and names the problem: in its problem list, or as its one error line."""
    proc = run("inspect", src, "--json")
    shown = f"exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, shown
    if not proc.stdout.strip():
        assert_one_line_error(proc, 1, *needles)
        return
    problems = json.loads(proc.stdout)["problems"]
    assert all("\n" not in line for line in problems), problems
    assert any(all(n in line for n in needles) for line in problems), f"{needles} not in {problems}"


def assert_dequant_refuses(src: Path, dst: Path, *needles: str, code: int = 1, extra: tuple = (), run=cli) -> str:
    """`dequant` refuses with one line and writes nothing."""
    line = assert_one_line_error(run("dequant", src, dst, "--quiet", "--device", "cpu", *extra), code, *needles)
    assert not dst.exists() or not any(dst.iterdir()), sorted(p.name for p in dst.iterdir())
    return line


def shard_tensors(path: Path) -> tuple[list[tuple[str, str, tuple, bytes]], dict]:
    """(name, dtype, shape, data) of a shard's tensors in data order, and its metadata."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    data = raw[8 + n :]
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [(k, v["dtype"], tuple(v["shape"]), data[slice(*v["data_offsets"])]) for k, v in items], meta


def write_shard(path: Path, tensors: list[tuple[str, str, tuple, bytes]], meta=None) -> None:
    header, _ = build_header([(n, d, s) for n, d, s, _ in tensors], meta)
    path.write_bytes(header + b"".join(b for *_, b in tensors))


def edit_header(path: Path, edit) -> None:
    """Apply `edit(header_dict)` to a shard's header JSON, keeping its data bytes (offsets untouched)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def set_header_text(path: Path, text: bytes) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=2))


@pytest.fixture
def src(tiny_src, tmp_path) -> Path:
    """A copy of the tiny checkpoint that the test may damage."""
    return Path(shutil.copytree(tiny_src, tmp_path / "src"))


# ------------------------------------------------------------------------------------ shard files
def _truncate(name: str, keep) -> callable:
    def damage(root: Path) -> None:
        path = root / name
        raw = path.read_bytes()
        path.write_bytes(raw[: keep(raw)])
    return damage


@pytest.mark.parametrize("shard", range(1, 5))
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_an_unreadable_shard_is_the_one_problem_reported(src, shard, damage):
    """The tensors of a shard that cannot be read are not reported again as scales without weights, weights
    without scales or a wrong total_size (whose fix, "restore the index", would be wrong)."""
    name = f"model-0000{shard}-of-000004.safetensors"
    if damage == "missing":
        (src / name).unlink()
    else:
        _truncate(name, lambda raw: len(raw) - 100)(src)
    problems = json.loads(cli("inspect", src, "--json", check=1).stdout)["problems"]
    assert len(problems) == 1 and name in problems[0], problems
    checks = {c["name"]: c for c in json.loads(cli("verify", src, "--json", "-q", check=1).stdout)["checks"]}
    failed = {n for n, c in checks.items() if not c["ok"]}
    assert failed == {"files" if damage == "missing" else "headers", "total_size"}, checks
    assert "not checked" in checks["total_size"]["detail"] and name in checks["total_size"]["detail"], checks


def _length_field(value: int):
    def damage(root: Path) -> None:
        path = root / SHARD2
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value) + raw[8:])
    return damage


def _set(name: str, key: str, value):
    def damage(root: Path) -> None:
        edit_header(root / SHARD1, lambda h: h[name].__setitem__(key, value))
    return damage


def _overlap(root: Path) -> None:
    def edit(h):
        begin, end = h[SCALE]["data_offsets"]
        h[SCALE]["data_offsets"] = [begin - 8, end - 8]  # into the weight before it
    edit_header(root / SHARD1, edit)


def _beyond_file(root: Path) -> None:
    def edit(h):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        begin = h[last]["data_offsets"][0]
        h[last] = {"dtype": "U8", "shape": [10**9], "data_offsets": [begin, begin + 10**9]}
    edit_header(root / SHARD1, edit)


SHARD_ROWS = [
    # id, damage, words the message must hold
    ("truncated-in-length-field", _truncate(SHARD2, lambda raw: 5), [SHARD2, "truncated inside the header length"]),
    ("truncated-in-header", _truncate(SHARD2, lambda raw: 100), [SHARD2, "larger than the file"]),
    ("truncated-in-data", _truncate(SHARD2, lambda raw: len(raw) - 1000), [SHARD2, "truncated inside the data"]),
    ("length-larger-than-file", _length_field(10_000_000), [SHARD2, "larger than the file"]),
    ("length-absurd", _length_field(2**63), [SHARD2, "absurd"]),
    ("length-all-ones", _length_field(2**64 - 1), [SHARD2, "absurd"]),
    ("header-not-json", lambda r: set_header_text(r / SHARD2, b"\x00garbage" * 20), [SHARD2, "not valid JSON"]),
    ("header-not-utf8", lambda r: set_header_text(r / SHARD2, b'{"\xff\xfe": 1}'), [SHARD2, "not valid JSON"]),
    ("header-array", lambda r: set_header_text(r / SHARD2, b"[1, 2, 3]"), [SHARD2, "not an object"]),
    ("header-nested-deep", lambda r: set_header_text(r / SHARD2, b"[" * 200_000), [SHARD2, "nested too deeply"]),
    ("header-huge-number",
     lambda r: set_header_text(r / SHARD2, b'{"a": {"dtype": "U8", "shape": [' + b"9" * 6000 + b'], "data_offsets": [0, 1]}}'),
     [SHARD2, "too large"]),
    ("entry-not-object", lambda r: edit_header(r / SHARD1, lambda h: h.__setitem__(WEIGHT, [1])),
     [SHARD1, WEIGHT, "not an object"]),
    ("dtype-not-string", _set(WEIGHT, "dtype", 8), [SHARD1, WEIGHT, "unknown dtype"]),
    ("dtype-unknown", _set(WEIGHT, "dtype", "F4_E2M1"), [SHARD1, WEIGHT, "unknown dtype 'F4_E2M1'"]),
    ("shape-string", _set(WEIGHT, "shape", "300x200"), [SHARD1, WEIGHT, "shape"]),
    ("shape-negative", _set(WEIGHT, "shape", [-300, -200]), [SHARD1, WEIGHT, "shape"]),
    ("shape-float", _set(WEIGHT, "shape", [300.0, 200]), [SHARD1, WEIGHT, "shape"]),
    ("shape-bool", _set(WEIGHT, "shape", [True, 200]), [SHARD1, WEIGHT, "shape"]),
    ("shape-too-many-dims", _set(WEIGHT, "shape", [1] * 100), [SHARD1, WEIGHT, "dimensions"]),
    ("shape-beyond-u64", _set(WEIGHT, "shape", [2**64, 1]), [SHARD1, WEIGHT, "shape"]),
    ("offsets-missing", _set(WEIGHT, "data_offsets", None), [SHARD1, WEIGHT, "data_offsets"]),
    ("offsets-three", _set(WEIGHT, "data_offsets", [0, 1, 2]), [SHARD1, WEIGHT, "data_offsets"]),
    ("offsets-reversed", _set(SCALE, "data_offsets", [402060, 402036]), [SHARD1, SCALE, "end before they begin"]),
    ("size-mismatch", _set(WEIGHT, "shape", [301, 200]), [SHARD1, WEIGHT, "covers 60,000 bytes", "needs 60,200"]),
    ("offsets-overlap", _overlap, [SHARD1, "overlaps"]),
    ("offsets-beyond-file", _beyond_file, [SHARD1, "truncated inside the data"]),
    ("metadata-not-strings", lambda r: edit_header(r / SHARD1, lambda h: h.__setitem__("__metadata__", {"format": 1})),
     [SHARD1, "__metadata__"]),
    ("name-with-newline",
     lambda r: edit_header(r / SHARD1, lambda h: h.__setitem__("evil\n\x1b[31mname", h.pop("model.norm.weight"))),
     [SHARD1, "unprintable"]),
    ("name-endless",
     lambda r: edit_header(r / SHARD1, lambda h: h.__setitem__("x" * 5000, h.pop("model.norm.weight"))),
     [SHARD1, "5000 characters"]),
    ("shard-is-directory", lambda r: ((r / SHARD3).unlink(), (r / SHARD3).mkdir()), [SHARD3, "is a directory"]),
    ("shard-is-fifo", lambda r: ((r / SHARD3).unlink(), os.mkfifo(r / SHARD3)), [SHARD3, "not a regular file"]),
    ("shard-is-device", lambda r: ((r / SHARD3).unlink(), (r / SHARD3).symlink_to("/dev/zero")),
     [SHARD3, "not a regular file"]),
    ("shard-empty", lambda r: (r / SHARD3).write_bytes(b""), [SHARD3, "truncated inside the header length"]),
]


@pytest.mark.parametrize("row, damage, needles", SHARD_ROWS, ids=[r[0] for r in SHARD_ROWS])
def test_damaged_shard(src, tmp_path, row, damage, needles):
    damage(src)
    assert_inspect_flags(src, *needles, run=runner(row, INSPECT_IN_A_PROCESS))
    assert_dequant_refuses(src, tmp_path / "out", *needles, run=runner(row, DEQUANT_IN_A_PROCESS))


def test_absurd_header_length_refused_before_allocating(tmp_path):
    """2**63 (or anything past the limit, or past the file's end) is refused having read 8 bytes."""
    path = tmp_path / "x.safetensors"
    for length, message in ((2**63, "absurd"), (MAX_HEADER_BYTES, "larger than the file"),
                            (MAX_HEADER_BYTES + 1, "absurd")):
        path.write_bytes(struct.pack("<Q", length) + b"{}" + b" " * 100)
        tracemalloc.start()
        try:
            with pytest.raises(HeaderError, match=message):
                read_header(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1024 * 1024, f"header length {length}: {peak} bytes allocated before refusing"


def test_hostile_shapes_cost_no_time(tmp_path):
    """A header of 100,000 huge dimensions once took minutes (a product of 100,000 big numbers)."""
    text = json.dumps({"a": {"dtype": "U8", "shape": [2**62] * 100_000, "data_offsets": [0, 1]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0")
    with pytest.raises(HeaderError, match="dimensions"):
        read_header(path)
    text = json.dumps({"a": {"dtype": "F64", "shape": [2**63] * 60, "data_offsets": [0, 1]}}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0")
    with pytest.raises(HeaderError, match="2\\*\\*64 bytes"):
        read_header(path)


# ------------------------------------------------------------------------------------------ index
def _index_edit(edit):
    return lambda root: edit_json(root / INDEX_NAME, edit)


def _stored_twice(root: Path) -> None:
    """model.norm.weight (in shard 1) stored again at the end of shard 3."""
    first, _ = shard_tensors(root / SHARD1)
    norm = next(t for t in first if t[0] == "model.norm.weight")
    tensors, meta = shard_tensors(root / SHARD3)
    write_shard(root / SHARD3, tensors + [norm], meta)


def _drop_from_shard(root: Path) -> None:
    tensors, meta = shard_tensors(root / SHARD1)
    write_shard(root / SHARD1, [t for t in tensors if t[0] != "model.norm.weight"], meta)


INDEX_ROWS = [
    ("shard-missing", lambda r: (r / SHARD3).unlink(), [SHARD3, "missing (listed in the index)"]),
    ("shard-dangling-symlink", lambda r: ((r / SHARD3).unlink(), (r / SHARD3).symlink_to(r / "blobs" / "gone")),
     [SHARD3, "missing"]),
    ("tensor-absent-from-shard", _drop_from_shard, ["model.norm.weight", "absent from every shard"]),
    ("tensor-listed-under-other-shard", _index_edit(lambda i: i["weight_map"].__setitem__("model.norm.weight", SHARD2)),
     ["model.norm.weight", f"listed in the index under {SHARD2} but stored in {SHARD1}"]),
    ("tensor-not-in-index", _index_edit(lambda i: i["weight_map"].pop("model.norm.weight")),
     ["model.norm.weight", SHARD1, "not in the index"]),
    ("tensor-in-two-shards", _stored_twice, ["model.norm.weight", "stored twice", SHARD1, SHARD3]),
    ("phantom-tensor", _index_edit(lambda i: i["weight_map"].__setitem__("model.ghost.weight", SHARD2)),
     ["model.ghost.weight", "absent from every shard"]),
    ("index-not-json", lambda r: (r / INDEX_NAME).write_text("{ not json"), [INDEX_NAME, "not valid JSON"]),
    ("index-no-weight-map", _index_edit(lambda i: i.pop("weight_map")), [INDEX_NAME, "weight_map"]),
    ("index-weight-map-list", _index_edit(lambda i: i.__setitem__("weight_map", [SHARD1])), [INDEX_NAME, "weight_map"]),
    ("index-file-not-string", _index_edit(lambda i: i["weight_map"].__setitem__("model.norm.weight", 7)),
     [INDEX_NAME, "weight_map"]),
    ("index-weight-map-empty", _index_edit(lambda i: i.__setitem__("weight_map", {})), [INDEX_NAME, "empty"]),
    ("index-metadata-list", _index_edit(lambda i: i.__setitem__("metadata", [1, 2])), [INDEX_NAME, "metadata"]),
    ("index-name-control-chars", _index_edit(lambda i: i["weight_map"].__setitem__("a\x1b[2Jb", SHARD1)),
     [INDEX_NAME, "not a plain tensor name"]),
    ("index-is-fifo", lambda r: ((r / INDEX_NAME).unlink(), os.mkfifo(r / INDEX_NAME)), [INDEX_NAME, "not a regular file"]),
    ("index-is-directory", lambda r: ((r / INDEX_NAME).unlink(), (r / INDEX_NAME).mkdir()),
     [INDEX_NAME, "not a regular file"]),
]


@pytest.mark.parametrize("row, damage, needles", INDEX_ROWS, ids=[r[0] for r in INDEX_ROWS])
def test_damaged_index(src, tmp_path, row, damage, needles):
    damage(src)
    assert_inspect_flags(src, *needles, run=runner(row, INSPECT_IN_A_PROCESS))
    assert_dequant_refuses(src, tmp_path / "out", *needles, run=runner(row, DEQUANT_IN_A_PROCESS))


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                    "./../outside.safetensors", "", ".", "a\\..\\..\\outside.safetensors",
                                    "x\x00.safetensors"])
def test_weight_map_escaping_the_checkpoint_is_refused_never_opened(src, tmp_path, monkeypatch, target):
    # A valid shard really lies outside: opening it would "work", so only refusing is correct.
    shutil.copy(src / SHARD1, tmp_path / "outside.safetensors")
    edit_json(src / INDEX_NAME, lambda i: i["weight_map"].__setitem__("model.norm.weight", target))
    opened: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path, *a, **kw):
        opened.append(os.fspath(path))
        return real_os_open(path, *a, **kw)

    def spy_open(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.fspath(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    with pytest.raises(Dsv3Error, match="outside the checkpoint; refusing to open it"):
        Checkpoint.open(src)
    monkeypatch.undo()
    assert not [p for p in opened if "outside" in p or p == "/etc/passwd"], opened
    if target in ("/etc/passwd", "../outside.safetensors"):
        line = assert_dequant_refuses(src, tmp_path / "out", "model.norm.weight", "outside the checkpoint")
        assert INDEX_NAME in line
        assert_inspect_flags(src, "outside the checkpoint")


# ------------------------------------------------------------------------------------ FP8 and scales
def _drop_scale(root: Path) -> None:
    tensors, meta = shard_tensors(root / SHARD1)
    write_shard(root / SHARD1, [t for t in tensors if t[0] != SCALE], meta)
    edit_json(root / INDEX_NAME, lambda i: i["weight_map"].pop(SCALE))


def _scale_as_fp8(root: Path) -> None:
    """The scale stored as F8_E4M3 (its 24 bytes as shape [4, 6]): a scale of the wrong dtype and shape."""
    edit_header(root / SHARD1, lambda h: h[SCALE].update(dtype="F8_E4M3", shape=[4, 6]))


SCALE_ROWS = [
    ("scale-missing", _drop_scale, [WEIGHT, "F8_E4M3", "_scale_inv"]),
    ("scale-shape-transposed", _set(SCALE, "shape", [2, 3]), [SCALE, "[2, 3]", "[3, 2]"]),
    ("scale-dtype-int", _set(SCALE, "dtype", "I32"), [SCALE, "dtype I32"]),
    ("scale-dtype-fp8", _scale_as_fp8, [SCALE]),
    ("fp8-weight-3d", _set(WEIGHT, "shape", [3, 100, 200]), [WEIGHT, "only 2-D"]),
    ("scale-without-weight", _set(WEIGHT, "dtype", "U8"), [SCALE, "scale without its F8_E4M3 weight"]),
]


@pytest.mark.parametrize("row, damage, needles", SCALE_ROWS, ids=[r[0] for r in SCALE_ROWS])
def test_bad_scale_pairing(src, tmp_path, row, damage, needles):
    damage(src)
    assert_inspect_flags(src, *needles, run=runner(row, INSPECT_IN_A_PROCESS))
    assert_dequant_refuses(src, tmp_path / "out", *needles, run=runner(row, DEQUANT_IN_A_PROCESS))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.5], ids=["nan", "inf", "zero", "negative"])
def test_scale_values_refused_by_dequant(src, tmp_path, value):
    """Headers are fine, one scale value is not: dequant must stop with one line naming the scale."""
    path = src / SHARD1
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = 8 + n + json.loads(raw[8 : 8 + n])[SCALE]["data_offsets"][0]
    raw[begin + 12 : begin + 16] = struct.pack("<f", value)  # block [1, 1] of [3, 2]
    path.write_bytes(bytes(raw))
    dst = tmp_path / "out"
    line = assert_one_line_error(cli("dequant", src, dst, "--quiet", "--device", "cpu"), 1, SCALE, SHARD1)
    assert "scale" in line
    # Nothing that looks finished: no index, no config, no partial file, no shard holding the bad tensor.
    left = sorted(p.name for p in dst.iterdir()) if dst.exists() else []
    assert INDEX_NAME not in left and "config.json" not in left and not [p for p in left if "partial" in p], left
    assert SHARD1 not in left, left


# ------------------------------------------------------------------------------------------- config
def _config(edit):
    return lambda root: edit_json(root / "config.json", edit)


CONFIG_ROWS = [
    ("config-missing", lambda r: (r / "config.json").unlink(), ["config.json", "missing"]),
    ("config-not-json", lambda r: (r / "config.json").write_text('{"num_hidden_layers": 3,'), ["config.json", "not valid JSON"]),
    ("config-not-object", lambda r: (r / "config.json").write_text("[3, 1]"), ["config.json", "not a JSON object"]),
    ("config-is-fifo", lambda r: ((r / "config.json").unlink(), os.mkfifo(r / "config.json")),
     ["config.json", "not a regular file"]),
    ("config-huge", lambda r: (r / "config.json").write_bytes(b" " * (17 * 1024 * 1024)), ["config.json", "far larger than such a file can be"]),
    ("layers-string", _config(lambda c: c.__setitem__("num_hidden_layers", "three")), ["config.json", "num_hidden_layers"]),
    ("layers-absurd", _config(lambda c: c.__setitem__("num_hidden_layers", 10**12)), ["config.json", "num_hidden_layers"]),
    ("mtp-negative", _config(lambda c: c.__setitem__("num_nextn_predict_layers", -1)),
     ["config.json", "num_nextn_predict_layers"]),
    ("mtp-absurd", _config(lambda c: c.__setitem__("num_nextn_predict_layers", 10**15)),
     ["config.json", "num_nextn_predict_layers"]),
    ("topk-string", _config(lambda c: c.__setitem__("num_experts_per_tok", "8")), ["config.json", "num_experts_per_tok"]),
    ("architectures-ints", _config(lambda c: c.__setitem__("architectures", [1, 2])), ["config.json", "architectures"]),
    ("layers-fewer-than-tensors", _config(lambda c: c.__setitem__("num_hidden_layers", 2)),
     ["config.json", "num_hidden_layers"]),
    ("layers-more-than-tensors", _config(lambda c: c.__setitem__("num_hidden_layers", 5)),
     ["config.json", "num_hidden_layers"]),
    ("mtp-declared-absent", _config(lambda c: c.__setitem__("num_nextn_predict_layers", 2)),
     ["config.json", "num_nextn_predict_layers"]),
    ("mtp-undeclared", _config(lambda c: c.__setitem__("num_nextn_predict_layers", 0)), ["config.json"]),
    # Every field read, several spellings each: null, a float, a bool, a list, a string, an object.
    *[(f"{key}-{tag}", _config(lambda c, key=key, value=value: c.__setitem__(key, value)), ["config.json", key])
      for key in ("num_hidden_layers", "num_nextn_predict_layers", "num_experts_per_tok", "first_k_dense_replace")
      for tag, value in (("null", None), ("float", 3.0), ("bool", True), ("list", [3]))],
    *[(f"{key}-{tag}", _config(lambda c, key=key, value=value: c.__setitem__(key, value)), ["config.json", key])
      for key, tag, value in (
          ("architectures", "null", None), ("architectures", "string", "DeepseekV3ForCausalLM"),
          ("model_type", "number", 3), ("torch_dtype", "object", {"a": 1}),
          ("quantization_config", "string", "fp8"), ("quantization_config", "list", ["fp8"]),
          ("quantization_config", "number", 1))],
    *[(f"block-{tag}", _config(lambda c, value=value: c["quantization_config"].__setitem__("weight_block_size", value)),
       ["config.json", "quantization_config.weight_block_size", "[128, 128]"])
      for tag, value in (("112", [112, 112]), ("64x128", [64, 128]), ("one", [128]), ("three", [128, 128, 1]),
                         ("floats", [128.0, 128.0]), ("null", None), ("string", "128"), ("bools", [True, True]))],
    *[(f"qc-{key}-{tag}", _config(lambda c, key=key, value=value: c["quantization_config"].__setitem__(key, value)),
       ["config.json", f"quantization_config.{key}"])
      for key, tag, value in (("scale_fmt", "number", 1), ("fmt", "list", ["e4m3"]),
                              ("modules_to_not_convert", "string", "lm_head"),
                              ("modules_to_not_convert", "numbers", [1, 2]))],
]


@pytest.mark.parametrize("row, damage, needles", CONFIG_ROWS, ids=[r[0] for r in CONFIG_ROWS])
def test_bad_config(src, tmp_path, row, damage, needles):
    damage(src)
    assert_inspect_flags(src, *needles, run=runner(row, INSPECT_IN_A_PROCESS))
    assert_dequant_refuses(src, tmp_path / "out", *needles, run=runner(row, DEQUANT_IN_A_PROCESS))


def test_mtp_drop_without_mtp_is_a_usage_error(tmp_path):
    make_tiny(tmp_path / "src", num_hidden_layers=2, num_nextn_predict_layers=0, n_shards=2)
    assert_dequant_refuses(tmp_path / "src", tmp_path / "out", "--mtp drop", "config.json", code=2,
                           extra=("--mtp", "drop"))


# ---------------------------------------------------------------------------------- what SRC/DST are
def test_src_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_dequant_refuses(tmp_path / "empty", tmp_path / "out", "empty", "not a safetensors checkpoint")
    assert_one_line_error(cli("inspect", tmp_path / "empty"), 1, "not a safetensors checkpoint")
    (tmp_path / "file").write_text("x")
    assert_dequant_refuses(tmp_path / "file", tmp_path / "out", "is a file, not a checkpoint directory", code=2)
    assert_one_line_error(cli("inspect", tmp_path / "file"), 2, "is a file")
    assert_dequant_refuses(tmp_path / "nowhere", tmp_path / "out", "nowhere", "no such directory", code=2)
    assert_one_line_error(cli("inspect", tmp_path / "nowhere"), 2, "no such directory")


def test_dst_equal_to_or_inside_src(src, tmp_path):
    before = sorted(p.name for p in src.iterdir())
    for dst in (src, src / "out", src / "a" / "b"):
        assert_one_line_error(cli("dequant", src, dst, "--quiet"), 2, "must not be the input directory or inside it")
    (tmp_path / "link").symlink_to(src)
    assert_one_line_error(cli("dequant", src, tmp_path / "link" / "out", "--quiet"), 2, "inside it")
    assert sorted(p.name for p in src.iterdir()) == before


def test_dst_not_empty_or_not_a_directory(tiny_src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert_one_line_error(cli("dequant", tiny_src, dst, "--quiet"), 2, str(dst), "not empty", "--resume", "--overwrite")
    assert [p.name for p in dst.iterdir()] == ["notes.txt"] and (dst / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(cli("dequant", tiny_src, tmp_path / "afile", "--quiet"), 2, "not a directory")
    assert (tmp_path / "afile").read_text() == "x"
    line = assert_one_line_error(cli("dequant", tiny_src, tmp_path / "afile" / "out", "--quiet"), 1, "afile")
    assert "output" in line


def test_dst_that_cannot_be_created_is_refused_before_any_work(tiny_src, tmp_path):
    """A DST under a file (or a read-only directory) is refused as the run would refuse it: by --dry-run too,
    and by split-mtp before its first output is written."""
    (tmp_path / "afile").write_text("x")
    blocked = tmp_path / "afile" / "sub" / "out"
    assert_one_line_error(cli("dequant", tiny_src, blocked, "--dry-run"), 1, str(blocked),
                          "cannot create the output directory", "afile is not a directory")
    main = tmp_path / "main"
    assert_one_line_error(cli("split-mtp", tiny_src, "--main-out", main, "--mtp-out", blocked, "--quiet"), 1,
                          "cannot create the output directory")
    assert not main.exists()


def test_dst_on_read_only_filesystem(tiny_src, tmp_path):
    dst = tmp_path / "ro"
    dst.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(dst)], capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        assert_one_line_error(cli("dequant", tiny_src, dst, "--quiet"), 1, str(dst), "not writable")
        assert_one_line_error(cli("dequant", tiny_src, dst / "sub", "--quiet"), 1, "cannot create the output directory")
    finally:
        subprocess.run(["umount", str(dst)], check=True)


# -------------------------------------------------------------------------- permissions (not as root)
def _without_dac() -> list[str] | None:
    """A command prefix that runs without the capabilities that let root ignore file permissions."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    if shutil.which("setpriv") and subprocess.run(prefix + ["true"], capture_output=True, check=False).returncode == 0:
        return prefix
    return None


def cli_unprivileged(*args) -> Run:
    prefix = _without_dac()
    if prefix is None:
        pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE: permission checks cannot be exercised")
    return cli_process(*args, prefix=tuple(prefix))


@pytest.mark.parametrize("what", [SHARD2, "config.json", INDEX_NAME])
def test_unreadable_input_file(src, tmp_path, what):
    (src / what).chmod(0o000)
    needles = [what, "permission denied", "fix its permissions"]
    # `inspect` and `dequant` open a checkpoint through the same reader: `inspect` is enough here, and
    # costs no torch import in a separate process.
    assert_inspect_flags(src, *needles, run=cli_unprivileged)


def test_unreadable_input_directory(src, tmp_path):
    src.chmod(0o000)
    try:
        proc = cli_unprivileged("inspect", src)
    finally:
        src.chmod(0o755)
    assert_one_line_error(proc, 1, str(src), "not readable", "fix its permissions")


def test_unwritable_output_directory(tiny_src, tmp_path):
    dst = tmp_path / "locked"
    dst.mkdir()
    dst.chmod(0o555)
    try:
        assert_one_line_error(cli_unprivileged("dequant", tiny_src, dst, "--quiet"), 1, str(dst), "not writable")
        assert list(dst.iterdir()) == []
    finally:
        dst.chmod(0o755)


# -------------------------------------------------------------------------------- --debug and usage
def test_debug_lets_the_traceback_through(src, tmp_path):
    (src / SHARD2).write_bytes(b"\x01")
    proc = cli("--debug", "dequant", src, tmp_path / "out")
    assert "Traceback" in proc.stderr and "dsv3conv.errors." in proc.stderr and SHARD2 in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------- verify and split-mtp
ALL_ROWS = SHARD_ROWS + INDEX_ROWS + SCALE_ROWS + CONFIG_ROWS


@pytest.mark.parametrize("row, damage, needles", ALL_ROWS, ids=[r[0] for r in ALL_ROWS])
def test_verify_flags(src, row, damage, needles):
    """verify reports the damage (its checks, or one error line) and exits 1; the file or tensor is named."""
    damage(src)
    proc = runner(row, set())("verify", src, "--json")
    shown = f"exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, shown
    if proc.stderr.strip():
        assert_one_line_error(proc, 1)
    failed = [c["detail"] for c in json.loads(proc.stdout)["checks"] if not c["ok"]] if proc.stdout.strip() else []
    assert needles[0] in " ".join(failed) + proc.stderr, shown


@pytest.mark.parametrize(
    "row, damage, needles",
    [pytest.param(*r, id=r[0]) for r in ALL_ROWS],
)
def test_split_mtp_refuses(src, tmp_path, row, damage, needles):
    damage(src)
    main_out, mtp_out = tmp_path / "main", tmp_path / "mtp"
    proc = runner(row, set())("split-mtp", src, "--main-out", main_out, "--mtp-out", mtp_out, "--quiet")
    assert_one_line_error(proc, 2 if row == "mtp-undeclared" else 1, *needles)
    for out in (main_out, mtp_out):
        assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_verify_and_split_mtp_on_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for what, needle in (("empty", "not a safetensors checkpoint"), ("file", "is a file"), ("nowhere", "no such directory")):
        proc = cli("verify", tmp_path / what, "--json")
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr and needle in proc.stdout + proc.stderr, proc
        split = cli("split-mtp", tmp_path / what, "--main-out", tmp_path / "m")
        assert_one_line_error(split, split.returncode if split.returncode in (1, 2) else 1, needle)


def test_split_mtp_outputs(src, tmp_path):
    for main_out in (src, src / "main"):
        assert_one_line_error(cli("split-mtp", src, "--main-out", main_out, "--quiet"), 2, "inside")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert_one_line_error(cli("split-mtp", src, "--main-out", busy, "--quiet"), 2, "not empty")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert_one_line_error(cli("split-mtp", src, "--main-out", tmp_path / "x", "--mtp-out", tmp_path / "x"), 2,
                          "separate")


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("option, needle", [
    (["--dtype", "int8"], "--dtype"), (["--device", "tpu"], "--device"), (["--mtp", "maybe"], "--mtp"),
    (["--max-shard-size", "0"], "--max-shard-size"), (["--max-shard-size", "lots"], "--max-shard-size"),
    (["--resume", "--overwrite"], "exclude each other"),
    (["--buffer-size", "lots"], "--buffer-size"),
])
def test_bad_options_are_one_line_usage_errors(tiny_src, tmp_path, option, needle):
    assert_dequant_refuses(tiny_src, tmp_path / "out", needle, code=2, extra=tuple(option))


def test_small_buffer_with_a_wide_fp8_tensor(tmp_path):
    """--buffer-size 1MiB (the least) and an FP8 weight whose 128-row block is 2 MB: exact output, or one clear line."""
    q, s = quantize_blocks(torch.randn(256, 16384) * 0.02)
    config = dict(tiny_config(), num_hidden_layers=0, num_nextn_predict_layers=0)
    write_checkpoint(tmp_path / "src", [[("x.weight", "F8_E4M3", (256, 16384), lambda: tensor_bytes(q)),
                                         ("x.weight_scale_inv", "F32", (2, 128), lambda: tensor_bytes(s))]], config)
    proc = cli("dequant", tmp_path / "src", tmp_path / "out", "--quiet", "--device", "cpu",
               "--buffer-size", "1MiB")
    if proc.returncode != 0:
        assert_one_line_error(proc, proc.returncode, "x.weight")
        return
    out = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))["x.weight"]
    assert torch.equal(out.view(torch.int16), reference_dequant(q, s, torch.bfloat16).view(torch.int16))
