"""Sibling releases of the format: inspect, dequant, split-mtp and verify on each, with nothing keyed on its name.

Each sibling is a tiny checkpoint from `make_sibling` (R1, V3-0324, V3.1 with F32 and with F8_E8M0 UE8M0 scales,
V3.2 indexer tensors, Kimi-K2, an MTP layer at 78, Qwen3 FP8). dsv3conv finds FP8 weights by dtype and scale
sibling and MTP layers by config; the expected figures here are computed from the generator's own tensors.
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dsv3conv.api import dequantize, split_mtp, verify_checkpoint
from dsv3conv.checkpoint import Checkpoint
from dsv3conv.errors import UsageError
from dsv3conv.inspection import inspect_checkpoint
from dsv3conv.synthetic import SIBLINGS, make_sibling, sibling_config
from tests.conftest import assert_bit_exact, cli, load_all

# What each release is, stated here rather than derived: the MTP layer ids and one FP8 tensor only it has.
MTP_IDS = {"mtp78": [78], "kimi-k2": [], "qwen3": []}  # every other sibling: [3]
SPECIFIC_FP8 = {
    "v3.2": "model.layers.0.self_attn.indexer.wk.weight",
    "kimi-k2": "model.layers.1.mlp.experts.383.up_proj.weight",
    "mtp78": "model.layers.78.mlp.experts.1.gate_proj.weight",
    "qwen3": "model.layers.1.self_attn.k_proj.weight",
}  # every other sibling: a routed expert of layer 1
SCALE_DTYPES = {"v3.1-e8m0": torch.float8_e8m0fnu, "qwen3": torch.bfloat16}  # every other sibling: float32
KIMI_SHARD_RE = re.compile(r"^model-([1-9]\d*)-of-61\.safetensors$")


@dataclass
class Sibling:
    kind: str
    src: Path
    tensors: dict[str, torch.Tensor]
    config: dict
    out: Path  # dequant output, MTP kept
    summary: dict


@pytest.fixture(scope="module", params=SIBLINGS)
def sib(request, tmp_path_factory) -> Sibling:
    """One sibling's FP8 source and its BF16 dequant output (read-only for tests)."""
    root = tmp_path_factory.mktemp(request.param)
    tensors = make_sibling(root / "src", request.param)
    summary = dequantize(root / "src", root / "out", device="cpu")
    config = json.loads((root / "src" / "config.json").read_text())
    return Sibling(request.param, root / "src", tensors, config, root / "out", summary)


def _expected_params(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, int]:
    """Parameter figures from the generator's tensors: scales and rotary inv_freq buffers are not parameters."""
    n_main = config["num_hidden_layers"]
    mtp_layers = {str(i) for i in range(n_main, n_main + (config.get("num_nextn_predict_layers") or 0))}
    top_k = config.get("num_experts_per_tok") or 0
    figures = dict.fromkeys(("main", "mtp", "mtp_unique", "embedding", "head", "main_activated", "mtp_activated"), 0)
    routed: dict[str, list[int]] = {}  # layer -> [elements, experts]
    experts_seen: set[tuple[str, str]] = set()
    for name, t in tensors.items():
        if name.endswith(("_scale_inv", ".inv_freq")):
            continue
        parts = name.split(".")
        layer = parts[2] if parts[:2] == ["model", "layers"] else None
        part = "mtp" if layer in mtp_layers else "main"
        figures[part] += t.numel()
        copy = part == "mtp" and parts[-2] in ("embed_tokens", "head")
        if part == "mtp" and not copy:
            figures["mtp_unique"] += t.numel()
        if part == "main" and name == "model.embed_tokens.weight":
            figures["embedding"] += t.numel()
        if name == "lm_head.weight":
            figures["head"] += t.numel()
        if layer is not None and parts[3:5] == ["mlp", "experts"]:
            entry = routed.setdefault(layer, [0, 0])
            entry[0] += t.numel()
            if (layer, parts[5]) not in experts_seen:
                experts_seen.add((layer, parts[5]))
                entry[1] += 1
    inactive = {"main": 0, "mtp": 0}
    for layer, (elements, experts) in routed.items():
        inactive["mtp" if layer in mtp_layers else "main"] += elements - elements * min(top_k, experts) // experts
    figures["main_activated"] = figures["main"] - figures["embedding"] - inactive["main"]
    figures["mtp_activated"] = figures["mtp_unique"] - inactive["mtp"]
    figures["scales"] = sum(t.numel() for n, t in tensors.items() if n.endswith("_scale_inv"))
    return figures


def _mtp_ids(kind: str) -> list[int]:
    return MTP_IDS.get(kind, [3])


def _specific(kind: str) -> str:
    return SPECIFIC_FP8.get(kind, "model.layers.1.mlp.experts.0.down_proj.weight")


# -------------------------------------------------------------------------------------------- inspect
def test_inspect(sib):
    r = inspect_checkpoint(Checkpoint.open(sib.src))
    assert r["problems"] == []
    assert r["model_type"] == sib.config["model_type"]
    assert r["mtp_layers"] == _mtp_ids(sib.kind)
    assert r["tensors"] == len(sib.tensors)
    fp8 = [n for n, t in sib.tensors.items() if t.dtype == torch.float8_e4m3fn]
    assert r["fp8"] == {"weights_with_scale": len(fp8), "weights_without_scale": 0, "orphan_scales": 0}
    assert r["quantization"] == sib.config["quantization_config"]
    assert _specific(sib.kind) in fp8
    scale_dtypes = {sib.tensors[n + "_scale_inv"].dtype for n in fp8}
    assert scale_dtypes == {SCALE_DTYPES.get(sib.kind, torch.float32)}


def test_inspect_parameter_figures(sib):
    r = inspect_checkpoint(Checkpoint.open(sib.src))
    assert r["params"] == _expected_params(sib.tensors, sib.config)


def test_sibling_configs():
    """The config facts each sibling stands for."""
    r1, v3 = sibling_config("r1"), sibling_config("v3-0324")
    assert set(v3) - set(r1) == {"aux_loss_alpha", "pretraining_tp", "seq_aux"}
    assert sibling_config("v3.1")["quantization_config"]["scale_fmt"] == "ue8m0"
    kimi = sibling_config("kimi-k2")
    assert (kimi["model_type"], kimi["n_routed_experts"], kimi["num_nextn_predict_layers"]) == ("kimi_k2", 384, 0)


@pytest.mark.parametrize("kind", ["kimi-k2", "qwen3"])
def test_inspect_cli_json(tmp_path, kind):
    tensors = make_sibling(tmp_path / "src", kind)
    report = json.loads(cli("inspect", tmp_path / "src", "--json", check=0).stdout)
    assert report["problems"] == [] and report["tensors"] == len(tensors)
    if kind == "kimi-k2":
        assert report["shards"] == 61 and report["mtp_layers"] == []
        assert all(KIMI_SHARD_RE.match(p.name) for p in (tmp_path / "src").glob("*.safetensors"))


# -------------------------------------------------------------------------------------------- dequant
def test_dequant(sib):
    out, meta = load_all(sib.out)
    converted = assert_bit_exact(out, sib.tensors)  # FP8 bit-exact against the reference, the rest byte for byte
    fp8 = sum(t.dtype == torch.float8_e4m3fn for t in sib.tensors.values())
    assert converted == fp8 == sib.summary["tensors_converted"]
    assert set(out) == {n for n in sib.tensors if not n.endswith("_scale_inv")}
    assert all(m == {"format": "pt"} for m in meta.values())
    config = json.loads((sib.out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == dict({k: v for k, v in sib.config.items() if k != "quantization_config"}, torch_dtype="bfloat16")
    src, dst = Checkpoint.open(sib.src), Checkpoint.open(sib.out)
    assert set(dst.shards) <= set(src.shards)  # the release's shard names, whatever their style
    if sib.kind == "kimi-k2":
        assert all(KIMI_SHARD_RE.match(name) for name in dst.shards)
        inv_freq = [n for n in out if n.endswith("rotary_emb.inv_freq")]
        assert len(inv_freq) == sib.config["num_hidden_layers"] and {out[n].dtype for n in inv_freq} == {torch.bfloat16}
    assert src.extra_files() == dst.extra_files()
    for rel in src.extra_files():
        assert filecmp.cmp(sib.src / rel, sib.out / rel, shallow=False), rel
    assert inspect_checkpoint(dst)["problems"] == []


def test_dequant_mtp_drop(sib, tmp_path):
    if not _mtp_ids(sib.kind):
        with pytest.raises(UsageError, match="declares no MTP layers"):
            dequantize(sib.src, tmp_path / "out", device="cpu", mtp="drop")
        return
    summary = dequantize(sib.src, tmp_path / "out", device="cpu", mtp="drop")
    out = Checkpoint.open(tmp_path / "out")
    prefix = f"model.layers.{_mtp_ids(sib.kind)[0]}."
    assert not any(n.startswith(prefix) for n in out.tensors)
    assert len(out.tensors) == sum(not n.endswith("_scale_inv") and not n.startswith(prefix) for n in sib.tensors)
    assert out.config["num_nextn_predict_layers"] == 0 and summary["tensors_dropped"] > 0
    assert verify_checkpoint(tmp_path / "out", against=sib.src, full=True)["ok"]


# ------------------------------------------------------------------------------------------ split-mtp
def test_split_mtp(sib, tmp_path):
    if not _mtp_ids(sib.kind):
        with pytest.raises(UsageError, match="declares no MTP layers"):
            split_mtp(sib.src, main_out=tmp_path / "main", mtp_out=tmp_path / "draft")
        assert not (tmp_path / "main").exists() and not (tmp_path / "draft").exists()
        return
    (mtp_id,) = _mtp_ids(sib.kind)
    result = split_mtp(sib.src, main_out=tmp_path / "main", mtp_out=tmp_path / "draft")
    assert result["mtp_layers"] == [mtp_id]
    assert result["mtp"]["renamed"] == [f"model.layers.{mtp_id}. -> model.layers.0."]
    src = Checkpoint.open(sib.src)
    main, draft = Checkpoint.open(tmp_path / "main"), Checkpoint.open(tmp_path / "draft")
    prefix = f"model.layers.{mtp_id}."
    assert set(main.tensors) == {n for n in sib.tensors if not n.startswith(prefix)}
    for name in main.tensors:
        assert main.read(main.tensors[name]) == src.read(src.tensors[name]), name
    assert main.config == dict(sib.config, num_nextn_predict_layers=0)
    expected = {
        "model.layers.0." + n[len(prefix):]: n for n in sib.tensors
        if n.startswith(prefix) and not n.endswith((".embed_tokens.weight", ".shared_head.head.weight"))
    }
    assert set(draft.tensors) == set(expected)
    for name, source in expected.items():
        assert draft.read(draft.tensors[name]) == src.read(src.tensors[source]), name
    assert draft.config["num_hidden_layers"] == 1
    assert draft.config["architectures"] == ["DeepseekV3ForCausalLMNextN"]
    assert draft.config["quantization_config"] == sib.config["quantization_config"]
    assert draft.config["model_type"] == sib.config["model_type"]
    if sib.kind == "v3.2":
        assert "model.layers.0.self_attn.indexer.wq_b.weight_scale_inv" in draft.tensors
    for root in (tmp_path / "main", tmp_path / "draft"):
        report = verify_checkpoint(root, full=True)
        assert report["ok"], [c for c in report["checks"] if not c["ok"]]


# --------------------------------------------------------------------------------------------- verify
def test_verify_passes_and_finds_damage(sib, tmp_path):
    report = verify_checkpoint(sib.out, against=sib.src, full=True)
    assert report["ok"] and report["mismatches"] == [], [c for c in report["checks"] if not c["ok"]]
    assert verify_checkpoint(sib.src, full=True)["ok"]
    damaged = Path(shutil.copytree(sib.out, tmp_path / "out"))
    name = _specific(sib.kind)
    info = Checkpoint.open(damaged).tensors[name]
    with open(damaged / info.file, "r+b") as f:
        f.seek(info.offset + 7)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x01]))
    report = verify_checkpoint(damaged, against=sib.src, full=True)
    assert not report["ok"] and report["mismatches"] == [name]


def test_verify_cli_on_a_sibling(tmp_path):
    make_sibling(tmp_path / "src", "qwen3")
    dequantize(tmp_path / "src", tmp_path / "out", device="cpu")
    report = json.loads(cli("verify", tmp_path / "out", "--against", tmp_path / "src", "--full", "--device", "cpu", "--json",
                                check=0).stdout)
    assert report["ok"] and report["mismatches"] == []
