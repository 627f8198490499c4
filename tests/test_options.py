"""Numeric options have a range: outside it, one line and exit 2; inside it, work does not grow with the number.

--part K/N (dequant, quant, split-mtp, verify), --buffer-size, --max-shard-size, --sample; each tried with
several spellings of the fault: zero, one, absurd magnitudes, digits that are not ASCII, signs, floats,
strings too long for `int`.
"""

from __future__ import annotations

import pytest

from dsv3conv.errors import UsageError
from dsv3conv.plan import MAX_PARTS, FilePlan, assign_parts, parse_part, parse_size
from tests.conftest import assert_one_line_error, cli

BAD_PARTS = ["0/3", "4/3", "1/0", "-1/3", "1/3/4", "1/", "/3", "a/b", "1.5/3", "\u0661/\u0662", "1/10^20",
             "1/100000000000000000000", "1/1000000000000", "1/100000000", f"1/{MAX_PARTS + 1}",
             "1/" + "9" * 5000, " ", "1 / 3 x"]
BAD_BUFFERS = ["0", "1", "1KB", "1000KiB", "100TB", "17GiB", "1e9", "-5MB", "9" * 400, "\u0661\u0662MB", "nan",
               "inf", "5 GB GB", "0.5MB"]
BAD_SHARD_SIZES = ["0", "0.0001", "-1GB", "2PB", "9" * 400, "lots"]


@pytest.mark.parametrize("text", BAD_PARTS)
def test_bad_part_is_refused(text):
    with pytest.raises(UsageError, match="part") as info:
        parse_part(text)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize("value", [(0, 3), (2, 1), (1, MAX_PARTS + 1), (1, 10**20), ("1", "2"), (True, True), [1, 2]])
def test_bad_part_tuple_is_refused(value):
    with pytest.raises(UsageError, match="part"):
        parse_part(value)


def test_good_parts():
    assert parse_part(" 2 / 8 ") == (2, 8)
    assert parse_part((3, 3)) == (3, 3)
    assert parse_part(f"{MAX_PARTS}/{MAX_PARTS}") == (MAX_PARTS, MAX_PARTS)
    assert parse_part(None) is None


def test_assignment_does_not_grow_with_the_number_of_parts():
    """Only the first len(files) parts can receive a file: N = 10**15 costs what N = 3 does (no list of N)."""
    files = [FilePlan(f"f{k}", (), b"x" * (k % 5 + 1)) for k in range(7)]
    many = assign_parts(files, 10**15)
    assert sorted(many) == list(range(1, 8))  # one file each, parts 1..7
    assert assign_parts(files, 7) == many
    assert sorted(set(assign_parts(files, 3))) == [1, 2, 3]


@pytest.mark.parametrize("text", BAD_BUFFERS)
def test_bad_buffer_size_is_refused(tiny_src, tmp_path, text):
    proc = cli("dequant", tiny_src, tmp_path / "out", "--quiet", "--buffer-size", text)
    assert_one_line_error(proc, 2, "--buffer-size")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["1MiB", "64MB", "16GiB", " 2 mb "])
def test_buffer_sizes_in_range(text):
    parse_size(text, "--buffer-size", (1 << 20, 16 << 30))


@pytest.mark.parametrize("text", BAD_SHARD_SIZES)
def test_bad_max_shard_size_is_refused(tiny_src, tmp_path, text):
    proc = cli("dequant", tiny_src, tmp_path / "out", "--quiet", "--max-shard-size", text)
    assert_one_line_error(proc, 2, "--max-shard-size")


@pytest.mark.parametrize("value", [0, -1, 10**30, 1.5, True])
def test_bad_integer_sizes_from_python(tiny_src, tmp_path, value):
    from dsv3conv.api import dequantize

    with pytest.raises(UsageError):
        dequantize(tiny_src, tmp_path / "out", buffer_size=value, dry_run=True)
    with pytest.raises(UsageError):
        dequantize(tiny_src, tmp_path / "out", max_shard_size=value, dry_run=True)


COMMANDS = {
    "dequant": lambda src, out, part: ("dequant", src, out, "--part", part),
    "quant": lambda src, out, part: ("quant", src, out, "--part", part),
    "split-mtp": lambda src, out, part: ("split-mtp", src, "--main-out", out, "--part", part),
    "verify": lambda src, out, part: ("verify", src, "--part", part),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("part", ["1/100000000000000000000", "1/1000000000000", "1/100000000", "0/2", "1/" + "9" * 5000])
def test_every_command_refuses_a_bad_part(tiny_src, tmp_path, command, part):
    proc = cli(*COMMANDS[command](tiny_src, tmp_path / "out", part), "--quiet")
    assert_one_line_error(proc, 2, "--part")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sample", ["0", "-0.1", "1.5", "nan", "inf", "-inf", "1e400"])
def test_bad_sample_is_refused(tiny_src, sample):
    assert_one_line_error(cli("verify", tiny_src, "--sample", sample, "--quiet"), 2, "--sample")
