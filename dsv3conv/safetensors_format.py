"""The safetensors file format: parse and validate a header, build one.

Why not the safetensors library here: dsv3conv must (a) list every problem of a damaged download instead of
stopping at the first, (b) refuse an absurd header length before allocating, and (c) write shards as a stream,
tensor by tensor, without holding a shard in memory (`safetensors.torch.save_file` needs every tensor at once).
The library is still used in tests as an independent reader of what dsv3conv writes.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from dsv3conv.dtypes import DTYPE_SIZES
from dsv3conv.errors import HeaderError, counted, short

# Largest header accepted. The real DeepSeek-V3 shards have headers of ~100 KB; safetensors caps at 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_ALIGN = 8
# Limits that keep a hostile header from costing time or memory (products of huge shapes, endless names);
# real checkpoints are far inside them. Sizes and offsets must fit the format's u64 fields.
MAX_NDIM = 64
MAX_NAME_CHARS = 1024
MAX_U64 = 2**64 - 1



@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a header describes it; offsets are relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated header: its tensors in data order, its metadata, and where the data section starts."""

    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None
    data_start: int  # 8 + header length
    data_size: int  # bytes the header's tensors cover
    text: bytes = field(default=b"", repr=False)  # the JSON text as stored, padding included

    @property
    def file_prefix(self) -> bytes:
        """The file's first `data_start` bytes: the length field and the JSON text."""
        return struct.pack("<Q", len(self.text)) + self.text


def read_header(path: Path) -> Header:
    """Read and validate the header of `path`, reading only the length field and the JSON text."""
    try:
        # O_NONBLOCK: a FIFO planted under a shard's name must be refused, not waited on forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except IsADirectoryError as exc:
        raise HeaderError(f"{path}: is a directory, not a safetensors file") from exc
    except PermissionError as exc:
        raise HeaderError(f"{path}: not readable (permission denied); fix its permissions") from exc
    except FileNotFoundError as exc:
        raise HeaderError(f"{path}: file is missing; download it again") from exc
    except OSError as exc:
        raise HeaderError(f"{path}: cannot be opened ({exc.strerror})") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise HeaderError(f"{path}: is a directory, not a safetensors file")
        raise HeaderError(f"{path}: is not a regular file (a device, FIFO or socket); replace it with the shard")
    file_size = st.st_size
    with os.fdopen(fd, "rb") as f:
        try:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(f"{path}: truncated inside the header length ({counted(file_size, 'byte')}); download it again")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise HeaderError(
                    f"{path}: header length {header_len} is absurd (limit {MAX_HEADER_BYTES}); the file is not safetensors or is damaged"
                )
            if 8 + header_len > file_size:
                raise HeaderError(
                    f"{path}: header length {header_len} is larger than the file ({counted(file_size, 'byte')}); the file is truncated, download it again"
                )
            raw = f.read(header_len)
        except OSError as exc:
            raise HeaderError(f"{path}: read failed ({exc.strerror}); check the disk and download it again") from exc
    if len(raw) < header_len:
        raise HeaderError(f"{path}: ended inside the header (the file shrank while being read); download it again")
    header = parse_header(raw, path)
    data_avail = file_size - header.data_start
    if header.data_size > data_avail:
        raise HeaderError(
            f"{path}: truncated inside the data ({data_avail} of {header.data_size} data bytes present); download it again"
        )
    if header.data_size < data_avail:
        raise HeaderError(
            f"{path}: {counted(data_avail - header.data_size, 'byte')} after the last tensor that no header entry covers; the file is damaged"
        )
    return header


def parse_header(raw: bytes, path: Path | str = "<header>") -> Header:
    """Validate header JSON bytes; raise HeaderError naming the file and the bad entry."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"{path}: header is not valid JSON ({exc.__class__.__name__}: {exc}); the file is damaged") from exc
    except RecursionError as exc:
        raise HeaderError(f"{path}: header is not valid safetensors JSON (nested too deeply); the file is damaged") from exc
    except ValueError as exc:  # an integer literal of thousands of digits
        raise HeaderError(f"{path}: header holds a number too large for any size or offset; the file is damaged") from exc
    if not isinstance(obj, dict):
        raise HeaderError(f"{path}: header is a JSON {type(obj).__name__}, not an object; the file is damaged")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings")
    entries = [_parse_entry(name, spec, path) for name, spec in obj.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    cursor = 0
    for entry in entries:
        if entry.begin != cursor:
            what = "overlaps the previous tensor" if entry.begin < cursor else f"leaves a gap of {counted(entry.begin - cursor, 'byte')}"
            raise HeaderError(f"{path}: tensor `{entry.name}` data_offsets {[entry.begin, entry.end]} {what}")
        cursor = entry.end
    return Header(tuple(entries), metadata, 8 + len(raw), cursor, bytes(raw))


def _parse_entry(name: str, spec: object, path: Path | str) -> TensorEntry:
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        # Names end up in messages and in the output's header: refuse control characters and endless names.
        what = f"is {len(name)} characters long" if len(name) > MAX_NAME_CHARS else "holds control or unprintable characters"
        raise HeaderError(f"{path}: tensor name {short(name)} {what}; the file is damaged")
    if not isinstance(spec, dict):
        raise HeaderError(f"{path}: tensor `{name}` entry is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise HeaderError(f"{path}: tensor `{name}` has unknown dtype {short(dtype)}")
    # `type(x) is int`: JSON gives int or bool (an int subclass), never another; tens of thousands per checkpoint
    if type(shape) is not list or not all([type(d) is int and 0 <= d <= MAX_U64 for d in shape]):
        raise HeaderError(f"{path}: tensor `{name}` shape {short(shape)} is not a list of non-negative integers")
    if len(shape) > MAX_NDIM:
        raise HeaderError(f"{path}: tensor `{name}` has {len(shape)} dimensions (limit {MAX_NDIM}); the file is damaged")
    if not (type(offsets) is list and len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int
            and 0 <= offsets[0] <= MAX_U64 and 0 <= offsets[1] <= MAX_U64):
        raise HeaderError(f"{path}: tensor `{name}` data_offsets {short(offsets)} is not a pair of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise HeaderError(f"{path}: tensor `{name}` data_offsets {offsets} end before they begin")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if expected > MAX_U64:
        raise HeaderError(f"{path}: tensor `{name}` {dtype} {short(shape)} would need more than 2**64 bytes; the file is damaged")
    if end - begin != expected:
        raise HeaderError(
            f"{path}: tensor `{name}` covers {counted(end - begin, 'byte')} but {dtype} {shape} needs {expected:,}"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)



def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) for tensors laid out back to back in the given order.

    Returns the bytes and each tensor's offset in the data section. The JSON is padded with spaces to a
    multiple of 8 bytes so that tensor data stays aligned, as the safetensors library does.
    """
    obj: dict[str, object] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    offsets, cursor = [], 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        offsets.append(cursor)
        cursor += nbytes
    text = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text, offsets



