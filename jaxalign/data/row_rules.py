"""What a tokenizing process runs: raw rows -> examples (ids, masks) + the counts of what happened.

    rules = RowRules(tokenizer, settings, "sft", "messages", "error", "train.jsonl", margins=False)
    columns, stats = rules.chunk(0, ds[0:256])   # store columns (flat values, lengths), DataStats

Both the token store's chunks (`jaxalign.data.tokenize`, over worker processes) and the stream
(`jaxalign.data.streaming`) apply these rules. This module imports neither `datasets` nor JAX, so a
worker process starts in well under a second.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any, Mapping

import numpy as np

from jaxalign.data.examples import (
    Dropped,
    TokenizeSettings,
    tokenize_preference_example,
    tokenize_replies,
    tokenize_sft_example,
)
from jaxalign.data.formats import BadRow, normalize_sft_row
from jaxalign.data.preference import normalize_preference_row, normalize_unpaired_row, preference_to_sft
from jaxalign.data.store import PAIR_COLUMNS, SFT_COLUMNS, UNPAIRED_COLUMNS
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import JaxalignError


@dataclasses.dataclass
class DataStats:
    """What happened to the rows: counts of kept rows, truncations and drops by reason."""

    rows_in: int = 0
    rows_out: int = 0
    truncated_prompt: int = 0
    truncated_completion: int = 0
    prompt_not_prefix: int = 0  # completions tokenized alone (prompt tokens not a prefix of the full text's)
    dropped_by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_drop: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> "FILE:ROW: message"
    from_cache: bool = False

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    def __add__(self, other: DataStats) -> DataStats:
        return DataStats(
            self.rows_in + other.rows_in, self.rows_out + other.rows_out,
            self.truncated_prompt + other.truncated_prompt, self.truncated_completion + other.truncated_completion,
            self.prompt_not_prefix + other.prompt_not_prefix, self.dropped_by_reason + other.dropped_by_reason,
            {**other.first_drop, **self.first_drop}, self.from_cache and other.from_cache,
        )

    def count(self, example: dict | None, flags: dict | str) -> None:
        """Count one row's outcome, as `RowRules.row` gives it: kept with its truncation flags, or dropped."""
        self.rows_in += 1
        if example is None:
            reason, message = flags.split("\t", 1)
            self.dropped_by_reason[reason] += 1
            self.first_drop.setdefault(reason, message)
            return
        self.rows_out += 1
        self.truncated_prompt += flags["_truncated_prompt"]
        self.truncated_completion += flags["_truncated_completion"]
        self.prompt_not_prefix += flags.get("_prompt_not_prefix", 0) > 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataStats:
        fields = {f.name for f in dataclasses.fields(cls)}
        return dataclasses.replace(cls(**{k: v for k, v in d.items() if k in fields}),
                                   dropped_by_reason=collections.Counter(d.get("dropped_by_reason", {})))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"dropped_by_reason": dict(self.dropped_by_reason), "dropped": self.dropped}

    def summary(self) -> str:
        text = (
            f"{self.rows_out}/{self.rows_in} rows kept; truncated prompts {self.truncated_prompt}, "
            f"truncated completions {self.truncated_completion}, completions tokenized alone {self.prompt_not_prefix}"
        )
        for reason, n in sorted(self.dropped_by_reason.items()):
            text += f"\n  dropped {n} ({reason}), e.g. {self.first_drop.get(reason, '')}"
        return text


@dataclasses.dataclass
class RowRules:
    """How a row becomes an example: the tokenizer and the rules (what a tokenizing process is sent once;
    the store's chunks and the stream both use it)."""

    tokenizer: Tokenizer
    settings: TokenizeSettings
    stage: str
    fmt: str
    on_bad_row: str
    source: str
    margins: bool

    def row(self, row: dict[str, Any], index: int) -> tuple[dict | None, dict | str]:
        """(example, flags), or (None, "reason\tFILE:ROW: message") for a dropped row."""
        where = f"{row.get('_source') or self.source or 'rows'}:{row.get('_row') or index + 1}"
        try:
            if self.fmt == "unpaired":
                row_ = normalize_unpaired_row(row)
                prompt, (completion,), flags = tokenize_replies(row_.prompt, (row_.completion,), self.tokenizer,
                                                                self.settings)
                return {"prompt_ids": prompt, "completion_ids": completion, "label": float(row_.label)}, flags
            if self.fmt == "preference":
                pref = normalize_preference_row(row)
                if self.stage == "dpo":
                    example, flags = tokenize_preference_example(pref, self.tokenizer, self.settings)
                    if self.margins:
                        example = {**example, "margin": _margin(row)}
                    return example, flags
                return tokenize_sft_example(preference_to_sft(pref), self.tokenizer, self.settings)
            return tokenize_sft_example(normalize_sft_row(row, self.fmt), self.tokenizer, self.settings)
        except BadRow as e:
            if self.on_bad_row == "error" and not isinstance(e, Dropped):
                raise JaxalignError(
                    f"{where}: {e} [{e.reason}]. Fix the row, or set data.on_bad_row: skip to skip such rows "
                    "(they are counted)"
                ) from None
            return None, f"{e.reason}\t{where}: {e}"

    def chunk(self, start: int, columns: dict[str, list]) -> tuple[dict[str, Any], DataStats]:
        """Rows start, start + 1, ... (given by column) as store columns (flat values, lengths) and their stats."""
        names = list(columns)
        stats = DataStats()
        kept: list[dict] = []
        for k, values in enumerate(zip(*(columns[c] for c in names))):
            example, flags = self.row(dict(zip(names, values)), start + k)
            stats.count(example, flags)
            if example is not None:
                kept.append(example)
        out: dict[str, Any] = {}
        for c in self.columns:
            lists = [ex[c] for ex in kept]
            flat = list(itertools.chain.from_iterable(lists))
            out[c] = (np.array(flat, SFT_COLUMNS.get(c, "int32")), np.array([len(v) for v in lists], np.int64))
        for c in self.scalars:
            out[c] = np.array([ex[c] for ex in kept], np.float32)
        return out, stats

    @property
    def columns(self) -> dict[str, str]:
        return UNPAIRED_COLUMNS if self.fmt == "unpaired" else PAIR_COLUMNS if self.stage == "dpo" else SFT_COLUMNS

    @property
    def scalars(self) -> list[str]:
        return ["label"] * (self.fmt == "unpaired") + ["margin"] * self.margins


def _margin(row: dict[str, Any]) -> float:
    value = row.get("margin")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise BadRow("bad_margin", f"'margin' must be a finite number, got {value!r:.40}")
    return float(value)


# ----------------------------------------------------------------------------- a worker process

_WORKER_RULES: RowRules | None = None


def init_worker(rules: RowRules) -> None:
    """A pool's initializer: keep the rules for the chunks to come."""
    global _WORKER_RULES
    _WORKER_RULES = rules


def run_chunk(task: tuple[int, dict[str, list]]) -> tuple[dict[str, Any], DataStats]:
    return _WORKER_RULES.chunk(*task)
