"""Triton block-quant kernel vs the plain-torch reference, run on the CPU with Triton's interpreter.

As in tests/test_kernel_triton.py, TRITON_INTERPRET=1 must be set before any `@triton.jit` function is
created, so every check runs once in a child process (this file run as a script) and each test asserts on
that child's result for one check.

The interpreter's own float32 -> float8e4nv cast is not round-to-nearest-even (it rounds half up on the
first dropped bit, drops the carry of a full mantissa and truncates subnormals: measured up to 8 codes
off), so there the kernel's integer encoder (`encode_bits=True`, the launcher's default in the interpreter)
is compared with the reference bit for bit, and the native-cast path only for its scales. Both paths are
compared bit for bit on a GPU by tests/test_gpu_kernels.py. Scales are rounded with integer arithmetic in
the kernel, so they are exact here too.
"""

from __future__ import annotations

import math
import sys

from tests.conftest import (
    assert_value_errors,
    assert_within_ulp,
    collect_checks,
    interpreted_test,
    run_checks,
)

SHAPES = [(1, 1), (129, 257), (128, 128), (300, 1000), (576, 300)]


# ---------------------------------------------------------------- checks (run in the child process only)


def _configs():
    import torch

    return [("float", torch.float32), ("float", torch.bfloat16), ("float", torch.float16),
            ("ue8m0", torch.float32), ("ue8m0", torch.float8_e8m0fnu)]


def _weights(rows: int, cols: int, dtype, gen):
    """Rows of very different magnitudes, an all-zero block, exact zeros and tiny values."""
    import torch

    w = torch.randn((rows, cols), generator=gen) * torch.exp2(torch.randint(-20, 4, (rows, 1), generator=gen).float())
    if rows > 128 and cols > 128:
        w[:128, 128:256] = 0.0
    w[0, : min(cols, 7)] = torch.tensor([0.0, -0.0, 1e-30, -3e-8, 2.0**-20, 448.0, -1.0])[: min(cols, 7)]
    return w.to(dtype)


def check_encoder_exhaustive() -> None:
    """The integer e4m3 encoder equals torch's RNE cast: every finite bfloat16 in [-448, 448], all ties
    between neighbouring e4m3 values (and their float32 neighbours), random float32 down to the subnormals."""
    import torch
    import triton
    import triton.language as tl

    global _f32_to_e4m3_bits  # a module global: the interpreter resolves names in a jit function's globals
    from dsv3conv.kernels.fp8_block_quant import _f32_to_e4m3_bits

    @triton.jit
    def probe(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, _f32_to_e4m3_bits(x), mask=offs < n)

    gen = torch.Generator().manual_seed(0)
    bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf16 = bf16[bf16.isfinite() & (bf16.abs() <= 448)]
    codes = torch.arange(0, 0x7F, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    ties = (codes[1:] + codes[:-1]) / 2  # exact in float32
    up, down = ties.view(torch.int32) + 1, ties.view(torch.int32) - 1
    near = torch.cat([ties, up.view(torch.float32), down.view(torch.float32)])
    rand = torch.cat([torch.rand(100_000, generator=gen) * 448, torch.rand(50_000, generator=gen) * 2.0**-6,
                      torch.exp2(torch.rand(50_000, generator=gen) * -40)])
    x = torch.cat([bf16, near, -near, rand, -rand, torch.tensor([0.0, -0.0, 1e-45, -1e-40, 448.0, -448.0])])
    y = torch.empty(x.numel(), dtype=torch.uint8)
    probe[(triton.cdiv(x.numel(), 8192),)](x, y, x.numel(), BLOCK=8192)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    bad = (y != want).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} of {x.numel()} values encoded differently, e.g. {x[bad[0]].item()!r} -> {int(y[bad[0]]):#04x}, "
        f"torch {int(want[bad[0]]):#04x}"
    )


def _check_shapes(encode_bits: bool | None) -> None:
    import torch

    from dsv3conv.kernels.fp8_block_quant import quant, reference_quant

    gen = torch.Generator().manual_seed(1)
    for rows, cols in SHAPES:
        for src_dtype in (torch.bfloat16, torch.float16, torch.float32):
            w = _weights(rows, cols, src_dtype, gen)
            configs = _configs() if src_dtype == torch.bfloat16 else _configs()[:1] + _configs()[3:4]
            for fmt, sdt in configs:
                q_ref, s_ref = reference_quant(w, fmt, sdt)
                q, s = quant(w, fmt, sdt, encode_bits=encode_bits)
                label = f"[{rows},{cols}] {src_dtype} {fmt} {sdt} encode_bits={encode_bits}"
                assert_within_ulp(s, s_ref, label + " scale")
                assert_within_ulp(q, q_ref, label + " q")


def check_shapes() -> None:
    """encode_bits=None: in the interpreter the launcher picks the integer encoder (as below sm89)."""
    import torch

    from dsv3conv.kernels.fp8_block_quant import resolve_encode_bits

    assert resolve_encode_bits(torch.device("cpu"), None) is True
    _check_shapes(None)


def check_576x7168() -> None:
    import torch

    from dsv3conv.kernels.fp8_block_quant import quant, reference_quant

    w = _weights(576, 7168, torch.bfloat16, torch.Generator().manual_seed(2))
    for fmt, sdt in (("ue8m0", torch.float8_e8m0fnu),):
        q_ref, s_ref = reference_quant(w, fmt, sdt)
        q, s = quant(w, fmt, sdt)
        assert_within_ulp(s, s_ref, f"[576,7168] {fmt} scale")
        assert_within_ulp(q, q_ref, f"[576,7168] {fmt} q")


def check_native_cast_scales() -> None:
    """The native-cast path runs in the interpreter and its scales are exact (its e4m3 bytes: see the top)."""
    import torch

    from dsv3conv.kernels.fp8_block_quant import quant, reference_quant

    gen = torch.Generator().manual_seed(3)
    for rows, cols in SHAPES:
        w = _weights(rows, cols, torch.bfloat16, gen)
        for fmt, sdt in _configs():
            _, s_ref = reference_quant(w, fmt, sdt)
            q, s = quant(w, fmt, sdt, encode_bits=False)
            assert_within_ulp(s, s_ref, f"[{rows},{cols}] {fmt} {sdt} native-cast scale")
            assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == (rows, cols)


def check_special_blocks() -> None:
    """All-zero block: scale 1 and q 0 (so dequant gives 0); tiny values: the scale dtype's smallest normal;
    NaN/Inf: an infinite scale (e8m0: NaN); float16 overflow: inf."""
    import torch

    from dsv3conv.kernels.fp8_block_quant import quant, reference_quant

    w = torch.zeros((130, 260), dtype=torch.bfloat16)
    w[0:128, 128:256] = 1e-37  # below 448 * 2^-126: every scale dtype's floor applies
    w[128:, 0] = float("nan")
    w[128:, 128] = float("-inf")
    w[128:, 256] = 1e30
    for fmt, sdt in _configs():
        q, s = quant(w, fmt, sdt)
        q_ref, s_ref = reference_quant(w, fmt, sdt)
        assert_within_ulp(s, s_ref, f"special {fmt} {sdt} scale")
        assert_within_ulp(q[:128], q_ref[:128], f"special {fmt} {sdt} q (finite blocks)")
        s32 = s.float()
        assert s32[0, 0].item() == 1.0 and s32[0, 2].item() == 1.0, f"{sdt}: zero blocks scale {s32[0].tolist()}"
        assert bool((q[:128, :128].view(torch.uint8) == 0).all()), "zero block: q is not all +0"
        tiny = 2.0**-14 if sdt == torch.float16 else 2.0**-126
        assert s32[0, 1].item() == tiny, f"{sdt}: tiny block scale {s32[0, 1].item()!r}, expected {tiny!r}"
        assert not bool(torch.isfinite(s32[1, :2]).any()), f"{sdt}: NaN/Inf blocks got finite scales {s32[1].tolist()}"
        big = s32[1, 2].item()
        assert (big == float("inf") or math.isnan(big)) if sdt == torch.float16 else big > 0, f"{sdt}: 1e30 block {big}"


def check_out_arguments_and_validation() -> None:
    import torch

    from dsv3conv.kernels.fp8_block_quant import quant, reference_quant

    w = _weights(200, 300, torch.bfloat16, torch.Generator().manual_seed(4))
    q_out = torch.full((200, 300), 0xAA, dtype=torch.uint8)
    s_out = torch.full((2, 3), float("nan"))
    q, s = quant(w, out=q_out, scale_out=s_out)
    assert q.data_ptr() == q_out.data_ptr() and s.data_ptr() == s_out.data_ptr(), "out tensors not used"
    q_ref, s_ref = reference_quant(w)
    assert_within_ulp(q, q_ref, "out= q")
    assert_within_ulp(s, s_ref, "out= scale")
    cases = [
        (lambda: quant(w.to(torch.float8_e4m3fn)), "bfloat16"),
        (lambda: quant(w[0]), "(300,)"),
        (lambda: quant(w, "float", torch.float8_e8m0fnu), "ue8m0"),
        (lambda: quant(w, "e8m0"), "scale_fmt"),
        (lambda: quant(w, scale_dtype=torch.float64), "scale_dtype"),
        (lambda: quant(w, out=torch.empty((200, 301), dtype=torch.uint8)), "(200, 301)"),
        (lambda: quant(w, scale_out=torch.empty((2, 2))), "(2, 2)"),
    ]
    assert_value_errors(cases)
    q, s = quant(torch.zeros((0, 7), dtype=torch.bfloat16))
    assert tuple(q.shape) == (0, 7) and tuple(s.shape) == (0, 1), f"empty: {tuple(q.shape)} {tuple(s.shape)}"


CHECKS = collect_checks(globals())
test_interpreted = interpreted_test(CHECKS)


def test_reference_by_hand() -> None:
    """The reference needs only torch: a 129 x 257 weight with known block maxima."""
    import torch

    from dsv3conv.kernels.fp8_block_quant import reference_quant

    w = torch.ones((129, 257), dtype=torch.bfloat16)
    w[0, 0], w[128, 256] = 4.48, -896.0
    w[128, 128:256] = 0.0
    q, s = reference_quant(w)
    assert s[0, 0].item() == (torch.tensor(4.48, dtype=torch.bfloat16).float() / 448).item()
    assert s[1, 2].item() == 2.0 and s[1, 1].item() == 1.0 and s[0, 1].item() == (torch.tensor(1.0) / 448).item()
    assert q[128, 256].float().item() == -448.0 and q[128, 200].float().item() == 0.0
    assert q[5, 200].float().item() == 448.0  # 1 / (1/448)
    q, s = reference_quant(w, "ue8m0")
    assert s[0, 1].item() == 2.0**-8 and s[1, 2].item() == 2.0 and q[5, 200].float().item() == 256.0


if __name__ == "__main__":
    run_checks(globals(), sys.argv[1])
