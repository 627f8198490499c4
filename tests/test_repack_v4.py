"""`dequant --experts fp8`: DeepSeek-V4's packed-FP4 experts repacked to 128x128 block FP8 (`.scale` F8_E8M0,
or F32 with `--scale-dtype float32`), every other tensor byte for byte; exact (dequant(source) ==
dequant(result) bit for bit) or refused naming the tensor; verified against its source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsv3conv.api import dequantize, verify_checkpoint
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4
from dsv3conv.kernels.mxfp4_to_fp8 import repack_mxfp4_to_fp8
from dsv3conv.synthetic_v4 import make_v4
from tests.conftest import assert_one_line_error, bits, cli, load_all, write_at
from tests.test_verify import failed, flip_byte

EXPERT = "layers.1.ffn.experts.0.w2.weight"  # packed [256, 80]: two row blocks, the second partial in columns
SCALE_DTYPES = {"float8_e8m0fnu": torch.float8_e8m0fnu, "float32": torch.float32}


def assert_same_tensors(a: Path, b: Path) -> None:
    """Two checkpoints hold the same tensor names, each with the same bytes."""
    ta, _ = load_all(a)
    tb, _ = load_all(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert torch.equal(bits(ta[name]), bits(tb[name])), name


@pytest.fixture(scope="module")
def flash(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("repack") / "flash"
    return root, make_v4(root, "flash")


def _scale(name: str) -> str:
    return name[: -len(".weight")] + ".scale"


@pytest.mark.parametrize(("kind", "scale_dtype"), [("flash", "float8_e8m0fnu"), ("0731", "float8_e8m0fnu"),
                                                   ("flash", "float32")])
def test_repack_exact_and_the_rest_copied(tmp_path, kind, scale_dtype) -> None:
    src = make_v4(tmp_path / "src", kind)
    summary = dequantize(tmp_path / "src", tmp_path / "out", device="cpu", experts="fp8", buffer_size=4096,
                         scale_dtype=scale_dtype)
    out, _ = load_all(tmp_path / "out")
    assert set(out) == set(src)
    repacked = 0
    for name, t in src.items():
        if t.dtype == torch.int8:  # packed FP4: e4m3 + block scale, as the whole-tensor reference makes them
            q, s, lossy = repack_mxfp4_to_fp8(t, src[_scale(name)], SCALE_DTYPES[scale_dtype])
            assert lossy == 0 and out[_scale(name)].dtype == SCALE_DTYPES[scale_dtype], name
            assert torch.equal(bits(out[name]), bits(q)) and torch.equal(bits(out[_scale(name)]), bits(s)), name
            for dtype in (torch.bfloat16, torch.float32):
                want = reference_dequant_mxfp4(t, src[_scale(name)], dtype)
                assert torch.equal(bits(reference_dequant(out[name], out[_scale(name)], dtype)), bits(want)), name
            repacked += 1
        elif not (name.endswith(".scale") and src[name[: -len(".scale")] + ".weight"].dtype == torch.int8):
            assert out[name].dtype == t.dtype and torch.equal(bits(out[name]), bits(t)), f"{name} changed"
    assert repacked == summary["tensors_converted"] > 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    source_config = json.loads((tmp_path / "src" / "config.json").read_text())
    assert source_config["expert_dtype"] == "fp4" and config == dict(source_config, expert_dtype="fp8")
    assert "expert_dtype: 'fp4' -> 'fp8'" in summary["config_changes"]
    assert json.loads(cli("inspect", tmp_path / "out", "--json", check=0).stdout)["problems"] == []


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_round_trip_through_dequant(flash, tmp_path, scale_dtype) -> None:
    """dequant(source) and dequant(repacked) are the same checkpoint, bit for bit, with either scale dtype."""
    root, _ = flash
    dequantize(root, tmp_path / "fp8", device="cpu", experts="fp8", scale_dtype=scale_dtype)
    dequantize(root, tmp_path / "a", device="cpu")
    summary = dequantize(tmp_path / "fp8", tmp_path / "b", device="cpu")
    assert_same_tensors(tmp_path / "a", tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert "expert_dtype" not in config and config == json.loads((tmp_path / "a" / "config.json").read_text())
    assert any(c.startswith("removed expert_dtype (was 'fp8'") for c in summary["config_changes"]), summary


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_repack_verifies_and_a_changed_code_is_found(flash, tmp_path, scale_dtype) -> None:
    root, _ = flash
    dequantize(root, tmp_path / "out", device="cpu", experts="fp8", mtp="drop", scale_dtype=scale_dtype)
    report = verify_checkpoint(tmp_path / "out", against=root, full=True)
    detail = {c["name"]: c["detail"] for c in report["checks"]}
    assert report["ok"], failed(report)
    assert "dequant --experts fp8 of the source" in detail["tensor_set"] and "MTP drop" in detail["tensor_set"]
    assert f"scale dtype {scale_dtype}" in detail["tensor_set"], detail["tensor_set"]
    assert "repacked again on cpu" in detail["data_vs_source"]
    flip_byte(tmp_path / "out", EXPERT, 1000)
    bad = failed(verify_checkpoint(tmp_path / "out", against=root, full=True))
    assert set(bad) == {"data_vs_source"}, bad
    assert f"tensor `{EXPERT}`" in bad["data_vs_source"] and "differ from repack of the source" in bad["data_vs_source"]


def test_lossy_block_refused_naming_the_tensor(flash, tmp_path) -> None:
    root, _ = flash
    src = Path(shutil.copytree(root, tmp_path / "src"))
    write_at(src, _scale(EXPERT), 0, bytes([140]))  # one group 18+ binades above the rest of its block
    proc = cli("dequant", src, tmp_path / "out", "--experts", "fp8", "--device", "cpu", "--quiet")
    assert_one_line_error(proc, 1, f"tensor `{EXPERT}`: 1 of its 128x128 blocks", "without --experts fp8")
    left = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert not [n for n in left if n.endswith(".json")], left  # finished shards only: index and config come last


DENSE_SCALE = "layers.0.attn.wq_a.scale"  # F8_E8M0 scale of a dense FP8 weight: copied by --experts fp8


@pytest.mark.parametrize("element", [0, -1], ids=["first", "last"])
def test_copied_nan_scale_refused_naming_the_tensor(flash, tmp_path, element) -> None:
    """E8M0 byte 255 (NaN) in a scale that --experts fp8 copies with its weight: refused as a scale that
    converts is, naming the tensor and its shard (exit 1); its shard never appears under its final name."""
    root, tensors = flash
    src = Path(shutil.copytree(root, tmp_path / "src"))
    write_at(src, DENSE_SCALE, element % tensors[DENSE_SCALE].numel(), bytes([255]))
    shard = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][DENSE_SCALE]
    proc = cli("dequant", src, tmp_path / "out", "--experts", "fp8", "--device", "cpu", "--quiet",
               "--buffer-size", "1MiB")
    assert_one_line_error(proc, 1, f"tensor `{DENSE_SCALE}` in {shard}", "not finite and positive (first: nan)")
    assert not (tmp_path / "out" / shard).exists()


def test_changed_f32_scale_is_found(flash, tmp_path) -> None:
    """An F32 block scale of a repacked expert doubled (still a power of two): verify names the tensor."""
    root, _ = flash
    dequantize(root, tmp_path / "out", device="cpu", experts="fp8", scale_dtype="float32")
    out, _ = load_all(tmp_path / "out")
    doubled = (out[_scale(EXPERT)][1, 0] * 2).reshape(1).view(torch.uint8)
    write_at(tmp_path / "out", _scale(EXPERT), out[_scale(EXPERT)].shape[1], bytes(doubled.tolist()))
    bad = failed(verify_checkpoint(tmp_path / "out", against=root, full=True))
    assert set(bad) == {"data_vs_source"}, bad
    assert f"tensor `{EXPERT}`" in bad["data_vs_source"] and "0 of 40,960 e4m3 codes and 1 of 4 scales" in bad["data_vs_source"]


@pytest.mark.parametrize(("args", "needle"), [
    (("--experts", "int4"), "--experts 'int4': choose dequant or fp8"),
    (("--experts", "fp8", "--dtype", "float32"), "--dtype float32 does not apply"),
    (("--experts", "fp8", "--scale-dtype", "bfloat16"), "--scale-dtype 'bfloat16': choose float8_e8m0fnu or float32"),
    (("--scale-dtype", "float32",), "--experts dequant writes none: add --experts fp8"),
])
def test_bad_options_refused(flash, tmp_path, args, needle) -> None:
    proc = cli("dequant", flash[0], tmp_path / "out", *args)
    assert_one_line_error(proc, 2, needle)


def test_nothing_to_repack_refused(tmp_path) -> None:
    make_v4(tmp_path / "src", "flash-base")
    proc = cli("dequant", tmp_path / "src", tmp_path / "out", "--experts", "fp8")
    assert_one_line_error(proc, 2, "holds no packed FP4 (MXFP4) experts to repack")


@pytest.mark.parametrize(("scale_dtype", "torch_dtype"), [("F8_E8M0", torch.float8_e8m0fnu), ("F32", torch.float32)])
def test_device_path_same_bytes_as_the_cpu_backend(scale_dtype, torch_dtype) -> None:
    """The GPU backend's repack (`repack_on_device`: the plain-torch kernel, run here on the CPU) and the CPU
    backend's table path write the same e4m3 codes and block scales, for both scale dtypes, over pieces
    of whole 128-row blocks with a partial last block and partial last column block."""
    from dsv3conv.backend import CpuBackend, Item, OutputArena, convert
    from dsv3conv.gpu import repack_on_device
    from dsv3conv.ops import RepackMxfp4Fp8

    gen = torch.Generator().manual_seed(3)
    rows, cols = 300, 320
    packed = torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, generator=gen)
    scale = torch.randint(116, 130, (rows, cols // 32), dtype=torch.uint8, generator=gen).view(torch.float8_e8m0fnu)
    op = RepackMxfp4Fp8(scale_dtype, "x.scale")
    items, off = [], 0
    for r0, r1 in ((0, 256), (256, rows)):
        n = (r1 - r0) * cols // 2
        items.append(Item(op, off, n, r1 - r0, cols, "I8", "F8_E4M3", scale[r0:r1].to(torch.float32), "x.weight"))
        off += n
    buf = packed.view(torch.uint8).reshape(-1).clone()
    backend = CpuBackend(2)
    try:
        cpu = [bytes(b) for b in convert(backend, buf, items)]
    finally:
        backend.close()
    device = [bytes(b) for it in items for b in repack_on_device(buf.numpy(), it, OutputArena(0), torch.device("cpu"))]
    assert cpu == device
    q, s, lossy = repack_mxfp4_to_fp8(packed, scale, torch_dtype)
    assert lossy == 0 and b"".join(device[0::2]) == q.view(torch.uint8).numpy().tobytes()
    assert b"".join(device[1::2]) == s.view(torch.uint8).numpy().tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_repack_cuda_same_bytes_as_cpu(flash, tmp_path, scale_dtype) -> None:
    root, _ = flash
    dequantize(root, tmp_path / "cpu", device="cpu", experts="fp8", scale_dtype=scale_dtype)
    dequantize(root, tmp_path / "gpu", device="cuda", experts="fp8", scale_dtype=scale_dtype)
    assert_same_tensors(tmp_path / "cpu", tmp_path / "gpu")
