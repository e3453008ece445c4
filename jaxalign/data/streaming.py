"""Streaming training data (`data.streaming: true`): rows read, tokenized and batched as they come,
never written to a token store. For data larger than the disk cache, or a hub dataset read without
downloading it whole.

    each epoch  the source's files in a seeded order (in file order when data.max_rows is set or
                data.shuffle is off; a hub dataset in its own order), each read row by row
             -> a shuffle buffer of data.shuffle_buffer rows, seeded by (train.seed, epoch)
             -> normalize + tokenize each row by the token store's rules (jaxalign.data.tokenize)
             -> SFT packed: examples laid into rows of data.max_length in stream order (a row
                closes when the next example does not fit, and at the end of an epoch);
                unpacked SFT and pairs: one example per row (pair)
             -> batches of train.batch_size rows (pairs), which run on across epochs

The position is (epoch, index in that epoch's shuffled stream of the first row not yet in an
emitted batch): a few numbers in the checkpoint. A resume reads the epoch's stream again up to it,
shuffling but not tokenizing the rows it passes, and goes on with exactly the batches the run would
have drawn next (reading is O(position); nothing else is kept). What streaming gives up:

* packing is greedy in stream order, not best-fit over the epoch (that needs every length ahead):
  `data inspect` on the same rows shows the best-fit figure to compare with;
* every process reads and tokenizes the whole stream (the lengths decide every process's rows)
  and builds only its own rows;
* no data.eval_fraction split (the stream has no end to hold out from): give data.eval, tokenized
  into a store as usual; no weighted mixture, no precomputed DPO reference; train.max_steps set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import numpy as np

from jaxalign.data.batching import check_pair, pair_lengths
from jaxalign.data.examples import TokenizeSettings
from jaxalign.data.formats import resolve_format
from jaxalign.data.iterator import batch_rows, build_host_batch, row_multiple, rows_of
from jaxalign.data.sources import BOOKKEEPING, data_files, data_kind, iter_jsonl, rows_fingerprint
from jaxalign.data.tokenize import DataStats, RowRules, tokenizer_fingerprint
from jaxalign.errors import JaxalignError

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Stream:
    """The training rows of a streaming run, with the rules that tokenize them (`load_examples`)."""

    path: Any  # data.train: a file, glob, dir, hub id, or a list of them
    split: str
    max_rows: int
    job: RowRules  # the tokenize stage's per-row rules (fmt "" until the iterator reads a row)
    fmt_spec: str  # data.format: with the first row's columns, it decides the format
    from_pref: bool  # data.sft_from_preference

    @property
    def content_hash(self) -> str:
        """Names what the run trains on: the files (path, size, mtime; a hub id by name), the tokenizer
        and the settings. The rows themselves are not read for it."""
        rows = rows_fingerprint(self.path, self.split, self.max_rows) or json.dumps([self.path, self.split])
        j = self.job
        desc = [rows, self.max_rows, tokenizer_fingerprint(j.tokenizer), j.stage, self.fmt_spec, self.from_pref,
                dataclasses.astuple(j.settings), j.on_bad_row]
        return hashlib.sha256(json.dumps(desc, default=str).encode()).hexdigest()[:16]

    def epoch_rows(self, rng: np.random.Generator, shuffle: bool = True) -> Iterator[dict]:
        """One pass over the rows, each with `_source` and `_row` (as `sources.load_rows` gives them)."""
        for name in self.path if isinstance(self.path, (list, tuple)) else [self.path]:
            files = data_files(os.path.expanduser(os.fspath(name)))
            if files is None:  # a hub id: the hub's own order
                ds = datasets.load_dataset(name, split=self.split, streaming=True)
                rows = ({**row, "_source": f"{name}[{self.split}]", "_row": k} for k, row in enumerate(ds, 1))
            else:
                order = [files[k] for k in rng.permutation(len(files))] if shuffle and not self.max_rows else files
                rows = itertools.chain.from_iterable(map(_file_rows, order))
            yield from itertools.islice(rows, self.max_rows or None)


def open_stream(cfg: Any, tokenizer: Any, stage: str) -> Stream:
    """The `Stream` of a run's data.train (nothing is read yet)."""
    data = cfg.data
    stage = "dpo" if stage == "rm" else stage
    settings = TokenizeSettings.from_config(data, cfg.sft.loss_on if stage == "sft" else "completion")
    job = RowRules(tokenizer, settings, stage, "", data.on_bad_row, str(data.train), False)
    return Stream(data.train, data.split, data.max_rows, job, data.format, data.sft_from_preference)


def _file_rows(path: str) -> Iterator[dict]:
    if ".jsonl" in os.path.basename(path).lower():  # our reader: errors name the file and line
        return ({**row, "_source": path, "_row": line} for line, row in iter_jsonl(path))
    ds = datasets.load_dataset(data_kind(path)[0], data_files=path, split="train", streaming=True)
    return ({**row, "_source": path, "_row": k} for k, row in enumerate(ds, 1))


def shuffled(rows: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """A shuffle buffer: each row out is a random one of the next `size` in (datasets' and tf.data's
    rule), so memory holds `size` rows; the draws come from `rng` alone, so a replay is identical."""
    buffer: list[dict] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = row
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


class StreamIterator:
    """Host batches of a `Stream`, with the BatchIterator interface the train loop uses (endless)."""

    def __init__(self, stream: Stream, stage: str, *, batch_size: int, max_length: int, pad_to_multiple_of: int,
                 packing: bool, shuffle: bool, seed: int, shuffle_buffer: int, pad_id: int = 0, mesh=None,
                 share_prompt: bool = False, micro_batches: int = 1):
        self.stream, self.stage, self.batch_size, self.max_length = stream, stage, batch_size, max_length
        self.pad_to_multiple_of, self.shuffle, self.seed, self.pad_id = pad_to_multiple_of, shuffle, seed, pad_id
        self.shuffle_buffer = shuffle_buffer
        self.paired = stage != "sft"
        self.shared, self.mesh = share_prompt and stage == "dpo", mesh
        self.pack_pairs = packing and self.shared  # whole pairs per row, batch by batch (iterator.py)
        self.row_multiple = row_multiple(mesh) * micro_batches
        self.packing = packing and not self.paired
        self.global_rows = batch_rows(self, batch_size)
        self.local_rows = rows_of(mesh, self.global_rows)
        self.stats = DataStats()  # the rows this process has tokenized (a resume's replay not counted)
        # The stream's first row decides the format, as a dataset's columns do (on a resume too).
        first = next(iter(stream.epoch_rows(np.random.default_rng([seed, 0]), False)), None)
        if first is None:
            raise JaxalignError(f"data.train {stream.path!r} has no rows")
        columns = [c for c in first if c not in BOOKKEEPING]
        self.job = dataclasses.replace(stream.job, fmt=resolve_format(columns, stream.fmt_spec, stream.job.stage,
                                                                      stream.from_pref), margins="margin" in columns)
        # Once: state() runs after every batch, and the hash stats the files and hashes the tokenizer.
        self.data_hash = stream.content_hash
        self.restore_position(0, 0)

    def restore_position(self, epoch: int, position: int) -> None:
        self.epoch, self.position, self.step, self._step_epoch = epoch, position, 0, epoch
        self._items = self._read(epoch, position)
        self._pending = None  # an example drawn but not yet placed (the first of the next packed row)

    def _read(self, epoch: int, start: int) -> Iterator[tuple[int, int, dict | None]]:
        """(epoch, row index, example) from (epoch, start) on, and (epoch, -1, None) at each epoch's end."""
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            rows = self.stream.epoch_rows(rng, self.shuffle)
            if self.shuffle:
                rows = shuffled(rows, self.shuffle_buffer, rng)
            kept = 0
            for i, row in enumerate(rows):
                if i < start:
                    continue
                example = self._tokenize(row, i)
                if example is not None:
                    kept += 1
                    yield epoch, i, example
            if kept == 0 and start == 0:
                raise JaxalignError(f"the stream {self.stream.path!r} gave no examples in epoch {epoch}:\n"
                                    + self.stats.summary())
            yield epoch, -1, None
            epoch, start = epoch + 1, 0

    def _tokenize(self, row: Mapping[str, Any], index: int) -> dict | None:
        example, flags = self.job.row(dict(row), index)
        self.stats.count(example, flags)
        if example is None:
            return None
        if self.paired:
            check_pair(example, f"{row.get('_source')}:{row.get('_row')}")
        return example

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        units: list = []  # packed: rows of examples; else examples (pairs)
        row: list = []
        used = 0
        while len(units) < self.batch_size:
            item = self._pending or next(self._items)
            self._pending = None
            epoch, i, example = item
            self.epoch, self.position = (epoch + 1, 0) if example is None else (epoch, i + 1)
            if example is None:  # an epoch's end closes the open row
                if row:
                    units.append(row)
                row, used = [], 0
                continue
            if not self.packing:
                units.append(example)
                continue
            n = len(example["input_ids"])
            if row and used + n > self.max_length:
                units.append(row)
                row, used = [], 0
                if len(units) == self.batch_size:  # this example starts the next batch's first row
                    self._pending = item
                    self.epoch, self.position = epoch, i
                    break
            row.append(example)
            used += n
        # batches drawn whose position is in this epoch (the loop's "batch i of the epoch")
        self.step, self._step_epoch = (self.step + 1 if self._step_epoch == self.epoch else 1), self.epoch
        examples = [ex for u in units for ex in (u if self.packing else [u])]
        lengths = np.array([pair_lengths(ex) if self.paired else len(ex["input_ids"]) for ex in examples], np.int64)
        ids = iter(range(len(examples)))
        local_units = [[next(ids) for _ in u] for u in units] if self.packing else list(range(len(examples)))
        return build_host_batch(local_units, examples.__getitem__, lengths, self)

    def state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "streaming": True, "epoch": self.epoch, "position": self.position,
                "data": self.data_hash, "stage": self.stage, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "packing": self.packing, "batch_size": self.batch_size,
                "max_length": self.max_length, "share_prompt": self.shared, "pack_pairs": self.pack_pairs}

    def restore(self, state: Mapping[str, Any]) -> None:
        mine = self.state()
        keys = [k for k in mine if k not in ("epoch", "position")]
        changed = [f"{k}: {state.get(k)!r} -> {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if changed:
            raise JaxalignError("cannot resume the data stream exactly: the data or its settings changed since "
                                f"the checkpoint ({'; '.join(changed)}); restore them or start a new run")
        self.restore_position(int(state["epoch"]), int(state["position"]))

    @property
    def steps_per_epoch(self) -> int:
        """Not known ahead (the config check asks for train.max_steps): never reached."""
        return sys.maxsize
