"""Synthetic checkpoints of the DeepSeek-V4 family and of compressed-tensors FP8_BLOCK, for tests and examples.

- `make_v4(root, "flash")`: V4-Flash-like: FP8 weights with F8_E8M0 128x128 `.scale`s, routed experts packed
  MXFP4 (I8 + F8_E8M0 per 32, `expert_dtype: fp4`), hash-routed first layer (I64 `tid2eid`), compressor and
  indexer tensors, F32 hyper-connection tensors, an MTP module at `mtp.0`.
- `make_v4(root, "flash-base")`: the same with FP8 routed experts (no `expert_dtype`).
- `make_v4(root, "0731")`: -0731-like: MXFP4 experts and a three-stage DSpark drafter under `mtp.*`.
- `make_compressed_tensors(root)`: a DeepSeek-V3-layout model quantized the way llm-compressor's FP8_BLOCK
  scheme stores it: `.weight_scale` multipliers, `quant_method: compressed-tensors`, an `ignore` list whose
  modules (`lm_head`, the routers, `kv_a_proj_with_mqa`) stay BF16.
Shapes are tiny; some FP8 dimensions are not multiples of 128. `v4_flash_config` gives V4-Flash's own
dimensions (as transformers' `DeepseekV4Config` states them), shrinkable, for benchmarks (`make_v4(...,
config=...)`, scripts/bench_v4.py).
- `make_v4_replica(root)`: every header of the DeepSeek-V4-Flash release (46 shards, 69,187 tensors) as sparse
  files, laid out as the release is (docs/formats.md says from what): for `inspect` and `--dry-run`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the generators of random data when called (as in `synthetic`)
    import torch

from dsv3conv import dtypes
from dsv3conv.formats import ignored, mx_scale_shape
from dsv3conv.layout import FP8_DTYPE, deepseek_v3_tensors, is_scale, scale_shape
from dsv3conv.layout_v4 import deepseek_v4_tensors, mtp_module_id, v4_layer_id
from dsv3conv.synthetic import (
    EXAMPLES,
    _write_tensors,
    make_example,
    quantize_blocks,
    tiny_config,
    write_checkpoint,
    write_extra_files,
)

V4_KINDS = ("flash", "flash-base", "0731")
V4_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                   "weight_block_size": [128, 128]}
CT_IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*kv_a_proj_with_mqa$"]


def v4_tiny_config(kind: str = "flash") -> dict:
    """A DeepSeek-V4 config shrunk to test size; `kind` one of `V4_KINDS`."""
    if kind not in V4_KINDS:
        raise ValueError(f"kind must be one of {V4_KINDS}")
    c = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16",
        "vocab_size": 320, "hidden_size": 256, "num_hidden_layers": 3, "num_nextn_predict_layers": 1,
        "num_attention_heads": 2, "head_dim": 64, "q_lora_rank": 96, "o_lora_rank": 80, "o_groups": 1,
        "qk_rope_head_dim": 16, "moe_intermediate_size": 160, "n_routed_experts": 4, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "num_hash_layers": 1, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
        "compress_ratios": [0, 4, 128, 0], "index_n_heads": 2, "index_head_dim": 32, "index_topk": 64,
        "sliding_window": 128, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5,
        "expert_dtype": "fp4", "quantization_config": dict(V4_QUANTIZATION),
    }
    if kind == "flash-base":
        del c["expert_dtype"]
    elif kind == "0731":
        c.update(num_nextn_predict_layers=3, dspark_target_layer_ids=[0, 1, 2], dspark_block_size=5,
                 dspark_markov_rank=16)
    return c


def v4_flash_config(kind: str = "flash", **overrides) -> dict:
    """V4-Flash's dimensions (43 layers of 256 routed experts, hidden 4096, ...); `overrides` shrink it. With
    fewer layers the compressors cycle CSA (4), HCA (128), none, so that one layer already holds an indexer."""
    c = v4_tiny_config(kind)
    c.update(vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
             q_lora_rank=1024, o_lora_rank=1024, o_groups=8, qk_rope_head_dim=64, moe_intermediate_size=2048,
             n_routed_experts=256, num_experts_per_tok=6, num_hash_layers=3, index_n_heads=64, index_head_dim=128,
             index_topk=512)
    c.update(overrides)
    n = c["num_hidden_layers"]
    if n == 43 and "compress_ratios" not in overrides:  # the release's: layers 2, 4, .., 42 CSA, 3, .., 41 HCA
        c["compress_ratios"] = [0, 0] + [4, 128] * 20 + [4, 0]  # the last entry: the MTP module
    elif "compress_ratios" not in overrides:
        c["compress_ratios"] = [(4, 128, 0)[i % 3] for i in range(n)] + [0]
        c["num_hash_layers"] = min(c["num_hash_layers"], max(n - 1, 0))
    return c


def _mxfp4(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed E2M1 bytes and E8M0 scales between 2^-9 and 2^-5 (no NaN code)."""
    import torch

    packed = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    scale = torch.randint(118, 123, mx_scale_shape(shape), dtype=torch.uint8, generator=gen)
    return packed, scale.view(torch.float8_e8m0fnu)


def _values(specs, gen: torch.Generator, scale_dtype: str, config: dict) -> dict[str, torch.Tensor]:
    """Data for `specs` (each scale listed after its weight): FP8 weights block-quantized with `scale_dtype`
    scales, packed FP4 with E8M0 scales, router tables, the rest small random values."""
    import torch

    names = {n for n, _, _ in specs}
    tensors: dict[str, torch.Tensor] = {}
    for name, shape, dtype in specs:
        if name in tensors:
            continue
        if dtype in (FP8_DTYPE, "I8"):
            sname = next(s for s in (name + "_scale_inv", name[:-7] + ".scale", name[:-7] + ".weight_scale") if s in names)
            if dtype == "I8":
                tensors[name], tensors[sname] = _mxfp4(shape, gen)
                continue
            w = torch.randn(shape, generator=gen) * 0.02 * (torch.rand((shape[0], 1), generator=gen) * 4 + 0.25)
            tensors[name], tensors[sname] = quantize_blocks(w, scale_dtype)
        elif dtype == "I64":
            tensors[name] = torch.randint(0, config["n_routed_experts"], shape, dtype=torch.int64, generator=gen)
        else:  # scales came with their weights (listed first)
            base = 1.0 if name.endswith("norm.weight") else 0.0
            tensors[name] = (base + 0.02 * torch.randn(shape, generator=gen)).to(dtypes.TORCH_DTYPES[dtype])
    return tensors


def make_v4(root: str | os.PathLike, kind: str = "flash", *, seed: int = 0, n_shards: int = 3,
            config: dict | None = None) -> dict[str, torch.Tensor]:
    """Write a tiny DeepSeek-V4-family checkpoint (see the module docstring), or one of `config`'s
    dimensions (`v4_flash_config`); return its tensors."""
    import torch

    root = Path(root)
    config = config if config is not None else v4_tiny_config(kind)
    specs = deepseek_v4_tensors(config)
    tensors = _values(specs, torch.Generator().manual_seed(seed), "F8_E8M0", config)
    _write_tensors(root, specs, tensors, config, n_shards)
    write_extra_files(root, config)
    return tensors


def ct_config(scale_dtype: str = "BF16") -> dict:
    """A DeepSeek-V3 tiny config carrying llm-compressor's FP8_BLOCK quantization_config."""
    c = tiny_config()
    c["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128],
                        "symmetric": True, "dynamic": False, "scale_dtype": {"BF16": "bfloat16", "F32": "float32"}[scale_dtype]},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128,
                                  "symmetric": True, "dynamic": True},
        }},
        "ignore": list(CT_IGNORE),
    }
    return c


def compressed_tensors_specs(config: dict, scale_dtype: str = "BF16") -> list[tuple[str, tuple[int, ...], str]]:
    """V3's tensors renamed to compressed-tensors' `.weight_scale`; modules in `ignore` stored BF16."""
    ignore = config["quantization_config"]["ignore"]
    out = []
    for name, shape, dtype in deepseek_v3_tensors(config):
        if is_scale(name):
            continue
        module = name[: -len(".weight")]
        if dtype == FP8_DTYPE and not any(ignored(module, p) for p in ignore):
            out += [(name, shape, FP8_DTYPE), (module + ".weight_scale", scale_shape(shape), scale_dtype)]
        else:
            out.append((name, shape, "BF16" if dtype == FP8_DTYPE else dtype))
    return out


def make_compressed_tensors(
    root: str | os.PathLike, *, scale_dtype: str = "BF16", seed: int = 0, n_shards: int = 3
) -> dict[str, torch.Tensor]:
    """Write a tiny compressed-tensors FP8_BLOCK checkpoint (DeepSeek-V3 layout); return its tensors."""
    import torch

    root = Path(root)
    config = ct_config(scale_dtype)
    specs = compressed_tensors_specs(config, scale_dtype)
    tensors = _values(specs, torch.Generator().manual_seed(seed), scale_dtype, config)
    _write_tensors(root, specs, tensors, config, n_shards)
    write_extra_files(root, config)
    return tensors


# --------------------------------------------------------------------------------------- the replica
# safetensors' dtype order: its writer lays tensors out by dtype, this order reversed, then by name.
_LIBRARY_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
                        "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")


def v4_release_shard(name: str, num_layers: int) -> int:
    """The shard (1-based) of `name` in a V4 release: the embedding alone, one per main layer, then the head
    (with `norm` and `hc_head_*`), then the `mtp.*` part."""
    if name == "embed.weight":
        return 1
    layer = v4_layer_id(name)
    if layer is not None:
        return layer + 2
    return num_layers + (3 if mtp_module_id(name) is not None else 2)


def make_v4_replica(root: str | os.PathLike) -> Path:
    """Header-exact replica of DeepSeek-V4-Flash: 46 sparse shards (160 GB apparent), no data, no
    `__metadata__`, tensors in the order the safetensors writer gives them."""
    root = Path(root)
    config = v4_flash_config("flash")
    n = config["num_hidden_layers"]
    n_shards = n + 2 + (1 if config.get("num_nextn_predict_layers") else 0)
    shards: list[list] = [[] for _ in range(n_shards)]
    for name, shape, dtype in deepseek_v4_tensors(config):
        shards[v4_release_shard(name, n) - 1].append((name, dtype, shape, None))
    for items in shards:
        items.sort(key=lambda t: (-_LIBRARY_DTYPE_ORDER.index(t[1]), t[0]))
    names = [f"model-{k:05d}-of-{n_shards:05d}.safetensors" for k in range(1, n_shards + 1)]  # as V4 spells them
    write_checkpoint(root, shards, config, names=names, sparse=True, metadata=None)
    write_extra_files(root, config)
    return root


V4_EXAMPLES = {
    "v4-replica": "a header-exact replica of the DeepSeek-V4-Flash release: 46 sparse shards (160 GB apparent, no "
                  "data; for --dry-run and inspect)",
    "v4-flash": "a tiny DeepSeek-V4-Flash: FP8 with E8M0 scales, packed-FP4 (MXFP4) routed experts, MTP at mtp.0",
    "v4-flash-base": "a tiny DeepSeek-V4-Flash-Base: block-FP8 routed experts",
    "v4-0731": "a tiny DeepSeek-V4-0731: MXFP4 experts and a DSpark drafter under mtp.*",
    "compressed-tensors": "a tiny llm-compressor FP8_BLOCK checkpoint (DeepSeek-V3 layout, .weight_scale, an ignore list)",
}
ALL_EXAMPLES = {**EXAMPLES, **V4_EXAMPLES}


def make_any_example(kind: str, root: str | os.PathLike) -> Path:
    """Write the example checkpoint `kind` (a key of `ALL_EXAMPLES`) into `root`."""
    if kind == "v4-replica":
        return make_v4_replica(root)
    if kind.startswith("v4-"):
        make_v4(root, kind.removeprefix("v4-"))
        return Path(root)
    if kind == "compressed-tensors":
        make_compressed_tensors(root)
        return Path(root)
    return make_example(kind, root)
