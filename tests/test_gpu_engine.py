"""The asynchronous GPU path (skipped where no CUDA GPU exists): many batches in flight on the streams of one
or several devices, waited for in any order, bit for bit the CPU's bytes."""

from __future__ import annotations

import pytest
import torch

from dsv3conv.api import dequantize, quantize
from dsv3conv.backend import Item, OutputArena, Spread, convert_async
from dsv3conv.gpu import CudaBackend
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.ops import DequantBlockFp8
from dsv3conv.synthetic import make_tiny, quantize_blocks

pytestmark = pytest.mark.gpu


def _devices() -> list[str]:
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def test_the_engine_memory_of_a_gpu_is_pinned():
    """The engine holds numpy views; the pages under them (any slice of them) are the GPU's pinned memory, so
    copies from and to them run asynchronously."""
    backend = CudaBackend(torch.device("cuda"))
    buf = backend.host_buffer(1000)
    assert buf.size >= 1000 and torch.from_numpy(buf).is_pinned() and torch.from_numpy(buf[7:100]).is_pinned()
    arena = OutputArena(4096, backend.host_buffer)
    assert torch.from_numpy(arena.take(100, 2)).is_pinned()
    backend.close()


def test_batches_enqueued_together_and_waited_in_reverse_are_exact():
    """Eight batches enqueued before any is waited for (the streams and devices take turns), then waited for
    last first: each batch's pinned arena holds the reference bytes of its own input."""
    gen = torch.Generator().manual_seed(5)
    devices = _devices()
    backend = Spread([CudaBackend(torch.device(d)) for d in devices + devices])
    shapes = [(576, 7168), (129, 257), (2048, 512), (1, 1)]
    pending = []
    for b in range(8):
        pieces, items, off = [], [], 0
        for rows, cols in shapes[b % 4 :] + shapes[: b % 4]:
            q, s = quantize_blocks(torch.randn((rows, cols), generator=gen) * (b + 1), "F32")
            items.append(Item(DequantBlockFp8("F32"), off, rows * cols, rows, cols, "F8_E4M3", "BF16", s))
            pieces.append((q, s))
            off += rows * cols
        buf = backend.host_buffer(off)  # pinned, seen as numpy
        buf[:off] = torch.cat([q.view(torch.uint8).reshape(-1) for q, _ in pieces]).numpy()
        arena = OutputArena(2 * off, backend.host_buffer)
        outs, fence = convert_async(backend, buf, items, arena)
        assert fence is not None
        pending.append((pieces, outs, fence))
    for b, (pieces, outs, fence) in reversed(list(enumerate(pending))):
        fence.wait()
        for (q, s), got in zip(pieces, outs):
            ref = reference_dequant(q, s, torch.bfloat16).view(torch.uint8).reshape(-1)
            got_t = torch.frombuffer(bytearray(got), dtype=torch.uint8)
            assert torch.equal(got_t, ref), f"batch {b}, {tuple(q.shape)}: {(got_t != ref).sum().item()} bytes differ"
    backend.close()


@pytest.mark.parametrize("device", ["cuda", "cuda:0,cuda:0", "cuda:all"])
def test_small_steps_many_files_same_bytes_as_the_cpu(tmp_path, device):
    """A tiny buffer (hundreds of batches over six shards, many in flight), one GPU, one GPU twice, every GPU."""
    make_tiny(tmp_path / "src", num_hidden_layers=6, n_shards=6)
    dequantize(tmp_path / "src", tmp_path / "cpu", device="cpu")
    s = dequantize(tmp_path / "src", tmp_path / "gpu", device=device, buffer_size=1 << 16)
    assert s["finalized"] and s["gpu_peak_bytes"] > 0
    names = sorted(p.name for p in (tmp_path / "cpu").iterdir())
    assert sorted(p.name for p in (tmp_path / "gpu").iterdir()) == names
    for name in names:
        assert (tmp_path / "gpu" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes(), name


def test_quant_on_several_streams_and_devices_same_bytes_as_the_cpu(tmp_path):
    make_tiny(tmp_path / "fp8", num_hidden_layers=4, n_shards=5)
    dequantize(tmp_path / "fp8", tmp_path / "bf16", device="cpu")
    quantize(tmp_path / "bf16", tmp_path / "cpu", device="cpu", scale_fmt="ue8m0", scale_dtype="float8_e8m0fnu")
    devices = ",".join(_devices() * 2)
    s = quantize(tmp_path / "bf16", tmp_path / "gpu", device=devices, scale_fmt="ue8m0",
                 scale_dtype="float8_e8m0fnu", buffer_size=1 << 16)
    assert s["finalized"]
    for p in (tmp_path / "cpu").iterdir():
        assert (tmp_path / "gpu" / p.name).read_bytes() == p.read_bytes(), p.name
