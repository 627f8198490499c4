"""Synthetic DeepSeek-V3-shaped checkpoints for tests, the demo and benchmarks.

- `tiny`: the real naming scheme and dtypes at small sizes, realistic FP8 values with correct 128x128 block
  scales, FP8 shapes that are not multiples of 128, a scale stored in another shard than its weight, the MTP
  layer at id `num_hidden_layers`, and the extra files a release has.
- `real_shapes`: the true DeepSeek-V3 tensor shapes with fewer layers and experts (benchmarks).
- `replica`: a header-exact replica of the full release (163 shards, 91,991 tensors) as sparse files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch

from dsv3conv.checkpoint import INDEX_NAME
from dsv3conv.dtypes import SAFETENSORS_DTYPES, TORCH_DTYPES
from dsv3conv.layout import FP8_DTYPE, deepseek_v3_tensors, default_config, is_scale, scale_name
from dsv3conv.safetensors_format import DTYPE_SIZES, build_header
from dsv3conv.writer import AtomicFile, write_bytes_atomic

E4M3_MAX = 448.0
SCALE_DTYPE_CHOICES = ("F32", "BF16", "F16", "F8_E8M0")

TensorSpec = tuple[str, tuple[int, ...], str]


def shard_name(k: int, n: int) -> str:
    """Shard names as the DeepSeek-V3 release spells them (`model-00001-of-000163.safetensors`)."""
    return f"model-{k:05d}-of-{n:06d}.safetensors"


def tiny_config(num_hidden_layers: int = 3, num_nextn_predict_layers: int = 1) -> dict:
    """A DeepSeek-V3 config shrunk so that every FP8 shape kind occurs, some not multiples of 128."""
    c = default_config()
    c.update(
        hidden_size=200, vocab_size=320, num_attention_heads=2, num_key_value_heads=2,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, q_lora_rank=160, kv_lora_rank=64,
        intermediate_size=300, moe_intermediate_size=144, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, num_hidden_layers=num_hidden_layers,
        num_nextn_predict_layers=num_nextn_predict_layers, max_position_embeddings=512,
    )
    c.pop("rope_scaling", None)
    return c


# --------------------------------------------------------------------------------- block quantization
def quantize_blocks(w: torch.Tensor, scale_dtype: str = "F32", block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize float32 `w` to e4m3 the way the release was made: s = amax / 448 per block.

    Partial edge blocks take their amax over the stored elements only. With F8_E8M0 scales the scale is
    rounded up to a power of two (as `scale_fmt: ue8m0` releases do).
    """
    rows, cols = w.shape
    pr, pc = -rows % block, -cols % block
    padded = torch.nn.functional.pad(w.abs(), (0, pc, 0, pr))
    amax = padded.view((rows + pr) // block, block, (cols + pc) // block, block).amax(dim=(1, 3))
    scale = (amax / E4M3_MAX).clamp(min=1e-12)
    if scale_dtype == "F8_E8M0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scale = scale.to(TORCH_DTYPES[scale_dtype]).to(torch.float32)  # the scale actually stored
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    q = (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(TORCH_DTYPES[scale_dtype])


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


# -------------------------------------------------------------------------------------------- writing
def write_checkpoint(
    root: Path,
    shards: list[list[tuple[str, str, tuple[int, ...], Callable[[], bytes] | None]]],
    config: dict,
    names: list[str] | None = None,
    sparse: bool = False,
    single_file: bool = False,
) -> None:
    """Write shards (each a list of (name, dtype, shape, data function)), the index and config.json.

    `sparse`: write headers only and extend each file to its full size, leaving the data as holes.
    """
    root.mkdir(parents=True, exist_ok=True)
    names = names or [shard_name(k + 1, len(shards)) for k in range(len(shards))]
    if single_file:
        names = ["model.safetensors"]
    weight_map, total = {}, 0
    for fname, items in zip(names, shards):
        header, offsets = build_header([(n, d, s) for n, d, s, _ in items], {"format": "pt"})
        data_size = sum(math.prod(s) * DTYPE_SIZES[d] for _, d, s, _ in items)
        if sparse:
            with open(root / fname, "wb") as f:
                f.write(header)
                f.truncate(len(header) + data_size)
        else:
            with AtomicFile(root / fname) as f:
                f.write(header)
                for _, _, _, data in items:
                    f.write(data())
        for n, d, s, _ in items:
            weight_map[n] = fname
            total += math.prod(s) * DTYPE_SIZES[d]
    if not single_file:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_bytes_atomic(root / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    write_bytes_atomic(root / "config.json", (json.dumps(config, indent=2) + "\n").encode())


def split_by_bytes(specs: list[TensorSpec], n_shards: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into `n_shards` groups of about equal bytes."""
    total = sum(math.prod(s) * DTYPE_SIZES[d] for _, s, d in specs)
    target = total / n_shards
    out: list[list[TensorSpec]] = [[]]
    acc = 0
    for spec in specs:
        size = math.prod(spec[1]) * DTYPE_SIZES[spec[2]]
        if out[-1] and acc + size / 2 > target * len(out) and len(out) < n_shards:
            out.append([])
        out[-1].append(spec)
        acc += size
    while len(out) < n_shards:
        out.append([])
    return out


def write_extra_files(root: Path, config: dict) -> None:
    """The non-weight files a release carries, so that conversions can be seen to copy them."""
    files = {
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}),
        "tokenizer_config.json": json.dumps({"model_max_length": 512, "tokenizer_class": "LlamaTokenizerFast"}),
        "generation_config.json": json.dumps({"bos_token_id": 0, "eos_token_id": 1, "do_sample": True}),
        "configuration_deepseek.py": "# remote code placeholder of the synthetic checkpoint\n",
        "modeling_deepseek.py": "# remote code placeholder of the synthetic checkpoint\n",
        "README.md": "# Synthetic DeepSeek-V3-shaped checkpoint made by dsv3conv\n",
        "LICENSE": "Synthetic test data; no license restrictions.\n",
    }
    for name, text in files.items():
        (root / name).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")


# ----------------------------------------------------------------------------------------------- tiny
def make_tiny(
    root: str | os.PathLike,
    *,
    scale_dtype: str = "F32",
    num_hidden_layers: int = 3,
    num_nextn_predict_layers: int = 1,
    n_shards: int = 4,
    seed: int = 0,
    single_file: bool = False,
    config: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Write a tiny FP8 checkpoint to `root`; return its tensors (for tests to compute references)."""
    if scale_dtype not in SCALE_DTYPE_CHOICES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPE_CHOICES}")
    root = Path(root)
    config = config or tiny_config(num_hidden_layers, num_nextn_predict_layers)
    if scale_dtype == "F8_E8M0":
        config["quantization_config"] = dict(config["quantization_config"], scale_fmt="ue8m0")
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    specs = deepseek_v3_tensors(config)
    for name, shape, dtype in specs:
        if is_scale(name):
            continue
        if dtype == FP8_DTYPE:
            # Weights with per-block magnitude differences, so that every block gets its own scale.
            w = torch.randn(shape, generator=gen) * 0.02
            w *= torch.rand((shape[0], 1), generator=gen) * 4 + 0.25
            q, s = quantize_blocks(w, scale_dtype)
            tensors[name], tensors[scale_name(name)] = q, s
        elif name.endswith("norm.weight"):
            tensors[name] = (1 + 0.1 * torch.randn(shape, generator=gen)).to(TORCH_DTYPES[dtype])
        else:
            tensors[name] = (0.02 * torch.randn(shape, generator=gen)).to(TORCH_DTYPES[dtype])
    spec_dtypes = {n: ("F8_E4M3" if t.dtype == torch.float8_e4m3fn else _st_dtype(t.dtype)) for n, t in tensors.items()}
    ordered = [(n, tuple(tensors[n].shape), spec_dtypes[n]) for n, _, _ in specs]
    groups = split_by_bytes(ordered, 1 if single_file else n_shards)
    if not single_file and n_shards > 1:
        # Store one scale in another shard than its weight, as the release sometimes does.
        moved = scale_name("model.layers.0.self_attn.o_proj.weight")
        for g in groups:
            g[:] = [s for s in g if s[0] != moved]
        groups[-1].append((moved, tuple(tensors[moved].shape), spec_dtypes[moved]))
    shards = [[(n, d, s, (lambda n=n: tensor_bytes(tensors[n]))) for n, s, d in g] for g in groups]
    write_checkpoint(root, shards, config, single_file=single_file)
    write_extra_files(root, config)
    return tensors


def _st_dtype(dtype: torch.dtype) -> str:
    return SAFETENSORS_DTYPES[dtype]


# --------------------------------------------------------------------------------------- real shapes
def make_real_shapes(
    root: str | os.PathLike, *, num_layers: int = 2, num_experts: int = 16, mtp: bool = False,
    shard_bytes: int = 4 * 1024**3, seed: int = 0, vocab_size: int | None = None,
) -> Path:
    """Write a checkpoint with the true DeepSeek-V3 tensor shapes (fewer layers/experts), random data."""
    root = Path(root)
    config = default_config()
    config.update(num_hidden_layers=num_layers, n_routed_experts=num_experts, num_nextn_predict_layers=int(mtp))
    if vocab_size is not None:  # the embedding and head are BF16 copies: shrink them to keep FP8 dominant
        config["vocab_size"] = vocab_size
    config["first_k_dense_replace"] = min(config["first_k_dense_replace"], max(num_layers - 1, 0))
    specs = deepseek_v3_tensors(config)
    total = sum(math.prod(s) * DTYPE_SIZES[d] for _, s, d in specs)
    groups = split_by_bytes(specs, max(1, round(total / shard_bytes)))
    gen = torch.Generator().manual_seed(seed)

    def data(shape: tuple[int, ...], dtype: str) -> Callable[[], bytes]:
        def make() -> bytes:
            n = math.prod(shape)
            if dtype == FP8_DTYPE:
                raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
                raw[(raw & 0x7F) == 0x7F] = 0x7E  # no NaN codes, as a real quantizer never writes them
                return raw.numpy().tobytes()
            if dtype == "F32" and n < 1 << 20:
                return tensor_bytes(torch.rand(shape, generator=gen) * 1e-3 + 1e-4)
            return tensor_bytes((torch.randn(shape, generator=gen) * 0.02).to(TORCH_DTYPES[dtype]))
        return make

    shards = [[(n, d, s, data(s, d)) for n, s, d in g] for g in groups]
    write_checkpoint(root, shards, config)
    write_extra_files(root, config)
    return root


# ------------------------------------------------------------------------------------------- replica
def make_replica(root: str | os.PathLike, n_shards: int = 163) -> Path:
    """Header-exact replica of the full DeepSeek-V3 release: 163 sparse shards, data left as holes."""
    root = Path(root)
    config = default_config()
    groups = split_by_bytes(deepseek_v3_tensors(config), n_shards)
    shards = [[(n, d, s, None) for n, s, d in g] for g in groups]
    write_checkpoint(root, shards, config, sparse=True)
    write_extra_files(root, config)
    return root
