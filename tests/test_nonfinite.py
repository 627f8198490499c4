"""NaN and Inf in dequant's output: refused by default, naming the tensor and the element; written with
--allow-nonfinite, NaN in one encoding on every backend.

Spellings of the fault: an e4m3 NaN code (0x7F, 0xFF) anywhere in a piece, a finite scale whose product
overflows BF16 (via float32 Inf) or overflows float16 for some codes of a block and not others, an E8M0 scale
whose MXFP4 products overflow. The check works from the input: it is held to the reference's own output
(`reference_dequant`) on random pieces near the overflow bounds.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from dsv3conv.checkpoint import Checkpoint, TensorInfo
from dsv3conv.errors import Dsv3Error
from dsv3conv.finite import NAN_BITS, check_copy, check_piece
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4
from dsv3conv.ops import Copy, DequantBlockFp8, DequantMxfp4
from dsv3conv.plan import TensorPlan
from tests.conftest import assert_one_line_error, bits, cli, load_all, write_at

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _plan(op, shape, src_dtype="F8_E4M3", out="BF16") -> TensorPlan:
    info = TensorInfo("w", "shard.safetensors", src_dtype, shape, 0, 0)
    return TensorPlan("w", out, shape, op, (info,))


def _bound_scales(gen, shape, largest: float, out_dtype) -> torch.Tensor:
    """Scales that put the block's bound (largest * scale) around the output dtype's overflow threshold."""
    edge = torch.finfo(out_dtype).max / largest
    return (edge * torch.empty(shape).uniform_(0.9, 1.1, generator=gen)).to(torch.float32)


@pytest.mark.parametrize("out_dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fp8_check_agrees_with_the_reference(out_dtype):
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for trial in range(40):
        rows, cols = (1, 1) if trial == 0 else (int(torch.randint(1, 300, (1,), generator=gen)),
                                                 int(torch.randint(1, 300, (1,), generator=gen)))
        codes = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x7E  # NaN codes apart: overflow alone
        blocks = (-(-rows // 128), -(-cols // 128))
        scale = _bound_scales(gen, blocks, 448.0, out_dtype)
        want = not bool(torch.isfinite(reference_dequant(codes, scale, out_dtype)).all())
        t = _plan(DequantBlockFp8("F32", allow_nonfinite=True), (rows, cols))
        assert check_piece(t, codes.reshape(-1).numpy(), 0, scale.numpy(), _name(out_dtype)) == want, (trial, rows, cols)
        seen.add(want)
    assert seen == {True, False}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("out_dtype", DTYPES.values(), ids=DTYPES.keys())
def test_mxfp4_check_agrees_with_the_reference(out_dtype):
    """E8M0 exponents around the overflow: 6 * 2^e passes the largest value at e = 126 (BF16, F32), 14 (F16)."""
    gen = torch.Generator().manual_seed(2)
    top = 15 if out_dtype == torch.float16 else 127
    seen = set()
    for trial in range(30):
        rows, cols = int(torch.randint(1, 20, (1,), generator=gen)), 2 * int(torch.randint(1, 80, (1,), generator=gen))
        packed = torch.randint(0, 256, (rows, cols // 2), generator=gen, dtype=torch.uint8)
        exps = torch.randint(top - 3, top + 1, (rows, -(-cols // 32)), generator=gen)
        scale = torch.pow(2.0, exps.double()).float()
        ref = reference_dequant_mxfp4(packed, scale.to(torch.float8_e8m0fnu), out_dtype)
        want = not bool(torch.isfinite(ref).all())
        t = _plan(DequantMxfp4(allow_nonfinite=True), (rows, cols), "U8")
        assert check_piece(t, packed.reshape(-1).numpy(), 0, scale.numpy(), _name(out_dtype)) == want, (trial, rows, cols)
        seen.add(want)
    assert seen == {True, False}


@pytest.mark.parametrize("code", [0x7F, 0xFF])
@pytest.mark.parametrize("where", [(0, 0), (129, 200), (255, 256)], ids=["first", "second-block", "last"])
def test_nan_codes_are_refused_naming_the_element(code, where):
    codes = torch.full((256, 257), 0x38, dtype=torch.uint8)
    codes[where] = code
    t = _plan(DequantBlockFp8("F32"), (256, 257))
    with pytest.raises(Dsv3Error) as exc:
        check_piece(t, codes.reshape(-1).numpy(), 1024, torch.ones(2, 3).numpy(), "bfloat16")
    message = str(exc.value)
    assert f"[{1024 + where[0]}, {where[1]}]" in message and f"0x{code:02X}" in message and "NaN" in message, message
    assert "allow_nonfinite" in message


# ----------------------------------------------------------------------------------- the command line
def _weight(root) -> tuple[str, str]:
    """An FP8 weight of the tiny checkpoint with 2 x 2 blocks (rows 200, columns 160), and its scale."""
    ckpt = Checkpoint.open(root)
    name = next(n for n, t in ckpt.tensors.items() if t.dtype == "F8_E4M3" and t.shape[0] > 128 and t.shape[1] > 128)
    return name, name + "_scale_inv"


@pytest.mark.parametrize("damage, dtype, needle", [
    ("nan-7f", "bfloat16", "NaN (e4m3 NaN code 0x7F)"),
    ("nan-ff", "float32", "NaN (e4m3 NaN code 0xFF)"),
    ("huge-scale", "bfloat16", "inf (w * scale beyond the largest bfloat16"),
    ("f16-scale", "float16", "inf (w * scale beyond the largest float16"),
])
def test_dequant_refuses_nonfinite_output(tiny, tmp_path, damage, dtype, needle):
    root, _ = tiny
    name, scale = _weight(root)
    if damage.startswith("nan"):
        write_at(root, name, 130 * Checkpoint.open(root).tensors[name].shape[1] + 7, bytes([int(damage[-2:], 16)]))
    else:  # the last block's scale: 1e36 overflows float32 itself; 300 overflows float16 for large codes only
        write_at(root, scale, 3, struct.pack("<f", 1e36 if damage == "huge-scale" else 300.0))
    proc = cli("dequant", root, tmp_path / "out", "--dtype", dtype, "--device", "cpu", "--quiet")
    line = assert_one_line_error(proc, 1, f"tensor `{name}`", needle, "--allow-nonfinite")
    assert ("[130, 7]" in line) if damage.startswith("nan") else ("[1" in line)
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("dtype", DTYPES)
def test_allowed_nonfinite_values_are_written_with_canonical_nan(tiny, tmp_path, dtype):
    root, _ = tiny
    name, scale = _weight(root)
    cols = Checkpoint.open(root).tensors[name].shape[1]
    write_at(root, name, 0, b"\x7f")
    write_at(root, name, 129 * cols + 150, b"\xff")
    write_at(root, scale, 0, struct.pack("<f", 1e36))  # block (0, 0): every nonzero code overflows
    out = tmp_path / "out"
    cli("dequant", root, out, "--dtype", dtype, "--device", "cpu", "--quiet", "--allow-nonfinite", check=0)
    got, _ = load_all(out)
    src, _ = load_all(root)
    ref = reference_dequant(src[name], src[scale], DTYPES[dtype])
    int_dtype = {"bfloat16": torch.int16, "float16": torch.int16, "float32": torch.int32}[dtype]
    positive, negative = (v - (1 << (8 * int_dtype.itemsize)) if v >> (8 * int_dtype.itemsize - 1) else v
                          for v in NAN_BITS[dtype])
    got_bits, ref_bits = got[name].view(int_dtype), ref.view(int_dtype)
    assert got_bits[0, 0] == positive and got_bits[129, 150] == negative, (hex(got_bits[0, 0]), hex(got_bits[129, 150]))
    finite_or_inf = ~torch.isnan(ref)
    assert torch.equal(got_bits[finite_or_inf], ref_bits[finite_or_inf])
    assert torch.isinf(got[name][1:128, :128]).any()
    proc = cli("verify", out, "--against", root, "--full", "--device", "cpu", "--json")
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["data_vs_source"]["ok"] and not checks["values"]["ok"], checks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_bits_agree_on_cpu_and_gpu(tiny, tmp_path, dtype):
    """The same NaN and Inf bits (and every other value) from the CPU and the GPU path."""
    root, _ = tiny
    name, scale = _weight(root)
    cols = Checkpoint.open(root).tensors[name].shape[1]
    for element, code in ((0, 0x7F), (1, 0xFF), (129 * cols + 150, 0x7F), (130 * cols, 0xFF)):
        write_at(root, name, element, bytes([code]))
    write_at(root, scale, 3, struct.pack("<f", 1e36))
    outs = {}
    for device in ("cpu", "cuda"):
        cli("dequant", root, tmp_path / device, "--dtype", dtype, "--device", device, "--quiet", "--allow-nonfinite",
            check=0)
        outs[device], _ = load_all(tmp_path / device)
    for n in outs["cpu"]:
        assert torch.equal(bits(outs["cpu"][n]), bits(outs["cuda"][n])), n
    assert torch.isnan(outs["cuda"][name]).sum() == 4 and torch.isinf(outs["cuda"][name]).any()


def test_nan_bits_are_set_once_an_asynchronous_backend_is_done():
    """A GPU returns before its bytes are there: the NaN bits are set when its fence is waited on."""
    from dsv3conv.finite import canonical_nan_after

    class Fence:
        waited = False

        def wait(self):
            out[:] = torch.tensor([0x7FFF, 0x3F80, 0x7FFF], dtype=torch.int16)  # the device's bytes arrive
            self.waited = True

    codes = torch.tensor([0x7F, 0x38, 0xFF], dtype=torch.uint8)
    out = torch.zeros(3, dtype=torch.int16)
    fence = canonical_nan_after(Fence(), [(codes.numpy(), memoryview(out.numpy()).cast("B"), "bfloat16")])
    assert out.tolist() == [0, 0, 0]
    fence.wait()
    assert [v & 0xFFFF for v in out.tolist()] == [0x7FC0, 0x3F80, 0xFFC0]
    now = torch.full((3,), 0x7FFF, dtype=torch.int16)
    assert canonical_nan_after(None, [(codes.numpy(), memoryview(now.numpy()).cast("B"), "bfloat16")]) is None
    assert [v & 0xFFFF for v in now.tolist()] == [0x7FC0, 0x7FFF, 0xFFC0]


def test_the_compiled_nan_scan_equals_the_reference():
    """Every alignment and length around the 8-byte words, each NaN code at each place; random ranges."""
    pytest.importorskip("numba")
    from dsv3conv.kernels.e4m3_nan_scan import _compiled, has_nan_code, reference_has_nan_code
    from dsv3conv.kernels.fp8_block_host import numba_kernel, numba_loaded

    assert numba_kernel() is not None and numba_loaded()  # loaded: `has_nan_code` takes the compiled scan
    assert _compiled() is not None, "numba is installed but the scan did not compile"
    base = np.full((160,), 0x7E, dtype=np.uint8)
    for start in range(8):
        for length in (64, 65, 71, 72, 80, 130):
            piece = base[start : start + length]
            assert not has_nan_code(piece)
            for at in range(length):
                for code in (0x7F, 0xFF):
                    damaged = piece.copy()
                    damaged[at] = code
                    assert has_nan_code(damaged[:]), (start, length, at, code)
                    view = base.copy()
                    view[start + at] = code
                    assert has_nan_code(view[start : start + length]), (start, length, at, code)
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        piece = torch.randint(0, 256, (int(torch.randint(64, 4000, (1,), generator=gen)),), generator=gen,
                              dtype=torch.uint8)
        piece[(piece & 0x7F) == 0x7F] = 0x7E if bool(torch.rand(1, generator=gen) < 0.5) else 0x7F
        assert has_nan_code(piece.numpy()) == reference_has_nan_code(piece.numpy())


@pytest.mark.parametrize(("dtype", "values", "first"), [
    ("F32", [1.0, -2.0, 0.5], "-2.0"), ("F32", [np.inf, 1.0], "inf"), ("BF16", [0.25, np.nan], "nan"),
    ("F16", [0.0, 1.0], "0.0"), ("F8_E8M0", None, "nan"),
], ids=["f32-negative", "f32-inf", "bf16-nan", "f16-zero", "e8m0-255"])
def test_copied_scale_held_to_the_rule_of_converted_scales(dtype, values, first) -> None:
    """A scale copied with its weight (`Copy(scale=True)`) is refused as a scale that converts is, in every
    scale dtype; the same bytes copied as a plain tensor pass unread."""
    if values is None:
        raw = np.array([127, 255], np.uint8)  # E8M0: 1.0, then NaN
    else:
        np_dtype = {"F32": np.float32, "F16": np.float16}.get(dtype)
        raw = (np.array(values, np_dtype) if np_dtype else
               torch.tensor(values, dtype=torch.bfloat16).view(torch.int16).numpy()).view(np.uint8)
    shape = (1, raw.size // {"F32": 4, "BF16": 2, "F16": 2, "F8_E8M0": 1}[dtype])
    info = TensorInfo("x.scale", "shard-2.safetensors", dtype, shape, 0, raw.size)
    with pytest.raises(Dsv3Error, match=rf"tensor `x.scale` in shard-2.safetensors: 1 scale value is not finite "
                                        rf"and positive \(first: {first}\)"):
        check_copy(TensorPlan("x.scale", dtype, shape, Copy(scale=True), (info,)), raw)
    check_copy(TensorPlan("x.scale", dtype, shape, Copy(), (info,)), raw)
