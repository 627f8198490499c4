"""MXFP4 dequant: the CPU backend's numpy kernel (`mxfp4_cpu`) and the Triton kernel against the plain-torch
reference.

The Triton checks run once in a child process under Triton's interpreter (see tests/conftest.py) and
compare float32 output bit for bit; bfloat16/float16 within one ulp (the interpreter's narrowing is not
round-to-nearest-even). On a CUDA GPU (`pytest -m gpu`), `test_gpu_*` compare every output dtype bit for bit.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.conftest import assert_within_ulp, collect_checks, interpreted_test, run_checks

# Packed shapes [rows, bytes]: 1 x 1, partial scale groups (7 and 257 bytes), V4-like expert rows.
SHAPES = [(1, 1), (3, 7), (129, 257), (64, 16), (5, 1000), (256, 3584 // 8)]
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INT = {2: torch.int16, 4: torch.int32}
_UINT = {2: np.uint16, 4: np.uint32}


def _random(rows: int, pcols: int, gen, lo: int = 100, hi: int = 140):
    packed = torch.randint(-128, 128, (rows, pcols), dtype=torch.int8, generator=gen)
    scale = torch.randint(lo, hi, (rows, -(-2 * pcols // 32)), dtype=torch.uint8, generator=gen)
    return packed, scale.view(torch.float8_e8m0fnu)


# ---------------------------------------------------------------- reference and CPU kernel (plain pytest)
def test_reference_known_values() -> None:
    from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4

    packed = torch.tensor([[0x21, 0x8F, 0x70]], dtype=torch.uint8)  # low nibble = even column
    scale = torch.tensor([[128]], dtype=torch.uint8)  # 2^1
    out = reference_dequant_mxfp4(packed, scale, torch.float32)
    assert out.tolist() == [[1.0, 2.0, -12.0, -0.0, 0.0, 12.0]], out.tolist()
    assert out[0, 3].item() == 0.0 and torch.signbit(out[0, 3]), "code 8 must decode to -0.0"


def cpu_dequant(packed: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype, out: torch.Tensor | None = None,
                ranges: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """`mxfp4_cpu.dequant_rows` (the CPU backend's kernel) on torch tensors, row ranges as the pool cuts them
    (default: the whole tensor in one), writing into `out` (a new tensor by default)."""
    from dsv3conv.kernels import mxfp4_cpu

    rows, cols = packed.shape[0], 2 * packed.shape[1]
    out = torch.empty((rows, cols), dtype=out_dtype) if out is None else out
    bits = out.view(_INT[out.element_size()]).numpy().view(_UINT[out.element_size()])
    for start, stop in ranges or [(0, rows)]:
        mxfp4_cpu.dequant_rows(packed.view(torch.uint8).numpy(), scale.view(torch.uint8).numpy(), bits,
                               str(out_dtype).removeprefix("torch."), start, stop)
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_cpu_kernel_matches_reference(shape, out_dtype) -> None:
    from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4

    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    packed, scale = _random(*shape, gen)
    assert_within_ulp(cpu_dequant(packed, scale, out_dtype), reference_dequant_mxfp4(packed, scale, out_dtype),
                      f"cpu {shape} -> {out_dtype}")


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_cpu_kernel_every_code_and_scale(out_dtype) -> None:
    """All 256 bytes under all 255 usable scales (incl. 0 -> 2^-127, float16 overflow and underflow)."""
    from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4

    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(255, 1)  # [255, 256]
    scale = torch.arange(255, dtype=torch.int32).to(torch.uint8)[:, None].repeat(1, 16)
    ref = reference_dequant_mxfp4(packed, scale, out_dtype)
    assert_within_ulp(cpu_dequant(packed, scale, out_dtype), ref, f"exhaustive -> {out_dtype}")
    if out_dtype == torch.float32:
        exact = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        assert torch.equal(ref[127, 0:16:2][:8], exact), "scale 127 (1.0) must give the E2M1 magnitudes"


def test_cpu_kernel_row_ranges_and_chunks(monkeypatch) -> None:
    """Row ranges (the pool's tasks), each cut into several chunks, write their rows of `out` and nothing else."""
    from dsv3conv.kernels import mxfp4_cpu
    from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4

    monkeypatch.setattr(mxfp4_cpu, "_CHUNK_BYTES", 40)  # several row chunks per range
    gen = torch.Generator().manual_seed(7)
    packed, scale = _random(37, 23, gen)
    out = torch.full((37, 46), float("nan"), dtype=torch.bfloat16)
    cpu_dequant(packed, scale, torch.bfloat16, out, ranges=[(0, 5), (5, 30)])
    assert bool(out[30:].isnan().all()), "rows outside the ranges were written"
    cpu_dequant(packed, scale, torch.bfloat16, out, ranges=[(30, 37)])
    assert_within_ulp(out, reference_dequant_mxfp4(packed, scale, torch.bfloat16), "chunked")


@pytest.mark.parametrize("fn", ["reference", "cpu"])
def test_nan_scale_refused(fn) -> None:
    from dsv3conv.kernels import mxfp4_dequant as m

    scale = torch.full((2, 1), 127, dtype=torch.uint8)
    scale[1, 0] = 255
    dequant = m.reference_dequant_mxfp4 if fn == "reference" else cpu_dequant
    with pytest.raises(ValueError, match=r"scale\[1, 0\] is the E8M0 NaN code 255"):
        dequant(torch.zeros((2, 8), dtype=torch.int8), scale, torch.bfloat16)
    assert m.nan_scale(scale) == (1, 0) and m.nan_scale(scale[:1]) is None


@pytest.mark.parametrize(
    ("packed", "scale", "needle"),
    [
        (torch.zeros((2, 16), dtype=torch.float32), torch.zeros((2, 1), dtype=torch.uint8), "int8 or uint8"),
        (torch.zeros((2, 16), dtype=torch.int8), torch.zeros((2, 2), dtype=torch.uint8), "expected (2, 1)"),
        (torch.zeros((2, 16), dtype=torch.int8), torch.zeros((2, 1)), "float8_e8m0fnu or uint8"),
        (torch.zeros(16, dtype=torch.int8), torch.zeros((1,), dtype=torch.uint8), "2-D"),
    ],
)
def test_bad_arguments(packed, scale, needle) -> None:
    """The checks the reference, the repack and the Triton launcher share (`check_args`)."""
    from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4

    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        reference_dequant_mxfp4(packed, scale)


# ---------------------------------------------------------------- GPU: bit for bit (skipped without CUDA)
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(2048, 3584), (4096, 1024)])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_gpu_kernel_bit_exact(shape, out_dtype) -> None:
    from dsv3conv.kernels.mxfp4_dequant import dequant_mxfp4, reference_dequant_mxfp4

    gen = torch.Generator().manual_seed(11)
    packed, scale = _random(*shape, gen, lo=0, hi=255)
    got = dequant_mxfp4(packed.cuda(), scale.cuda(), out_dtype).cpu()
    assert_within_ulp(got, reference_dequant_mxfp4(packed, scale, out_dtype), f"gpu {shape} -> {out_dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_gpu_kernel_every_code_and_scale(out_dtype) -> None:
    from dsv3conv.kernels.mxfp4_dequant import dequant_mxfp4, reference_dequant_mxfp4

    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(255, 1)
    scale = torch.arange(255, dtype=torch.int32).to(torch.uint8)[:, None].repeat(1, 16)
    got = dequant_mxfp4(packed.cuda(), scale.cuda(), out_dtype).cpu()
    assert_within_ulp(got, reference_dequant_mxfp4(packed, scale, out_dtype), f"gpu exhaustive -> {out_dtype}")


# ---------------------------------------------------------------- Triton interpreter (child process only)
def check_shapes_float32() -> None:
    from dsv3conv.kernels.mxfp4_dequant import dequant_mxfp4, reference_dequant_mxfp4

    gen = torch.Generator().manual_seed(3)
    for shape in SHAPES:
        packed, scale = _random(*shape, gen, lo=0, hi=255)
        assert_within_ulp(dequant_mxfp4(packed, scale, torch.float32),
                  reference_dequant_mxfp4(packed, scale, torch.float32), f"interp {shape} -> float32")


def check_every_code_and_scale() -> None:
    from dsv3conv.kernels.mxfp4_dequant import dequant_mxfp4, reference_dequant_mxfp4

    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(255, 1)
    scale = torch.arange(255, dtype=torch.int32).to(torch.uint8)[:, None].repeat(1, 16)
    assert_within_ulp(dequant_mxfp4(packed, scale, torch.float32),
              reference_dequant_mxfp4(packed, scale, torch.float32), "interp exhaustive -> float32")


def check_16bit_outputs_and_out_argument() -> None:
    from dsv3conv.kernels.mxfp4_dequant import dequant_mxfp4, reference_dequant_mxfp4

    gen = torch.Generator().manual_seed(5)
    packed, scale = _random(129, 257, gen)
    for out_dtype in (torch.bfloat16, torch.float16):
        wide = torch.full((129, 600), float("nan"), dtype=out_dtype)
        view = wide[:, 50:564]
        got = dequant_mxfp4(packed, scale, out_dtype, out=view)
        assert got.data_ptr() == view.data_ptr(), "dequant_mxfp4 did not return out"
        assert_within_ulp(view, reference_dequant_mxfp4(packed, scale, out_dtype), f"interp -> {out_dtype}", limit=1)
        rest = torch.cat([wide[:, :50], wide[:, 564:]], dim=1)
        assert bool(rest.isnan().all()), f"{int((~rest.isnan()).sum())} values outside out were written"


CHECKS = collect_checks(globals())
test_interpreted = interpreted_test(CHECKS)


if __name__ == "__main__":
    run_checks(globals(), sys.argv[1])
