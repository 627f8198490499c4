"""The CUDA pipeline, bit for bit against the reference (skipped where no CUDA GPU exists: run on a GPU box)."""

from __future__ import annotations

import pytest
import torch

from dsv3conv.api import dequantize
from dsv3conv.backend import CudaBackend, Item
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.synthetic import make_tiny, quantize_blocks
from tests.test_dequant import assert_bit_exact, load_all

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
        items.append(Item(off, raw.numel(), rows, cols, s, "BF16"))
        off += raw.numel()
    buf = torch.cat([q.view(torch.uint8).reshape(-1) for q, _ in pieces]).pin_memory()
    outs = CudaBackend(torch.device("cuda")).run(buf, items)
    for (q, s), got in zip(pieces, outs):
        ref = reference_dequant(q, s, torch.bfloat16).view(torch.uint8).reshape(-1)
        got_t = torch.frombuffer(bytearray(got), dtype=torch.uint8)
        assert torch.equal(got_t, ref), f"{tuple(q.shape)}: {(got_t != ref).sum().item()} bytes differ"
