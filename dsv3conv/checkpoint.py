"""Open a checkpoint from its index and shard headers; tensor data is read only when asked for.

A checkpoint is a directory with `model.safetensors.index.json` and shards, or with a single
`model.safetensors`. Files may be symlinks (a Hugging Face cache snapshot). Opening never reads tensor data.
Problems found while opening are collected in `Checkpoint.problems` (`Problem` records) so that `inspect` and
`verify` can list them all; converting commands call `require_clean()` and refuse to go on.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from dsv3conv.config import config_problems
from dsv3conv.dtypes import DTYPE_SIZES
from dsv3conv.errors import Dsv3Error, HeaderError, Problem, UsageError, refuse, short
from dsv3conv.safetensors_format import Header, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SCALE_SUFFIX = "_scale_inv"
# JSON files are read whole: refuse sizes no real checkpoint has (the DeepSeek-V3 index is ~9 MB).
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_INDEX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard, dtype, shape and absolute byte range in that file."""

    name: str
    file: str  # shard name relative to the checkpoint root
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first data byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class ShardInfo:
    name: str
    path: Path
    header: Header
    file_size: int


def require_dir(path: str | os.PathLike, what: str = "") -> Path:
    """`path` as a checkpoint directory, or a usage error (exit 2) saying what it is instead.

    A Hub repo id (`org/name`) that is not a local directory gets the command that downloads it.
    """
    root = Path(path)
    name = f"{what} {root}" if what else str(root)
    if not root.exists():
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path)):
            raise UsageError(f"{name}: no such directory; if it is a Hugging Face repo id, download it first "
                             f"(hf download {path} --local-dir {root.name}) and give that directory")
        raise UsageError(f"{name}: no such directory; give the checkpoint directory")
    if not root.is_dir():
        raise UsageError(f"{name}: is a file, not a checkpoint directory; give the directory that holds it")
    return root


class Checkpoint:
    """Index + headers of a checkpoint directory."""

    def __init__(self, root: Path):
        self.root = root
        self.config: dict | None = None
        self.index: dict | None = None  # the index JSON, when the checkpoint is sharded
        self.shards: dict[str, ShardInfo] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.problems: list[Problem] = []
        self.unread: dict[str, str] = {}  # tensor -> file, for the index's tensors in shards that could not be read

    # ----------------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        root = require_dir(path)
        if not os.access(root, os.R_OK | os.X_OK):
            raise Dsv3Error(f"{root}: directory is not readable; fix its permissions")
        ckpt = cls(root)
        ckpt._load_config()
        index_path, single_path = root / INDEX_NAME, root / SINGLE_NAME
        if index_path.exists():
            shard_names = ckpt._load_index(index_path)
        elif single_path.exists():
            shard_names = [SINGLE_NAME]
        else:
            found = sorted(p.name for p in root.glob("*.safetensors"))
            if not found:
                raise Dsv3Error(f"{root}: no {INDEX_NAME} and no {SINGLE_NAME}; this is not a safetensors checkpoint")
            ckpt._problem("no-index", str(root), f"{root}: no {INDEX_NAME}; reading the {len(found)} .safetensors files found")
            shard_names = found
        ckpt._load_shards(shard_names)
        return ckpt

    def _load_config(self) -> None:
        path = self.root / CONFIG_NAME
        if not path.exists():
            self._problem("config", str(path), f"{path}: missing", "copy config.json from the original release")
            return
        try:
            config = _read_json(path, MAX_CONFIG_BYTES)
        except Dsv3Error as exc:
            self._problem("config", str(path), str(exc))
            return
        problems = config_problems(config, path)
        if problems:
            for text in problems:
                self._problem("config", str(path), text)
            return  # layer and MTP logic must not run on it
        self.config = config

    def _load_index(self, path: Path) -> list[str]:
        index = _read_json(path, MAX_INDEX_BYTES)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise Dsv3Error(f"{path}: has no `weight_map` object of tensor name -> shard file; restore it from the release")
        metadata = index.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise Dsv3Error(f"{path}: `metadata` is {type(metadata).__name__}, not an object; restore it from the release")
        unsafe = {file for file in set(weight_map.values()) if not _is_safe_relative(file)}  # each file once
        for name, file in weight_map.items():
            if len(name) > 1024 or not name.isprintable():
                raise Dsv3Error(f"{path}: tensor name {short(name)} is not a plain tensor name; restore it from the release")
            if file in unsafe:
                raise Dsv3Error(
                    f"{path}: tensor `{name}` points at {short(file)}, outside the checkpoint; refusing to open it"
                )
        if not weight_map:
            self._problem("index-empty", str(path), f"{path}: `weight_map` is empty", "restore it from the release")
        self.index = index
        return sorted(set(weight_map.values()))

    def _load_shards(self, shard_names: list[str]) -> None:
        owner: dict[str, str] = {}
        for name in shard_names:
            path = self.root / name
            if not path.exists():
                self._problem("shard-missing", name, f"{path}: missing (listed in the index)", "download it again")
                continue
            try:
                header = read_header(path)
            except HeaderError as exc:
                self._problem("header", name, str(exc))
                continue
            self.shards[name] = ShardInfo(name, path, header, path.stat().st_size)
            for entry in header.tensors:
                odd = odd_index(entry.name)
                if odd is not None:
                    self._problem("odd-index", entry.name, f"tensor `{entry.name}` in {name}: {odd!r} is not "
                                  f"written the way loaders write module numbers (`{int(odd)}`), so no loader would "
                                  "find it", "rename the tensor")
                if entry.name in owner:
                    self._problem("stored-twice", entry.name,
                                  f"tensor `{entry.name}` is stored twice: in {owner[entry.name]} and in {name}")
                    continue
                owner[entry.name] = name
                self.tensors[entry.name] = TensorInfo(
                    entry.name, name, entry.dtype, entry.shape, header.data_start + entry.begin, entry.nbytes
                )
        if self.index is None:
            return
        weight_map = self.index["weight_map"]
        for tensor, file in weight_map.items():
            if file not in self.shards:
                self.unread[tensor] = file  # the missing or damaged file is already reported
                continue
            if tensor not in self.tensors:
                self._problem("index-phantom", tensor,
                              f"tensor `{tensor}` is listed in the index under {file} but absent from every shard")
            elif self.tensors[tensor].file != file:
                self._problem("index-elsewhere", tensor, f"tensor `{tensor}` is listed in the index under {file} "
                              f"but stored in {self.tensors[tensor].file}")
        for tensor, info in self.tensors.items():
            if tensor not in weight_map:
                self._problem("index-unlisted", tensor, f"tensor `{tensor}` is in {info.file} but not in the index")

    def _problem(self, code: str, subject: str, message: str, fix: str = "") -> None:
        self.problems.append(Problem(code, subject, message, fix))

    # ---------------------------------------------------------------------------------------- queries
    def require_clean(self) -> None:
        """Refuse to convert a checkpoint that has problems: name the first, count the rest."""
        refuse(self.problems, "; run `dsv3conv inspect`")

    def require_config(self) -> dict:
        if self.config is None:
            raise Dsv3Error(f"{self.root / CONFIG_NAME}: missing or unreadable; it is needed to find the MTP layers")
        return self.config

    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def extra_files(self) -> list[str]:
        """Files besides shards, index and config (tokenizer, remote code, README...), relative paths."""
        skip = set(self.shards) | {INDEX_NAME, CONFIG_NAME, SINGLE_NAME}
        out = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if rel in skip or rel.startswith(".") or "/." in rel or not path.is_file():
                continue
            if rel.endswith(".safetensors"):
                continue  # stray shards not in the index are reported, never copied
            out.append(rel)
        return out

    def links_outside(self) -> list[tuple[str, str]]:
        """(file, where it leads) for each file a conversion reads or copies that resolves outside the checkpoint.

        Inside means under the checkpoint directory or, for a Hugging Face cache snapshot
        (`<repo>/snapshots/<rev>`, files linking to `../../blobs/<hash>`), under that cache repository.
        """
        inside = [Path(os.path.realpath(self.root))]
        if inside[0].parent.name == "snapshots" and (inside[0].parent.parent / "blobs").is_dir():
            inside.append(inside[0].parent.parent)
        names = [CONFIG_NAME, INDEX_NAME, *self.shards, *self.extra_files()]
        out = []
        for name in names:
            path = self.root / name
            if not path.exists():
                continue
            target = Path(os.path.realpath(path))
            if not any(target == d or d in target.parents for d in inside):
                out.append((name, str(target)))
        return out

    def require_links_inside(self, follow_links: bool = False) -> None:
        """Refuse a file that leads outside the checkpoint (a copy would carry it along), unless asked to follow."""
        if follow_links:
            return
        outside = self.links_outside()
        if outside:
            name, target = outside[0]
            more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
            raise Dsv3Error(
                f"{self.root / name}: a link to {target}, outside the checkpoint{more}; copy the file into the "
                "checkpoint, or pass --follow-links to read what the links point to"
            )

    def read(self, info: TensorInfo, start: int = 0, length: int | None = None) -> bytearray:
        """Read `length` bytes of a tensor's data from byte `start` (relative to the tensor)."""
        return read_tensor(self.root, info, start, length)


def read_tensor(root: Path, info: TensorInfo, start: int = 0, length: int | None = None) -> bytearray:
    """`length` bytes of the data of tensor `info` of the checkpoint at `root`, from byte `start` of it."""
    length = info.nbytes - start if length is None else length
    buf = bytearray(length)
    with open(root / info.file, "rb", buffering=0) as f:
        read_into(f, info.offset + start, memoryview(buf), root / info.file)
    return buf


class ShardReader:
    """Reads tensor bytes of one checkpoint with pread, keeping at most `max_open` shard files open.

    A checkpoint may hold more shards than a process may open files (`ulimit -n` is often 1024): the least
    recently used file is closed first. Not thread-safe: one reader per reading thread.
    """

    def __init__(self, root: Path, max_open: int = 16):
        self.root = root
        self.max_open = max_open
        self._open: OrderedDict[str, BinaryIO] = OrderedDict()

    def read_span(self, file: str, offset: int, view: memoryview) -> None:
        """Fill `view` with the bytes of shard `file` from absolute `offset`."""
        f = self._open.get(file)
        if f is None:
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
            f = self._open[file] = open(self.root / file, "rb", buffering=0)  # closed by close()
        else:
            self._open.move_to_end(file)
        read_into(f, offset, view, self.root / file)

    def read_into(self, info: TensorInfo, start: int, view: memoryview) -> None:
        """Fill `view` with the tensor's bytes from byte `start` (relative to the tensor)."""
        self.read_span(info.file, info.offset + start, view)

    def read(self, info: TensorInfo, start: int = 0, length: int | None = None) -> bytearray:
        length = info.nbytes - start if length is None else length
        buf = bytearray(length)
        self.read_into(info, start, memoryview(buf))
        return buf

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_into(f, offset: int, view: memoryview, path: Path) -> None:
    """Fill `view` from file `f` at `offset`; a short read means the file changed under us."""
    got = 0
    while got < len(view):
        n = os.preadv(f.fileno(), [view[got:]], offset + got)
        if n == 0:
            raise Dsv3Error(f"{path}: ended early while reading tensor data; the file is truncated, download it again")
        got += n


def odd_index(name: str) -> str | None:
    """A dotted part of tensor `name` that is a number written otherwise than module numbers are (`03`, `٣`).

    Loaders find a layer or an expert by `str(int)` (`model.layers.3.`); a tensor named otherwise belongs to
    no module, and a renumbering would mangle it.
    """
    if name.isascii() and ".0" not in name and name[:1] != "0":  # the common case, without splitting
        return None
    for part in name.split("."):
        if part.isdecimal() and not (part.isascii() and (part == "0" or part[0] != "0")):
            return part
    return None


def _is_safe_relative(file: str) -> bool:
    if not file or "\\" in file or not file.isprintable() or len(file) > 4096:
        return False
    p = PurePosixPath(file)
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts


def _read_json(path: Path, limit: int) -> object:
    """Parse a JSON file of at most `limit` bytes; a FIFO, a device or a damaged file is one Dsv3Error line."""
    restore = "restore it from the release"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never wait on a FIFO
    except PermissionError as exc:
        raise Dsv3Error(f"{path}: not readable (permission denied); fix its permissions") from exc
    except OSError as exc:
        raise Dsv3Error(f"{path}: unreadable ({exc.strerror}); {restore}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Dsv3Error(f"{path}: is not a regular file; {restore}")
        if st.st_size > limit:
            raise Dsv3Error(f"{path}: {st.st_size} bytes, far larger than such a file can be (limit {limit}); {restore}")
        raw = bytearray()
        while len(raw) <= limit and (chunk := os.read(fd, 1 << 20)):
            raw += chunk
    except OSError as exc:
        raise Dsv3Error(f"{path}: unreadable ({exc.strerror}); {restore}") from exc
    finally:
        os.close(fd)
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _Ambiguous as exc:
        raise Dsv3Error(f"{path}: {exc}; {restore}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else exc.__class__.__name__
        raise Dsv3Error(f"{path}: not valid JSON ({reason}); {restore}") from exc


class _Ambiguous(ValueError):
    """JSON that parsers read differently: a repeated key (which one wins?), NaN or Infinity (not JSON)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Ambiguous(f"key {short(key)} appears more than once in one object (readers keep one or the other)")
    return out


def _no_constant(name: str) -> object:
    raise _Ambiguous(f"holds {name}, which is not standard JSON (other readers refuse it)")
