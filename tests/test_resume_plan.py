"""--resume into a DST begun under another plan is refused, naming what differs; the same plan resumes.

An unfinished DST is made by `--part 1/2` (half the shards, no index or config, the plan recorded in
`.dsv3conv.plan`); a finished one has no record, and its shards are held to the new plan's names.
Every refusal leaves DST as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dsv3conv.dest import PLAN_NAME
from tests.conftest import assert_one_line_error, cli


def listing(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if not p.name.startswith(".")}


@pytest.fixture
def half_done(tiny_src, tmp_path) -> Path:
    out = tmp_path / "out"
    cli("dequant", tiny_src, out, "--part", "1/2", "--device", "cpu", "--quiet", check=0)
    assert (out / PLAN_NAME).exists() and not (out / "config.json").exists()
    return out


@pytest.mark.parametrize("flags, needle", [
    (("--mtp", "drop"), "another config.json"),
    (("--max-shard-size", "300KB"), "output shards 4 before"),
    (("--dtype", "float16"), "other tensors or dtypes"),
    (("--dtype", "float32", "--part", "2/2"), "other tensors or dtypes"),
    (("--mtp", "drop", "--part", "1/2"), "another config.json"),
    (("--dtype", "float16", "--dry-run"), "other tensors or dtypes"),
])
def test_other_options_are_refused(tiny_src, half_done, flags, needle):
    before = listing(half_done)
    resume = () if "--part" in flags else ("--resume",)
    proc = cli("dequant", tiny_src, half_done, *resume, "--device", "cpu", "--quiet", *flags)
    assert_one_line_error(proc, 2, str(half_done), "another plan", needle, "--overwrite")
    assert listing(half_done) == before


def test_another_source_is_refused(tiny_src, half_done, tmp_path):
    other = Path(shutil.copytree(tiny_src, tmp_path / "copy"))
    proc = cli("dequant", other, half_done, "--resume", "--device", "cpu", "--quiet")
    assert_one_line_error(proc, 2, "another plan", "source")


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"output_files": 3}'], ids=["not-json", "list", "wrong-type"])
def test_an_unreadable_record_is_refused(tiny_src, half_done, damage):
    (half_done / PLAN_NAME).write_text(damage)
    proc = cli("dequant", tiny_src, half_done, "--resume", "--device", "cpu", "--quiet")
    assert_one_line_error(proc, 2, "another plan")


def test_the_same_plan_resumes_and_the_record_goes(tiny_src, half_done, tmp_path):
    cli("dequant", tiny_src, half_done, "--part", "2/2", "--device", "cpu", "--quiet", check=0)
    assert not (half_done / PLAN_NAME).exists()
    whole = tmp_path / "whole"
    cli("dequant", tiny_src, whole, "--device", "cpu", "--quiet", check=0)
    assert listing(half_done) == listing(whole)
    assert not (whole / PLAN_NAME).exists()


def test_finished_output_resumed_with_other_shards_is_refused(tiny_src, tmp_path):
    out = tmp_path / "out"
    cli("dequant", tiny_src, out, "--device", "cpu", "--quiet", check=0)
    before = listing(out)
    proc = cli("dequant", tiny_src, out, "--resume", "--device", "cpu", "--quiet", "--max-shard-size", "300KB")
    assert_one_line_error(proc, 2, "holds shards this run would not write", "model-00001-of-000004")
    assert listing(out) == before
    cli("dequant", tiny_src, out, "--resume", "--device", "cpu", "--quiet", check=0)  # same options: fine
    assert listing(out) == before and not (out / PLAN_NAME).exists()


def test_split_mtp_resume_from_another_source_is_refused(tiny_src, tmp_path):
    out = tmp_path / "main"
    cli("split-mtp", tiny_src, "--main-out", out, "--part", "1/2", "--quiet", check=0)
    other = Path(shutil.copytree(tiny_src, tmp_path / "copy"))
    proc = cli("split-mtp", other, "--main-out", out, "--resume", "--quiet")
    assert_one_line_error(proc, 2, "another plan", "source")


def test_quant_resume_with_other_options_is_refused(tiny_src, tmp_path):
    bf16 = tmp_path / "bf16"
    cli("dequant", tiny_src, bf16, "--device", "cpu", "--quiet", check=0)
    out = tmp_path / "fp8"
    cli("quant", bf16, out, "--part", "1/2", "--device", "cpu", "--quiet", check=0)
    before = listing(out)
    proc = cli("quant", bf16, out, "--resume", "--scale-dtype", "bfloat16", "--device", "cpu", "--quiet")
    assert_one_line_error(proc, 2, "another plan")
    assert listing(out) == before
