"""`dsv3conv example v4-replica`: every header of the DeepSeek-V4-Flash release as sparse files, checked against
the release's published shard sizes, with the inspect figures recomputed here from the config by arithmetic."""

from __future__ import annotations

import json
import struct

import pytest

from dsv3conv.synthetic_v4 import v4_flash_config
from tests.conftest import bytes_read, cli

# File sizes of the 46 shards of deepseek-ai/DeepSeek-V4-Flash at revision 60d8d70770c6776ff598c94bb586a859a38244f1
# (model-00001-of-00046.safetensors first). Each is 8 + header + tensor data: equal sizes mean the same tensors
# (names, dtypes, shapes) in each shard, and headers of the same length.
_CSA, _HCA = 3590026352, 3568770544  # a layer from 10 on (two-digit names) with / without the indexer
RELEASE_SHARD_BYTES = (
    [1059061856, 3566321192, 3566321192, 3596229272, 3568768976]  # embed; layers 0, 1 (none); 2 (CSA, hash); 3
    + [3590024776, 3568768976] * 3 + [_CSA, _HCA] * 16 + [_CSA]  # layers 4 .. 42
    + [1059332516, 3593956092]  # head, norm, hc_head; the MTP module
)
HEADERS_BOUND = 16 * 1024**2  # the 46 headers take 7.6 MB; the tensor data 160 GB


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4-replica") / "DeepSeek-V4-Flash"
    cli("example", "v4-replica", root)
    return root


def test_shard_sizes_are_the_release_s(replica) -> None:
    files = sorted(replica.glob("*.safetensors"))
    assert [p.name for p in files] == [f"model-{k:05d}-of-00046.safetensors" for k in range(1, 47)]
    sizes = [p.stat().st_size for p in files]
    differ = [(p.name, got, want) for p, got, want in zip(files, sizes, RELEASE_SHARD_BYTES) if got != want]
    assert not differ, differ
    assert sum(p.stat().st_blocks for p in files) * 512 < HEADERS_BOUND  # holes: no data written
    # A byte-level pin: the first shard holds the embedding alone, its header without `__metadata__`.
    head = (replica / files[0].name).read_bytes()[:96]
    text = b'{"embed.weight":{"dtype":"BF16","shape":[129280,4096],"data_offsets":[0,1059061760]}}'
    assert head[:8] == struct.pack("<Q", 88) and head[8:96] == text + b" " * (88 - len(text))


def _expected(config: dict) -> dict:
    """Tensor counts and bytes per dtype of the release, from its config by arithmetic (not from the generator):
    per block 2 norms, 6 hyper-connection F32s, q_norm, kv_norm, attn_sink, the router (weight, and bias or a
    hash table), 5 attention and 3 shared-expert FP8 weights, 3 x n_routed_experts packed FP4 experts, each
    quantized weight with its E8M0 scale; a compressor (wkv, wgate, norm, ape) where compress_ratios says so,
    with an indexer (a compressor at index_head_dim, wq_b, weights_proj) at ratio 4."""
    h, heads, hd, q, o_g, o_r = (config[k] for k in ("hidden_size", "num_attention_heads", "head_dim",
                                                      "q_lora_rank", "o_groups", "o_lora_rank"))
    inter, e, v, hc = config["moe_intermediate_size"], config["n_routed_experts"], config["vocab_size"], 4
    ih, idim = config["index_n_heads"], config["index_head_dim"]
    count = {"BF16": 3, "F32": 3, "I64": 0, "F8_E4M3": 0, "F8_E8M0": 0, "I8": 0}
    size = dict.fromkeys(count, 0)
    size["BF16"] = 2 * (2 * v * h + h)
    size["F32"] = 4 * (hc * hc * h + hc + 1)

    def add(dtype: str, numel: int, n: int = 1) -> None:
        count[dtype] += n
        size[dtype] += n * numel * {"BF16": 2, "F32": 4, "I64": 8}.get(dtype, 1)

    def fp8(rows: int, cols: int, n: int = 1) -> None:
        add("F8_E4M3", rows * cols, n)
        add("F8_E8M0", -(-rows // 128) * -(-cols // 128), n)

    def compressor(width: int, dim: int, ratio: int) -> None:
        add("BF16", width * h, 2)
        add("BF16", dim)
        add("F32", ratio * width)

    blocks = [(r, i < config["num_hash_layers"]) for i, r in enumerate(config["compress_ratios"][:-1])]
    blocks.append((0, False))  # the MTP module: its own block, then e_proj, h_proj, 3 norms and hc_head
    for ratio, hashed in blocks:
        add("BF16", h, 2), add("BF16", q), add("BF16", hd), add("BF16", e * h)
        add("F32", (2 + hc) * hc * hc * h, 2), add("F32", (2 + hc) * hc, 2), add("F32", 3, 2), add("F32", heads)
        add("I64", v * config["num_experts_per_tok"]) if hashed else add("F32", e)
        fp8(q, h), fp8(heads * hd, q), fp8(hd, h), fp8(o_g * o_r, heads * hd // o_g), fp8(h, o_g * o_r)
        fp8(inter, h, 2), fp8(h, inter)
        add("I8", inter * h // 2, 2 * e), add("I8", h * inter // 2, e)
        add("F8_E8M0", inter * h // 32, 2 * e), add("F8_E8M0", h * inter // 32, e)
        if ratio:
            compressor(hd * (2 if ratio == 4 else 1), hd, ratio)
        if ratio == 4:
            compressor(2 * idim, idim, 4)
            fp8(ih * idim, q)
            add("BF16", ih * h)
    fp8(h, h, 2)
    add("BF16", h, 3)
    add("F32", hc * hc * h), add("F32", hc), add("F32", 1)
    return {"count": count, "bytes": size}


def test_inspect_figures_from_headers_only(replica) -> None:
    config = v4_flash_config("flash")
    want = _expected(config)
    before = bytes_read()
    r = json.loads(cli("inspect", replica, "--json").stdout)
    assert bytes_read() - before < HEADERS_BOUND, "inspect read tensor data, not only headers"
    assert r["problems"] == []
    assert r["shards"] == 46
    assert r["tensors"] == sum(want["count"].values()) == 69187
    assert r["dtypes"] == {k: n for k, n in want["count"].items() if n}
    assert r["tensor_bytes"] == r["total_size"] == sum(want["bytes"].values()) == 159_609_485_896
    packed = 3 * config["n_routed_experts"] * (config["num_hidden_layers"] + 1)
    assert r["formats"]["mxfp4 (E2M1 pairs, F8_E8M0 scale per 32)"] == packed == 33792
    assert r["formats"]["fp8_block (scale, F8_E8M0 scales)"] == want["count"]["F8_E4M3"] == 375
    assert r["layout"] == {"main_layers": 43, "mtp_kind": "mtp", "mtp_modules": [0], "mtp_tensors": 1575}
    # The data section of the shards: what the published file sizes leave once the headers are taken off.
    headers = sum(8 + struct.unpack("<Q", p.open("rb").read(8))[0] for p in replica.glob("*.safetensors"))
    assert sum(RELEASE_SHARD_BYTES) - headers == r["tensor_bytes"]


def test_bytes_per_format(replica) -> None:
    """Bytes per dtype from the headers equal the arithmetic: packed FP4 experts (I8) are 89% of the release,
    their E8M0 scales 5.5%, the dense FP8 weights 3.8%."""
    from dsv3conv.checkpoint import Checkpoint

    got: dict[str, int] = {}
    for t in Checkpoint.open(replica).tensors.values():
        got[t.dtype] = got.get(t.dtype, 0) + t.nbytes
    assert got == _expected(v4_flash_config("flash"))["bytes"]
    assert got == {"I8": 141_733_920_768, "F8_E8M0": 8_858_737_664, "F8_E4M3": 6_023_020_544,
                   "BF16": 2_830_518_528, "F32": 144_672_072, "I64": 18_616_320}
