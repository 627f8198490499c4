"""The CPU kernels (`dsv3conv.kernels.fp8_block_host`: numba, numpy, torch) against the torch references, bit
for bit, and the thread pool of `CpuBackend` around them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import dsv3conv.kernels
from dsv3conv import backend as cpu_backend
from dsv3conv.backend import CpuBackend, Item, OutputArena, convert, cpu_threads
from dsv3conv.dest import PLAN_NAME
from dsv3conv.errors import UsageError
from dsv3conv.kernels import fp8_block_host
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.fp8_block_host import row_ranges
from dsv3conv.kernels.fp8_block_quant import reference_quant
from dsv3conv.ops import DequantBlockFp8, QuantBlockFp8
from tests.conftest import ENV, TIMEOUT

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHAPES = [(1, 1), (129, 257), (576, 896), (128, 1), (5, 300), (300, 128)]
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.element_size()])


def mismatches(got: torch.Tensor, want: torch.Tensor) -> str:
    """Bits that differ, NaN aside (NaN where the reference has NaN: its bits are `test_nan_codes_...`'s)."""
    bad = bits(got) != bits(want)
    if got.is_floating_point():
        bad &= ~(got.isnan() & want.isnan())
    if not bool(bad.any()):
        return ""
    i = tuple(int(v) for v in bad.nonzero()[0])
    return f"{int(bad.sum())} of {bad.numel()} differ; first at {i}: got {got[i].item()!r}, want {want[i].item()!r}"


KERNELS = ("numba", "numpy", "torch")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dequant_rows(w, s, out, start=0, stop=None, kernel="auto"):
    """`fp8_block_host.dequant_task` on torch tensors (views, no copies)."""
    fp8_block_host.dequant_task(w.view(torch.uint8).numpy(), s.to(torch.float32).contiguous().numpy(),
                                bits(out).numpy().view({2: np.uint16, 4: np.uint32}[out.element_size()]),
                                _name(out.dtype), kernel)(start, w.shape[0] if stop is None else stop)


def quant_rows(x, q, s, fmt="float", scale_dtype=torch.float32, start=0, stop=None, kernel="auto"):
    """`fp8_block_host.quant_task` on torch tensors (views, no copies)."""
    fp8_block_host.quant_task(x.view(torch.uint8).numpy(), _name(x.dtype), q.numpy(), s.view(torch.uint8).numpy(),
                              fmt, _name(scale_dtype), kernel)(start, x.shape[0] if stop is None else stop)


def dequant_in_ranges(w, s, out_dtype, cuts, kernel):
    out = torch.full(w.shape, 7, dtype=out_dtype)
    for r0, r1 in zip(cuts, cuts[1:]):
        dequant_rows(w, s, out, r0, r1, kernel=kernel)
    return out


def random_scales(shape, scale_dtype, kind, gen):
    if scale_dtype == torch.float8_e8m0fnu:
        return torch.randint(0, 255, shape, dtype=torch.uint8, generator=gen).view(scale_dtype)
    mag = {"plain": 1e-2, "subnormal": 1e-40, "huge": 3e38}[kind]
    return (torch.rand(shape, generator=gen) * mag).to(scale_dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu])
@pytest.mark.parametrize("kind", ["plain", "subnormal", "huge"])
def test_dequant_rows_equals_reference(shape, scale_dtype, kind, kernel):
    """Random bytes (NaN codes included), every out dtype, cut into row ranges that split 128-row blocks."""
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    s = random_scales((-(-shape[0] // 128), -(-shape[1] // 128)), scale_dtype, kind, gen)
    cuts = sorted({0, shape[0] // 3, shape[0] // 2, shape[0]})
    for out_dtype in OUT_DTYPES:
        got = dequant_in_ranges(w, s, out_dtype, cuts, kernel)
        problem = mismatches(got, reference_dequant(w, s, out_dtype))
        assert not problem, f"{kernel}: {shape} {scale_dtype} {kind} scales -> {out_dtype}: {problem}"


# Scales reaching float32's ends, float16's (6e-5, 2^-24, 2^-25: products round to float16 subnormals or 0),
# and, passed to the kernels directly only (the engine refuses them), scales that are not finite.
EDGE_SCALES = [1.0, 2.0**-30, 3.1e-3, 1e30, 2.0**-149, 2.0**125, 6e-5, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 146.3,
               float("inf"), float("nan")]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scale", EDGE_SCALES)
def test_dequant_rows_every_code(scale, kernel):
    """All 256 e4m3 codes (NaN, -0.0, subnormals, 448) in every row, a NaN-free row between them."""
    w = torch.arange(256, dtype=torch.uint8).repeat(130, 1)
    w[70] = torch.arange(256, dtype=torch.uint8) % 0x7F
    s = torch.tensor([[scale, 0.5], [2.0, scale]])
    for out_dtype in OUT_DTYPES:
        got = dequant_in_ranges(w, s, out_dtype, [0, 64, 130], kernel)
        problem = mismatches(got, reference_dequant(w, s, out_dtype))
        assert not problem, f"{kernel}: scale {scale} -> {out_dtype}: {problem}"


@pytest.mark.parametrize("kernel", ("numba", "numpy"))
def test_nan_codes_come_out_as_the_canonical_nan(kernel):
    """e4m3 NaN codes: the output dtype's default quiet NaN with the code's sign, whatever the row's other codes."""
    w = torch.tensor([[0x7F, 0x01, 0xFF, 0x80]], dtype=torch.uint8)
    for out_dtype, (pos, neg) in (((torch.bfloat16, (0x7FC0, 0xFFC0))), (torch.float16, (0x7E00, 0xFE00)),
                                  (torch.float32, (0x7FC00000, 0xFFC00000))):
        out = torch.zeros((1, 4), dtype=out_dtype)
        dequant_rows(w, torch.ones((1, 1)), out, kernel=kernel)
        mask = (1 << (8 * out.element_size())) - 1
        got = [v & mask for v in bits(out).view(-1).tolist()]
        assert got[0] == pos and got[2] == neg and not bool(out[0, 1::2].isnan().any()), (out_dtype, got)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_numba_kernel_rounds_every_product_like_torch(out_dtype):
    """Random e4m3 codes that are numbers times 120 bfloat16 scales spread over float32's exponents, from below
    float16's subnormals to overflow: the numba kernel's integer rounding against torch's conversion."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(0, 256, (128 * 3, 128 * 40), dtype=torch.uint8, generator=gen)
    w[(w & 0x7F) == 0x7F] = 0x7E
    exps = torch.randint(-149, 128, (3, 40), generator=gen).to(torch.float32)
    s = (torch.exp2(exps) * (1 + torch.rand((3, 40), generator=gen))).to(torch.bfloat16)  # 8-bit significands:
    got = dequant_in_ranges(w, s, out_dtype, [0, w.shape[0]], "numba")  # products of 12 bits, many exact ties
    assert not mismatches(got, reference_dequant(w, s, out_dtype)), mismatches(got, reference_dequant(w, s, out_dtype))


def test_auto_takes_numba_for_large_tensors_only(monkeypatch):
    """"auto": the numpy kernels below `AUTO_NUMBA_ELEMS` elements (numba not even asked for); from there numba,
    once its kernel has loaded in the background (numpy converts meanwhile): the same bytes either way."""
    asked, used = [], []
    real, plain = fp8_block_host.numba_kernel, fp8_block_host.fp8_numpy.dequant_rows
    monkeypatch.setattr(fp8_block_host, "numba_kernel", lambda what=(): asked.append(what) or real(what))
    monkeypatch.setattr(fp8_block_host.fp8_numpy, "dequant_rows", lambda *a: used.append("numpy") or plain(*a))
    monkeypatch.setattr(fp8_block_host, "AUTO_NUMBA_ELEMS", 256 * 4)
    monkeypatch.setattr(fp8_block_host, "_loads", {})
    w = torch.arange(256, dtype=torch.uint8).repeat(4, 1)
    w[:, 0x7F] = w[:, 0xFF] = 0  # no NaN codes: numba converts every row
    s = torch.full((1, 2), 0.5)
    what = ("dequant", "bfloat16")
    # 3 rows: numpy; 4 rows: numba's load starts (numpy converts unless it is already done); then numba
    for rows, want_asked, want_used in ((3, [], [["numpy"]]), (4, [what], [["numpy"], []]), (4, [what, what], [[]])):
        used.clear()
        got = dequant_in_ranges(w[:rows], s, torch.bfloat16, [0, rows], "auto")
        fp8_block_host.wait_for_loads()
        assert asked[: len(want_asked)] == want_asked and used in want_used, (rows, asked, used)
        assert not mismatches(got, reference_dequant(w[:rows], s))
    x = got.to(torch.float32)[:, :120].contiguous()
    quant_rows(x, torch.empty(x.shape, dtype=torch.uint8), torch.empty((1, 1)))
    assert ("quant",) not in asked  # 480 elements: numpy's


def test_a_small_checkpoint_converts_without_numba(tiny_src, tmp_path):
    """The tiny example end to end in a fresh process: numba's import is not part of its start-up."""
    code = ("import sys; from dsv3conv.commands import dequantize; "
            f"dequantize({str(tiny_src)!r}, {str(tmp_path / 'out')!r}, device='cpu'); print('numba' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc


def test_a_checkpoint_through_each_kernel_gives_the_same_files(tiny_src, tmp_path, monkeypatch):
    """dequant, then quant of its output, end to end: every tensor through numba, numpy or torch (the kernel
    `DSV3CONV_CPU_KERNEL` names) gives the same files."""
    from dsv3conv.commands import dequantize, quantize

    def files(root):  # the checkpoint's files; the plan record names each run's own source
        return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name != PLAN_NAME}

    runs = {}
    for kernel in KERNELS:
        monkeypatch.setenv("DSV3CONV_CPU_KERNEL", kernel)
        dequantize(tiny_src, tmp_path / kernel / "bf16", device="cpu")
        quantize(tmp_path / kernel / "bf16", tmp_path / kernel / "fp8", device="cpu")
        runs[kernel] = (files(tmp_path / kernel / "bf16"), files(tmp_path / kernel / "fp8"))
    assert runs["numba"] == runs["numpy"] == runs["torch"]


def test_without_numba_the_torch_kernel_stands_in_for_large_tensors(monkeypatch):
    """numba missing (or failing to import): "auto" tries its load (numpy converts meanwhile), then takes the
    torch kernels for large tensors, exactly; "numba" is refused."""
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    monkeypatch.delitem(sys.modules, "dsv3conv.kernels.fp8_block_numba", raising=False)
    monkeypatch.delattr(dsv3conv.kernels, "fp8_block_numba", raising=False)
    monkeypatch.setattr(fp8_block_host, "NUMBA_FAILURES", {})
    monkeypatch.setattr(fp8_block_host, "AUTO_NUMBA_ELEMS", 256)
    monkeypatch.setattr(fp8_block_host, "_loads", {})
    fp8_block_host.numba_kernel.cache_clear()
    try:
        assert fp8_block_host.numba_kernel() is None
        assert fp8_block_host.NUMBA_FAILURES == {(): "numba is not installed (or does not import)"}
        w = torch.arange(256, dtype=torch.uint8).repeat(3, 1)
        s = torch.full((1, 2), 3.1e-3)
        for _ in range(2):  # numpy or torch while the load is tried, torch once it has failed
            got = dequant_in_ranges(w, s, torch.bfloat16, [0, 3], "auto")
            assert not mismatches(got, reference_dequant(w, s)), mismatches(got, reference_dequant(w, s))
            fp8_block_host.wait_for_loads()
        assert fp8_block_host.choose("auto", ("dequant", "bfloat16"), 1 << 20) == "torch"
        assert fp8_block_host.choose("auto", ("dequant", "bfloat16"), 255) == "numpy"
        with pytest.raises(ValueError, match="numba is not installed"):
            dequant_rows(w, s, torch.empty(w.shape, dtype=torch.bfloat16), kernel="numba")
        x = got[:, :120].contiguous()  # no NaN codes
        q, sq = torch.empty(x.shape, dtype=torch.uint8), torch.empty((1, 1))
        quant_rows(x, q, sq)
        assert bytes(q.numpy()) == bytes(reference_quant(x)[0].view(torch.uint8).numpy())
        with pytest.raises(ValueError, match="numba is not installed"):
            quant_rows(x, q, sq, kernel="numba")
    finally:
        fp8_block_host.numba_kernel.cache_clear()  # the next caller imports the real module again


def test_dequant_rows_refuses_mismatched_arguments():
    w = torch.zeros((130, 10), dtype=torch.uint8)
    with pytest.raises(ValueError, match="expected float32 \\(2, 1\\)"):
        dequant_rows(w, torch.ones((1, 1)), torch.empty((130, 10), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out is"):
        dequant_rows(w, torch.ones((2, 1)), torch.empty((130, 10), dtype=torch.int16))
    with pytest.raises(ValueError, match="kernel 'fast'"):
        dequant_rows(w, torch.ones((2, 1)), torch.empty((130, 10), dtype=torch.bfloat16), kernel="fast")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt_dtype", [("float", torch.float32), ("float", torch.bfloat16), ("float", torch.float16),
                                       ("ue8m0", torch.float32), ("ue8m0", torch.float8_e8m0fnu)])
def test_quant_rows_equals_reference(shape, src_dtype, fmt_dtype, kernel):
    """Rows of very different magnitudes (some blocks underflow the scale floor), NaN and Inf in some blocks:
    scales equal everywhere, codes equal wherever the scale is finite (elsewhere callers refuse)."""
    fmt, scale_dtype = fmt_dtype
    gen = torch.Generator().manual_seed(shape[0] + shape[1])
    mag = torch.logspace(-30, 4, shape[0]).view(-1, 1)
    x = (torch.randn(shape, generator=gen) * mag).to(src_dtype)
    if shape[0] > 140:
        x[2, 0], x[139, -1] = float("nan"), float("inf")
    q = torch.full(shape, 0x55, dtype=torch.uint8)
    s = torch.empty((-(-shape[0] // 128), -(-shape[1] // 128)), dtype=scale_dtype)
    for r0, r1 in row_ranges(shape[0], shape[1], 128 * 64, 128):
        quant_rows(x, q, s, fmt, scale_dtype, r0, r1, kernel=kernel)
    q_ref, s_ref = reference_quant(x, fmt, scale_dtype)
    assert not mismatches(s, s_ref), f"{kernel} scales: {mismatches(s, s_ref)}"
    finite = torch.isfinite(s_ref.to(torch.float32)).repeat_interleave(128, 0)[: shape[0]]
    finite = finite.repeat_interleave(128, 1)[:, : shape[1]]
    assert not mismatches(q[finite], q_ref.view(torch.uint8)[finite]), mismatches(q[finite], q_ref.view(torch.uint8)[finite])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [16, 127])
def test_quant_rows_every_source_value(src_dtype, cols, kernel):
    """Every finite bfloat16 / float16 value, ordered by magnitude so that blocks span a few binades (16 columns)
    or many (127): codes from 448 down to e4m3's subnormals and 0, exact ties under power-of-two scales."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(src_dtype)
    finite = every[torch.isfinite(every)]
    values = finite[finite.to(torch.float32).abs().argsort(stable=True)]
    x = values[: values.numel() // cols * cols].view(-1, cols).contiguous()
    for fmt, scale_dtype in (("float", torch.float32), ("ue8m0", torch.float8_e8m0fnu), ("float", torch.bfloat16)):
        q = torch.empty(x.shape, dtype=torch.uint8)
        s = torch.empty((-(-x.shape[0] // 128), 1), dtype=scale_dtype)
        quant_rows(x, q, s, fmt, scale_dtype, kernel=kernel)
        q_ref, s_ref = reference_quant(x, fmt, scale_dtype)
        assert not mismatches(s, s_ref), f"{kernel} {fmt} {scale_dtype} scales: {mismatches(s, s_ref)}"
        assert not mismatches(q, q_ref.view(torch.uint8)), f"{kernel} {fmt} {scale_dtype}: {mismatches(q, q_ref.view(torch.uint8))}"


def test_quant_rows_refuses_ranges_inside_a_block():
    x = torch.zeros((300, 4), dtype=torch.bfloat16)
    q, s = torch.empty((300, 4), dtype=torch.uint8), torch.empty((3, 1))
    with pytest.raises(ValueError, match="128-row block"):
        quant_rows(x, q, s, start=64, stop=128)
    quant_rows(x, q, s, start=256, stop=300)  # the last, partial block is fine


def test_row_ranges_cover_every_row_once():
    for rows, cols, target, align in ((1000, 7, 100, 1), (1000, 7, 100, 128), (0, 5, 10, 1), (3, 10**7, 10, 128)):
        ranges = row_ranges(rows, cols, target, align)
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(r0 % align == 0 for r0, _ in ranges)


@pytest.mark.parametrize("kernel", KERNELS)
def test_backend_threads_write_each_piece_into_out_or_a_new_buffer(kernel, monkeypatch):
    """Two threads, a dequant and a quant item sharing a batch, the recycled buffer too small for both, each
    item cut into several row ranges."""
    monkeypatch.setattr(cpu_backend, "TASK_ELEMS", 128 * 300)
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(0, 256, (700, 300), dtype=torch.uint8, generator=gen)
    s = torch.rand((6, 3), generator=gen)
    x = torch.randn((260, 130), generator=gen).to(torch.bfloat16)
    buf = torch.cat([w.view(-1), torch.zeros(1, dtype=torch.uint8), x.view(-1).view(torch.uint8)])
    items = [Item(DequantBlockFp8("F32"), 0, w.numel(), 700, 300, "F8_E4M3", "BF16", s),
             Item(QuantBlockFp8("float", "F32", "x_scale_inv"), w.numel() + 1, x.numel() * 2, 260, 130, "BF16",
                  "F8_E4M3", name="x")]
    backend = CpuBackend(threads=2, kernel=kernel)
    try:
        deq, q, sc = convert(backend, buf, items, OutputArena(700 * 300 * 2 + 100))
    finally:
        backend.close()
    q_ref, s_ref = reference_quant(x)
    got = torch.frombuffer(bytearray(deq), dtype=torch.bfloat16).view(700, 300)
    assert not mismatches(got, reference_dequant(w, s)), mismatches(got, reference_dequant(w, s))
    assert bytes(q) == bytes(q_ref.view(torch.uint8).numpy()) and bytes(sc) == bytes(s_ref.view(torch.uint8).numpy())


def test_cpu_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv("DSV3CONV_CPU_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.setenv("DSV3CONV_CPU_THREADS", "0")
    with pytest.raises(UsageError, match="DSV3CONV_CPU_THREADS='0'"):
        cpu_threads()
    monkeypatch.delenv("DSV3CONV_CPU_THREADS")
    for cores, want in ((1, 1), (2, 1), (3, 1), (16, 8)):  # by default half the cores this process may use
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert cpu_threads() == want, cores


@pytest.mark.parametrize("shape", [(1, 2), (3, 64), (130, 100), (257, 512)])
def test_numpy_mxfp4_kernels_equal_the_references(shape):
    """MXFP4 dequant (every output dtype) and the repack to FP8 (E8M0 and F32 block scales, in 128-row ranges)
    against the torch references, bit for bit; a lossy repack counts the blocks the reference counts."""
    from dsv3conv.kernels import mxfp4_cpu
    from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4
    from dsv3conv.kernels.mxfp4_to_fp8 import repack_mxfp4_to_fp8

    rows, cols = shape
    gen = torch.Generator().manual_seed(rows * cols)
    packed = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
    groups = -(-cols // 32)
    for low in (0, 100, 240):  # exponents spanning float32's range, and far apart (lossy repacks)
        scale = torch.randint(low, min(low + 15, 255), (rows, groups), dtype=torch.uint8, generator=gen)
        if low == 0 and rows > 1:
            scale[0, 0] = 150  # 150 binades above its neighbours: lossy blocks
        for out_dtype in OUT_DTYPES:
            out = torch.full(shape, 7, dtype=out_dtype)
            mxfp4_cpu.dequant_rows(packed.numpy(), scale.numpy(), bits(out).numpy().view(
                {2: np.uint16, 4: np.uint32}[out.element_size()]), _name(out_dtype), 0, rows)
            ref = reference_dequant_mxfp4(packed, scale, out_dtype)
            assert not mismatches(out, ref), f"{shape} {low} {out_dtype}: {mismatches(out, ref)}"
        for scale_dtype in (torch.float8_e8m0fnu, torch.float32):
            q = np.zeros(shape, np.uint8)
            s = torch.zeros((-(-rows // 128), -(-cols // 128)), dtype=scale_dtype)
            lossy = sum(mxfp4_cpu.repack_rows(packed.numpy(), scale.numpy(), q, s.view(torch.uint8).numpy(),
                                              _name(scale_dtype), r0, min(rows, r0 + 128)) for r0 in range(0, rows, 128))
            q_ref, s_ref, lossy_ref = repack_mxfp4_to_fp8(packed, scale, scale_dtype)
            assert lossy == lossy_ref and bits(s).equal(bits(s_ref)), (shape, low, scale_dtype, lossy, lossy_ref)
            if not lossy:
                assert np.array_equal(q, q_ref.view(torch.uint8).numpy()), (shape, low, scale_dtype)
