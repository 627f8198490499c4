"""Fuzzing the safetensors header parser: random and mutated headers raise HeaderError and nothing else.

Whatever comes back is either a HeaderError whose message is one printable line, or a Header whose tensors
tile the data section exactly. Examples are bounded so the file runs in seconds.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv3conv.dtypes import DTYPE_SIZES
from dsv3conv.errors import HeaderError
from dsv3conv.safetensors_format import Header, build_header, parse_header, read_header

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = sorted(DTYPE_SIZES)
json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(DTYPES + ["F4", "", "__metadata__"]),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
shapes = st.lists(st.integers(0, 300), min_size=0, max_size=3)
# "__metadata__" is the header's metadata key, never a tensor name
tensor_names = st.text(min_size=1, max_size=20).filter(lambda name: name != "__metadata__")
tensor_lists = st.lists(
    st.tuples(tensor_names, st.sampled_from(DTYPES), shapes), min_size=1, max_size=6,
    unique_by=lambda t: t[0],
)


def check(raw: bytes) -> Header | None:
    """Parse; only HeaderError may escape, as one short printable line; a success must be self-consistent."""
    try:
        header = parse_header(raw, "fuzz.safetensors")
    except HeaderError as exc:
        assert_clean_message(exc)
        return None
    assert_consistent(header)
    return header


def assert_clean_message(exc: HeaderError) -> None:
    message = str(exc)
    assert message.startswith("fuzz.safetensors: "), message
    assert "\n" not in message and "\r" not in message and len(message) < 4000, message[:500]
    message.encode("utf-8")  # no lone surrogates: it can be printed


def assert_consistent(header: Header) -> None:
    cursor = 0
    for t in header.tensors:
        assert t.name.isprintable() and t.begin == cursor
        assert t.end - t.begin == math.prod(t.shape) * DTYPE_SIZES[t.dtype]
        cursor = t.end
    assert header.data_size == cursor


def header_text(tensors) -> bytes:
    return build_header(tensors, {"format": "pt"})[0][8:]


# ---------------------------------------------------------------------------------------------- fuzz
@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(raw):
    check(raw)


@FUZZ
@given(json_values)
def test_random_json_values(value):
    check(json.dumps(value).encode())


@FUZZ
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=4))
def test_random_entries(entries):
    check(json.dumps(entries).encode())


@FUZZ
@given(tensor_lists)
def test_valid_headers_parse_back(tensors):
    header = check(header_text(tensors))
    if all(t[0].isprintable() for t in tensors):
        assert header is not None and sorted(t.name for t in header.tensors) == sorted(t[0] for t in tensors)


@FUZZ
@given(tensor_lists, st.data())
def test_mutated_fields(tensors, data):
    """One field of one valid entry replaced by anything JSON can hold."""
    obj = json.loads(header_text(tensors))
    name = data.draw(st.sampled_from(sorted(obj)))
    if name == "__metadata__" or not isinstance(obj[name], dict):
        obj[name] = data.draw(json_values)
    else:
        obj[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = data.draw(json_values)
    check(json.dumps(obj).encode())


@FUZZ
@given(tensor_lists, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_bytes(tensors, flips):
    """Bytes of a valid header overwritten: broken JSON, broken numbers, broken names."""
    raw = bytearray(header_text(tensors))
    for pos, value in flips:
        raw[pos % len(raw)] = value
    check(bytes(raw))


@FUZZ
@given(tensor_lists, st.integers(0, 10**6), st.binary(max_size=20))
def test_cut_and_spliced(tensors, cut, insert):
    raw = header_text(tensors)
    cut %= len(raw) + 1
    check(raw[:cut] + insert + raw[cut:])
    check(raw[:cut])


@settings(max_examples=60, deadline=None, database=None)
@given(st.sampled_from(["nest", "digits", "dims", "name"]), st.integers(1, 60_000))
def test_pathological_sizes(kind, n):
    """Deep nesting, numbers of thousands of digits, thousands of dimensions, endless names: fast refusals."""
    if kind == "nest":
        raw = b'{"a": ' + b"[" * n + b"]" * n + b"}"
    elif kind == "digits":
        raw = b'{"a": {"dtype": "U8", "shape": [1' + b"0" * min(n, 20_000) + b'], "data_offsets": [0, 1]}}'
    elif kind == "dims":
        raw = json.dumps({"a": {"dtype": "U8", "shape": [2**62] * min(n, 20_000), "data_offsets": [0, 1]}}).encode()
    else:
        raw = json.dumps({"x" * n: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    check(raw)


# ------------------------------------------------------------------------------- whole files on disk
@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d) / "fuzz.safetensors"


@FUZZ
@given(
    st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 7, 8, 2**63, 2**64 - 1, 100 * 1024 * 1024])),
    st.binary(max_size=300),
)
def test_random_files(scratch, length, body):
    """A random length field before random bytes: refused without reading `length` bytes."""
    scratch.write_bytes(struct.pack("<Q", length) + body)
    try:
        read_header(scratch)
    except HeaderError as exc:
        assert "\n" not in str(exc)


small_tensor_lists = st.lists(
    st.tuples(tensor_names, st.sampled_from(DTYPES), st.lists(st.integers(0, 9), max_size=3)),
    min_size=1, max_size=6, unique_by=lambda t: t[0],
)


@FUZZ
@given(small_tensor_lists, st.integers(-64, 64))
def test_files_with_wrong_data_length(scratch, tensors, delta):
    """A valid header with its data section too short or too long: refused unless the length is exact."""
    header, _ = build_header(tensors)
    size = sum(math.prod(s) * DTYPE_SIZES[d] for _, d, s in tensors)
    present = max(0, size + delta)
    scratch.write_bytes(header + b"\0" * present)
    try:
        got = read_header(scratch)
    except HeaderError as exc:
        assert "\n" not in str(exc)
        assert present != size or not all(t[0].isprintable() for t in tensors), str(exc)
    else:
        assert present == size and got.data_size == size
