"""Links that leave the checkpoint are refused (unless --follow-links); a copy is never more readable than its source.

Allowed without asking: links that stay inside the checkpoint directory, and a Hugging Face cache snapshot's
links into its own repository (`snapshots/<rev>/x -> ../../blobs/<hash>`).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from dsv3conv.synthetic import make_tiny
from tests.conftest import assert_one_line_error, cli

REFUSAL = "outside the checkpoint"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """A tiny FP8 checkpoint and a BF16 one (its dequant), never modified: tests link their files."""
    from dsv3conv.api import dequantize

    root = tmp_path_factory.mktemp("links")
    make_tiny(root / "fp8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSV3CONV_NO_COMPILE", "1")  # eager: compiling would cost a minute here
        dequantize(root / "fp8", root / "bf16", device="cpu")
    return {"fp8": root / "fp8", "bf16": root / "bf16"}


def fresh(pristine: Path, where: Path) -> Path:
    """A checkpoint of its own whose files are hard links to the pristine one's (cheap, and not symlinks)."""
    where.mkdir(parents=True)
    for p in pristine.iterdir():
        (where / p.name).hardlink_to(p)
    return where


def secret(tmp_path: Path) -> Path:
    path = tmp_path / "private" / "token.txt"
    path.parent.mkdir()
    path.write_text("hf_secret")
    path.chmod(0o600)
    return path


def _absolute(src: Path, tmp: Path) -> str:
    (src / "secret.txt").symlink_to(secret(tmp))
    return "secret.txt"


def _relative(src: Path, tmp: Path) -> str:
    secret(tmp)
    (src / "notes").mkdir()
    (src / "notes" / "token.txt").symlink_to(Path("..") / ".." / "private" / "token.txt")
    return "notes/token.txt"


def _chain(src: Path, tmp: Path) -> str:
    """A link to a link inside the checkpoint that leaves it."""
    (src / "inner.txt").symlink_to(secret(tmp))
    (src / "outer.txt").symlink_to("inner.txt")
    return "inner.txt"


def _tokenizer_replaced(src: Path, tmp: Path) -> str:
    """A file the release has, replaced by a link outside."""
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(secret(tmp))
    return "tokenizer.json"


def _config_outside(src: Path, tmp: Path) -> str:
    outside = tmp / "elsewhere" / "config.json"
    outside.parent.mkdir()
    shutil.copy(src / "config.json", outside)
    (src / "config.json").unlink()
    (src / "config.json").symlink_to(outside)
    return "config.json"


def _shard_outside(src: Path, tmp: Path) -> str:
    shard = sorted(src.glob("*.safetensors"))[-1]
    outside = tmp / "elsewhere" / shard.name
    outside.parent.mkdir()
    shutil.copy(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)
    return shard.name


def _directory_link(src: Path, tmp: Path) -> str:
    """A real directory in the checkpoint holding a link that climbs out through `..` of another link."""
    secret(tmp)
    (src / "up").symlink_to(".")  # inside: the checkpoint itself; lexically `extra/../up/..` is the checkpoint
    (src / "extra").mkdir()
    (src / "extra" / "token.txt").symlink_to(Path("..") / "up" / ".." / "private" / "token.txt")
    return "extra/token.txt"


LEAKS = [_absolute, _relative, _chain, _tokenizer_replaced, _config_outside, _shard_outside, _directory_link]
COMMANDS = {
    "dequant": lambda src, out: ("dequant", src, out),
    "quant": lambda src, out: ("quant", src, out),
    "split-mtp --main-out": lambda src, out: ("split-mtp", src, "--main-out", out),
    "split-mtp --mtp-out": lambda src, out: ("split-mtp", src, "--mtp-out", out),
}


@pytest.mark.parametrize("leak", LEAKS, ids=[f.__name__.strip("_") for f in LEAKS])
@pytest.mark.parametrize("command", COMMANDS)
def test_links_leaving_the_checkpoint_are_refused(pristine, tmp_path, command, leak):
    src = fresh(pristine["bf16" if command == "quant" else "fp8"], tmp_path / "src")
    name = leak(src, tmp_path)
    out = tmp_path / "out"
    for flags in ((), ("--dry-run",)):
        proc = cli(*COMMANDS[command](src, out), "--quiet", *flags)
        assert_one_line_error(proc, 1, str(src / name), REFUSAL, "--follow-links")
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("leak", [_absolute, _relative, _tokenizer_replaced], ids=["absolute", "relative", "tokenizer"])
def test_follow_links_copies_no_more_readable_than_the_source(pristine, tmp_path, leak):
    src = fresh(pristine["fp8"], tmp_path / "src")
    name = leak(src, tmp_path)
    out = tmp_path / "out"
    proc = cli("dequant", src, out, "--quiet", "--device", "cpu", "--follow-links")
    assert proc.returncode == 0, proc.stderr
    copy = out / name
    assert not copy.is_symlink() and copy.read_text() == "hf_secret"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600


def test_links_inside_the_checkpoint_are_followed(pristine, tmp_path):
    src = fresh(pristine["fp8"], tmp_path / "src")
    (src / "docs").mkdir()
    (src / "docs" / "README.md").symlink_to(Path("..") / "README.md")
    (src / "tokenizer-copy.json").symlink_to(src / "tokenizer.json")  # absolute, still inside
    out = tmp_path / "out"
    proc = cli("dequant", src, out, "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (out / "docs" / "README.md").read_bytes() == (src / "README.md").read_bytes()
    assert (out / "tokenizer-copy.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_hugging_face_cache_snapshot_is_followed(pristine, tmp_path):
    """`models--org--name/snapshots/<rev>/f -> ../../blobs/<hash>`, every file a link: converted as usual."""
    repo = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V3"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for k, p in enumerate(sorted(pristine["fp8"].iterdir())):
        blob = repo / "blobs" / f"{k:040x}"
        blob.hardlink_to(p)
        (snapshot / p.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    out = tmp_path / "out"
    for src in (snapshot, tmp_path / "hub" / "latest"):  # also through a link to the snapshot
        if src.name == "latest":
            src.symlink_to(snapshot)
            shutil.rmtree(out)
        proc = cli("dequant", src, out, "--quiet", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        assert all(not p.is_symlink() for p in out.iterdir())
        assert (out / "tokenizer.json").read_bytes() == (pristine["fp8"] / "tokenizer.json").read_bytes()
    # A snapshot's link to somewhere else than its repository is still refused.
    (snapshot / "stolen.txt").symlink_to(secret(tmp_path))
    proc = cli("dequant", snapshot, tmp_path / "out2", "--quiet")
    assert_one_line_error(proc, 1, "stolen.txt", REFUSAL)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400, 0o755])
def test_copies_keep_at_most_the_source_permissions(pristine, tmp_path, mode):
    src = fresh(pristine["fp8"], tmp_path / "src")
    extra = src / "generation_config.json"
    extra.unlink()
    extra.write_text("{}")
    extra.chmod(mode)
    out = tmp_path / "out"
    for args in (("dequant", src, out, "--device", "cpu"), ("split-mtp", src, "--main-out", tmp_path / "main")):
        proc = cli(*args, "--quiet")
        assert proc.returncode == 0, proc.stderr
    umask = os.umask(0)
    os.umask(umask)
    for copy in (out / extra.name, tmp_path / "main" / extra.name):
        assert stat.S_IMODE(copy.stat().st_mode) == 0o666 & ~umask & mode, copy
    # split-mtp copies whole shards too: never more permissive than the source shard.
    shard = next(p for p in (tmp_path / "main").glob("*.safetensors"))
    assert stat.S_IMODE(shard.stat().st_mode) & ~stat.S_IMODE((src / shard.name).stat().st_mode) == 0
