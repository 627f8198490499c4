"""`split-mtp`: the main model without its MTP layers, and the MTP layers as a standalone draft.

Every tensor is checked byte for byte against the source; shards without MTP tensors must be identical files.
"""

from __future__ import annotations

import errno
import filecmp
import json
import os
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from dsv3conv import writer as split_module
from dsv3conv.api import dequantize, split_mtp
from dsv3conv.checkpoint import INDEX_NAME, Checkpoint
from dsv3conv.dest import PLAN_NAME
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.layout import layer_id, mtp_layer_ids
from dsv3conv.safetensors_format import read_header
from dsv3conv.split_mtp import plan_split_main, plan_split_mtp
from dsv3conv.synthetic import make_tiny
from dsv3conv.writer import copy_file_fast
from tests.conftest import cli

SHARED = (".embed_tokens.weight", ".shared_head.head.weight")
DRAFT_SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


# ------------------------------------------------------------------------------------------- helpers
def _config(root: Path) -> dict:
    return json.loads((root / "config.json").read_text())


def _renamed(name: str, n_main: int) -> str:
    layer = layer_id(name)
    return name.replace(f"model.layers.{layer}.", f"model.layers.{layer - n_main}.", 1)


def _expected_draft(src: Checkpoint, layout: str) -> dict[str, str]:
    """Draft tensor name -> source tensor name."""
    n_main = int(src.config["num_hidden_layers"])
    ids = set(mtp_layer_ids(src.config))
    return {
        _renamed(n, n_main): n for n in src.tensors
        if layer_id(n) in ids and not (layout == "sglang" and n.endswith(SHARED))
    }



def _assert_bytes_equal(out: Checkpoint, src: Checkpoint, mapping: dict[str, str]) -> None:
    assert set(out.tensors) == set(mapping)
    for name, source_name in mapping.items():
        a, b = out.tensors[name], src.tensors[source_name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert out.read(a) == src.read(b), f"tensor `{name}` differs from `{source_name}`"


def _assert_index(root: Path, ckpt: Checkpoint) -> dict:
    index = json.loads((root / INDEX_NAME).read_text())
    assert index["weight_map"] == {n: t.file for n, t in ckpt.tensors.items()}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ckpt.tensors.values())
    assert index["metadata"]["total_size"] == sum(
        s.file_size - s.header.data_start for s in ckpt.shards.values()
    )
    return index


def _assert_main(src_root: Path, out_root: Path) -> Checkpoint:
    src, out = Checkpoint.open(src_root), Checkpoint.open(out_root)
    assert not out.problems, out.problems
    mtp_ids = set(mtp_layer_ids(src.config))
    _assert_bytes_equal(out, src, {n: n for n in src.tensors if layer_id(n) not in mtp_ids})
    _assert_index(out_root, out)
    expected_config = dict(src.config, num_nextn_predict_layers=0)
    assert out.config == expected_config
    # shards without an MTP tensor are the source files, byte for byte; the others keep their names
    untouched = [s for s in src.shards.values() if not any(layer_id(e.name) in mtp_ids for e in s.header.tensors)]
    assert untouched, "the fixture should have shards without MTP tensors"
    for shard in untouched:
        assert filecmp.cmp(shard.path, out_root / shard.name, shallow=False), shard.name
        assert not os.path.samefile(shard.path, out_root / shard.name)
        assert (out_root / shard.name).stat().st_nlink == 1, "a copy, never a hard link"
    for name in set(out.shards) - {s.name for s in untouched}:
        assert name in src.shards
        assert out.shards[name].header.metadata == {"format": "pt"}
    for rel in src.extra_files():
        assert filecmp.cmp(src_root / rel, out_root / rel, shallow=False), rel
    assert [p.name for p in out_root.glob(".*")] == [PLAN_NAME]  # no lock, no partial files: the plan record
    return out


def _assert_draft(src_root: Path, out_root: Path, layout: str) -> Checkpoint:
    src, out = Checkpoint.open(src_root), Checkpoint.open(out_root)
    assert not out.problems, out.problems
    _assert_bytes_equal(out, src, _expected_draft(src, layout))
    _assert_index(out_root, out)
    for name, shard in out.shards.items():
        m = DRAFT_SHARD_RE.match(name)
        assert m and int(m.group(2)) == len(out.shards), name
        assert shard.header.metadata == {"format": "pt"}
    n_mtp = len(mtp_layer_ids(src.config))
    expected = dict(src.config, num_hidden_layers=n_mtp, architectures=["DeepseekV3ForCausalLMNextN"],
                        first_k_dense_replace=0)
    if not any(t.dtype == "F8_E4M3" for t in out.tensors.values()):
        expected.pop("quantization_config", None)
    assert out.config == expected
    assert {layer_id(n) for n in out.tensors} == set(range(n_mtp))
    for rel in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert filecmp.cmp(src_root / rel, out_root / rel, shallow=False), rel
    return out


# --------------------------------------------------------------------------------------------- FP8
def test_main_out_fp8(tiny_src, tmp_path):
    result = split_mtp(tiny_src, main_out=tmp_path / "main")
    assert result["mtp"] is None and result["mtp_layers"] == [3]
    out = _assert_main(tiny_src, tmp_path / "main")
    part = result["main"]
    assert part["shards_copied_whole"] >= 1
    assert part["tensors_dropped"] == sum(layer_id(n) == 3 for n in Checkpoint.open(tiny_src).tensors)
    assert part["bytes_written"] == sum(s.file_size for s in out.shards.values())
    assert part["tensors_converted"] == 0


@pytest.mark.parametrize("layout", ["sglang", "full"])
def test_mtp_out_fp8(tiny_src, tmp_path, layout):
    result = split_mtp(tiny_src, mtp_out=tmp_path / "mtp", mtp_layout=layout)
    out = _assert_draft(tiny_src, tmp_path / "mtp", layout)
    src_config = _config(tiny_src)
    assert out.config["quantization_config"] == src_config["quantization_config"]
    assert out.config["num_nextn_predict_layers"] == src_config["num_nextn_predict_layers"]
    shared = [n for n in out.tensors if n.endswith(SHARED)]
    if layout == "sglang":
        assert shared == [] and result["mtp"]["tensors_dropped"] == 2
    else:
        assert sorted(shared) == ["model.layers.0.embed_tokens.weight", "model.layers.0.shared_head.head.weight"]
        assert result["mtp"]["tensors_dropped"] == 0
    assert result["mtp"]["renamed"] == ["model.layers.3. -> model.layers.0."]
    # an independent reader agrees
    (shard,) = out.shards.values()
    with safe_open(shard.path, framework="pt") as f:
        assert set(f.keys()) == set(out.tensors)
        assert f.metadata() == {"format": "pt"}


def test_layout_full_is_sglang_plus_shared(tiny_src):
    ckpt = Checkpoint.open(tiny_src)
    sg = {t.name for f in plan_split_mtp(ckpt, Path("/nonexistent/a"), "sglang").files for t in f.tensors}
    full = {t.name for f in plan_split_mtp(ckpt, Path("/nonexistent/b"), "full").files for t in f.tensors}
    assert full - sg == {"model.layers.0.embed_tokens.weight", "model.layers.0.shared_head.head.weight"}
    assert sg <= full


def test_mtp_not_at_61_or_3_and_two_mtp_layers(tmp_path):
    """MTP ids come from config: here layers 5 and 6 of a 5-layer model, renamed to 0 and 1."""
    src = tmp_path / "src"
    make_tiny(src, num_hidden_layers=5, num_nextn_predict_layers=2, n_shards=6)
    assert mtp_layer_ids(_config(src)) == [5, 6]
    result = split_mtp(src, main_out=tmp_path / "main", mtp_out=tmp_path / "mtp", mtp_layout="full")
    assert result["mtp_layers"] == [5, 6]
    main = _assert_main(src, tmp_path / "main")
    assert {layer_id(n) for n in main.tensors} - {None} == {0, 1, 2, 3, 4}
    draft = _assert_draft(src, tmp_path / "mtp", "full")
    assert draft.config["num_hidden_layers"] == 2 and draft.config["num_nextn_predict_layers"] == 2
    assert "model.layers.1.eh_proj.weight" in draft.tensors
    assert result["mtp"]["renamed"] == ["model.layers.5. -> model.layers.0.", "model.layers.6. -> model.layers.1."]


def test_single_id_five(tmp_path):
    src = tmp_path / "src"
    make_tiny(src, num_hidden_layers=5)
    split_mtp(src, main_out=tmp_path / "main", mtp_out=tmp_path / "mtp")
    main = _assert_main(src, tmp_path / "main")
    assert not any(layer_id(n) == 5 for n in main.tensors)
    draft = _assert_draft(src, tmp_path / "mtp", "sglang")
    assert "model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv" in draft.tensors


# -------------------------------------------------------------------------------------------- BF16
@pytest.fixture(scope="module")
def bf16_src(tiny_src, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16") / "src"
    dequantize(tiny_src, root, device="cpu")
    return root


def test_bf16_input(bf16_src, tmp_path):
    split_mtp(bf16_src, main_out=tmp_path / "main", mtp_out=tmp_path / "mtp", mtp_layout="full")
    _assert_main(bf16_src, tmp_path / "main")
    draft = _assert_draft(bf16_src, tmp_path / "mtp", "full")
    assert "quantization_config" not in draft.config
    assert {t.dtype for t in draft.tensors.values()} <= {"BF16", "F32"}


def test_dequant_of_extracted_fp8_draft(tiny_src, bf16_src, tmp_path):
    split_mtp(tiny_src, mtp_out=tmp_path / "mtp", mtp_layout="full")
    dequantize(tmp_path / "mtp", tmp_path / "mtp-bf16", device="cpu")
    # dequantizing the draft == taking the draft of the dequantized model
    split_mtp(bf16_src, mtp_out=tmp_path / "mtp-of-bf16", mtp_layout="full")
    a, b = Checkpoint.open(tmp_path / "mtp-bf16"), Checkpoint.open(tmp_path / "mtp-of-bf16")
    _assert_bytes_equal(a, b, {n: n for n in b.tensors})
    assert "quantization_config" not in a.config


# ---------------------------------------------------------------------------------------- planning
def test_main_plan_copies_untouched_shards_with_their_header(tiny_src):
    ckpt = Checkpoint.open(tiny_src)
    plan = plan_split_main(ckpt, Path("/nonexistent/out"))
    copied = [f for f in plan.files if f.copy_of]
    assert copied
    for f in copied:
        assert f.copy_of == f.name
        raw = (tiny_src / f.name).read_bytes()
        assert raw.startswith(f.header) and len(f.header) == read_header(tiny_src / f.name).data_start
        assert f.size == len(raw)
    assert plan.index["metadata"]["total_size"] == plan.total_size


def test_emptied_shard_is_left_out(tmp_path):
    src = tmp_path / "src"
    make_tiny(src, n_shards=8)
    ckpt = Checkpoint.open(src)
    mtp_only = [s.name for s in ckpt.shards.values() if all(layer_id(e.name) == 3 for e in s.header.tensors)]
    assert mtp_only, "the fixture should have a shard holding only MTP tensors"
    split_mtp(src, main_out=tmp_path / "main")
    for name in mtp_only:
        assert not (tmp_path / "main" / name).exists()
    _assert_main(src, tmp_path / "main")


def test_no_mtp_layers_is_refused(tmp_path):
    src = tmp_path / "src"
    make_tiny(src, num_nextn_predict_layers=0)
    with pytest.raises(UsageError, match="declares no MTP layers"):
        split_mtp(src, main_out=tmp_path / "main")
    proc = cli("split-mtp", src, "--mtp-out", tmp_path / "mtp", check=2)
    assert proc.stderr.strip().count("\n") == 0 and "no MTP layers" in proc.stderr
    assert not (tmp_path / "main").exists() and not (tmp_path / "mtp").exists()


def test_refusals(tiny_src, tmp_path):
    with pytest.raises(UsageError, match="give main_out DIR, mtp_out DIR or both"):
        split_mtp(tiny_src)
    with pytest.raises(UsageError, match="mtp_layout 'vllm'"):
        split_mtp(tiny_src, mtp_out=tmp_path / "m", mtp_layout="vllm")
    with pytest.raises(UsageError, match="separate directories"):
        split_mtp(tiny_src, main_out=tmp_path / "o", mtp_out=tmp_path / "o" / "mtp")
    with pytest.raises(UsageError, match="must not be the input"):
        split_mtp(tiny_src, main_out=tiny_src / "sub")
    assert list(tmp_path.iterdir()) == []


def test_dry_run_writes_nothing(tiny_src, tmp_path):
    result = split_mtp(tiny_src, main_out=tmp_path / "main", mtp_out=tmp_path / "mtp", dry_run=True)
    assert list(tmp_path.iterdir()) == []
    assert any(f["copy_of"] for f in result["main"]["files"])
    assert result["main"]["config"]["num_nextn_predict_layers"] == 0
    assert result["mtp"]["config"]["architectures"] == ["DeepseekV3ForCausalLMNextN"]
    assert all(DRAFT_SHARD_RE.match(f["name"]) for f in result["mtp"]["files"])


def test_non_empty_outputs_resume_overwrite(tiny_src, tmp_path):
    main, mtp = tmp_path / "main", tmp_path / "mtp"
    mtp.mkdir()
    (mtp / "stray.txt").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        split_mtp(tiny_src, main_out=main, mtp_out=mtp)
    assert not main.exists(), "both outputs are checked before anything is written"
    split_mtp(tiny_src, main_out=main, mtp_out=mtp, overwrite=True)
    _assert_main(tiny_src, main)
    _assert_draft(tiny_src, mtp, "sglang")

    ckpt = Checkpoint.open(main)
    names = sorted(ckpt.shards)
    (main / names[0]).unlink()  # a copied-whole shard
    raw = bytearray((main / names[-1]).read_bytes())  # a rewritten one, damaged in its header
    raw[10] ^= 0xFF
    (main / names[-1]).write_bytes(raw)
    result = split_mtp(tiny_src, main_out=main, resume=True)
    assert result["main"]["shards_skipped"] == len(names) - 2
    _assert_main(tiny_src, main)
    with pytest.raises(UsageError, match="exclude each other"):
        split_mtp(tiny_src, main_out=main, resume=True, overwrite=True)


# --------------------------------------------------------------------------------------------- CLI
def test_cli_json_both_outputs(tiny_src, tmp_path):
    proc = cli("split-mtp", tiny_src, "--main-out", tmp_path / "main", "--mtp-out", tmp_path / "mtp",
                   "--mtp-layout", "full", "--json", check=0)
    r = json.loads(proc.stdout)
    assert r["mtp_layers"] == [3] and r["mtp"]["layout"] == "full"
    assert r["main"]["output"] == str(tmp_path / "main")
    _assert_main(tiny_src, tmp_path / "main")
    _assert_draft(tiny_src, tmp_path / "mtp", "full")


def test_cli_no_output_is_usage_error(tiny_src):
    proc = cli("split-mtp", tiny_src, check=2)
    assert proc.stderr.strip() == "dsv3conv: error: give --main-out DIR, --mtp-out DIR or both"


def test_cli_dry_run_text(tiny_src, tmp_path):
    proc = cli("split-mtp", tiny_src, "--main-out", tmp_path / "main", "--dry-run", check=0)
    assert "copy of model-00001" in proc.stdout and "dry run: nothing written" in proc.stdout
    assert not (tmp_path / "main").exists()


# --------------------------------------------------------------------------------------- fast copy
def test_copy_file_fast(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    copy_file_fast(src, tmp_path / "out" / "b.bin")
    assert filecmp.cmp(src, tmp_path / "out" / "b.bin", shallow=False)
    assert (tmp_path / "out" / "b.bin").stat().st_nlink == 1 and src.stat().st_nlink == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.bin"]


def test_copy_file_fast_falls_back_to_a_stream(tmp_path, monkeypatch):
    """No reflink, and copy_file_range failing part-way: the stream finishes the copy."""
    calls = []

    def ioctl(*args):
        raise OSError(errno.EOPNOTSUPP, "no reflink")

    def copy_range(fd_in, fd_out, count, off_in, off_out):
        calls.append(off_in)
        if calls[1:]:
            raise OSError(errno.EXDEV, "cross-device")
        return os.pwrite(fd_out, os.pread(fd_in, min(count, 1000), off_in), off_out)

    monkeypatch.setattr(split_module.fcntl, "ioctl", ioctl)
    monkeypatch.setattr(split_module.os, "copy_file_range", copy_range, raising=False)
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(5000))
    copy_file_fast(src, tmp_path / "b.bin")
    assert calls == [0, 1000]
    assert (tmp_path / "b.bin").read_bytes() == src.read_bytes()


def test_copy_file_fast_error_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def ioctl(*args):
        raise OSError(errno.EXDEV, "cross-device")

    def copy_range(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(split_module.fcntl, "ioctl", ioctl)
    monkeypatch.setattr(split_module.os, "copy_file_range", copy_range, raising=False)
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 100)
    (tmp_path / "out").mkdir()
    with pytest.raises(Dsv3Error, match="disk full"):
        copy_file_fast(src, tmp_path / "out" / "b.bin")
    assert list((tmp_path / "out").iterdir()) == []
