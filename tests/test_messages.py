"""Names and paths print escaped, each message on its one line; long lists print as ranges and counts.

Hostile spellings: a newline, a carriage return, a terminal escape sequence, a Unicode line separator, a tab,
bytes that are not UTF-8 (in a UTF-8 locale), and rich markup (`[/bold]`) in a path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dsv3conv.checkpoint import INDEX_NAME
from dsv3conv.checks import ranges
from dsv3conv.errors import Dsv3Error, printable
from tests.conftest import ENV, assert_one_line_error, cli, cli_process

UTF8 = dict(ENV, LC_ALL="C.UTF-8", LANG="C.UTF-8", PYTHONIOENCODING="utf-8")
HOSTILE = {"newline": "a\nb", "return": "a\rb", "escape": "a\x1b[31mb", "line-separator": "a\u2028b",
           "markup": "a[/bold]b", "tab": "a\tb"}


def test_printable():
    assert printable("plain name/é [x]") == "plain name/é [x]"
    assert printable("a\nb\r\x1b\u2028\udcff\t") == "a\\nb\\r\\x1b\\u2028\\udcff\\t"
    assert printable(printable("a\nb")) == printable("a\nb")
    assert str(Dsv3Error("x\ny")) == "x\\ny"


@pytest.mark.parametrize("spelling", HOSTILE, ids=list(HOSTILE))
def test_hostile_source_path_in_errors_and_plans(tiny_src, tmp_path, spelling):
    src = Path(shutil.copytree(tiny_src, tmp_path / f"src-{HOSTILE[spelling]}"))
    dst = tmp_path / f"out-{HOSTILE[spelling]}"
    dst.mkdir(parents=True)  # the markup spelling is two directories: `out-a[` / `bold]b`
    (dst / "x").write_text("")
    line = assert_one_line_error(cli("dequant", src, dst, "--quiet"), 2, "not empty")
    assert printable(str(dst)) in line
    proc = cli("dequant", src, tmp_path / "fresh", "--dry-run")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert printable(str(src)) in proc.stdout
    proc = cli("inspect", src)
    assert proc.returncode == 0 and printable(str(src)) in proc.stdout, proc.stdout + proc.stderr
    proc = cli("verify", src)
    assert proc.returncode == 0 and printable(str(src)) in proc.stdout, proc.stdout + proc.stderr
    assert not any(c in proc.stdout for c in "\r\x1b\u2028")


@pytest.mark.parametrize("name", [b"notes-\xff.txt", b"line\nbreak.txt", b"esc\x1b[2J.txt"],
                         ids=["not-utf8", "newline", "escape"])
def test_hostile_extra_file_names_in_a_utf8_locale(tiny_src, tmp_path, name):
    src = Path(shutil.copytree(tiny_src, tmp_path / "src"))
    fd = os.open(os.path.join(os.fsencode(src), name), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x")
    os.close(fd)
    shown = printable(os.fsdecode(name))
    proc = cli_process("dequant", src, tmp_path / "plan", "--dry-run", env=UTF8)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    copied = next(line for line in proc.stdout.splitlines() if "other files copied" in line)
    assert shown in copied
    proc = cli("dequant", src, tmp_path / "plan", "--dry-run", "--json")
    assert proc.returncode == 0 and os.fsdecode(name) in json.loads(proc.stdout)["extra_files"]
    cli("split-mtp", src, "--main-out", tmp_path / "main", "--quiet", check=0)
    assert name in os.listdir(os.fsencode(tmp_path / "main"))


def test_ranges_are_capped():
    assert ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert ranges(list(range(100_000))) == "0-99999"
    many = ranges(list(range(0, 200_000, 2)))
    assert len(many) < 200 and "more ranges" in many


def test_a_huge_declared_layer_count_stays_short(tiny_src, tmp_path):
    src = Path(shutil.copytree(tiny_src, tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    config.update(num_hidden_layers=50_000, num_nextn_predict_layers=50_000)
    (src / "config.json").write_text(json.dumps(config))
    for args in (("inspect", src), ("inspect", src, "--json"), ("verify", src, "--json")):
        proc = cli(*args)
        assert proc.returncode == 1 and len(proc.stdout) < 20_000, (args, len(proc.stdout), proc.stdout[:2000])
    assert_one_line_error(cli("dequant", src, tmp_path / "out"), 1, "num_hidden_layers")


def test_inspect_caps_a_long_problem_list(tiny_src, tmp_path):
    """Every tensor but one per shard left out of the index: many problems, 50 printed and a count."""
    src = Path(shutil.copytree(tiny_src, tmp_path / "src"))
    index = json.loads((src / INDEX_NAME).read_text())
    kept, weight_map = set(), {}
    for name, file in index["weight_map"].items():
        if file not in kept:
            kept.add(file)
            weight_map[name] = file
    index["weight_map"] = weight_map
    (src / INDEX_NAME).write_text(json.dumps(index))
    proc = cli("inspect", src)
    listed = [line for line in proc.stdout.splitlines() if line.startswith("  - ")]
    n = len(json.loads(cli("inspect", src, "--json").stdout)["problems"])
    assert n > 60 and len(listed) == 50, (n, len(listed))
    assert f"and {n - 50} more problems" in proc.stdout


def test_a_count_of_one_takes_the_singular():
    from dsv3conv.backend import check_repack
    from dsv3conv.errors import Problem, counted, refuse

    assert [counted(1, "shard"), counted(0, "shard"), counted(1234, "tensor")] == ["1 shard", "0 shards", "1,234 tensors"]
    assert counted(1, "value is", "values are") == "1 value is" and counted(2, "value is", "values are") == "2 values are"
    with pytest.raises(Dsv3Error, match=r" \(and 1 more problem\)$"):
        refuse([Problem("x", "a", "first"), Problem("x", "b", "second")])
    with pytest.raises(Dsv3Error, match="`w`: 1 of its 128x128 blocks holds 32-value groups"):
        check_repack(type("Item", (), {"name": "w"}), 1)


def test_messages_about_one_shard_or_one_scale_value(tmp_path):
    """A checkpoint of one shard, then one scale value damaged: the summary and the error say it in the singular."""
    from dsv3conv.synthetic import make_tiny
    from tests.conftest import write_at

    make_tiny(tmp_path / "src", n_shards=1)
    text = cli("dequant", tmp_path / "src", tmp_path / "out", "--device", "cpu", "-q", check=0).stdout
    assert ": 1 shard (0 already complete)" in text, text
    weight = "model.layers.0.self_attn.o_proj.weight"
    write_at(tmp_path / "src", weight + "_scale_inv", 0, b"\x00\x00\x00\x00")
    proc = cli("dequant", tmp_path / "src", tmp_path / "again", "--device", "cpu", "-q", check=1)
    assert f"`{weight}_scale_inv` in " in proc.stderr and ": 1 scale value is not finite and positive" in proc.stderr, proc.stderr
