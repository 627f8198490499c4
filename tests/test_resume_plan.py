"""--resume into a DST begun under another plan is refused, naming what differs (the option first); the same
plan resumes, whatever the device, threads or buffers.

An unfinished DST is made by `--part 1/2` (half the shards, no index or config); a finished one by a whole
run. Both hold their plan in `.dsv3conv.plan`; a DST without one (an earlier version's) is held to the new
plan's shard names. Every refusal leaves DST as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dsv3conv.dest import PLAN_NAME
from dsv3conv.writer import partial_path
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
    (("--mtp", "drop"), "(--mtp keep, now drop)"),
    (("--max-shard-size", "300KB"), "(--max-shard-size not given, now 300000)"),
    (("--dtype", "float16"), "(--dtype bfloat16, now float16)"),
    (("--dtype", "float32", "--part", "2/2"), "(--dtype bfloat16, now float32)"),
    (("--mtp", "drop", "--part", "1/2"), "(--mtp keep, now drop)"),
    (("--dtype", "float16", "--dry-run"), "(--dtype bfloat16, now float16)"),
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


def test_the_same_plan_resumes_and_the_record_stays(tiny_src, half_done, tmp_path):
    cli("dequant", tiny_src, half_done, "--part", "2/2", "--device", "cpu", "--quiet", check=0)
    whole = tmp_path / "whole"
    cli("dequant", tiny_src, whole, "--device", "cpu", "--quiet", check=0)
    assert listing(half_done) == listing(whole)
    assert (half_done / PLAN_NAME).read_bytes() == (whole / PLAN_NAME).read_bytes()


@pytest.mark.parametrize("flags, needle", [
    (("--dtype", "float16"), "(--dtype bfloat16, now float16)"),
    (("--mtp", "drop"), "(--mtp keep, now drop)"),
    (("--max-shard-size", "300KB"), "(--max-shard-size not given, now 300000)"),
    (("--dtype", "float32", "--mtp", "drop"), "(--dtype bfloat16, now float32; --mtp keep, now drop)"),
])
def test_finished_output_resumed_with_other_options_is_refused(tiny_src, tmp_path, flags, needle):
    """`dequant SRC DST` done, then `--resume` with an option that changes the output: refused, not redone."""
    out = tmp_path / "out"
    cli("dequant", tiny_src, out, "--device", "cpu", "--quiet", check=0)
    before = listing(out)
    proc = cli("dequant", tiny_src, out, "--resume", "--device", "cpu", "--quiet", *flags)
    assert_one_line_error(proc, 2, str(out), "another plan", needle, "that run's source and options", "--overwrite")
    assert listing(out) == before


def test_options_that_keep_the_output_may_change(tiny_src, half_done, tmp_path, monkeypatch):
    """Device, buffer size and thread count change no output byte: a resume with others finishes the job."""
    out = half_done
    monkeypatch.setenv("DSV3CONV_CPU_THREADS", "1")
    cli("dequant", tiny_src, out, "--resume", "--device", "auto", "--buffer-size", "1MiB", "--quiet", check=0)
    whole = tmp_path / "whole"
    cli("dequant", tiny_src, whole, "--device", "cpu", "--quiet", check=0)
    assert listing(out) == listing(whole)


def test_finished_output_without_a_record_is_held_to_its_shard_names(tiny_src, tmp_path):
    """A finished DST without a record (an earlier version kept none): shards this run would not write are
    refused; the same options resume."""
    out = tmp_path / "out"
    cli("dequant", tiny_src, out, "--device", "cpu", "--quiet", check=0)
    (out / PLAN_NAME).unlink()
    before = listing(out)
    proc = cli("dequant", tiny_src, out, "--resume", "--device", "cpu", "--quiet", "--max-shard-size", "300KB")
    assert_one_line_error(proc, 2, "holds shards this run would not write", "model-00001-of-000004")
    assert listing(out) == before
    cli("dequant", tiny_src, out, "--resume", "--device", "cpu", "--quiet", check=0)  # same options: fine
    assert listing(out) == before


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
    assert_one_line_error(proc, 2, "another plan", "(--scale-dtype float32, now bfloat16)")
    assert listing(out) == before


def test_split_mtp_resume_with_another_layout_is_refused(tiny_src, tmp_path):
    out = tmp_path / "draft"
    cli("split-mtp", tiny_src, "--mtp-out", out, "--quiet", check=0)
    before = listing(out)
    proc = cli("split-mtp", tiny_src, "--mtp-out", out, "--resume", "--mtp-layout", "full", "--quiet")
    assert_one_line_error(proc, 2, "another plan", "(--mtp-layout sglang, now full)", "--overwrite")
    assert listing(out) == before
    cli("split-mtp", tiny_src, "--mtp-out", out, "--resume", "--quiet", check=0)
    assert listing(out) == before


def test_split_mtp_refuses_another_layout_before_writing_either_output(tiny_src, tmp_path):
    """Both outputs resumed, the draft under another --mtp-layout: refused before the main output (unfinished,
    the same job) is written further, as every other refusal of split-mtp's two outputs is."""
    main, draft = tmp_path / "main", tmp_path / "draft"
    cli("split-mtp", tiny_src, "--main-out", main, "--mtp-out", draft, "--part", "1/2", "--quiet", check=0)
    before = listing(main), listing(draft)
    proc = cli("split-mtp", tiny_src, "--main-out", main, "--mtp-out", draft, "--resume", "--mtp-layout", "full",
               "--quiet")
    assert_one_line_error(proc, 2, str(draft), "another plan", "(--mtp-layout sglang, now full)")
    assert (listing(main), listing(draft)) == before


def test_an_earlier_versions_record_of_the_same_job_resumes(tiny_src, half_done, tmp_path):
    """A DST begun by an earlier version, whose record holds the source's path itself and no options: the same
    job resumes and finishes as a whole run; another source is still refused."""
    record = json.loads((half_done / PLAN_NAME).read_text())
    del record["options"]
    record["source"] = os.path.realpath(tiny_src)
    (half_done / PLAN_NAME).write_text(json.dumps(record))
    other = Path(shutil.copytree(tiny_src, tmp_path / "copy"))
    proc = cli("dequant", other, half_done, "--resume", "--device", "cpu", "--quiet")
    assert_one_line_error(proc, 2, "another plan", "source")
    cli("dequant", tiny_src, half_done, "--resume", "--device", "cpu", "--quiet", check=0)
    whole = tmp_path / "whole"
    cli("dequant", tiny_src, whole, "--device", "cpu", "--quiet", check=0)
    assert listing(half_done) == listing(whole)
    assert (half_done / PLAN_NAME).read_bytes() == (whole / PLAN_NAME).read_bytes()  # no path kept


def test_parts_rewriting_an_earlier_versions_record_write_through_names_of_their_own(tiny_src, half_done, tmp_path):
    """Parts resuming such a DST at once each rewrite its record: never through one shared temporary file
    (one part would truncate and rename away another's). Here another part's is there, half written."""
    record = json.loads((half_done / PLAN_NAME).read_text())
    del record["options"]
    (half_done / PLAN_NAME).write_text(json.dumps(record))
    theirs = partial_path(half_done / PLAN_NAME)
    theirs.write_bytes(b"another part's record, half written")
    cli("dequant", tiny_src, half_done, "--part", "2/2", "--device", "cpu", "--quiet", check=0)
    assert theirs.read_bytes() == b"another part's record, half written"
    whole = tmp_path / "whole"
    cli("dequant", tiny_src, whole, "--device", "cpu", "--quiet", check=0)
    assert (half_done / PLAN_NAME).read_bytes() == (whole / PLAN_NAME).read_bytes()
