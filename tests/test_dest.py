"""An output that is the source by another route is refused before anything is written; the source is untouched.

"Another route": DST equal to SRC, inside it, or holding it, reached through a symlinked ancestor, a symlink
to SRC itself, `..`, or a bind mount (one directory at two paths: path strings differ, device and inode do
not). Every command that writes and every output option is tried: `dequant DST`, `quant DST`,
`split-mtp --main-out/--mtp-out`, and the two split-mtp outputs aliasing each other.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3conv import dest as dest_mod
from dsv3conv.dest import check_apart, check_dest, overlaps
from dsv3conv.errors import UsageError
from dsv3conv.synthetic import make_tiny
from tests.conftest import ENV, TIMEOUT, assert_one_line_error, cli

ALIAS = "must not be the input directory or inside it"


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (links followed), by relative path: the source before and after."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict[str, Path]:
    """tmp/data/src (a tiny FP8 checkpoint), tmp/view -> tmp/data (a symlinked ancestor), tmp/src-link -> src.

    Shared by the module's tests: each proves the source unchanged, and removes what it creates beside it.
    """
    tmp_path = tmp_path_factory.mktemp("dest")
    data = tmp_path / "data"
    src = data / "src"
    make_tiny(src)
    (tmp_path / "view").symlink_to(data)
    (tmp_path / "src-link").symlink_to(src)
    return {"tmp": tmp_path, "data": data, "src": src, "view": tmp_path / "view", "src_link": tmp_path / "src-link"}


def aliases(t: dict[str, Path]) -> list[tuple[Path, str]]:
    """Spellings of an output that is the source, is inside it, or holds it (DST, what it stands for)."""
    return [
        (t["src"], "the same path"),
        (t["view"] / "src", "the same directory through a symlinked ancestor"),
        (t["src_link"], "a symlink to the source"),
        (t["view"] / "src" / "sub" / "out", "inside, through a symlinked ancestor, not yet created"),
        (t["src_link"] / "sub", "inside, through a symlink to the source"),
        (t["tmp"] / "elsewhere" / ".." / "data" / "src", "the same directory through `..`"),
        (t["data"], "a directory holding the source"),
        (t["view"], "a symlink to a directory holding the source"),
    ]


# ------------------------------------------------------------------------------------------ the guard
def test_overlaps_by_identity_not_strings(layout, monkeypatch):
    """With path strings made useless (as a bind mount makes them: realpath sees nothing), identity decides.

    `realpath` is replaced by a plain absolute path, so `view/src` no longer resolves to `data/src` as a
    string; only the device+inode of `view` (the same as `data`) shows they are one directory.
    """
    monkeypatch.setattr(dest_mod.os.path, "realpath", os.path.abspath)
    t = layout
    for dst, what in aliases(t):
        if ".." in dst.parts:
            continue  # lexically `..` is not a route once realpath is gone
        assert overlaps(t["src"], dst), what
        assert overlaps(dst, t["src"]), what
    apart = [t["tmp"] / "out", t["data"] / "src2", t["tmp"] / "view2", t["tmp"] / "data-bf16" / "src"]
    for dst in apart:
        assert not overlaps(t["src"], dst), dst
        check_dest(t["src"], dst)


def test_check_dest_and_check_apart_raise_one_line(layout):
    t = layout
    for dst, what in aliases(t):
        with pytest.raises(UsageError, match=ALIAS) as info:
            check_dest(t["src"], dst)
        assert "\n" not in str(info.value), what
    with pytest.raises(UsageError, match="separate directories"):
        check_apart(t["tmp"] / "o", t["view"] / ".." / "o" / "mtp", "--main-out", "--mtp-out")
    check_apart(t["tmp"] / "o1", t["tmp"] / "o2", "--main-out", "--mtp-out")


# -------------------------------------------------------------------------------- every writing command
WRITERS = [
    ("dequant", lambda src, dst, *flags: ("dequant", src, dst, *flags)),
    ("quant", lambda src, dst, *flags: ("quant", src, dst, *flags)),
    ("split-mtp --main-out", lambda src, dst, *flags: ("split-mtp", src, "--main-out", dst, *flags)),
    ("split-mtp --mtp-out", lambda src, dst, *flags: ("split-mtp", src, "--mtp-out", dst, *flags)),
]


@pytest.mark.parametrize("flags", [(), ("--resume",), ("--overwrite",), ("--part", "1/2")], ids=lambda f: " ".join(f) or "plain")
@pytest.mark.parametrize("command", WRITERS, ids=[w[0] for w in WRITERS])
def test_every_writer_refuses_an_alias_and_leaves_the_source_untouched(layout, command, flags):
    t = layout
    before = tree_digest(t["src"])
    listing = sorted(os.listdir(t["data"]))
    for dst, what in aliases(t):
        proc = cli(*command[1](t["src"], dst, "--quiet", *flags))
        line = assert_one_line_error(proc, 2, ALIAS)
        assert str(dst) in line, what
    assert tree_digest(t["src"]) == before
    assert sorted(os.listdir(t["data"])) == listing  # nothing created beside it either


@pytest.mark.parametrize("flags", [(), ("--resume",), ("--overwrite",)], ids=lambda f: " ".join(f) or "plain")
def test_split_mtp_outputs_must_not_alias_each_other(layout, flags):
    t = layout
    out = t["tmp"] / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    (t["tmp"] / "out-link").unlink(missing_ok=True)
    (t["tmp"] / "out-link").symlink_to(out)
    pairs = [(out / "main", out / "main"), (out / "main", t["tmp"] / "out-link" / "main"),
             (out, t["tmp"] / "out-link" / "mtp"), (t["tmp"] / "out-link" / "x" / "mtp", out / "x")]
    for main, mtp in pairs:
        proc = cli("split-mtp", t["src"], "--main-out", main, "--mtp-out", mtp, "--quiet", *flags)
        assert_one_line_error(proc, 2, "--main-out", "--mtp-out", "separate directories")
    assert os.listdir(out) == []


# ----------------------------------------------------------------------------------- a real bind mount
def _mount_namespace_prefix(tmp: Path) -> list[str] | None:
    """`unshare` arguments that give a private mount namespace where `mount --bind` works, or None."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    a, b = tmp / "probe-a", tmp / "probe-b"
    a.mkdir()
    b.mkdir()
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        probe = subprocess.run([*prefix, "mount", "--bind", str(a), str(b)], capture_output=True, check=False)
        if probe.returncode == 0:
            return prefix
    return None


# Runs each command line through the CLI inside one process (startup once); prints "exit code<TAB>stderr".
_RUN_ALL = """
import json, sys
from typer.testing import CliRunner
from dsv3conv.cli import app
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args)
    escaped = r.exception is not None and not isinstance(r.exception, SystemExit)
    print(json.dumps([r.exit_code, r.stderr, repr(r.exception) if escaped else ""]))
"""


def test_bind_mount_of_the_source_is_refused(layout, tmp_path):
    """The fault as reported: DST reaches SRC through a bind mount (path strings share nothing).

    Runs where a private mount namespace is allowed (`unshare -m` as root, or `unshare -rm`); the identity
    logic itself is covered everywhere by `test_overlaps_by_identity_not_strings`.
    """
    import json

    t = layout
    prefix = _mount_namespace_prefix(tmp_path)
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare -m / -rm refused)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = tree_digest(t["src"])
    commands = [
        [*args, *flags, "--quiet"]
        for flags in (["--resume"], ["--overwrite"])
        for args in (
            ["dequant", t["src"], mnt / "src"],
            ["quant", t["src"], mnt / "src"],
            ["dequant", t["src"], mnt / "src" / "out"],
            ["dequant", t["src"], mnt],
            ["split-mtp", t["src"], "--main-out", mnt / "src"],
            ["split-mtp", t["src"], "--mtp-out", mnt / "src" / "mtp"],
        )
    ]
    commands = [[str(a) for a in c] for c in commands]
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    proc = subprocess.run(
        [*prefix, "sh", "-c", script, "sh", str(t["data"]), str(mnt), sys.executable, "-c", _RUN_ALL,
         json.dumps(commands)],
        capture_output=True, text=True, env=ENV, timeout=TIMEOUT, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(commands), proc.stdout
    for args, (code, stderr, exc) in zip(commands, results):
        lines = stderr.strip().splitlines()
        assert code == 2 and not exc and len(lines) == 1 and ALIAS in lines[0], (args, code, stderr, exc)
    assert tree_digest(t["src"]) == before
    assert os.listdir(mnt) == []  # the bind mount was private to the namespace
