"""The CUDA pipeline, bit for bit against the reference (skipped where no CUDA GPU exists: run on a GPU box)."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3conv.api import dequantize
from dsv3conv.backend import Item, convert
from dsv3conv.gpu import CudaBackend
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.ops import DequantBlockFp8
from dsv3conv.synthetic import make_tiny, quantize_blocks
from tests.conftest import assert_bit_exact, cli, load_all

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("scale_dtype", ["F32", "BF16", "F16", "F8_E8M0"])
def test_cuda_dequant_checkpoint_bit_exact(tmp_path, scale_dtype):
    src = make_tiny(tmp_path / "src", scale_dtype=scale_dtype)
    summary = dequantize(tmp_path / "src", tmp_path / "out", device="cuda")
    assert summary["device"].startswith("cuda")
    out, _ = load_all(tmp_path / "out")
    assert assert_bit_exact(out, src) == summary["tensors_converted"]


def test_cuda_and_cpu_outputs_identical(tmp_path):
    make_tiny(tmp_path / "src", num_hidden_layers=4)
    dequantize(tmp_path / "src", tmp_path / "gpu", device="cuda", buffer_size=200_000)
    dequantize(tmp_path / "src", tmp_path / "cpu", device="cpu")
    for p in (tmp_path / "cpu").iterdir():
        assert (tmp_path / "gpu" / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("shape", [(576, 7168), (1, 1), (129, 257), (2048, 7168), (7168, 2048), (32768, 512)])
def test_cuda_backend_batch_of_shapes(shape):
    gen = torch.Generator().manual_seed(1)
    pieces, items, off = [], [], 0
    for rows, cols in (shape, (129, 257), shape):
        w = torch.randn((rows, cols), generator=gen) * 2
        q, s = quantize_blocks(w, "F32")
        raw = q.view(torch.uint8).reshape(-1)
        pieces.append((q, s))
        items.append(Item(DequantBlockFp8("F32"), off, raw.numel(), rows, cols, "F8_E4M3", "BF16", s))
        off += raw.numel()
    buf = torch.cat([q.view(torch.uint8).reshape(-1) for q, _ in pieces]).pin_memory()
    outs = convert(CudaBackend(torch.device("cuda")), buf, items)
    for (q, s), got in zip(pieces, outs):
        ref = reference_dequant(q, s, torch.bfloat16).view(torch.uint8).reshape(-1)
        got_t = torch.frombuffer(bytearray(got), dtype=torch.uint8)
        assert torch.equal(got_t, ref), f"{tuple(q.shape)}: {(got_t != ref).sum().item()} bytes differ"


@pytest.mark.parametrize("pdl", ["2", "1", "0"])
def test_dequant_chained_launches_see_each_others_writes(monkeypatch, pdl):
    """Each dequant reads what the kernel just before it wrote and overwrites what that kernel read:
    programmatic dependent launch (on by default on sm90+) must still order memory like a plain launch."""
    from dsv3conv.kernels import fp8_block_dequant as k

    monkeypatch.setenv("DSV3CONV_PDL", pdl)
    gen = torch.Generator().manual_seed(3)
    rows, cols, steps = 576, 7168, 20
    s = torch.exp2(torch.randint(-8, 2, (5, 56), generator=gen).float())
    x0 = (torch.randn((rows, cols), generator=gen) * 8).to(torch.float8_e4m3fn)
    want, x = [], x0
    for _ in range(steps):  # on the CPU: dequant, then re-encode the output as the next input
        want.append(reference_dequant(x, s, torch.bfloat16))
        x = (want[-1].float() * 0.5).to(torch.float8_e4m3fn)
    w, sd = x0.cuda(), s.cuda()
    o = torch.empty((rows, cols), dtype=torch.bfloat16, device="cuda")
    got = []
    for _ in range(steps):
        k.dequant(w, sd, torch.bfloat16, out=o)  # reads w (written by the kernel before), overwrites o
        got.append(o.clone())  # a kernel reading o
        w = (o.float() * 0.5).to(torch.float8_e4m3fn)  # kernels writing the next input
    torch.cuda.synchronize()
    for i, (g, ref) in enumerate(zip(got, want)):
        assert torch.equal(g.cpu().view(torch.int16), ref.view(torch.int16)), f"step {i}"


@pytest.mark.parametrize("fmt,sdt", [("float", "float32"), ("ue8m0", "float8_e8m0fnu"), ("float", "bfloat16")])
def test_cuda_quant_writes_the_cpu_files(tmp_path, fmt, sdt):
    """`quant --device cuda` (Triton kernel, several chunks per tensor) writes the CPU path's bytes exactly."""
    from dsv3conv.api import quantize

    make_tiny(tmp_path / "fp8", num_hidden_layers=4)
    dequantize(tmp_path / "fp8", tmp_path / "bf16", device="cpu")
    quantize(tmp_path / "bf16", tmp_path / "cpu", device="cpu", scale_fmt=fmt, scale_dtype=sdt)
    s = quantize(tmp_path / "bf16", tmp_path / "gpu", device="cuda", scale_fmt=fmt, scale_dtype=sdt,
                 buffer_size=200_000)
    assert s["device"].startswith("cuda") and s["finalized"]
    for p in (tmp_path / "cpu").iterdir():
        assert (tmp_path / "gpu" / p.name).read_bytes() == p.read_bytes(), p.name


def test_cuda_all_uses_every_gpu(tmp_path):
    """`--device cuda:all`: every GPU converts batches of one engine, the same bytes as one GPU."""
    make_tiny(tmp_path / "src", num_hidden_layers=5, n_shards=6)
    dequantize(tmp_path / "src", tmp_path / "one", device="cuda")
    s = dequantize(tmp_path / "src", tmp_path / "all", device="cuda:all")
    assert s["device"] == ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count())) and s["finalized"]
    assert s["gpu_peak_bytes"] > 0
    for p in (tmp_path / "one").iterdir():
        assert (tmp_path / "all" / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("pdl", ["2", "1", "0"])
def test_dequant_back_to_back_reads_the_previous_dequant_output(monkeypatch, pdl):
    """Dequant launches directly after each other, each reading (as raw e4m3 bytes) what the one before wrote:
    with programmatic dependent launch the second may start early, and must still wait for that data."""
    from dsv3conv.kernels import fp8_block_dequant as k

    monkeypatch.setenv("DSV3CONV_PDL", pdl)
    gen = torch.Generator().manual_seed(4)
    rows, cols, steps = 576, 7168, 12
    s = torch.exp2(torch.randint(-3, 1, (5, 56), generator=gen).float())
    x = (torch.randn((rows, cols), generator=gen) * 4).to(torch.float8_e4m3fn)

    def as_e4m3(o: torch.Tensor) -> torch.Tensor:  # the low bytes of a bf16 output, read as e4m3 codes
        return o.view(torch.uint8)[:, :cols].view(torch.float8_e4m3fn)

    def canonical(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t.isnan(), torch.full_like(t, float("nan")), t).view(torch.int16)

    want, w = [], x
    for _ in range(steps):
        want.append(reference_dequant(w, s, torch.bfloat16))
        w = as_e4m3(want[-1])
    sd, w, got = s.cuda(), x.cuda(), []
    for _ in range(steps):
        got.append(k.dequant(w, sd, torch.bfloat16))
        w = as_e4m3(got[-1])
    torch.cuda.synchronize()
    for i, (g, ref) in enumerate(zip(got, want)):
        assert torch.equal(canonical(g.cpu()), canonical(ref)), f"step {i}"


def test_profile_splits_the_gpu_conversion(tmp_path, monkeypatch, tiny_src):
    """DSV3CONV_PROFILE=1 on CUDA: the GPU time of copies and kernels, each with the bytes it moved."""
    monkeypatch.setenv("DSV3CONV_PROFILE", "1")
    proc = cli("dequant", tiny_src, tmp_path / "out", "--quiet", "--device", "cuda", check=0)
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("dsv3conv profile: ")]
    stages = json.loads(line.removeprefix("dsv3conv profile: "))["stages"]
    for name in ("h2d", "kernel", "d2h", "wait_convert", "convert", "write"):
        assert name in stages and stages[name]["calls"] >= 1 and stages[name]["s"] >= 0, stages
    assert stages["kernel"]["bytes"] == stages["d2h"]["bytes"] > 0, stages
    assert "pin_alloc" not in stages and "sync" not in stages, stages  # nothing pinned per batch, no wait in convert
