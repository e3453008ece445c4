"""KTO's examples, laid out as the pair machinery reads them (token store, iterator, shared-prompt rows,
precomputed reference): example i is (prompt, completion, KL completion, label).

The KL completion is another example's completion under this example's prompt, from which KTO estimates its
reference point z0 (the mismatched pairs of TRL's KTOTrainer): within consecutive blocks of `block` examples
(train.batch_size), example i takes the completion of example i - 1 and the block's first takes its last
one's, as TRL rotates them in blocks of its batch size. Being fixed per example, it can be precomputed. It is
cut to fit data.max_length after this example's prompt (TRL's collator truncates the KL rows the same way).

A store of unpaired rows (prompt_ids, completion_ids, label) gives its examples in order; a store of
preference pairs gives each pair's chosen reply as a desirable example and its rejected one as an
undesirable example: all chosen first, then all rejected (TRL's `unpair_preference_dataset`, for up to
its 1,000-row map batches).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


class UnpairedExamples:
    """A sequence of KTO examples as pairs: prompt_ids, chosen_ids (the completion), rejected_ids (the KL
    completion), label (1.0 desirable, 0.0 undesirable) and any scalars given (ref_chosen_logp, ...)."""

    weighted = False

    def __init__(self, store, block: int, max_length: int, scalars: Mapping[str, np.ndarray] | None = None):
        self.store, self.block, self.max_length = store, max(int(block), 1), max_length
        self.from_pairs = "chosen_ids" in store.columns
        self.n = 2 * len(store) if self.from_pairs else len(store)
        self.scalars = dict(scalars or {})

    def __len__(self) -> int:
        return self.n

    def _source(self, i: int) -> tuple[int, str]:
        """(store example, completion column) of example i."""
        if not self.from_pairs:
            return i, "completion_ids"
        half = len(self.store)
        return (i, "chosen_ids") if i < half else (i - half, "rejected_ids")

    def partner(self, i: np.ndarray | int):
        """The example whose completion is example i's KL completion."""
        start = i // self.block * self.block
        size = np.minimum(self.block, self.n - start)
        return start + (i - start - 1) % size

    def _completion(self, i: int) -> list[int]:
        k, column = self._source(i)
        return self.store[k][column]

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"example {i} of {self.n}")
        k, column = self._source(i)
        row = self.store[k]
        label = float(row["label"]) if not self.from_pairs else float(column == "chosen_ids")
        room = self.max_length - len(row["prompt_ids"])  # >= this example's own completion
        return {"prompt_ids": row["prompt_ids"], "chosen_ids": row[column],
                "rejected_ids": self._completion(int(self.partner(i)))[:room], "label": label,
                **{c: float(v[i]) for c, v in self.scalars.items()}}

    def column_lengths(self, column: str) -> np.ndarray:
        return self._lengths_by_column()[column]

    def _lengths_by_column(self) -> dict[str, np.ndarray]:
        if self.from_pairs:
            prompt = np.tile(self.store.column_lengths("prompt_ids"), 2)
            completion = np.concatenate([self.store.column_lengths("chosen_ids"),
                                         self.store.column_lengths("rejected_ids")])
        else:
            prompt, completion = (self.store.column_lengths(c) for c in ("prompt_ids", "completion_ids"))
        kl = np.minimum(completion[self.partner(np.arange(self.n))], self.max_length - prompt)
        return {"prompt_ids": prompt, "chosen_ids": completion, "rejected_ids": kl}

    def lengths(self) -> np.ndarray:
        """[n, 2] prompt + completion, prompt + KL completion."""
        c = self._lengths_by_column()
        return np.stack([c["prompt_ids"] + c["chosen_ids"], c["prompt_ids"] + c["rejected_ids"]], axis=1)

    def with_scalars(self, **values: np.ndarray) -> UnpairedExamples:
        return UnpairedExamples(self.store, self.block, self.max_length, {**self.scalars, **values})

    @property
    def content_hash(self) -> str:
        return f"{self.store.content_hash}:kto:{self.block}:{self.max_length}"
