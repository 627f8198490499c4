"""What a newcomer meets first: help texts, usage errors, missing paths, summaries of a part."""

from __future__ import annotations

import pytest

from tests.conftest import ENV, cli


def test_top_level_help_lists_every_command_and_the_exit_codes():
    text = cli("--help", check=0).stdout
    for command in ("inspect", "dequant", "quant", "split-mtp", "verify", "verify-combine"):
        assert f"\n  {command} " in text, text
    assert "2 a usage error" in text and "<bool>" not in text, text


@pytest.mark.parametrize("command, needles", [
    ("dequant", ["--mtp keep|drop", "--dtype bfloat16|float16|float32", "--part K/N", "--dry-run  "]),
    ("quant", ["--scale-fmt float|ue8m0", "--mtp keep|drop"]),
    ("split-mtp", ["--mtp-layout sglang|full", "--main-out DIR"]),
    ("verify", ["--against SRC", "--full  "]),
    ("verify-combine", ["REPORT... <path>  The JSON reports"]),
])
def test_help_lists_choices_and_flags_take_no_value(command, needles):
    text = cli(command, "--help", check=0).stdout
    assert "<bool>" not in text and "╭" not in text and "list[" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.mark.parametrize("args, needle, command", [
    (["dequant", "somewhere"], "Missing argument 'DST'", "dsv3conv dequant"),
    (["inspect", "--bogus", "x"], "No such option: --bogus", "dsv3conv inspect"),
    (["nope"], "No such command 'nope'", "dsv3conv"),
    (["dequant", "a", "b", "--mtp"], "requires an argument", "dsv3conv dequant"),
    (["dequant", "--mtp"], "requires an argument", "dsv3conv dequant"),
    (["verify", "x", "--sample"], "requires an argument", "dsv3conv verify"),
])
def test_usage_errors_are_one_line_with_exit_2(args, needle, command):
    """One line that names the help of the command the mistake was made in."""
    proc = cli(*args, check=2)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv3conv: error: ") and needle in lines[0], proc.stderr
    assert lines[0].endswith(f"(see `{command} --help`)") and proc.stdout == "", proc.stderr


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_missing_path_same_words_and_code_in_inspect_and_verify(tmp_path, command):
    proc = cli(command, tmp_path / "nowhere", check=2)
    assert proc.stderr.strip().endswith("nowhere: no such directory; give the checkpoint directory"), proc.stderr


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_hub_repo_id_gets_the_download_command(command):
    proc = cli(command, "no-such-org-x/NoSuchModel-Y", check=2)
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "hf download no-such-org-x/NoSuchModel-Y --local-dir NoSuchModel-Y" in proc.stderr, proc.stderr


def test_part_summary_shows_the_parts_own_totals(tiny_src, tmp_path):
    from dsv3conv.api import dequantize

    whole = dequantize(tiny_src, tmp_path / "plan", dry_run=True)
    text = cli("dequant", tiny_src, tmp_path / "out", "--part", "1/2", "--device", "cpu", "-q", check=0).stdout
    first = dequantize(tiny_src, tmp_path / "out", dry_run=True, part="1/2")
    assert f"wrote part 1/2 of {tmp_path / 'out'}: {len(first['part_shards'])} of {whole['shards']} shards" in text, text
    assert f"{first['part_tensors_converted']} tensors converted" in text, text
    assert 0 < first["part_tensors_converted"] < whole["tensors_converted"], first


def test_example_checkpoints_from_the_cli(tmp_path):
    from dsv3conv.checkpoint import Checkpoint

    cli("example", "fp8", tmp_path / "fp8", check=0)
    cli("example", "bf16", tmp_path / "bf16", check=0)
    fp8, bf16 = Checkpoint.open(tmp_path / "fp8"), Checkpoint.open(tmp_path / "bf16")
    assert not fp8.problems and not bf16.problems, (fp8.problems, bf16.problems)
    assert {t.dtype for t in fp8.tensors.values()} >= {"F8_E4M3", "BF16"}
    assert "F8_E4M3" not in {t.dtype for t in bf16.tensors.values()} and "quantization_config" not in bf16.config
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    proc = cli("example", "fp8", tmp_path / "fp8", check=2)
    assert "not an empty directory" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    proc = cli("example", "fp16", tmp_path / "x", check=2)
    assert "choose one of fp8, bf16" in proc.stderr and not (tmp_path / "x").exists(), proc.stderr


@pytest.mark.parametrize("kind,fmt", [("v4-flash", "mxfp4"), ("v4-flash-base", "fp8_block (scale,"),
                                      ("v4-0731", "mxfp4"), ("compressed-tensors", "fp8_block (weight_scale,")])
def test_v4_and_compressed_tensors_examples_from_the_cli(tmp_path, kind, fmt):
    """The tiny DeepSeek-V4 and compressed-tensors checkpoints the docs suggest trying, from `example`."""
    import json

    cli("example", kind, tmp_path / kind, check=0)
    report = json.loads(cli("inspect", tmp_path / kind, "--json", check=0).stdout)
    assert report["problems"] == [] and any(g.startswith(fmt) for g in report["formats"]), report["formats"]
    if kind == "v4-0731":
        assert report["layout"]["mtp_kind"] == "dspark", report["layout"]


def test_without_triton_the_cpu_path_runs_and_the_gpu_path_says_what_to_install(tiny_src, tmp_path):
    """triton is the optional `gpu` extra: a CPU-only install converts; asking for CUDA names the extra."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"  # `import triton` now fails as if it were absent
            "import torch; torch.cuda.is_available = lambda: True\n"  # as on a GPU host without triton
            "from dsv3conv.gpu import check_device\n"
            "assert check_device('auto') == 'cpu'\n"
            "from dsv3conv.cli import main; main()\n")
    run = [sys.executable, "-c", code]
    proc = subprocess.run([*run, "dequant", tiny_src, tmp_path / "out", "-q"], capture_output=True, text=True,
                          env=ENV)
    assert proc.returncode == 0 and "on cpu" in proc.stdout, proc
    proc = subprocess.run([*run, "dequant", tiny_src, tmp_path / "gpu", "--device", "cuda"], capture_output=True,
                          text=True, env=ENV)
    assert proc.returncode == 2 and "pip install 'dsv3conv[gpu]'" in proc.stderr, proc


def test_dry_run_refuses_a_non_empty_destination_as_the_run_does(tiny_src, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    run = cli("dequant", tiny_src, tmp_path / "busy", check=2)  # no --quiet: nothing else on stderr
    dry = cli("dequant", tiny_src, tmp_path / "busy", "--dry-run", check=2)
    assert run.stderr == dry.stderr and len(run.stderr.splitlines()) == 1, (run.stderr, dry.stderr)
    assert "not empty" in run.stderr and [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    cli("dequant", tiny_src, tmp_path / "new", "--dry-run", check=0)
    assert not (tmp_path / "new").exists()  # a dry run creates nothing


def test_free_space_is_checked_before_writing(tiny_src, tmp_path, monkeypatch):
    import shutil

    from dsv3conv.api import dequantize
    from dsv3conv.errors import Dsv3Error

    plan = dequantize(tiny_src, tmp_path / "out", dry_run=True)
    assert plan["bytes_needed"] > plan["bytes_out"] > 0  # the shards, and the other files copied
    real = shutil.disk_usage
    monkeypatch.setattr("dsv3conv.preflight.shutil.disk_usage",
                        lambda p: real(p)._replace(free=plan["bytes_needed"] - 1))
    for dry_run in (True, False):
        with pytest.raises(Dsv3Error, match=f"needs .*{plan['bytes_needed']:,} bytes.* is available there"):
            dequantize(tiny_src, tmp_path / "out", dry_run=dry_run)
        assert not (tmp_path / "out").exists()
    result = dequantize(tiny_src, tmp_path / "out", device="cpu", space_check=False)
    assert result["finalized"] and result["bytes_written"] == plan["bytes_out"]
    # resumed: the complete shards already there need no new space
    assert dequantize(tiny_src, tmp_path / "out", dry_run=True, resume=True)["bytes_needed"] < plan["bytes_out"]


def test_split_mtp_checks_the_space_of_both_outputs_together(tiny_src, tmp_path, monkeypatch):
    """Each output fits alone, not both on one filesystem: refused before the first is written, dry run too."""
    import shutil

    from dsv3conv.api import split_mtp
    from dsv3conv.errors import Dsv3Error

    main, mtp = tmp_path / "main", tmp_path / "mtp"
    plan = split_mtp(tiny_src, main_out=main, mtp_out=mtp, dry_run=True)
    needed = plan["main"]["bytes_needed"] + plan["mtp"]["bytes_needed"]
    real = shutil.disk_usage
    monkeypatch.setattr("dsv3conv.preflight.shutil.disk_usage", lambda p: real(p)._replace(free=needed - 1))
    for dry_run in (True, False):
        with pytest.raises(Dsv3Error, match=f"need .*{needed:,} bytes.* together"):
            split_mtp(tiny_src, main_out=main, mtp_out=mtp, dry_run=dry_run)
        assert not main.exists() and not mtp.exists()
    split_mtp(tiny_src, main_out=main, dry_run=True)  # one output alone fits
    result = split_mtp(tiny_src, main_out=main, mtp_out=mtp, space_check=False)
    assert result["main"]["finalized"] and result["mtp"]["finalized"]


def test_dequant_of_a_checkpoint_without_fp8_refuses_unless_asked_to_copy(tmp_path):
    cli("example", "bf16", tmp_path / "bf16", check=0)
    proc = cli("dequant", tmp_path / "bf16", tmp_path / "out", check=1)
    assert len(proc.stderr.splitlines()) == 1 and "no FP8 weights to dequantize" in proc.stderr, proc.stderr
    assert "--allow-noop" in proc.stderr and not (tmp_path / "out").exists()
    proc = cli("dequant", tmp_path / "bf16", tmp_path / "out", "--allow-noop", "-q", check=0)
    assert "0 tensors converted" in proc.stdout, proc.stdout
