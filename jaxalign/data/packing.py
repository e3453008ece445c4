"""Sequences -> [rows, length] batch arrays: best-fit-decreasing packing and row filling.

A sequence is a tokenized example, `{"input_ids": [...], "loss_mask": [...]}` with
`loss_mask[i]` = token i is a trained target. A sequence of n ids fills n positions of a row:

    tokens    = ids                       positions   = 0, 1, ..., n-1 (restart per sequence)
    targets   = ids[1:] + [pad]           segment_ids = k for the k-th sequence of the row (1, 2, ...)
    loss_mask = loss_mask[1:] + [False]   (0 / pad / False after the last sequence)

so the last token of every sequence predicts nothing: no sequence is trained on the first token of
the next one, and attention (from segment_ids) never crosses sequences. One row holding one
sequence is the unpacked (padded) layout; the same function builds both.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import numpy as np

from jaxalign.errors import JaxalignError

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: group item indices into bins of total length <= `capacity`.

    Items go longest first (ties in input order) into the open bin with the least room that still
    fits them, else a new bin. Open bins are kept by remaining room, and the distinct room values
    (at most capacity + 1 of them) in a sorted list, so each item costs one bisect: 100k items
    take well under a second. Deterministic; bins come back in the order they were opened.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and (lengths.max() > capacity or lengths.min() < 0):
        bad = int(np.argmax(lengths > capacity)) if lengths.max() > capacity else int(np.argmin(lengths))
        raise JaxalignError(f"cannot pack item {bad} of length {int(lengths[bad])} into rows of {capacity} "
                            "tokens; the tokenize stage truncates to data.max_length, so this is a bug there "
                            "or data.max_length changed after tokenizing")
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> ids of open bins with exactly that room
    rooms: list[int] = []  # sorted distinct keys of by_room
    for item in np.argsort(-lengths, kind="stable").tolist():
        size = int(lengths[item])
        k = bisect.bisect_left(rooms, size)
        if k < len(rooms):
            room = rooms[k]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[k]
            bins[b].append(item)
        else:
            room, b = capacity, len(bins)
            bins.append([item])
        room -= size
        if room not in by_room:
            by_room[room] = []
            bisect.insort(rooms, room)
        by_room[room].append(b)
    return bins


def pack_rows(rows: Sequence[Sequence[Mapping]], capacity: int, pad_id: int = 0,
              num_rows: int | None = None) -> dict[str, np.ndarray]:
    """Batch arrays [num_rows, capacity] with the sequences of `rows[r]` laid end to end in row r.

    `num_rows` (default len(rows)) may exceed len(rows): the extra rows are all padding.
    """
    num_rows = len(rows) if num_rows is None else num_rows
    if len(rows) > num_rows:
        raise JaxalignError(f"{len(rows)} rows do not fit a batch of {num_rows}")
    batch = {
        "tokens": np.full((num_rows, capacity), pad_id, np.int32),
        "targets": np.full((num_rows, capacity), pad_id, np.int32),
        "loss_mask": np.zeros((num_rows, capacity), bool),
        "positions": np.zeros((num_rows, capacity), np.int32),
        "segment_ids": np.zeros((num_rows, capacity), np.int32),
    }
    for r, sequences in enumerate(rows):
        start = k = 0
        for seq in sequences:
            ids = np.asarray(seq["input_ids"], np.int32)
            n = len(ids)
            if n == 0:
                continue
            if len(seq["loss_mask"]) != n:
                raise JaxalignError(f"row {r}: a sequence has {n} input_ids but {len(seq['loss_mask'])} loss_mask "
                                    "entries")
            k += 1
            if start + n > capacity:
                raise JaxalignError(f"row {r}: sequences of {start + n} tokens exceed the row length {capacity}")
            end = start + n
            batch["tokens"][r, start:end] = ids
            batch["targets"][r, start:end - 1] = ids[1:]
            batch["loss_mask"][r, start:end - 1] = np.asarray(seq["loss_mask"], bool)[1:]
            batch["positions"][r, start:end] = np.arange(n, dtype=np.int32)
            batch["segment_ids"][r, start:end] = k
            start = end
    return batch


def packing_efficiency(batch: Mapping[str, np.ndarray]) -> float:
    """Fraction of positions holding a real token (segment id != 0)."""
    seg = np.asarray(batch["segment_ids"])
    return float(np.count_nonzero(seg)) / max(seg.size, 1)


def bins_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Non-pad fraction of the rows `pack_bfd` made, without building them."""
    return float(np.sum(lengths)) / max(len(bins) * capacity, 1)
