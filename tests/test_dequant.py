"""`dequant` on the CPU: bit-exact against the plain-torch reference, and everything around the weights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from dsv3conv.api import dequantize
from dsv3conv.backend import CpuBackend, Item, convert
from dsv3conv.dest import PLAN_NAME
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.ops import DequantBlockFp8
from dsv3conv.synthetic import make_tiny, quantize_blocks
from tests.conftest import ENV, Paused, assert_bit_exact, bits, cli, load_all, write_at


# ------------------------------------------------------------------------------------ the CPU kernel
@pytest.mark.parametrize("shape", [(576, 7168), (1, 1), (129, 257), (128, 128), (300, 1000), (2048, 384)])
@pytest.mark.parametrize("scale_dtype", ["F32", "BF16", "F16", "F8_E8M0"])
def test_cpu_backend_bit_exact_on_awkward_shapes(shape, scale_dtype):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    w = torch.randn(shape, generator=gen) * torch.rand((shape[0], 1), generator=gen) * 3
    q, s = quantize_blocks(w, scale_dtype)
    backend = CpuBackend()
    buf = bits(q).reshape(-1)
    for out_dtype, torch_dtype in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)):
        item = Item(DequantBlockFp8(scale_dtype), 0, buf.numel(), *shape, "F8_E4M3", out_dtype, s.to(torch.float32))
        (out,) = convert(backend, buf, [item])
        got = torch.frombuffer(bytearray(out), dtype=torch.uint8)
        ref = bits(reference_dequant(q, s, torch_dtype)).reshape(-1)
        mism = (got != ref).sum().item()
        assert mism == 0, f"{shape} {scale_dtype}->{out_dtype}: {mism} of {ref.numel()} bytes differ"


def test_reference_handles_partial_blocks_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0]] * 130).to(torch.float8_e4m3fn)[:, :3]
    s = torch.tensor([[0.5], [4.0]])
    out = reference_dequant(w, s, torch.float32)
    assert out[0].tolist() == [0.5, 1.0, 1.5] and out[129].tolist() == [4.0, 8.0, 12.0]


# --------------------------------------------------------------------------------- whole checkpoints
@pytest.mark.parametrize("scale_dtype", ["F32", "BF16", "F16", "F8_E8M0"])
def test_dequant_bit_exact_each_scale_dtype(tmp_path, scale_dtype):
    src = make_tiny(tmp_path / "src", scale_dtype=scale_dtype)
    summary = dequantize(tmp_path / "src", tmp_path / "out", device="cpu")
    out, meta = load_all(tmp_path / "out")
    n = assert_bit_exact(out, src)
    assert n == summary["tensors_converted"] == sum(t.dtype == torch.float8_e4m3fn for t in src.values())
    assert not any(k.endswith("_scale_inv") for k in out)
    assert all(m == {"format": "pt"} for m in meta.values())


@pytest.mark.parametrize("dtype, torch_dtype", [("float16", torch.float16), ("float32", torch.float32)])
def test_dequant_other_output_dtypes(tmp_path, dtype, torch_dtype):
    src = make_tiny(tmp_path / "src")
    dequantize(tmp_path / "src", tmp_path / "out", device="cpu", dtype=dtype)
    out, _ = load_all(tmp_path / "out")
    assert_bit_exact(out, src, torch_dtype)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == dtype


def test_config_index_and_files(tmp_path):
    src = make_tiny(tmp_path / "src")
    (tmp_path / "src" / "config.json").write_text(
        json.dumps(dict(json.loads((tmp_path / "src" / "config.json").read_text()), dtype="bfloat16"), indent=2)
    )
    dequantize(tmp_path / "src", tmp_path / "out", device="cpu")
    before = json.loads((tmp_path / "src" / "config.json").read_text())
    text = (tmp_path / "out" / "config.json").read_text()
    after = json.loads(text)
    assert text.startswith('{\n  "')  # 2-space indent
    assert "quantization_config" not in after
    assert after["torch_dtype"] == after["dtype"] == "bfloat16"
    assert {k: v for k, v in before.items() if k != "quantization_config"} == after
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    out, _ = load_all(tmp_path / "out")
    assert set(index["weight_map"]) == set(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / "out" / file), "pt") as f:
            assert name in f.keys()
    # the scale stored in another shard than its weight was found and used
    assert_bit_exact(out, src, names={"model.layers.0.self_attn.o_proj.weight"})
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "configuration_deepseek.py",
                  "modeling_deepseek.py", "README.md", "LICENSE"):
        assert (tmp_path / "out" / extra).read_bytes() == (tmp_path / "src" / extra).read_bytes(), extra
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(
        p.name for p in (tmp_path / "src").glob("*.safetensors"))
    # no lock or partial file left behind: only the plan record, which a later --resume is held to
    assert [p.name for p in (tmp_path / "out").glob(".*")] == [PLAN_NAME]


def test_mtp_drop_and_keep(tmp_path):
    src = make_tiny(tmp_path / "src", num_hidden_layers=4)  # MTP at layer 4, not 61 and not 3
    dequantize(tmp_path / "src", tmp_path / "keep", device="cpu", mtp="keep")
    dequantize(tmp_path / "src", tmp_path / "drop", device="cpu", mtp="drop")
    keep, _ = load_all(tmp_path / "keep")
    drop, _ = load_all(tmp_path / "drop")
    mtp_names = {k for k in keep if k.startswith("model.layers.4.")}
    assert mtp_names and not any(k.startswith("model.layers.4.") for k in drop)
    assert set(keep) - set(drop) == mtp_names
    assert_bit_exact(keep, src)
    assert json.loads((tmp_path / "drop" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert json.loads((tmp_path / "keep" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    index = json.loads((tmp_path / "drop" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(drop)


def test_max_shard_size_reshards(tmp_path):
    src = make_tiny(tmp_path / "src")
    dequantize(tmp_path / "src", tmp_path / "out", device="cpu", max_shard_size="500KB")
    names = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    n = len(names)
    assert n > 4 and names == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    out, _ = load_all(tmp_path / "out")
    assert_bit_exact(out, src)
    assert all(p.stat().st_size <= 500_000 + 4096 for p in (tmp_path / "out").glob("*.safetensors"))


def test_single_file_source(tmp_path):
    src = make_tiny(tmp_path / "src", single_file=True)
    dequantize(tmp_path / "src", tmp_path / "out", device="cpu")
    out, _ = load_all(tmp_path / "out")
    assert_bit_exact(out, src)


def test_small_chunks_split_tensors_and_stay_exact(tmp_path):
    """Row-chunking of big tensors and batching of small ones, forced with a tiny chunk size."""
    from dsv3conv.checkpoint import Checkpoint
    from dsv3conv.dequant import plan_dequant
    from dsv3conv.runner import execute

    src = make_tiny(tmp_path / "src")
    plan = plan_dequant(Checkpoint.open(tmp_path / "src"), tmp_path / "out")
    execute(plan, CpuBackend(), chunk_bytes=128 * 200)
    out, _ = load_all(tmp_path / "out")
    assert_bit_exact(out, src)


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_json_summary_and_dry_run(tmp_path, tiny_src):
    proc = cli("dequant", tiny_src, tmp_path / "plan", "--dry-run", "--json", check=0)
    plan = json.loads(proc.stdout)
    assert not (tmp_path / "plan").exists(), "dry run wrote something"
    assert plan["tensors_converted"] == 68 and plan["tensors_dropped"] == 68
    assert "removed quantization_config" in plan["config_changes"]
    proc = cli("dequant", tiny_src, tmp_path / "plan", "--dry-run", check=0)
    assert "dry run: nothing written" in proc.stdout and "removed quantization_config" in proc.stdout
    proc = cli("dequant", tiny_src, tmp_path / "out", "--json", "--device", "cpu", check=0)
    s = json.loads(proc.stdout)
    assert s["device"] == "cpu" and s["tensors_converted"] == 68 and s["shards"] == 4
    assert s["bytes_written"] == sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert s["output"] == str(tmp_path / "out") and s["seconds"] >= 0


def test_refuses_non_empty_dst_and_resume_overwrite(tmp_path, tiny_src):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    proc = cli("dequant", tiny_src, dst, check=2)
    assert "not empty" in proc.stderr and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert (dst / "precious.txt").read_text() == "keep me"
    cli("dequant", tiny_src, dst, "--overwrite", "--quiet", check=0)
    assert (dst / "precious.txt").read_text() == "keep me"
    cli("dequant", tiny_src, tmp_path / "in" / "x", check=0)
    proc = cli("dequant", tiny_src, tiny_src / "inside", check=2)
    assert "inside" in proc.stderr


def test_resume_after_kill_gives_identical_bytes(tmp_path):
    make_tiny(tmp_path / "src", num_hidden_layers=12, n_shards=12)
    dequantize(tmp_path / "src", tmp_path / "ref", device="cpu")
    run = Paused("dequant", tmp_path / "src", tmp_path / "out", "--device", "cpu", "--quiet", pause=("commit",))
    run.wait_for("commit")
    run.go()
    run.wait_for("committed")  # one shard renamed into place (writers commit in any order)
    run.wait_for("commit", 2)  # the next written but not renamed
    run.proc.kill()
    assert run.finish()[0] == -signal.SIGKILL
    finals = list((tmp_path / "out").glob("model-*.safetensors"))
    complete = [p for p in finals if p.read_bytes() == (tmp_path / "ref" / p.name).read_bytes()]
    assert complete == finals, "a file under a final name is not complete"
    summary = dequantize(tmp_path / "src", tmp_path / "out", device="cpu", resume=True)
    assert summary["shards_skipped"] >= len(finals) >= 1
    for p in (tmp_path / "ref").iterdir():
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes(), p.name
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == sorted(x.name for x in (tmp_path / "ref").iterdir())


def test_resume_rewrites_a_file_that_does_not_match_the_plan(tmp_path, tiny_src):
    dequantize(tiny_src, tmp_path / "out", device="cpu")
    victim = next((tmp_path / "out").glob("model-*.safetensors"))
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # e.g. copied in by hand, half-finished
    s = dequantize(tiny_src, tmp_path / "out", device="cpu", resume=True)
    assert victim.read_bytes() == good and s["shards_skipped"] == s["shards"] - 1


# ------------------------------------------------------------------------------------ --part K/N jobs
@pytest.mark.slow
def test_three_parts_equal_one_run(tmp_path):
    make_tiny(tmp_path / "src", num_hidden_layers=6, n_shards=7)
    dequantize(tmp_path / "src", tmp_path / "ref", device="cpu")
    # two parts in parallel, as a job array would run them, then the third alone: it finalizes
    procs = [subprocess.Popen([sys.executable, "-m", "dsv3conv", "dequant", tmp_path / "src", tmp_path / "out",
                               "--device", "cpu", "--quiet", "--json", "--part", f"{k}/3"],
                              env=ENV, stdout=subprocess.PIPE, text=True) for k in (1, 2)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert not (tmp_path / "out" / "config.json").exists(), "config written before every part finished"
    assert all(r["waiting_for"] for r in results)
    last = dequantize(tmp_path / "src", tmp_path / "out", device="cpu", part="3/3")
    assert last["finalized"] and not last["waiting_for"]
    shards = [set(r["part_shards"]) for r in results] + [set(last["part_shards"])]
    assert set().union(*shards) == {p.name for p in (tmp_path / "ref").glob("*.safetensors")}
    assert sum(map(len, shards)) == 7
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ref  # the plan record too, no lock
    for name in ref:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_part_is_validated(tmp_path, tiny_src):
    for bad in ("0/3", "4/3", "x", "1/0"):
        proc = cli("dequant", tiny_src, tmp_path / "out", "--part", bad, check=2)
        assert "--part" in proc.stderr


@pytest.mark.parametrize("workers", ["threads", pytest.param("processes", marks=pytest.mark.slow)])
def test_several_devices_share_the_shards(tmp_path, monkeypatch, workers):
    """`--device cuda:all` runs one worker per device, each a part; two CPU workers stand in for two GPUs here."""
    monkeypatch.setenv("DSV3CONV_WORKERS", workers)
    make_tiny(tmp_path / "src", num_hidden_layers=5, n_shards=6)
    dequantize(tmp_path / "src", tmp_path / "ref", device="cpu")
    s = dequantize(tmp_path / "src", tmp_path / "out", device="cpu,cpu")
    assert s["device"] == "cpu,cpu" and s["finalized"] and s["shards"] == 6
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ref
    for name in ref:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    proc = cli("dequant", tmp_path / "src", tmp_path / "x", "--device", "cpu,cpu", "--part", "1/2", check=2)
    assert "--device" in proc.stderr
    proc = cli("dequant", tmp_path / "src", tmp_path / "y", "--device", "cuda:all", check=2)
    assert "cuda:all" in proc.stderr


@pytest.mark.parametrize("workers", ["threads", pytest.param("processes", marks=pytest.mark.slow)])
def test_a_failing_device_worker_is_one_line_and_leaves_no_damaged_file(tmp_path, monkeypatch, workers):
    """A worker process that meets bad data: the parent exits 1 naming the tensor (no traceback), the other
    worker is stopped, no shard exists under its final name unless complete, and --resume finishes the job
    once the data is fixed."""
    monkeypatch.setenv("DSV3CONV_WORKERS", workers)
    make_tiny(tmp_path / "src", num_hidden_layers=5, n_shards=6)
    dequantize(tmp_path / "src", tmp_path / "ref", device="cpu")
    scale = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    good = (tmp_path / "src" / _file_of(tmp_path / "src", scale)).read_bytes()
    write_at(tmp_path / "src", scale, 0, b"\x00\x00\xc0\x7f")  # a NaN scale
    proc = cli("dequant", tmp_path / "src", tmp_path / "out", "--device", "cpu,cpu", "--quiet", check=1)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"`{scale}`" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    for p in (tmp_path / "out").iterdir():  # whatever exists under a final name is complete and correct
        if p.suffix == ".safetensors":
            assert p.read_bytes() == (tmp_path / "ref" / p.name).read_bytes(), p.name
    assert not (tmp_path / "out" / "config.json").exists()
    (tmp_path / "src" / _file_of(tmp_path / "src", scale)).write_bytes(good)
    cli("dequant", tmp_path / "src", tmp_path / "out", "--device", "cpu,cpu", "--resume")
    for p in (tmp_path / "ref").iterdir():
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes(), p.name


def _file_of(root, tensor: str) -> str:
    from dsv3conv.checkpoint import Checkpoint

    return Checkpoint.open(root).tensors[tensor].file


@pytest.mark.parametrize("workers", ["threads", pytest.param("processes", marks=pytest.mark.slow)])
def test_device_workers_report_progress(tmp_path, monkeypatch, workers):
    """Progress from worker processes reaches the parent: every byte of the output is counted once."""
    from dsv3conv.checkpoint import Checkpoint
    from dsv3conv.dequant import plan_dequant
    from dsv3conv.runner import execute_on_devices

    monkeypatch.setenv("DSV3CONV_WORKERS", workers)
    make_tiny(tmp_path / "src", num_hidden_layers=5, n_shards=6)
    plan = plan_dequant(Checkpoint.open(tmp_path / "src"), tmp_path / "out")
    seen = []
    stats, peak = execute_on_devices(plan, ["cpu", "cpu"], progress=lambda n, k, name: seen.append(n))
    assert stats.finalized and stats.files_written == len(plan.files) and peak == 0
    assert sum(seen) == sum(f.size for f in plan.files)


def test_part_summary_counts_the_parts_tensors(tmp_path, tiny_src):
    """One part of one holds every tensor: its converted and copied counts are the plan's."""
    s = dequantize(tiny_src, tmp_path / "out", part="1/1", dry_run=True)
    assert s["part_tensors_copied"] == s["tensors_copied"] > 0
    assert s["part_tensors_converted"] == s["tensors_converted"] > 0
