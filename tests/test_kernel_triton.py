"""Triton block-dequant kernel vs the plain-torch reference, run on the CPU with Triton's interpreter.

TRITON_INTERPRET=1 must be set before any `@triton.jit` function is created, and another test in the
same pytest process may already have imported the kernel module without it. So all checks run once,
in a child process started with that variable (this file run as a script), and each test here
asserts on that child's result for one check.

The interpreter's float32 -> bfloat16/float16 conversion is not round-to-nearest-even, so float32
output is compared exactly and 16-bit outputs within one ulp (bit exactness of those is checked on
a GPU by tests/test_gpu_kernels.py).
"""

from __future__ import annotations

import sys

from tests.conftest import (
    assert_value_errors,
    assert_within_ulp,
    collect_checks,
    interpreted_test,
    random_e4m3,
    run_checks,
)

SHAPES = [(1, 1), (129, 257), (128, 128), (300, 1000), (576, 300)]


# ---------------------------------------------------------------- checks (run in the child process only)


def _random_scale(rows: int, cols: int, dtype, gen):
    import torch

    shape = ((rows + 127) // 128, (cols + 127) // 128)
    if dtype == torch.float8_e8m0fnu:
        exps = torch.randint(-20, 6, shape, generator=gen).to(torch.float32)
        return torch.exp2(exps).to(torch.float8_e8m0fnu)
    return (torch.rand(shape, generator=gen) * 3e-3 + 1e-4).to(dtype)


def _compare(out, ref, label: str) -> None:
    """float32: bit-exact. 16-bit: within one ulp (the interpreter's rounding is not RNE)."""
    assert_within_ulp(out, ref, label, limit=0 if out.element_size() == 4 else 1)


def check_decoder_exhaustive() -> None:
    """All 256 e4m3 codes through both load paths map exactly like torch's float8_e4m3fn -> float32."""
    import torch

    from dsv3conv.kernels.fp8_block_dequant import dequant

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(2, 128)
    ref = codes.view(torch.float8_e4m3fn).to(torch.float32)
    one = torch.ones((1, 1), dtype=torch.float32)
    for decode_bits in (True, False):
        out = dequant(codes, one, torch.float32, decode_bits=decode_bits)
        nan_out, nan_ref = out.isnan(), ref.isnan()
        if not decode_bits:
            # The interpreter emulates the native FP8 type without NaN (0x7F -> 480); the GPU's
            # conversion gives NaN, which tests/test_gpu_kernels.py checks. Here: the 254 other codes.
            nan_out = nan_out | nan_ref
        assert torch.equal(nan_out, nan_ref), (
            f"decode_bits={decode_bits}: NaN at codes {nan_out.flatten().nonzero().flatten().tolist()}, "
            f"expected {nan_ref.flatten().nonzero().flatten().tolist()}"
        )
        same = out.view(torch.int32) == ref.view(torch.int32)
        bad = (~same & ~nan_ref).flatten().nonzero().flatten().tolist()
        assert not bad, (
            f"decode_bits={decode_bits}: {len(bad)} codes wrong, e.g. code {bad[0]:#04x} -> "
            f"{out.flatten()[bad[0]].item()!r}, expected {ref.flatten()[bad[0]].item()!r}"
        )


def check_e8m0_scales_exhaustive() -> None:
    """All 256 e8m0 scale codes (incl. 0 -> 2^-127 and 255 -> NaN) decode like torch's conversion."""
    import torch

    from dsv3conv.kernels.fp8_block_dequant import dequant, reference_dequant

    gen = torch.Generator().manual_seed(1)
    cols = 255 * 128 + 1
    w = random_e4m3(1, cols, gen)
    scale = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e8m0fnu).reshape(1, 256)
    ref = reference_dequant(w, scale, torch.float32)
    for decode_bits in (True, False):
        out = dequant(w, scale, torch.float32, decode_bits=decode_bits)
        assert torch.equal(out.isnan(), ref.isnan()), f"decode_bits={decode_bits}: NaN positions differ"
        keep = ~ref.isnan()
        _compare(out[keep], ref[keep], f"e8m0 exhaustive decode_bits={decode_bits}")


def check_16bit_scale_decoders_exhaustive() -> None:
    """All 65536 bfloat16 and float16 bit patterns decode to torch's float32 (NaN equal NaN)."""
    import torch
    import triton
    import triton.language as tl
    # A module global: the interpreter resolves names in a jit function's globals, not its closure.
    global _scale_to_f32
    from dsv3conv.kernels.fp8_block_dequant import _scale_to_f32

    @triton.jit
    def probe(x_ptr, y_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, _scale_to_f32(x, KIND), mask=offs < n)

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for kind, dtype in ((1, torch.bfloat16), (2, torch.float16)):
        out = torch.empty(bits.numel(), dtype=torch.float32)
        probe[(bits.numel() // 4096,)](bits, out, bits.numel(), KIND=kind, BLOCK=4096)
        ref = bits.view(dtype).to(torch.float32)
        assert torch.equal(out.isnan(), ref.isnan()), f"{dtype}: NaN positions differ"
        keep = ~ref.isnan()
        bad = (out.view(torch.int32) != ref.view(torch.int32)) & keep
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise AssertionError(
                f"{dtype}: {int(bad.sum())} of 65536 codes wrong, e.g. bits {int(bits[i]) & 0xFFFF:#06x} -> "
                f"{out[i].item()!r}, expected {ref[i].item()!r}"
            )


def _check_shapes(decode_bits: bool) -> None:
    import torch

    from dsv3conv.kernels.fp8_block_dequant import dequant, reference_dequant

    gen = torch.Generator().manual_seed(2 + int(decode_bits))
    scale_dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu)
    for rows, cols in SHAPES:
        w = random_e4m3(rows, cols, gen)
        # uint8 and float8 weights are both accepted; alternate them.
        w_in = w if (rows + cols) % 2 else w.view(torch.float8_e4m3fn)
        for scale_dtype in scale_dtypes:
            scale = _random_scale(rows, cols, scale_dtype, gen)
            out = dequant(w_in, scale, torch.float32, decode_bits=decode_bits)
            _compare(
                out,
                reference_dequant(w, scale, torch.float32),
                f"[{rows},{cols}] scale {scale_dtype} -> float32 decode_bits={decode_bits}",
            )
        scale = _random_scale(rows, cols, torch.float32, gen) * 1e3  # some float16 overflow to inf
        for out_dtype in (torch.bfloat16, torch.float16):
            out = dequant(w_in, scale, out_dtype, decode_bits=decode_bits)
            _compare(
                out,
                reference_dequant(w, scale, out_dtype),
                f"[{rows},{cols}] scale float32 -> {out_dtype} decode_bits={decode_bits}",
            )


def check_shapes_native() -> None:
    _check_shapes(decode_bits=False)


def check_shapes_decode_bits() -> None:
    _check_shapes(decode_bits=True)


def check_out_argument_strided() -> None:
    """`out=` is written in place, also when it is a column slice of a wider tensor (row stride != cols)."""
    import torch

    from dsv3conv.kernels.fp8_block_dequant import dequant, reference_dequant

    gen = torch.Generator().manual_seed(4)
    w = random_e4m3(200, 300, gen)
    scale = _random_scale(200, 300, torch.float32, gen)
    wide = torch.full((200, 416), float("nan"), dtype=torch.float32)
    view = wide[:, 16:316]
    got = dequant(w, scale, torch.float32, out=view)
    assert got.data_ptr() == view.data_ptr(), "dequant did not return the out tensor"
    _compare(view, reference_dequant(w, scale, torch.float32), "strided out")
    untouched = torch.cat([wide[:, :16], wide[:, 316:]], dim=1)
    assert bool(untouched.isnan().all()), (
        f"{int((~untouched.isnan()).sum())} elements outside out were written"
    )


def _check_segments(out_dtype, decode_bits: bool) -> None:
    import torch

    from dsv3conv.kernels.fp8_block_dequant import dequant_segments, reference_dequant

    gen = torch.Generator().manual_seed(5)
    esize = torch.empty((), dtype=out_dtype).element_size()
    shapes = [(129, 257), (128, 128), (1, 1), (300, 1000), (64, 256), (256, 64), (576, 300), (17, 3)]
    weights, scales, segments = [], [], []
    src_off = dst_off = scale_off = 0
    for k, (rows, cols) in enumerate(shapes):
        # Odd gaps put some segments off 16-byte alignment: both the aligned and the generic launch run.
        src_off += 3 if k % 3 == 1 else 0
        dst_off += esize * (5 if k % 3 == 2 else 0)
        w = random_e4m3(rows, cols, gen)
        s = _random_scale(rows, cols, torch.float32, gen)
        segments.append((src_off, dst_off, scale_off, rows, cols))
        weights.append(w)
        scales.append(s)
        src_off += rows * cols
        dst_off += rows * cols * esize
        scale_off += s.numel()
    src = torch.zeros(src_off + 7, dtype=torch.uint8)
    scale_buf = torch.zeros(scale_off + 3, dtype=torch.float32)
    for (so, _, co, rows, cols), w, s in zip(segments, weights, scales):
        src[so : so + rows * cols] = w.flatten()
        scale_buf[co : co + s.numel()] = s.flatten()
    dst = torch.full(
        (dst_off + 2 * esize,), 0xFF, dtype=torch.uint8
    )  # all-ones bytes are NaN in every out dtype
    dequant_segments(src, dst, scale_buf, segments, out_dtype, decode_bits=decode_bits)

    written = torch.zeros(dst.numel(), dtype=torch.bool)
    for (_, do, _, rows, cols), w, s in zip(segments, weights, scales):
        got = dst[do : do + rows * cols * esize].view(out_dtype).reshape(rows, cols)
        label = f"segment [{rows},{cols}] at dst byte {do} -> {out_dtype} decode_bits={decode_bits}"
        assert not bool(got.isnan().any()), f"{label}: {int(got.isnan().sum())} elements left unwritten (NaN)"
        _compare(got, reference_dequant(w, s, out_dtype), label)
        written[do : do + rows * cols * esize] = True
    gaps = dst[~written]
    assert bool((gaps == 0xFF).all()), f"{int((gaps != 0xFF).sum())} bytes outside the segments were written"


def check_segments_float32_native() -> None:
    import torch

    _check_segments(torch.float32, decode_bits=False)


def check_segments_float32_decode_bits() -> None:
    import torch

    _check_segments(torch.float32, decode_bits=True)


def check_segments_bfloat16() -> None:
    import torch

    _check_segments(torch.bfloat16, decode_bits=False)
    _check_segments(torch.bfloat16, decode_bits=True)


def check_segments_float16() -> None:
    import torch

    _check_segments(torch.float16, decode_bits=None)


def check_validation_errors() -> None:
    """Bad inputs raise ValueError naming the shapes, never an assert or a kernel fault."""
    import torch

    from dsv3conv.kernels.fp8_block_dequant import dequant, dequant_segments, resolve_decode_bits

    w = torch.zeros((576, 300), dtype=torch.uint8)
    src, dst, scales = torch.zeros(100, dtype=torch.uint8), torch.zeros(400, dtype=torch.uint8), torch.ones(4)
    bf16 = torch.bfloat16
    cases = [
        (lambda: dequant(w, torch.ones((4, 3))), "(4, 3)"),
        (lambda: dequant(w.float(), torch.ones((5, 3))), "float32"),
        (lambda: dequant(w[0], torch.ones((1, 3))), "(300,)"),
        (lambda: dequant(w, torch.ones((5, 3)), torch.int8), "out_dtype"),
        (lambda: dequant(w, torch.ones((5, 3)), out=torch.empty((576, 301))), "(576, 301)"),
        (lambda: dequant(w, torch.ones((5, 3), dtype=torch.float64)), "float64"),
        (lambda: dequant(w, torch.ones((5, 3), device="meta")), "weight on cpu, scale_inv on meta"),
        (lambda: dequant_segments(src, dst, scales, [(0, 0, 0, 10, 10), (1, 200, 1, 10, 10)], bf16), "segment 1"),
        (lambda: dequant_segments(src, dst, scales, [(0, 3, 0, 10, 10)], bf16), "multiple of 2"),
        (lambda: dequant_segments(src, dst, scales, [(0, 0, 4, 10, 10)], bf16), "scales"),
        (lambda: dequant_segments(src, dst.float(), scales, [(0, 0, 0, 10, 10)], bf16), "dst"),
    ]
    assert_value_errors(cases)
    assert resolve_decode_bits(torch.device("cpu"), None) is False, "auto decode on CPU should load natively"
    assert resolve_decode_bits(torch.device("cpu"), True) is True


def check_empty() -> None:
    import torch

    from dsv3conv.kernels.fp8_block_dequant import dequant, dequant_segments

    out = dequant(torch.zeros((0, 7), dtype=torch.uint8), torch.ones((0, 1)))
    assert tuple(out.shape) == (0, 7), f"empty dequant shape {tuple(out.shape)}"
    dst = torch.full((8,), 0xAB, dtype=torch.uint8)
    dequant_segments(torch.zeros(4, dtype=torch.uint8), dst, torch.ones(1), [], torch.bfloat16)
    dequant_segments(torch.zeros(4, dtype=torch.uint8), dst, torch.ones(1), [(0, 0, 0, 0, 5)], torch.bfloat16)
    assert bool((dst == 0xAB).all()), "empty segments wrote to dst"


CHECKS = collect_checks(globals())
test_interpreted = interpreted_test(CHECKS)


def test_reference_partial_blocks() -> None:
    """The reference needs only torch; it handles partial edge blocks (here 129 x 257)."""
    import torch

    from dsv3conv.kernels.fp8_block_dequant import reference_dequant

    w = torch.full((129, 257), 0x38, dtype=torch.uint8)  # e4m3 0x38 == 1.0
    scale = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    out = reference_dequant(w, scale, torch.float32)
    assert out[0, 0].item() == 1.0 and out[0, 256].item() == 4.0 and out[128, 128].item() == 16.0, (
        f"corners {out[0, 0].item()}, {out[0, 256].item()}, {out[128, 128].item()}"
    )


if __name__ == "__main__":
    run_checks(globals(), sys.argv[1])
