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
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the generators of random data import torch when called: replicas and refusals need none
    import torch

from dsv3conv import dtypes
from dsv3conv.checkpoint import INDEX_NAME
from dsv3conv.dtypes import DTYPE_SIZES
from dsv3conv.kernels.fp8_numpy import E4M3_MAX
from dsv3conv.layout import FP8_DTYPE, deepseek_v3_tensors, default_config, is_scale, scale_name, scale_shape
from dsv3conv.safetensors_format import build_header
from dsv3conv.writer import AtomicFile, write_bytes_atomic

SCALE_DTYPE_CHOICES = ("F32", "BF16", "F16", "F8_E8M0")

TensorSpec = tuple[str, tuple[int, ...], str]


PT_METADATA = {"format": "pt"}  # the `__metadata__` torch's safetensors writer puts in every header


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
    import torch

    rows, cols = w.shape
    pr, pc = -rows % block, -cols % block
    padded = torch.nn.functional.pad(w.abs(), (0, pc, 0, pr))
    amax = padded.view((rows + pr) // block, block, (cols + pc) // block, block).amax(dim=(1, 3))
    scale = (amax / E4M3_MAX).clamp(min=1e-12)
    if scale_dtype == "F8_E8M0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scale = scale.to(dtypes.TORCH_DTYPES[scale_dtype]).to(torch.float32)  # the scale actually stored
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    q = (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(dtypes.TORCH_DTYPES[scale_dtype])


def tensor_bytes(t: torch.Tensor) -> bytes:
    import torch

    return t.contiguous().view(torch.uint8).numpy().tobytes()


# -------------------------------------------------------------------------------------------- writing
def write_checkpoint(
    root: Path,
    shards: list[list[tuple[str, str, tuple[int, ...], Callable[[], bytes] | None]]],
    config: dict,
    names: list[str] | None = None,
    sparse: bool = False,
    single_file: bool = False,
    metadata: dict[str, str] | None = PT_METADATA,
) -> None:
    """Write shards (each a list of (name, dtype, shape, data function)), the index and config.json.

    `sparse`: write headers only and extend each file to its full size, leaving the data as holes.
    `metadata`: each header's `__metadata__` (None: none, as some releases' writers leave it out).
    """
    root.mkdir(parents=True, exist_ok=True)
    names = names or [shard_name(k + 1, len(shards)) for k in range(len(shards))]
    if single_file:
        names = ["model.safetensors"]
    weight_map, total = {}, 0
    for fname, items in zip(names, shards):
        header, _ = build_header([(n, d, s) for n, d, s, _ in items], metadata)
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
    import torch

    if scale_dtype not in SCALE_DTYPE_CHOICES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPE_CHOICES}")
    root = Path(root)
    config = config or tiny_config(num_hidden_layers, num_nextn_predict_layers)
    if scale_dtype == "F8_E8M0":
        config["quantization_config"] = dict(config["quantization_config"], scale_fmt="ue8m0")
    gen = torch.Generator().manual_seed(seed)
    specs = deepseek_v3_tensors(config)
    tensors = _random_tensors(specs, gen, lambda w: quantize_blocks(w, scale_dtype))
    _write_tensors(root, specs, tensors, config, 1 if single_file else n_shards, single_file=single_file)
    write_extra_files(root, config)
    return tensors


def _random_tensors(
    specs: list[TensorSpec], gen: torch.Generator,
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Values for `specs` (scales come from `quantize`, whatever dtype the spec names for them)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, shape, dtype in specs:
        if is_scale(name):
            continue
        if dtype == FP8_DTYPE:
            # Weights with per-block magnitude differences, so that every block gets its own scale.
            w = torch.randn(shape, generator=gen) * 0.02
            w *= torch.rand((shape[0], 1), generator=gen) * 4 + 0.25
            q, s = quantize(w)
            tensors[name], tensors[scale_name(name)] = q, s
        elif name.endswith("norm.weight"):
            tensors[name] = (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtypes.TORCH_DTYPES[dtype])
        else:
            tensors[name] = (0.02 * torch.randn(shape, generator=gen)).to(dtypes.TORCH_DTYPES[dtype])
    return tensors


def _write_tensors(
    root: Path, specs: list[TensorSpec], tensors: dict[str, torch.Tensor], config: dict, n_shards: int,
    single_file: bool = False, names: list[str] | None = None,
) -> None:
    """Write `tensors` in the order of `specs`, split into `n_shards` of about equal bytes."""
    spec_dtypes = {n: _st_dtype(t.dtype) for n, t in tensors.items()}
    ordered = [(n, tuple(tensors[n].shape), spec_dtypes[n]) for n, _, _ in specs]
    groups = split_by_bytes(ordered, n_shards)
    moved = scale_name("model.layers.0.self_attn.o_proj.weight")
    if not single_file and n_shards > 1 and moved in tensors:
        # Store one scale in another shard than its weight, as the release sometimes does.
        for g in groups:
            g[:] = [s for s in g if s[0] != moved]
        groups[-1].append((moved, tuple(tensors[moved].shape), spec_dtypes[moved]))
    shards = [[(n, d, s, (lambda n=n: tensor_bytes(tensors[n]))) for n, s, d in g] for g in groups]
    write_checkpoint(root, shards, config, names=names, single_file=single_file)


def _st_dtype(dtype: torch.dtype) -> str:
    return dtypes.SAFETENSORS_DTYPES[dtype]


# ------------------------------------------------------------------------------------------- siblings
SIBLINGS = ("r1", "v3-0324", "v3.1", "v3.1-e8m0", "v3.2", "kimi-k2", "mtp78", "qwen3")
"""Other releases in the DeepSeek-V3 FP8 block format, at tiny sizes (see `make_sibling`)."""

_R1_MISSING_KEYS = ("aux_loss_alpha", "pretraining_tp", "seq_aux")
_QWEN3_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [128, 128]}


def unpadded_shard_name(k: int, n: int) -> str:
    """Shard names as Kimi-K2 spells them (`model-1-of-61.safetensors`)."""
    return f"model-{k}-of-{n}.safetensors"


def sibling_config(kind: str) -> dict:
    """The tiny config.json of sibling `kind` (one of `SIBLINGS`)."""
    if kind not in SIBLINGS:
        raise ValueError(f"kind must be one of {SIBLINGS}")
    if kind == "qwen3":
        return {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "head_dim": 64, "hidden_act": "silu",
            "hidden_size": 200, "initializer_range": 0.02, "intermediate_size": 300, "max_position_embeddings": 512,
            "max_window_layers": 2, "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1,
            "quantization_config": dict(_QWEN3_QUANTIZATION), "rms_norm_eps": 1e-06, "rope_scaling": None,
            "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "use_cache": True, "use_sliding_window": False, "vocab_size": 320,
        }
    c = tiny_config()
    if kind == "r1":  # R1's config.json lacks these three keys of V3's
        for key in _R1_MISSING_KEYS:
            c.pop(key)
    elif kind == "v3.1":  # UE8M0 scale values (powers of two) stored as F32 tensors
        c["quantization_config"] = dict(c["quantization_config"], scale_fmt="ue8m0")
    elif kind == "v3.2":
        c.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32",
                 index_n_heads=2, index_head_dim=64, index_topk=2048)
    elif kind == "kimi-k2":  # no MTP, 384 routed experts (tiny ones), one MoE layer
        c.update(model_type="kimi_k2", num_hidden_layers=2, num_nextn_predict_layers=0, n_routed_experts=384,
                 num_experts_per_tok=8, moe_intermediate_size=16, routed_scaling_factor=2.827)
    elif kind == "mtp78":  # MTP layer at 78, as GLM-style releases put it; few experts to stay small
        c.update(num_hidden_layers=78, first_k_dense_replace=3, n_routed_experts=2, num_experts_per_tok=1)
    return c


def sibling_tensors(kind: str, config: dict) -> list[TensorSpec]:
    """(name, shape, dtype) of every tensor of sibling `kind` under `config`, in release order."""
    if kind == "qwen3":
        return qwen3_tensors(config)
    specs = deepseek_v3_tensors(config)
    if kind == "v3.2":
        specs = _after_attention(specs, lambda layer: _indexer_tensors(layer, config))
    elif kind == "kimi-k2":
        rope_half = config["qk_rope_head_dim"] // 2
        specs = _after_attention(
            specs, lambda layer: [(f"model.layers.{layer}.self_attn.rotary_emb.inv_freq", (rope_half,), "BF16")]
        )
    return specs


def qwen3_tensors(config: dict) -> list[TensorSpec]:
    """A Qwen3 FP8 dense model: no MoE, no MTP; every linear layer FP8 with a *_scale_inv sibling."""
    hidden, vocab, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    out: list[TensorSpec] = [("model.embed_tokens.weight", (vocab, hidden), "BF16")]

    def fp8(name: str, shape: tuple[int, int]) -> None:
        out.extend([(name, shape, FP8_DTYPE), (scale_name(name), scale_shape(shape), "BF16")])

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out.append((f"{p}.input_layernorm.weight", (hidden,), "BF16"))
        fp8(f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden))
        fp8(f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden))
        fp8(f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden))
        fp8(f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim))
        out.append((f"{p}.self_attn.q_norm.weight", (head_dim,), "BF16"))
        out.append((f"{p}.self_attn.k_norm.weight", (head_dim,), "BF16"))
        out.append((f"{p}.post_attention_layernorm.weight", (hidden,), "BF16"))
        fp8(f"{p}.mlp.gate_proj.weight", (inter, hidden))
        fp8(f"{p}.mlp.up_proj.weight", (inter, hidden))
        fp8(f"{p}.mlp.down_proj.weight", (hidden, inter))
    out.append(("model.norm.weight", (hidden,), "BF16"))
    if not config.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (vocab, hidden), "BF16"))
    return out


def _indexer_tensors(layer: int, config: dict) -> list[TensorSpec]:
    """DeepSeek-V3.2's sparse-attention indexer: wq_b and wk FP8 with scales; k_norm and weights_proj BF16."""
    p = f"model.layers.{layer}.self_attn.indexer"
    heads, dim = config["index_n_heads"], config["index_head_dim"]
    wq_b, wk = (heads * dim, config["q_lora_rank"]), (dim, config["hidden_size"])
    return [
        (f"{p}.wq_b.weight", wq_b, FP8_DTYPE), (f"{p}.wq_b.weight_scale_inv", scale_shape(wq_b), "F32"),
        (f"{p}.wk.weight", wk, FP8_DTYPE), (f"{p}.wk.weight_scale_inv", scale_shape(wk), "F32"),
        (f"{p}.k_norm.weight", (dim,), "BF16"), (f"{p}.k_norm.bias", (dim,), "BF16"),
        (f"{p}.weights_proj.weight", (heads, config["hidden_size"]), "BF16"),
    ]


def _after_attention(specs: list[TensorSpec], extra: Callable[[int], list[TensorSpec]]) -> list[TensorSpec]:
    """Insert `extra(layer)` after each layer's attention output projection (and its scale)."""
    out: list[TensorSpec] = []
    for spec in specs:
        out.append(spec)
        m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight_scale_inv", spec[0])
        if m:
            out.extend(extra(int(m.group(1))))
    return out


def make_sibling(
    root: str | os.PathLike, kind: str, *, seed: int = 0, n_shards: int | None = None,
    config_overrides: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Write a tiny FP8 checkpoint of another release of the format; return its tensors.

    r1         DeepSeek-R1: V3's layout; config.json without aux_loss_alpha, pretraining_tp, seq_aux
    v3-0324    DeepSeek-V3-0324: V3's layout and config keys
    v3.1       `scale_fmt: ue8m0`: power-of-two scale values stored as F32
    v3.1-e8m0  `scale_fmt: ue8m0` with F8_E8M0 scale tensors
    v3.2       V3.2-style sparse-attention indexer tensors in every layer (model_type deepseek_v32)
    kimi-k2    model_type kimi_k2, 384 routed experts, no MTP, BF16 rotary_emb.inv_freq tensors,
               unpadded shard names (`model-1-of-61.safetensors`)
    mtp78      the MTP layer at id 78 (78 main layers)
    qwen3      Qwen3 FP8: dense, no MTP, q/k/v/o_proj, q_norm/k_norm, BF16 scales

    `config_overrides` changes config.json fields before the tensors are derived from it.
    """
    import torch

    root = Path(root)
    config = sibling_config(kind)
    config.update(config_overrides or {})
    specs = sibling_tensors(kind, config)
    # (dtype whose rounding the scale values get, dtype the scale tensors are stored in)
    rounding, stored = {"qwen3": ("BF16", "BF16"), "v3.1": ("F8_E8M0", "F32"),
                        "v3.1-e8m0": ("F8_E8M0", "F8_E8M0")}.get(kind, ("F32", "F32"))
    if kind == "v3.1-e8m0":
        config["quantization_config"] = dict(config["quantization_config"], scale_fmt="ue8m0")

    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = quantize_blocks(w, rounding)
        return q, scale.to(dtypes.TORCH_DTYPES[stored])  # exact: powers of two fit in F32

    tensors = _random_tensors(specs, torch.Generator().manual_seed(seed), quantize)
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # the values a rotary embedding computes
            dim = 2 * t.numel()
            exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
            tensors[name] = (1.0 / config.get("rope_theta", 10000) ** exponents).to(t.dtype)
    n = n_shards or {"kimi-k2": 61, "mtp78": 8}.get(kind, 4)
    names = [unpadded_shard_name(k + 1, n) for k in range(n)] if kind == "kimi-k2" else None
    _write_tensors(root, specs, tensors, config, n, names=names)
    _write_sibling_files(root, kind)
    return tensors


def _write_sibling_files(root: Path, kind: str) -> None:
    """The non-weight files of the release: tokenizer, generation config, remote code where it has some."""
    files = {
        "tokenizer_config.json": json.dumps({"model_max_length": 512}),
        "generation_config.json": json.dumps({"bos_token_id": 0, "eos_token_id": 1}),
        "README.md": f"# Synthetic {kind}-style checkpoint made by dsv3conv\n",
        "LICENSE": "Synthetic test data; no license restrictions.\n",
    }
    if kind == "qwen3":
        files.update({"vocab.json": "{}", "merges.txt": "#version: 0.2\n"})
    else:
        files.update({"configuration_deepseek.py": "# remote code placeholder\n",
                      "modeling_deepseek.py": "# remote code placeholder\n"})
    if kind == "kimi-k2":
        files.update({"tiktoken.model": "placeholder\n", "tokenization_kimi.py": "# remote code placeholder\n"})
    else:
        files["tokenizer.json"] = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}})
    for name, text in files.items():
        (root / name).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")


# --------------------------------------------------------------------------------------- real shapes
def make_real_shapes(
    root: str | os.PathLike, *, num_layers: int = 2, num_experts: int = 16, mtp: bool = False,
    shard_bytes: int = 4 * 1024**3, seed: int = 0, vocab_size: int | None = None, dense_layers: int | None = None,
) -> Path:
    """Write a checkpoint with the true DeepSeek-V3 tensor shapes (fewer layers/experts), random data.

    `dense_layers`: how many of the layers have a dense MLP (by default V3's three, at most all but one)."""
    import torch

    root = Path(root)
    config = default_config()
    config.update(num_hidden_layers=num_layers, n_routed_experts=num_experts, num_nextn_predict_layers=int(mtp))
    if vocab_size is not None:  # the embedding and head are BF16 copies: shrink them to keep FP8 dominant
        config["vocab_size"] = vocab_size
    dense = min(config["first_k_dense_replace"], max(num_layers - 1, 0)) if dense_layers is None else dense_layers
    config["first_k_dense_replace"] = dense
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
            return tensor_bytes((torch.randn(shape, generator=gen) * 0.02).to(dtypes.TORCH_DTYPES[dtype]))
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


# ---------------------------------------------------------------------------------- `dsv3conv example`
EXAMPLES = {
    "fp8": "a tiny FP8 release: DeepSeek-V3 names and dtypes, 3 layers + MTP at layer 3, 4 shards (2.5 MB)",
    "real-shapes": "DeepSeek-V3's true tensor shapes, 2 layers of 8 experts, small vocabulary (about 1.6 GB)",
    "replica": "a header-exact replica of the full DeepSeek-V3 release: 163 sparse shards (688 GB apparent, "
               "no data; for --dry-run and inspect)",
    **{kind: f"a tiny FP8 checkpoint laid out as {kind}" for kind in SIBLINGS},
}


def make_example(kind: str, root: str | os.PathLike) -> Path:
    """Write the example checkpoint `kind` (a key of `EXAMPLES`) into `root`."""
    if kind == "fp8":
        make_tiny(root)
    elif kind == "real-shapes":
        make_real_shapes(root, num_layers=2, num_experts=8, vocab_size=16384)
    elif kind == "replica":
        make_replica(root)
    elif kind in SIBLINGS:
        make_sibling(root, kind)
    else:
        raise ValueError(f"kind must be one of {sorted(EXAMPLES)}")
    return Path(root)
