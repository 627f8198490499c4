"""The Triton kernels on a CUDA GPU, bit for bit against their plain-torch references.

Dequant: every e4m3 code and every 16-bit / e8m0 scale code, both decode paths, every output and scale
dtype on awkward shapes, the FP8 shapes of DeepSeek-V3, the reference computed on the CPU too, NaN inputs,
batched segments (misaligned ones, and a batch past 2 GiB). Quant: both e4m3 encoders on every finite
bfloat16 in [-448, 448] and every rounding tie, special blocks (zero, tiny, NaN, Inf, float16 overflow),
awkward and DeepSeek-V3 shapes in every scale format. Skipped where no CUDA GPU exists (`pytest -m gpu`).
The CPU interpreter runs the same kernels in tests/test_kernel_triton.py and test_kernel_quant_triton.py,
where 16-bit outputs cannot be compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from dsv3conv.kernels.fp8_block_dequant import dequant, dequant_segments, reference_dequant
from dsv3conv.kernels.fp8_block_quant import quant, reference_quant, resolve_encode_bits
from tests.conftest import random_e4m3 as random_e4m3_bytes

pytestmark = pytest.mark.gpu

DSV3_SHAPES = [
    (7168, 18432), (18432, 7168), (2048, 7168), (7168, 2048), (576, 7168),
    (24576, 1536), (32768, 512), (7168, 16384), (1536, 7168),
]  # fmt: skip
AWKWARD_SHAPES = [(1, 1), (129, 257), (128, 128), (300, 1000), (576, 300), (127, 129), (1, 7168), (7168, 1)]
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu)
QUANT_CONFIGS = [("float", torch.float32), ("float", torch.bfloat16), ("float", torch.float16),
                 ("ue8m0", torch.float32), ("ue8m0", torch.float8_e8m0fnu)]
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    return torch.device("cuda")


def short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float8_e8m0fnu", "e8m0")


def random_e4m3(rows: int, cols: int, device, gen, kind: str = "bytes") -> torch.Tensor:
    """Random e4m3 as raw bytes: uniform bytes with NaN codes replaced, or a clamped randn cast."""
    if kind == "bytes":
        return random_e4m3_bytes(rows, cols, gen, device)
    x = torch.randn((rows, cols), device=device, generator=gen) * 64
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)


def random_scale(rows: int, cols: int, dtype: torch.dtype, device, gen) -> torch.Tensor:
    shape = ((rows + 127) // 128, (cols + 127) // 128)
    if dtype == torch.float8_e8m0fnu:
        return torch.exp2(torch.randint(-24, 8, shape, device=device, generator=gen).to(torch.float32)).to(dtype)
    # A wide range: products overflow float16 and underflow into subnormals in places.
    return torch.exp2(torch.rand(shape, device=device, generator=gen) * 36 - 24).to(dtype)


def differing(got: torch.Tensor, want: torch.Tensor) -> int:
    """Elements whose bits differ (NaN equals NaN whatever its payload); every element if shape or dtype differ."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return max(want.numel(), 1)
    got, want = got.cpu(), want.cpu()
    iv = _INT_VIEW[want.dtype]
    both_nan = got.isnan() & want.isnan()
    return int(((got.view(iv) != want.view(iv)) & ~both_nan).sum())


def bytes_differing(got: torch.Tensor, want: torch.Tensor) -> int:
    if got.shape != want.shape or got.dtype != want.dtype:
        return max(want.numel(), 1)
    return int((got.contiguous().view(torch.uint8) != want.contiguous().view(torch.uint8)).sum())


def assert_none_failed(failures: list[str], checked: int) -> None:
    assert not failures, f"{len(failures)} of {checked} cases differ:\n" + "\n".join(failures[:40])


# ---------------------------------------------------------------------------------------------- dequant
@pytest.mark.parametrize("decode_bits", [False, True])
def test_dequant_every_e4m3_code(cuda, decode_bits):
    """All 256 codes, scale 1, float32 out: torch's CPU conversion bit for bit, NaN at 0x7F and 0xFF."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(2, 128)
    want = codes.view(torch.float8_e4m3fn).to(torch.float32)
    got = dequant(codes.to(cuda), torch.ones((1, 1), device=cuda), torch.float32, decode_bits=decode_bits)
    assert (got.cpu().isnan() == want.isnan()).all()
    assert differing(got, want) == 0, f"{differing(got, want)} of 256 codes differ"


@pytest.mark.parametrize("decode_bits", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float8_e8m0fnu], ids=short)
def test_dequant_every_scale_code(cuda, scale_dtype, decode_bits):
    """Weight 1.0 under every scale code: float32 out equals torch's conversion of the scale."""
    if scale_dtype == torch.float8_e8m0fnu:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(scale_dtype)
    else:
        codes = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(scale_dtype)
    want = codes.to(torch.float32)
    w = torch.full((1, 128 * (codes.numel() - 1) + 1), 0x38, dtype=torch.uint8, device=cuda)  # e4m3 0x38 == 1.0
    got = dequant(w, codes.reshape(1, -1).to(cuda), torch.float32, decode_bits=decode_bits)[0, ::128]
    assert (got.cpu().isnan() == want.isnan()).all()
    assert differing(got, want) == 0, f"{differing(got, want)} of {codes.numel()} scale codes differ"


def _dequant_cases(cuda, shapes, scale_dtypes, out_dtypes, seed: int) -> tuple[list[str], int]:
    gen = torch.Generator(device=cuda).manual_seed(seed)
    failures, checked = [], 0
    for rows, cols in shapes:
        for decode_bits in (False, True):
            w = random_e4m3(rows, cols, cuda, gen, "bytes" if decode_bits else "randn")
            for scale_dtype in scale_dtypes:
                for out_dtype in out_dtypes:
                    s = random_scale(rows, cols, scale_dtype, cuda, gen)
                    w_in = w.view(torch.float8_e4m3fn) if (rows + cols) % 2 else w  # raw bytes or e4m3 alike
                    bad = differing(dequant(w_in, s, out_dtype, decode_bits=decode_bits),
                                    reference_dequant(w, s, out_dtype))
                    checked += 1
                    if bad:
                        failures.append(f"[{rows},{cols}] decode={int(decode_bits)} scale={short(scale_dtype)} "
                                        f"out={short(out_dtype)}: {bad}/{rows * cols} elements differ")
        torch.cuda.empty_cache()
    return failures, checked


@pytest.mark.parametrize("shape", AWKWARD_SHAPES + [(576, 7168), (2048, 7168)], ids=str)
def test_dequant_awkward_shapes_every_dtype(cuda, shape):
    assert_none_failed(*_dequant_cases(cuda, [shape], SCALE_DTYPES, OUT_DTYPES, seed=shape[0] * 7 + shape[1]))


@pytest.mark.parametrize("shape", DSV3_SHAPES, ids=str)
def test_dequant_deepseek_v3_shapes(cuda, shape):
    assert_none_failed(*_dequant_cases(cuda, [shape], (torch.float32,), (torch.bfloat16,), seed=shape[0] + shape[1]))


@pytest.mark.parametrize("shape", [(576, 7168), (129, 257), (300, 1000), (1, 1), (2048, 7168)], ids=str)
def test_dequant_matches_the_reference_computed_on_the_cpu(cuda, shape):
    rows, cols = shape
    gen = torch.Generator(device=cuda).manual_seed(rows * cols)
    w = random_e4m3(rows, cols, cuda, gen)
    failures, checked = [], 0
    for scale_dtype in (torch.float32, torch.float8_e8m0fnu):
        s = random_scale(rows, cols, scale_dtype, cuda, gen)
        for out_dtype in OUT_DTYPES:
            want = reference_dequant(w.cpu(), s.cpu(), out_dtype)
            for decode_bits in (False, True):
                bad = differing(dequant(w, s, out_dtype, decode_bits=decode_bits), want)
                checked += 1
                if bad:
                    failures.append(f"decode={int(decode_bits)} scale={short(scale_dtype)} out={short(out_dtype)}: "
                                    f"{bad} elements differ")
    assert_none_failed(failures, checked)


def test_dequant_nan_inputs(cuda):
    """NaN codes in the weight give NaN at the same places; every other element bit-exact."""
    rows, cols = 576, 7168
    gen = torch.Generator(device=cuda).manual_seed(5)
    w = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=cuda, generator=gen)
    s = random_scale(rows, cols, torch.float32, cuda, gen)
    failures = []
    for decode_bits in (False, True):
        for out_dtype in OUT_DTYPES:
            got, want = dequant(w, s, out_dtype, decode_bits=decode_bits), reference_dequant(w, s, out_dtype)
            bad = int((got.isnan() != want.isnan()).sum()) + differing(got, want)
            if bad:
                failures.append(f"decode={int(decode_bits)} out={short(out_dtype)}: {bad} elements differ")
    assert_none_failed(failures, 6)


def _segments_case(cuda, shapes, misalign: bool, out_dtype, decode_bits: bool, gen) -> str | None:
    """One `dequant_segments` call over a batch of tensors into a destination poisoned with 0xFF bytes."""
    esize = torch.empty((), dtype=out_dtype).element_size()
    segments, src_off, dst_off, scale_off = [], 0, 0, 0
    for k, (rows, cols) in enumerate(shapes):
        if misalign and k % 7 == 3:
            src_off += 5  # misaligned: the generic launch next to the aligned one
            dst_off += esize
        segments.append((src_off, dst_off, scale_off, rows, cols))
        src_off += rows * cols
        dst_off += rows * cols * esize
        scale_off += ((rows + 127) // 128) * ((cols + 127) // 128)
    src = torch.randint(0, 256, (src_off,), dtype=torch.uint8, device=cuda, generator=gen)
    src[(src & 0x7F) == 0x7F] -= 1
    scales = torch.exp2(torch.rand(scale_off, device=cuda, generator=gen) * 24 - 16)
    dst = torch.full((dst_off + 64,), 0xFF, dtype=torch.uint8, device=cuda)
    dequant_segments(src, dst, scales, segments, out_dtype, decode_bits=decode_bits)
    torch.cuda.synchronize()
    bad = 0
    written = torch.zeros(dst.numel(), dtype=torch.bool, device=cuda)
    for so, do, co, rows, cols in segments:
        sr, sc = (rows + 127) // 128, (cols + 127) // 128
        want = reference_dequant(src[so : so + rows * cols].view(rows, cols), scales[co : co + sr * sc].view(sr, sc),
                                 out_dtype)
        bad += differing(dst[do : do + rows * cols * esize].view(out_dtype).view(rows, cols), want)
        written[do : do + rows * cols * esize] = True
    bad += int((dst[~written] != 0xFF).sum())
    del src, dst, scales, written
    torch.cuda.empty_cache()
    if bad:
        return f"{len(segments)} segments decode={int(decode_bits)} out={short(out_dtype)}: {bad} elements differ"
    return None


@pytest.mark.parametrize("decode_bits", [False, True])
def test_dequant_segments_mixed_and_misaligned(cuda, decode_bits):
    gen = torch.Generator(device=cuda).manual_seed(11)
    shapes = [(2048, 7168)] * 8 + [(7168, 2048)] * 4 + [(129, 257), (1, 1), (300, 1000), (576, 7168), (24576, 1536)]
    failures = [f for out_dtype in (torch.bfloat16, torch.float32)
                if (f := _segments_case(cuda, shapes, True, out_dtype, decode_bits, gen))]
    assert_none_failed(failures, 2)


@pytest.mark.slow
@pytest.mark.parametrize("decode_bits", [False, True])
def test_dequant_segments_past_2_gib(cuda, decode_bits):
    """160 + 80 expert-sized tensors in one call: offsets past 2^31 bytes in source and destination."""
    gen = torch.Generator(device=cuda).manual_seed(12)
    shapes = [(2048, 7168)] * 160 + [(7168, 2048)] * 80
    failure = _segments_case(cuda, shapes, False, torch.bfloat16, decode_bits, gen)
    assert failure is None, failure


# ------------------------------------------------------------------------------------------------ quant
def weights(rows: int, cols: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """Rows of magnitudes 2^-24 .. 2^4 (e4m3 subnormals, every scale range), and an all-zero block."""
    gen = torch.Generator(device=device).manual_seed(seed)
    mag = torch.exp2(torch.randint(-24, 4, (rows, 1), device=device, generator=gen).float())
    w = torch.randn((rows, cols), device=device, generator=gen) * mag
    if rows > 128 and cols > 128:
        w[:128, 128:256] = 0
    return w.to(dtype)


def encode_paths(device) -> list[bool]:
    """Both e4m3 paths where the GPU has a native FP8 conversion (sm89+); the integer encoder elsewhere."""
    return [True] if resolve_encode_bits(device, None) else [False, True]


def test_quant_encoders_every_bfloat16_and_every_tie(cuda):
    """Every finite bfloat16 in [-448, 448] and every tie between neighbouring e4m3 values (and their float32
    neighbours), one per row of a [n, 1] weight whose block scales are 1: q equals torch's CPU cast."""
    bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf16 = bf16[bf16.isfinite() & (bf16.abs() <= 448)]
    codes = torch.arange(0, 0x7F, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    ties = (codes[1:] + codes[:-1]) / 2
    near = torch.cat([ties, (ties.view(torch.int32) + 1).view(torch.float32), (ties.view(torch.int32) - 1).view(torch.float32)])
    x = torch.cat([bf16, near, -near])
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    rows = x.numel()
    xs = torch.cat([x, torch.zeros(-rows % 127)]).view(-1, 127)
    w = torch.cat([xs, torch.full((xs.shape[0], 1), 448.0)], 1).reshape(-1, 1).to(cuda)  # a 448 per block: scale 1
    for encode in encode_paths(cuda):
        q, s = quant(w, encode_bits=encode)
        got = q.view(torch.uint8).cpu().view(-1, 128)[:, :127].reshape(-1)[:rows]
        assert int((s.cpu() != 1).sum()) == 0, f"encode_bits={encode}: a block scale is not 1"
        bad = int((got != want).sum())
        assert bad == 0, f"encode_bits={encode}: {bad} of {rows} values encoded differently"


def test_quant_special_blocks(cuda):
    """All-zero, tiny, NaN, Inf and float16-overflowing blocks: scales (NaN where NaN) and finite blocks' q."""
    w = torch.zeros((130, 260 + 128), dtype=torch.bfloat16)
    w[0:128, 128:256] = 1e-37
    w[128:, 0] = float("nan")
    w[128:, 128] = float("-inf")
    w[128:, 256] = 1e30
    w[:, 300:] = 1.0
    failures = []
    for fmt, sdt in QUANT_CONFIGS:
        q_ref, s_ref = reference_quant(w, fmt, sdt)
        for encode in encode_paths(cuda):
            q, s = quant(w.to(cuda), fmt, sdt, encode_bits=encode)
            s_got, s_want = s.cpu().float(), s_ref.float()
            bad = int(((s_got != s_want) & ~(s_got.isnan() & s_want.isnan())).sum())
            bad += bytes_differing(q[:128].cpu(), q_ref[:128])
            if bad:
                failures.append(f"{fmt}/{short(sdt)} encode_bits={encode}: {bad} differ")
    assert_none_failed(failures, len(QUANT_CONFIGS))


def _quant_cases(cuda, shape, src_dtypes, seed: int, on_cpu: bool) -> tuple[list[str], int]:
    rows, cols = shape
    failures, checked = [], 0
    for src_dtype in src_dtypes:
        w = weights(rows, cols, src_dtype, cuda, seed)
        for fmt, sdt in QUANT_CONFIGS:
            q_ref, s_ref = reference_quant(w, fmt, sdt)
            if on_cpu:  # the CPU is the definition: the reference on the GPU must agree with it
                q_cpu, s_cpu = reference_quant(w.cpu(), fmt, sdt)
                bad = bytes_differing(q_ref.cpu(), q_cpu) + bytes_differing(s_ref.cpu(), s_cpu)
                checked += 1
                if bad:
                    failures.append(f"{short(src_dtype)} {fmt}/{short(sdt)} GPU reference vs CPU: {bad} bytes differ")
            for encode in encode_paths(cuda):
                q, s = quant(w, fmt, sdt, encode_bits=encode)
                bad = bytes_differing(q, q_ref) + bytes_differing(s, s_ref)
                checked += 1
                if bad:
                    failures.append(f"{short(src_dtype)} {fmt}/{short(sdt)} encode_bits={encode}: {bad} bytes differ")
        del w
        torch.cuda.empty_cache()
    return failures, checked


@pytest.mark.parametrize("shape", AWKWARD_SHAPES, ids=str)
def test_quant_awkward_shapes_every_format(cuda, shape):
    assert_none_failed(*_quant_cases(cuda, shape, (torch.bfloat16, torch.float16, torch.float32), 1, on_cpu=True))


@pytest.mark.parametrize("shape", DSV3_SHAPES, ids=str)
def test_quant_deepseek_v3_shapes(cuda, shape):
    on_cpu = shape[0] * shape[1] <= 16 * 2**20  # the larger ones on the GPU only: the CPU reference is slow
    assert_none_failed(*_quant_cases(cuda, shape, (torch.bfloat16,), 100 + shape[0] % 97, on_cpu))
