"""Tokenized examples on disk: flat arrays per column, read through memory maps.

    with StoreWriter(path, SFT_COLUMNS) as w:      # written under a temporary name, renamed at the end
        w.add({"input_ids": (values, lengths), "loss_mask": (values, lengths)})
        w.finish(meta={...})
    store = TokenStore(path)
    store[i]          # {"input_ids": [...], "loss_mask": [...]}: the lists tokenization made
    store.lengths()   # tokens per example ([n], or [n, 2] chosen/rejected rows for pairs), no row read

Layout of a store directory:
    meta.json              columns, num_examples, content hash, and what the writer passed (stats, note)
    COLUMN.bin             a ragged column's values end to end (int32 ids, uint8 masks)
    COLUMN.offsets.npy     int64 [n + 1]: example i is values[offsets[i]:offsets[i + 1]]
    COLUMN.npy             a per-example scalar column (float32 margin)

Numpy memory maps rather than ArrayRecord or Arrow: examples are read by index, a ragged column
is two arrays, and the iterator needs their lengths without reading a row.
A store exists only complete: `StoreWriter` writes to DIR.tmp-HOST-PID-*, then renames it to DIR; a
writer that died (kill -9) leaves its temporary dir, which the next writer on that host deletes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxalign.errors import JaxalignError

META_FILE = "meta.json"
TMP_MARK = ".tmp-"  # DIR.tmp-HOST-PID-RANDOM: a store being written
STORE_VERSION = 1
# column -> dtype; ragged columns hold one list per example, scalar columns one number.
SFT_COLUMNS = {"input_ids": "int32", "loss_mask": "bool"}
PAIR_COLUMNS = {"prompt_ids": "int32", "chosen_ids": "int32", "rejected_ids": "int32"}
UNPAIRED_COLUMNS = {"prompt_ids": "int32", "completion_ids": "int32"}  # with a `label` scalar (KTO)
SCALAR_COLUMNS = {"margin": "float32", "label": "float32", "ref_chosen_logp": "float32",
                  "ref_rejected_logp": "float32"}


class StoreWriter:
    """Append tokenized chunks to a new store; `finish` makes it visible atomically."""

    def __init__(self, path: str, columns: Mapping[str, str], scalars: Sequence[str] = ()):
        self.path = os.fspath(path)
        _remove_abandoned(self.path)
        self.tmp = f"{self.path}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        os.makedirs(self.tmp)
        self.columns = dict(columns)
        self.scalars = list(scalars)
        self._files = {c: open(os.path.join(self.tmp, f"{c}.bin"), "wb") for c in self.columns}
        self._lengths: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        self._scalar_parts: dict[str, list[np.ndarray]] = {c: [] for c in self.scalars}
        # One hash per stream, so the content hash does not depend on how the rows were chunked.
        self._hashes = {name: hashlib.sha256() for c in self.columns for name in (c, f"{c}.lengths")}
        self.num_examples = 0

    def add(self, chunk: Mapping[str, Any]) -> None:
        """chunk: {ragged column: (flat values, lengths per example), scalar column: values}."""
        n = None
        for c, dtype in self.columns.items():
            values, lengths = chunk[c]
            values, lengths = np.asarray(values, dtype), np.asarray(lengths, np.int64)
            if values.size != lengths.sum() or (n is not None and len(lengths) != n):
                raise JaxalignError(f"store chunk: column {c} has {values.size} values for lengths summing to "
                                    f"{lengths.sum()} over {len(lengths)} examples")
            n = len(lengths)
            data = values.astype(np.uint8).tobytes() if dtype == "bool" else values.tobytes()
            self._files[c].write(data)
            self._hashes[c].update(data)
            self._hashes[f"{c}.lengths"].update(lengths.tobytes())
            self._lengths[c].append(lengths)
        for c in self.scalars:
            self._scalar_parts[c].append(np.asarray(chunk[c], SCALAR_COLUMNS[c]))
        self.num_examples += n or 0

    def finish(self, meta: Mapping[str, Any]) -> TokenStore:
        """Write offsets and meta.json, then rename into place (a store someone else finished first wins)."""
        for c, f in self._files.items():
            f.close()
            lengths = np.concatenate(self._lengths[c]) if self._lengths[c] else np.zeros(0, np.int64)
            np.save(os.path.join(self.tmp, f"{c}.offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]))
        content = hashlib.sha256()
        for name in sorted(self._hashes):
            content.update(name.encode() + self._hashes[name].digest())
        for c in self.scalars:
            values = np.concatenate(self._scalar_parts[c]) if self._scalar_parts[c] else np.zeros(0, np.float32)
            np.save(os.path.join(self.tmp, f"{c}.npy"), values)
            content.update(c.encode() + values.tobytes())
        full = {"version": STORE_VERSION, "columns": self.columns, "scalars": self.scalars,
                "num_examples": self.num_examples, "content_hash": content.hexdigest()[:16], **meta}
        with open(os.path.join(self.tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(full, f, indent=2, default=str)
        try:
            os.rename(self.tmp, self.path)
        except OSError:
            if not os.path.exists(os.path.join(self.path, META_FILE)):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)  # written meanwhile by another process: same inputs
        return TokenStore(self.path)

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None or os.path.exists(self.tmp):
            self.abort()


class TokenStore(Sequence):
    """Examples of a finished store, by index, as the lists tokenization gave (O(1) memory each).

    `with_scalars(ref_chosen_logp=..., ...)` gives a view with per-example numbers added (the
    precomputed DPO reference), the files unchanged.
    """

    def __init__(self, path: str, _extra: Mapping[str, np.ndarray] | None = None):
        self.path = os.fspath(path)
        meta_file = os.path.join(self.path, META_FILE)
        if not os.path.isfile(meta_file):
            raise JaxalignError(f"{self.path} is not a finished token store (no {META_FILE})")
        with open(meta_file, encoding="utf-8") as f:
            self.meta = json.load(f)
        if self.meta.get("version") != STORE_VERSION:
            raise JaxalignError(f"token store {self.path} has version {self.meta.get('version')!r}, expected "
                                f"{STORE_VERSION}; delete it to re-tokenize")
        self.num_examples = int(self.meta["num_examples"])
        self.columns = dict(self.meta["columns"])
        self._values = {c: _memmap(os.path.join(self.path, f"{c}.bin"), "uint8" if d == "bool" else d)
                        for c, d in self.columns.items()}
        self._offsets = {c: np.load(os.path.join(self.path, f"{c}.offsets.npy"), mmap_mode="r") for c in self.columns}
        self._scalars = {c: np.load(os.path.join(self.path, f"{c}.npy")) for c in self.meta["scalars"]}
        self._scalars.update(_extra or {})

    @property
    def content_hash(self) -> str:
        """A hash of the tokenized examples (ids, masks, order, scalar columns), whatever they came from."""
        return self.meta["content_hash"]

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.num_examples))]
        i = int(i)
        if i < 0:
            i += self.num_examples
        if not 0 <= i < self.num_examples:
            raise IndexError(f"example {i} of a store of {self.num_examples}")
        out: dict[str, Any] = {}
        for c, dtype in self.columns.items():
            start, end = self._offsets[c][i], self._offsets[c][i + 1]
            values = self._values[c][start:end]
            out[c] = values.astype(bool).tolist() if dtype == "bool" else values.tolist()
        out.update({c: float(v[i]) for c, v in self._scalars.items()})
        return out

    def column_lengths(self, column: str) -> np.ndarray:
        return np.diff(np.asarray(self._offsets[column]))

    def lengths(self) -> np.ndarray:
        """Tokens per example: [n] (SFT; unpaired: prompt + completion), or [n, 2] prompt + chosen, prompt +
        rejected (pairs)."""
        if "completion_ids" in self.columns:
            return self.column_lengths("prompt_ids") + self.column_lengths("completion_ids")
        if "prompt_ids" in self.columns:
            prompt = self.column_lengths("prompt_ids")
            return np.stack([prompt + self.column_lengths("chosen_ids"),
                             prompt + self.column_lengths("rejected_ids")], axis=1)
        return self.column_lengths("input_ids")

    def trained_targets(self, block: int = 1 << 16) -> np.ndarray:
        """[n] trained targets per SFT example: its loss_mask without the first token (which nothing
        predicts), summed block by block so the mask is never read whole."""
        offsets, mask = np.asarray(self._offsets["loss_mask"]), self._values["loss_mask"]
        out = np.zeros(self.num_examples, np.int64)
        for s in range(0, self.num_examples, block):
            e = min(s + block, self.num_examples)
            rel = offsets[s:e + 1] - offsets[s]
            values = np.asarray(mask[offsets[s]:offsets[e]], np.int64)
            sums = np.concatenate([[0], np.cumsum(values)])
            starts, ends = rel[:-1], rel[1:]
            first = np.zeros(e - s, np.int64)
            nonempty = ends > starts
            first[nonempty] = values[starts[nonempty]]
            out[s:e] = sums[ends] - sums[starts] - first
        return out

    def with_scalars(self, **values: np.ndarray) -> TokenStore:
        for c, v in values.items():
            if len(v) != self.num_examples:
                raise JaxalignError(f"{c}: {len(v)} values for a store of {self.num_examples} examples")
        return TokenStore(self.path, {**self._scalars, **{c: np.asarray(v, np.float32) for c, v in values.items()}})

    def __repr__(self) -> str:
        return f"TokenStore({self.path!r}, {self.num_examples} examples, columns {list(self.columns)})"


def _remove_abandoned(path: str) -> None:
    """Delete this host's temporary dirs for `path` whose writer died (kill -9, a lost node)."""
    parent, name, host = os.path.dirname(path) or ".", os.path.basename(path), socket.gethostname()
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if not entry.startswith(f"{name}{TMP_MARK}{host}-"):
            continue
        pid = entry[len(f"{name}{TMP_MARK}{host}-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _memmap(path: str, dtype: str) -> np.ndarray:
    # np.memmap refuses an empty file; a store of empty examples has nothing to map.
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")
