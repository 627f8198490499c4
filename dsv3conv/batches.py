"""The batches of an engine run and their order, decided before any data moves.

A batch is one read -> convert -> write step: contiguous source bytes of one file (small scales between two
pieces read along), at most `chunk_bytes`, and where each output piece goes. The files take turns
(`interleaved`), and while the backend starts, a batch that converts nothing goes first (`Schedule`).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Callable

from dsv3conv.plan import FilePlan, TensorPlan

MAX_GAP_BYTES = 1 << 20  # small tensors between two read pieces are read along rather than seeked over
LOOKAHEAD = 256  # batches searched for one that converts nothing while the backend starts


@dataclass
class BatchSpec:
    """One read -> convert -> write step, decided before any data moves."""

    k: int  # index of the output file in the plan
    file: FilePlan
    src_file: str | None
    span_start: int  # absolute offset of the read in the source file
    span_len: int
    pieces: list[tuple[TensorPlan, int, int]]  # (tensor, start byte in the tensor's source, source bytes)
    out_offsets: list[int]  # absolute offset in the output file of each piece the backend returns, in order
    out_bytes: int
    converts: bool = False  # a piece goes through the backend (the batch needs an arena)
    copies: bool = False  # a piece is copied: its output is a view of the read buffer


def batch_specs(k: int, f: FilePlan, chunk_bytes: int) -> list[BatchSpec]:
    """Group the file's tensor pieces into batches of contiguous source bytes (interleaved small scales read along)."""
    if f.copy_of is not None:
        return [BatchSpec(k, f, None, 0, 0, [], [], f.size)]
    specs: list[BatchSpec] = []
    where, at = {}, len(f.header)  # each tensor's data offset in the output file
    for t in f.tensors:
        where[t.name] = at
        at += t.nbytes
    cur: BatchSpec | None = None
    for t in f.tensors:
        for start, n in t.op.pieces(t, chunk_bytes):
            a = t.source.offset + start
            fits = cur is not None and (
                cur.src_file == t.source.file
                and cur.span_start + cur.span_len <= a <= cur.span_start + cur.span_len + MAX_GAP_BYTES
                and a + n - cur.span_start <= chunk_bytes
            )
            if not fits:
                cur = BatchSpec(k, f, t.source.file, a, 0, [], [], 0)
                specs.append(cur)
            cur.pieces.append((t, start, n))
            cur.converts |= t.converts
            cur.copies |= not t.converts
            cur.span_len = a + n - cur.span_start
            for name, offset, out_n in t.op.outputs(t, start, n):
                cur.out_offsets.append(where[name] + offset)
                cur.out_bytes += out_n
    if not specs:  # a file of empty tensors still gets its header
        specs.append(BatchSpec(k, f, None, 0, 0, [], [], 0))
    return specs


def interleaved(per_file: list[list], window: int) -> list:
    """The batches of `window` files at a time, taking turns, in file order otherwise.

    A file system lets one write into a file at a time (tmpfs, ext4 and XFS lock the file for each buffered
    write), so writers run in parallel only on different files; a file ends before the files beyond the
    window start, so few partial files exist at any moment."""
    waiting = deque(batches for batches in per_file if batches)
    active: list[list] = []  # [a file's batches, the index of its next one]
    order = []
    while waiting or active:
        while len(active) < window and waiting:
            active.append([waiting.popleft(), 0])
        for turn in active:
            order.append(turn[0][turn[1]])
            turn[1] += 1
        active = [turn for turn in active if turn[1] < len(turn[0])]
    return order


class Schedule:
    """The batches for the readers, in run order; while `starting()`, a batch that converts nothing (within
    the next LOOKAHEAD) goes first, so reads and writes go on while the backend starts."""

    def __init__(self, specs: list[BatchSpec], starting: Callable[[], bool], lookahead: int):
        self.pending, self.starting, self.lookahead = deque(specs), starting, lookahead
        self.lock = threading.Lock()

    def next(self) -> BatchSpec | None:
        with self.lock:
            if self.starting():
                for i, spec in enumerate(islice(self.pending, self.lookahead)):
                    if not spec.converts:
                        del self.pending[i]
                        return spec
            return self.pending.popleft() if self.pending else None

    def left(self) -> int:
        """Batches not yet taken."""
        with self.lock:
            return len(self.pending)
