"""Weighted mixtures of training sources, sampled deterministically.

    data:
      train:
        - {path: tulu.jsonl, weight: 0.7}
        - {path: code/*.parquet, weight: 0.3, max_rows: 200000}
        - {path: HuggingFaceH4/no_robots, weight: 0.1, split: train}

Each source is tokenized into a token store of its own (so changing a weight re-tokenizes nothing)
and `Mixture` views the stores end to end. Weights are relative sampling proportions (normalized
to sum to 1), as in Levanter's `train_weights` or `datasets.interleave_datasets(probabilities=...)`,
but drawn as exact counts rather than per-example coin flips:

* an epoch of the mixture has N = sum of the sources' examples (the size of their concatenation);
* source i gives c_i = w_i / sum(w) * N of them, rounded by largest remainder so the counts add to N;
* c_i <= n_i: a seeded subset without replacement; c_i > n_i: whole passes over the source (each its
  own shuffle), then a subset. A new draw each epoch, from (train.seed, epoch) alone, so every process
  computes the same epoch and a resumed run the same batches. Without data.shuffle a source is
  cycled in file order, each epoch going on where the last one stopped.

The held-out part of a mixture (data.eval_fraction of each source) is the sources' held-out rows end
to end, unweighted: `Mixture(parts)` with no weights is a plain concatenation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxalign.errors import JaxalignError


@dataclasses.dataclass(frozen=True)
class Source:
    """One entry of a weighted data.train: where its rows are, how much of the mixture it makes."""

    path: str
    weight: float
    split: str
    max_rows: int

    @property
    def name(self) -> str:
        return self.path if self.split == "train" else f"{self.path}[{self.split}]"


def weighted_sources(train: Any, split: str = "train", max_rows: int = 0) -> list[Source] | None:
    """The sources of a weighted data.train (a list of {path, weight} mappings), or None for a file,
    glob, dir or hub id or a plain list of them (one source, concatenated). `split` and `max_rows`
    are the data section's, for entries that do not set their own."""
    if isinstance(train, str) or not any(isinstance(e, Mapping) for e in train):
        return None
    out = []
    for i, entry in enumerate(train):
        if not isinstance(entry, Mapping):  # the config check says this too, with the config file
            raise JaxalignError(f"data.train[{i}]: give every source as {{path, weight}}, got {entry!r}")
        out.append(Source(str(entry["path"]), float(entry.get("weight", 1.0)), str(entry.get("split", split)),
                          int(entry.get("max_rows", max_rows))))
    return out


def epoch_counts(weights: Sequence[float], total: int) -> np.ndarray:
    """Examples per source in an epoch of `total`: proportional to `weights`, largest remainder."""
    w = np.asarray(weights, np.float64)
    quota = w / w.sum() * total
    counts = np.floor(quota).astype(np.int64)
    short = total - int(counts.sum())
    # the sources with the largest fractional parts get one more (ties: the earlier source)
    counts[np.argsort(-(quota - counts), kind="stable")[:short]] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    examples: Any  # a TokenStore, or any sequence of example dicts
    weight: float | None = None
    stats: Any = None  # the tokenize stage's DataStats of this source


class Mixture(Sequence):
    """Several sources' examples end to end (index i of the concatenation), with each epoch's order
    drawn by weight (`epoch_order`) when the parts have weights. Offers what a token store offers the
    iterator and `data inspect` (lengths, column_lengths, trained_targets, with_scalars, content_hash)."""

    def __init__(self, parts: Sequence[Part]):
        if not parts:
            raise JaxalignError("a mixture needs at least one source")
        self.parts = list(parts)
        sizes = np.array([len(p.examples) for p in self.parts], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.weighted = all(p.weight is not None for p in self.parts)
        empty = [p.name for p, n in zip(self.parts, sizes) if n == 0]
        if self.weighted and empty:
            raise JaxalignError(f"data.train source {empty[0]!r} has no examples left after tokenizing; "
                                "remove it from the mixture or fix its rows")
        self.counts = epoch_counts([p.weight for p in self.parts], len(self)) if self.weighted else sizes

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of a mixture of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k].examples[i - int(self.starts[k])]

    def epoch_order(self, rng: np.random.Generator, shuffle: bool, epoch: int = 0) -> np.ndarray:
        """Indices of an epoch's examples: `counts[k]` drawn from part k as the module doc says,
        shuffled together (or, unshuffled, part after part, each cycled on from where the last epoch
        stopped, so a down-weighted source reaches its later rows)."""
        picks = []
        for k, c in enumerate(self.counts):
            n, c = int(self.starts[k + 1] - self.starts[k]), int(c)
            if shuffle:
                local = np.concatenate([rng.permutation(n) for _ in range(-(-c // n))] or [np.zeros(0, np.int64)])[:c]
            else:
                local = (epoch * c + np.arange(c)) % n
            picks.append(self.starts[k] + local)
        order = np.concatenate(picks).astype(np.int64)
        return rng.permutation(order) if shuffle else order

    def _concat(self, per_part) -> np.ndarray:
        return np.concatenate([np.asarray(per_part(p.examples)) for p in self.parts])

    def lengths(self) -> np.ndarray:
        return self._concat(lambda s: s.lengths())

    def column_lengths(self, column: str) -> np.ndarray:
        return self._concat(lambda s: s.column_lengths(column))

    def trained_targets(self) -> np.ndarray:
        return self._concat(lambda s: s.trained_targets())

    def with_scalars(self, **values: np.ndarray) -> Mixture:
        for c, v in values.items():
            if len(v) != len(self):
                raise JaxalignError(f"{c}: {len(v)} values for a mixture of {len(self)} examples")
        return Mixture([dataclasses.replace(p, examples=p.examples.with_scalars(
            **{c: np.asarray(v)[self.starts[k]:self.starts[k + 1]] for c, v in values.items()}))
            for k, p in enumerate(self.parts)])

    @property
    def content_hash(self) -> str:
        """The parts' hashes, weights and epoch counts: two mixtures train alike when they match."""
        desc = [[p.examples.content_hash, p.weight] for p in self.parts] + [self.counts.tolist()]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def plan_state(self) -> list | None:
        """What the iterator's saved position records of the mixture (None for a concatenation)."""
        return [[p.name, p.weight, int(c)] for p, c in zip(self.parts, self.counts)] if self.weighted else None

    def __repr__(self) -> str:
        return f"Mixture({[(p.name, len(p.examples), p.weight) for p in self.parts]})"
