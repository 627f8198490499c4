"""Byte-level tests of the safetensors header: what dsv3conv writes, and what it refuses to read."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3conv.errors import HeaderError
from dsv3conv.safetensors_format import MAX_HEADER_BYTES, build_header, parse_header, read_header


def test_build_header_bytes_are_pinned():
    header, offsets = build_header([("a", "BF16", (2, 3)), ("b", "F8_E4M3", (5,))], {"format": "pt"})
    (n,) = struct.unpack("<Q", header[:8])
    assert n == len(header) - 8 and len(header) % 8 == 0
    text = header[8:].rstrip(b" ")
    assert text == (
        b'{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},'
        b'"b":{"dtype":"F8_E4M3","shape":[5],"data_offsets":[12,17]}}'
    )
    assert offsets == [0, 12]


def test_written_header_is_read_by_the_safetensors_library(tmp_path):
    t = {"x": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "y": torch.ones(3, dtype=torch.float32)}
    header, _ = build_header([(k, {torch.bfloat16: "BF16", torch.float32: "F32"}[v.dtype], tuple(v.shape)) for k, v in t.items()],
                             {"format": "pt"})
    path = tmp_path / "a.safetensors"
    path.write_bytes(header + b"".join(v.view(torch.uint8).numpy().tobytes() for v in t.values()))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in t.items():
            assert torch.equal(f.get_tensor(k), v)


def test_reads_what_the_safetensors_library_writes(tmp_path):
    path = tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(4, 4, dtype=torch.float8_e4m3fn), "s": torch.ones(1, 1)}, str(path), {"format": "pt"})
    h = read_header(path)
    assert {e.name: (e.dtype, e.shape) for e in h.tensors} == {"w": ("F8_E4M3", (4, 4)), "s": ("F32", (1, 1))}
    assert h.metadata == {"format": "pt"}
    assert h.data_start + h.data_size == path.stat().st_size


def _raw(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (_raw({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}), "unknown dtype"),
        (_raw({"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}), "shape"),
        (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}), "data_offsets"),
        (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}), "needs 8"),
        (_raw({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
               "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}), "overlaps"),
        (_raw({"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}), "gap"),
        (_raw({"__metadata__": {"format": 1}}), "__metadata__"),
    ],
)
def test_bad_headers_are_named(raw, message):
    with pytest.raises(HeaderError, match=message):
        parse_header(raw, "shard.safetensors")


def test_absurd_header_length_refused_before_reading(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(HeaderError, match="absurd"):
        read_header(path)


def test_truncated_files_are_named(tmp_path):
    header, _ = build_header([("a", "F32", (4,))])
    path = tmp_path / "d.safetensors"
    path.write_bytes(header[:5])
    with pytest.raises(HeaderError, match="inside the header length"):
        read_header(path)
    path.write_bytes(header[:-3])
    with pytest.raises(HeaderError, match="larger than the file"):
        read_header(path)
    path.write_bytes(header + b"\0" * 10)
    with pytest.raises(HeaderError, match="truncated inside the data"):
        read_header(path)
    path.write_bytes(header + b"\0" * 20)
    with pytest.raises(HeaderError, match="after the last tensor"):
        read_header(path)
