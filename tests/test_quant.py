"""`quant`: BF16 -> 128x128 block FP8, and back.

- The CPU backend's compiled path equals `reference_quant` bit for bit (awkward shapes, every scale format).
- dequant(quant(x)) is within e4m3's rounding of x in every block: half a unit in the last place, i.e.
  |err| <= 2^-4 |x| where x / s is an e4m3 normal (>= 2^-6) and |err| <= 2^-10 s in the subnormal range
  (spacing 2^-9 s), plus float32 rounding of the division and the product; an all-zero block gets scale 1
  and dequantizes to exactly 0.
- quant(dequant(fp8)) of a release made with the same recipe (`make_tiny`, `quantize_blocks`) gives back
  its FP8 bytes; what does not come back, and why, is measured and asserted (see
  `test_round_trip_of_a_release_made_with_the_same_recipe`).
- The output: exactly the release's FP8 tensor set, scales beside their weights, quantization_config,
  index, `{"format": "pt"}`, aligned tensors, other files copied; `verify` accepts it; transformers loads it.
- CLI: --dry-run, --json, ue8m0, --skip, --mtp drop, refusal of FP8 input.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dsv3conv.api import dequantize, quantize, verify_checkpoint
from dsv3conv.backend import CpuBackend, Item, convert
from dsv3conv.dest import PLAN_NAME
from dsv3conv.dtypes import DTYPE_SIZES, SAFETENSORS_DTYPES, TORCH_DTYPES
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.fp8_block_quant import reference_quant
from dsv3conv.ops import QuantBlockFp8
from dsv3conv.quant import QUANTIZATION_CONFIG, is_fp8_weight_name
from dsv3conv.safetensors_format import read_header
from dsv3conv.synthetic import make_tiny, tiny_config
from tests.conftest import bits, cli, load_all, write_at

SCALE_CONFIGS = [("float", "F32"), ("float", "BF16"), ("float", "F16"), ("ue8m0", "F32"), ("ue8m0", "F8_E8M0")]
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "configuration_deepseek.py",
               "modeling_deepseek.py", "README.md", "LICENSE")


def _weights(rows: int, cols: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Rows of magnitudes 2^-24 .. 2^4, an all-zero block, signed zeros and a few extremes."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((rows, cols), generator=gen) * torch.exp2(torch.randint(-24, 4, (rows, 1), generator=gen).float())
    if rows > 128 and cols > 128:
        w[:128, 128:256] = 0.0
    w[0, : min(cols, 6)] = torch.tensor([0.0, -0.0, 3e-8, 448.0, -1.0, 2.0**-20])[: min(cols, 6)]
    return w.to(dtype)


def _quant_cpu(w: torch.Tensor, fmt: str, scale_dtype: str, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Through the CPU backend as the engine calls it: raw bytes in, e4m3 bytes and scale bytes out."""
    raw = torch.cat([torch.zeros(offset, dtype=torch.uint8), bits(w).reshape(-1)])
    rows, cols = w.shape
    item = Item(QuantBlockFp8(fmt, scale_dtype, "w_scale_inv"), offset, raw.numel() - offset, rows, cols,
                SAFETENSORS_DTYPES[w.dtype], "F8_E4M3", name="w")
    q_bytes, s_bytes = convert(CpuBackend(), raw, [item])
    q = torch.frombuffer(bytearray(q_bytes), dtype=torch.uint8).view(torch.float8_e4m3fn).view(rows, cols)
    s = torch.frombuffer(bytearray(s_bytes), dtype=torch.uint8).view(TORCH_DTYPES[scale_dtype])
    return q, s.view(-(-rows // 128), -(-cols // 128))


# ------------------------------------------------------------------------------------ the CPU path
@pytest.mark.parametrize("shape", [(576, 7168), (1, 1), (129, 257), (300, 1000)])
@pytest.mark.parametrize("fmt, scale_dtype", SCALE_CONFIGS)
def test_cpu_backend_bit_exact_vs_reference(shape, fmt, scale_dtype):
    w = _weights(*shape, seed=sum(shape))
    q, s = _quant_cpu(w, fmt, scale_dtype)
    q_ref, s_ref = reference_quant(w, fmt, TORCH_DTYPES[scale_dtype])
    for what, got, want in (("scale", s, s_ref), ("q", q, q_ref)):
        mism = int((bits(got) != bits(want)).sum())
        assert mism == 0, f"{shape} {fmt} {scale_dtype}: {mism} of {bits(want).numel()} {what} bytes differ"


@pytest.mark.parametrize("src_dtype", [torch.float16, torch.float32])
def test_cpu_backend_other_sources_and_an_odd_offset(src_dtype):
    w = _weights(129, 257, src_dtype, seed=3)
    q, s = _quant_cpu(w, "float", "F32", offset=1)  # odd offset in the batch buffer: copied before viewing
    q_ref, s_ref = reference_quant(w)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)


def _bound_holds(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> tuple[bool, str]:
    rows, cols = x.shape
    s_full = s.float().repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    x = x.float()
    err = (reference_dequant(q, s, torch.float32) - x).abs()
    tol = torch.maximum(2.0**-4 * x.abs(), 2.0**-10 * s_full) * (1 + 2.0**-20) + 2.0**-22 * x.abs()
    worst = (err / tol).max().item()
    return worst <= 1, f"worst |err| / bound = {worst:.4f}"


@pytest.mark.parametrize("fmt, scale_dtype", SCALE_CONFIGS)
def test_dequant_of_quant_is_within_the_e4m3_rounding_bound(fmt, scale_dtype):
    for shape, seed in (((576, 7168), 1), ((129, 257), 2), ((384, 640), 3)):
        w = _weights(*shape, seed=seed)
        q, s = reference_quant(w, fmt, TORCH_DTYPES[scale_dtype])
        ok, detail = _bound_holds(w, q, s)
        assert ok, f"{shape} {fmt} {scale_dtype}: {detail}"
        assert not bool(q.float().isnan().any()), "NaN codes in q"
        back = reference_dequant(q, s, torch.float32)
        assert bool((back[w.float() == 0] == 0).all()), "dequant(quant(0)) != 0"
        s32 = s.float()
        assert s32[0, 1].item() == 1.0, f"all-zero block: scale {s32[0, 1].item()} (expected 1)"
        amax = q.float().abs()
        block_max = torch.nn.functional.pad(amax, (0, -shape[1] % 128, 0, -shape[0] % 128)).view(
            s.shape[0], 128, s.shape[1], 128).amax(dim=(1, 3))
        nonzero = block_max > 0
        if fmt == "ue8m0":
            mant = s32.view(torch.int32) & 0x7FFFFF
            assert bool((mant == 0).all()), f"ue8m0 scales are not powers of two: {s32[mant != 0][:4].tolist()}"
            assert bool((block_max[nonzero] >= 224).all()), "a ue8m0 block uses less than half of e4m3's range"
        elif scale_dtype == "F32":
            assert bool((block_max[nonzero] == 448).all()), "a block's largest value does not map to 448"


def test_refuses_nan_inf_and_float16_overflow():
    w = _weights(256, 256)
    w[200, 3] = float("nan")
    with pytest.raises(Dsv3Error, match=r"tensor `w` holds NaN or Inf values"):
        _quant_cpu(w, "float", "F32")
    w[200, 3] = float("inf")
    with pytest.raises(Dsv3Error, match=r"tensor `w` holds NaN or Inf values"):
        _quant_cpu(w, "ue8m0", "F8_E8M0")
    w[200, 3] = 1e30
    _quant_cpu(w, "float", "F32")
    with pytest.raises(Dsv3Error, match=r"needs a scale beyond F16.*scale_dtype float32"):
        _quant_cpu(w, "float", "F16")


# --------------------------------------------------------------------------------- whole checkpoints
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """A tiny FP8 release (F32 scales), its BF16 dequant, and quant of that BF16 checkpoint."""
    root = tmp_path_factory.mktemp("quant")
    release = make_tiny(root / "fp8")
    dequantize(root / "fp8", root / "bf16", device="cpu")
    summary = quantize(root / "bf16", root / "q", device="cpu")
    return {"root": root, "release": release, "summary": summary}


def test_round_trip_of_a_release_made_with_the_same_recipe(ckpts, tmp_path):
    """quant(dequant(release)) against the release, measured per path:

    - F32 scales, dequantized to BF16 (the usual path), then quantized: every FP8 byte comes back; the scales
      do not (0 of 242 equal): dequant rounds q * s to BF16, so the block maximum 448 * s re-enters with 8
      significant bits and the new scale amax / 448 differs from s by up to 2^-8 relative (half a BF16 step).
    - F32 scales through a float32 dequant: FP8 bytes and scales all come back.
    - UE8M0 (F8_E8M0 scales): the dequantized values all come back; 12 of 242 blocks (about 5%, 1.3% of the
      bytes) come back with half the scale and doubled codes: their largest |q| had rounded down to 224, and
      224 * s / 448 = s / 2 is a power of two, which the recipe takes.
    """
    release, out = ckpts["release"], load_all(ckpts["root"] / "q")[0]
    n_q = n_q_same = n_s = 0
    for name, q in release.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        s, s2 = release[name + "_scale_inv"], out[name + "_scale_inv"]
        n_q += q.numel()
        n_q_same += int((bits(out[name]) == bits(q)).sum())
        n_s += s.numel()
        rel = ((s2 - s).abs() / s).max().item()
        assert rel <= 2.0**-8, f"{name}: scale moved by {rel:.2e} relative"
    assert n_q_same == n_q, f"via BF16: {n_q - n_q_same} of {n_q} FP8 bytes differ"

    # The other two paths, in memory (the recipe is the same code the checkpoint path runs: see above).
    n_same = 0
    for name, q in release.items():
        if q.dtype == torch.float8_e4m3fn:
            s = release[name + "_scale_inv"]
            q2, s2 = reference_quant(reference_dequant(q, s, torch.float32))
            assert torch.equal(bits(q2), bits(q)) and torch.equal(s2, s), f"{name}: via float32 does not come back"
            n_same += 1
    assert n_same == 68

    e8 = make_tiny(tmp_path / "e8m0", scale_dtype="F8_E8M0", n_shards=1)
    blocks = diff_blocks = 0
    for name, q in e8.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        s = e8[name + "_scale_inv"]
        x = reference_dequant(q, s, torch.bfloat16)
        q2, s2 = reference_quant(x, "ue8m0", torch.float8_e8m0fnu)
        assert torch.equal(bits(reference_dequant(q2, s2, torch.bfloat16)), bits(x)), f"{name}: values changed"
        differ = s2.float() != s.float()
        blocks += s.numel()
        diff_blocks += int(differ.sum())
        if bool(differ.any()):
            assert bool((s2.float()[differ] == s.float()[differ] / 2).all()), f"{name}: scale not halved"
            qmax = torch.nn.functional.pad(q.float().abs(), (0, -q.shape[1] % 128, 0, -q.shape[0] % 128)).view(
                s.shape[0], 128, s.shape[1], 128).amax(dim=(1, 3))
            assert bool((qmax[differ] <= 224).all()), f"{name}: a block differs without max |q| <= 224"
    assert 0 < diff_blocks / blocks < 0.1, f"ue8m0: {diff_blocks} of {blocks} blocks changed representation"


def test_output_layout_config_index_and_files(ckpts):
    root, release = ckpts["root"], ckpts["release"]
    out, meta = load_all(root / "q")
    src, _ = load_all(root / "bf16")
    fp8_release = {n for n, t in release.items() if t.dtype == torch.float8_e4m3fn}
    fp8_out = {n for n, t in out.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8_out == fp8_release and fp8_out == {n for n in src if is_fp8_weight_name(n)}
    assert {n for n in out if n.endswith("_scale_inv")} == {n + "_scale_inv" for n in fp8_release}
    assert all(out[n + "_scale_inv"].dtype == torch.float32 for n in fp8_out)
    for name, t in src.items():  # router, its bias, eh_proj, embeddings, heads, norms: unchanged bytes
        if name not in fp8_out:
            assert out[name].dtype == t.dtype and torch.equal(bits(out[name]), bits(t)), name
    assert {"model.layers.3.eh_proj.weight", "model.layers.1.mlp.gate.weight"} <= set(src) - fp8_out
    assert all(m == {"format": "pt"} for m in meta.values())

    config = json.loads((root / "q" / "config.json").read_text())
    before = json.loads((root / "bf16" / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    assert config["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if k != "quantization_config"} == before
    index = json.loads((root / "q" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    for name in fp8_out:  # a weight and its scale in one shard
        assert index["weight_map"][name] == index["weight_map"][name + "_scale_inv"]
    for p in (root / "q").glob("*.safetensors"):
        for e in read_header(p).tensors:
            assert e.begin % DTYPE_SIZES[e.dtype] == 0, f"{p.name}: `{e.name}` starts at {e.begin}, unaligned"
    for extra in EXTRA_FILES:
        assert (root / "q" / extra).read_bytes() == (root / "bf16" / extra).read_bytes(), extra
    assert [p.name for p in (root / "q").glob(".*")] == [PLAN_NAME]  # the plan record, no lock or partial file
    s = ckpts["summary"]
    assert s["tensors_converted"] == s["scales_written"] == 68 and s["tensors_copied"] == len(src) - 68
    assert s["bytes_written"] == sum(p.stat().st_size for p in (root / "q").glob("*.safetensors"))
    again = quantize(root / "bf16", root / "q", device="cpu", resume=True)
    assert again["shards_skipped"] == again["shards"]


def test_verify_accepts_the_output(ckpts):
    report = verify_checkpoint(ckpts["root"] / "q", full=True)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert report["ok"], failed


def _checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_verify_against_holds_the_output_to_quant_of_the_source(ckpts, tmp_path):
    """`verify Q --against BF16`: tensor set, config and data held to quant of the source, bit for bit;
    a changed e4m3 byte, scale or copied byte, or a config edit, is named."""
    report = verify_checkpoint(ckpts["root"] / "q", against=ckpts["root"] / "bf16", full=True)
    c = _checks(report)
    assert report["ok"], [x for x in report["checks"] if not x["ok"]]
    assert "68 quantized, each with its scale, 31 copied" in c["tensor_set"]["detail"]
    assert "all 99 tensors bit-identical to quant of the source" in c["data_vs_source"]["detail"]
    sampled = _checks(verify_checkpoint(ckpts["root"] / "q", against=ckpts["root"] / "bf16"))["data_vs_source"]
    assert sampled["ok"] and " of 99 tensors bit-identical" in sampled["detail"]

    damaged = tmp_path / "q"
    shutil.copytree(ckpts["root"] / "q", damaged)
    weight, copied = "model.layers.1.self_attn.o_proj.weight", "model.norm.weight"
    write_at(damaged, weight, 5, b"\x11")
    write_at(damaged, weight + "_scale_inv", 0, b"\x00\x00\x80\x3f")  # 1.0
    write_at(damaged, copied, 0, b"\x00\x40")
    config = json.loads((damaged / "config.json").read_text())
    config["quantization_config"]["activation_scheme"] = "static"
    (damaged / "config.json").write_text(json.dumps(config))
    report = verify_checkpoint(damaged, against=ckpts["root"] / "bf16", full=True)
    c = _checks(report)
    assert not report["ok"] and sorted(report["mismatches"]) == sorted([weight, copied])
    data = c["data_vs_source"]["detail"]
    assert f"`{weight}`" in data and "1 of 12,800 e4m3 codes and 1 of 2 scales differ" in data and f"`{copied}`" in data, data
    assert "e4m3 codes" in data and "bytes differ from the copied source" in data
    assert "`quantization_config.activation_scheme`: expected \"dynamic\", found \"static\"" in c["config_vs_source"]["detail"]


def test_verify_against_a_source_quant_refuses_names_the_tensor(ckpts, tmp_path):
    """A NaN in the source, where quant refuses: that tensor is reported not compared, the rest compared."""
    src = shutil.copytree(ckpts["root"] / "bf16", tmp_path / "bf16")
    weight = "model.layers.1.self_attn.o_proj.weight"
    write_at(src, weight, 7, b"\xc0\x7f")  # BF16 NaN
    report = verify_checkpoint(ckpts["root"] / "q", against=src, full=True)
    data = _checks(report)["data_vs_source"]
    assert not data["ok"] and report["mismatches"] == [], data
    assert data["detail"].startswith("1 of the 99 compared tensors differs: ") and f"tensor `{weight}`: not compared" in data["detail"]
    assert "holds NaN or Inf values" in data["detail"], data


def test_verify_against_reads_the_settings_the_output_declares(ckpts, tmp_path):
    """ue8m0 scales as F8_E8M0, skipped weights and a dropped MTP layer: verify plans the same quant."""
    bf16, dst = ckpts["root"] / "bf16", tmp_path / "out"
    quantize(bf16, dst, device="cpu", scale_fmt="ue8m0", scale_dtype="float8_e8m0fnu", skip=[r"experts\.1\."],
             mtp="drop")
    report = verify_checkpoint(dst, against=bf16, full=True)
    c = _checks(report)
    assert report["ok"], [x for x in report["checks"] if not x["ok"]]
    assert "scale_fmt ue8m0, scale dtype float8_e8m0fnu, 6 weights skipped, MTP drop" in c["tensor_set"]["detail"]
    # A config that no longer says ue8m0, over E8M0 scales: no quant run makes that, and verify says why.
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]["scale_fmt"]
    (dst / "config.json").write_text(json.dumps(config))
    report = verify_checkpoint(dst, against=bf16)
    detail = _checks(report)["tensor_set"]["detail"]
    assert not report["ok"] and "cannot plan quant of the source with CKPT's settings" in detail
    assert "float8_e8m0fnu holds powers of two only" in detail


def test_plan_refusals(ckpts, tmp_path):
    bf16 = ckpts["root"] / "bf16"
    cases = [
        ({"scale_fmt": "float", "scale_dtype": "float8_e8m0fnu"}, UsageError, "add scale_fmt ue8m0"),
        ({"scale_fmt": "e8m0"}, UsageError, "scale_fmt 'e8m0'"),
        ({"scale_dtype": "float64"}, UsageError, "scale_dtype 'float64'"),
        ({"skip": ["("]}, UsageError, "not a valid regular expression"),
        ({"skip": ["no_such_tensor"]}, UsageError, "matches none"),
        ({"skip": ["."]}, UsageError, "leaves no tensor"),
    ]
    for kwargs, exc, needle in cases:
        with pytest.raises(exc, match=needle):
            quantize(bf16, tmp_path / "x", dry_run=True, **kwargs)
    with pytest.raises(Dsv3Error, match=r"already holds FP8 tensors or scales \(`model.layers.0.mlp.down_proj"):
        quantize(ckpts["root"] / "fp8", tmp_path / "y", dry_run=True)


# ----------------------------------------------------------------------------------------- the CLI
def test_cli_dry_run_and_json(ckpts, tmp_path):
    bf16 = ckpts["root"] / "bf16"
    proc = cli("quant", bf16, tmp_path / "plan", "--dry-run", "--json", check=0)
    plan = json.loads(proc.stdout)
    assert not (tmp_path / "plan").exists(), "dry run wrote something"
    assert plan["tensors_converted"] == plan["scales_written"] == 68 and plan["tensors_dropped"] == 0
    assert plan["config"]["quantization_config"] == QUANTIZATION_CONFIG
    assert "added quantization_config (fp8 e4m3, 128x128 blocks)" in plan["config_changes"]
    proc = cli("quant", ckpts["root"] / "fp8", tmp_path / "out", check=1)
    assert "already holds FP8 tensors" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_ue8m0_skip_and_mtp_drop(ckpts, tmp_path):
    bf16, dst = ckpts["root"] / "bf16", tmp_path / "out"
    proc = cli("quant", bf16, dst, "--scale-fmt", "ue8m0", "--skip", r"experts\.1\.", "--skip", r"\.o_proj\.",
                   "--mtp", "drop", "--device", "cpu", "--json", check=0)
    s = json.loads(proc.stdout)
    out, _ = load_all(dst)
    src, _ = load_all(bf16)
    skipped = sorted(n for n in src if is_fp8_weight_name(n) and ("experts.1." in n or ".o_proj." in n)
                     and not n.startswith("model.layers.3."))
    assert s["tensors_skipped"] == len(skipped) == 9 and s["scale_fmt"] == "ue8m0"  # 2 layers x 3 + 3 o_proj
    for name in skipped:
        assert out[name].dtype == torch.bfloat16 and torch.equal(bits(out[name]), bits(src[name])), name
        assert name + "_scale_inv" not in out
    assert not any(n.startswith("model.layers.3.") for n in out), "MTP layer (3) not dropped"
    scales = [t for n, t in out.items() if n.endswith("_scale_inv")]
    n_mtp = sum(is_fp8_weight_name(n) and n.startswith("model.layers.3.") for n in src)
    assert len(scales) == s["tensors_converted"] == 68 - n_mtp - len(skipped)
    for t in scales:
        assert t.dtype == torch.float32 and bool(((t.view(torch.int32) & 0x7FFFFF) == 0).all()), "not powers of 2"
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == dict(QUANTIZATION_CONFIG, scale_fmt="ue8m0", modules_to_not_convert=[n[:-7] for n in skipped])
    assert config["num_nextn_predict_layers"] == 0
    assert verify_checkpoint(dst, full=True)["ok"]


# ----------------------------------------------------------------------------------- transformers
def test_transformers_loads_the_output_with_the_expected_values(tmp_path):
    """An aligned tiny model (every FP8 dimension a multiple of 128: transformers' FP8 dequantizer derives
    the block from the scale grid), loaded with FineGrainedFP8Config(dequantize=True) on the CPU: every
    parameter equals reference_dequant of what quant wrote (experts fused as transformers lays them out)."""
    interop = pytest.importorskip("tests.test_interop")
    if interop.transformers is None:
        pytest.skip(interop._IMPORT_ERROR)
    interop._require("DeepseekV3ForCausalLM")
    quantization = interop._fp8_loader()
    config = dict(tiny_config(), **interop.ALIGNED)
    make_tiny(tmp_path / "fp8", config=config)
    dequantize(tmp_path / "fp8", tmp_path / "bf16", device="cpu", mtp="drop")
    quantize(tmp_path / "bf16", tmp_path / "q", device="cpu", scale_fmt="ue8m0")
    ours, _ = load_all(tmp_path / "q")
    model, info = interop._load(tmp_path / "q", quantization_config=quantization)
    interop._assert_clean(info)
    got = model.state_dict()
    interop._assert_same_state(got, interop._reference_state(ours, set(got)), "FP8 load of quant's output")
    src, _ = load_all(tmp_path / "bf16")
    w = "model.layers.0.self_attn.q_a_proj.weight"
    ok, detail = _bound_holds(src[w], ours[w], ours[w + "_scale_inv"])
    assert ok, detail


def test_quant_in_parts_equals_one_run(tmp_path):
    from dsv3conv.api import dequantize, quantize
    from dsv3conv.synthetic import make_tiny

    make_tiny(tmp_path / "fp8", num_hidden_layers=4, n_shards=5)
    dequantize(tmp_path / "fp8", tmp_path / "bf16", device="cpu")
    quantize(tmp_path / "bf16", tmp_path / "ref", device="cpu")
    first = quantize(tmp_path / "bf16", tmp_path / "out", device="cpu", part="2/2")
    assert not first["finalized"] and not (tmp_path / "out" / "config.json").exists()
    last = quantize(tmp_path / "bf16", tmp_path / "out", device="cpu", part="1/2")
    assert last["finalized"]
    for p in (tmp_path / "ref").iterdir():
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes(), p.name
