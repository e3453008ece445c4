"""Tokenize a dataset of normalized rows into the examples the batching code consumes; cache them on disk.

    examples, stats = tokenize_dataset(load_rows(path), tok, cfg.data, "sft", loss_on=cfg.sft.loss_on,
                                       cache_dir=resolve_cache_dir(cfg))

Each row is normalized (`jaxalign.data.formats`, `jaxalign.data.preference`) and then tokenized by
`jaxalign.data.examples`, whose doc gives the example layouts and the tokenization and truncation
rules. Every skip, drop and truncation is counted in `DataStats`; nothing disappears silently.

Cache: one arrow file per (rows fingerprint, tokenizer fingerprint, chat template, settings,
code version) under `cache_dir/tokenized/`; a second run with the same inputs reads it back
without tokenizing. `resolve_cache_dir(cfg)` gives data.cache_dir or, when that is '',
`output_dir/cache` (the schema's rule); with no config at all, or an output_dir that is a URL,
~/.cache/jaxalign.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Mapping

import datasets

from jaxalign.data.examples import (
    Dropped,
    TokenizeSettings,
    data_value,
    tokenize_preference_example,
    tokenize_sft_example,
)
from jaxalign.data.formats import BadRow, normalize_sft_row, resolve_format
from jaxalign.data.preference import normalize_preference_row, preference_to_sft
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import JaxalignError
from jaxalign.runtime.paths import is_remote

log = logging.getLogger(__name__)

# Bump when tokenization output changes for the same inputs: old cache files are then ignored.
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxalign")

SFT_FEATURES = {"input_ids": datasets.List(datasets.Value("int32")), "loss_mask": datasets.List(datasets.Value("bool"))}
PREFERENCE_FEATURES = {k: datasets.List(datasets.Value("int32")) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
# Per-row bookkeeping written next to the example and dropped after the stats are read.
_ROW_FEATURES = {
    "_drop": datasets.Value("string"),  # "" = kept, else "reason\tFILE:ROW: message"
    "_truncated_prompt": datasets.Value("bool"),
    "_truncated_completion": datasets.Value("bool"),
    "_prompt_not_prefix": datasets.Value("int8"),
}


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


# ----------------------------------------------------------------------------- datasets


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer: Tokenizer,
    cfg_data: Mapping[str, Any],
    stage: str,
    *,
    loss_on: str = "completion",
    cache_dir: str | None = None,
    source: str = "",
) -> tuple[datasets.Dataset, DataStats]:
    """Normalize and tokenize every row: (examples dataset, stats). Cached on disk; see the module doc.

    cfg_data: the `data` config section (format, lengths, truncation, on_bad_row, sft_from_preference,
    cache_dir). stage: "sft", or "dpo" / "rm" (pairs; a `margin` column is kept for the reward model's
    loss, TRL's). loss_on: `sft.loss_on`. cache_dir: overrides data.cache_dir.
    source: the name quoted in errors for rows without a `_source` column (see `load_rows`).
    """
    if stage not in ("sft", "dpo", "rm"):
        raise JaxalignError(f"tokenize_dataset: stage must be 'sft', 'dpo' or 'rm', got {stage!r}")
    stage = "dpo" if stage == "rm" else stage  # the same pairs, the same cache
    settings = TokenizeSettings.from_config(cfg_data, loss_on if stage == "sft" else "completion")
    on_bad_row = data_value(cfg_data, "on_bad_row")
    from_pref = data_value(cfg_data, "sft_from_preference")
    fmt = resolve_format(ds.column_names, data_value(cfg_data, "format"), stage, from_pref)
    preference_rows = fmt == "preference"
    margins = stage == "dpo" and "margin" in ds.column_names
    features = datasets.Features((PREFERENCE_FEATURES if stage == "dpo" else SFT_FEATURES) | _ROW_FEATURES
                                 | ({"margin": datasets.Value("float32")} if margins else {}))
    empty = {k: [] for k in features if not k.startswith("_")}

    def process(row: dict[str, Any], index: int) -> dict[str, Any]:
        where = f"{row.get('_source') or source or 'rows'}:{row.get('_row') or index + 1}"
        try:
            if preference_rows:
                pref = normalize_preference_row(row)
                if stage == "dpo":
                    example, flags = tokenize_preference_example(pref, tokenizer, settings)
                    if margins:
                        example = {**example, "margin": _margin(row)}
                else:
                    example, flags = tokenize_sft_example(preference_to_sft(pref), tokenizer, settings)
            else:
                example, flags = tokenize_sft_example(normalize_sft_row(row, fmt), tokenizer, settings)
        except BadRow as e:
            if on_bad_row == "error" and not isinstance(e, Dropped):
                raise JaxalignError(
                    f"{where}: {e} [{e.reason}]. Fix the row, or set data.on_bad_row: skip to skip such rows "
                    "(they are counted)"
                ) from None
            return empty | ({"margin": 0.0} if margins else {}) | {"_drop": f"{e.reason}\t{where}: {e}", "_truncated_prompt": False,
                            "_truncated_completion": False, "_prompt_not_prefix": 0}
        return example | flags | {"_drop": ""}

    key = _cache_key(ds, tokenizer, fmt, stage, settings, on_bad_row, from_pref)
    cache_file = None
    if key is not None:
        root = os.path.join(os.path.expanduser(cache_dir or data_value(cfg_data, "cache_dir") or DEFAULT_CACHE_DIR),
                            "tokenized")
        cache_file = os.path.join(root, f"{stage}-{key[:32]}.arrow")
    from_cache = cache_file is not None and os.path.exists(cache_file)
    mapped = ds.map(
        process, with_indices=True, remove_columns=ds.column_names, features=features,
        cache_file_name=cache_file, load_from_cache_file=True, keep_in_memory=cache_file is None,
        new_fingerprint=(key or _random_key())[:32], desc=f"tokenizing ({stage}, {fmt})",
    )
    if cache_file is not None and not from_cache:
        _write_cache_note(cache_file, ds, tokenizer, fmt, stage, settings, on_bad_row, from_pref)
    examples, stats = _collect(mapped, from_cache)
    log.info("tokenized %s rows (%s, %s): %s", source or "data", stage, fmt, stats.summary())
    if stats.rows_out == 0:
        raise JaxalignError(f"every one of the {stats.rows_in} rows of {source or 'the data'} was dropped:\n"
                            + stats.summary())
    return examples, stats


def _margin(row: dict[str, Any]) -> float:
    value = row.get("margin")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise BadRow("bad_margin", f"'margin' must be a finite number, got {value!r:.40}")
    return float(value)


def _collect(mapped: datasets.Dataset, from_cache: bool) -> tuple[datasets.Dataset, DataStats]:
    """Stats from the bookkeeping columns, then the kept rows without them."""
    cols = mapped.select_columns(list(_ROW_FEATURES)).to_dict()
    stats = DataStats(rows_in=len(mapped), from_cache=from_cache)
    keep = []
    for i, drop in enumerate(cols["_drop"]):
        if drop:
            reason, message = drop.split("\t", 1)
            stats.dropped_by_reason[reason] += 1
            stats.first_drop.setdefault(reason, message)
            continue
        keep.append(i)
        stats.truncated_prompt += cols["_truncated_prompt"][i]
        stats.truncated_completion += cols["_truncated_completion"][i]
        stats.prompt_not_prefix += cols["_prompt_not_prefix"][i] > 0
    stats.rows_out = len(keep)
    if len(keep) < len(mapped):
        mapped = mapped.select(keep)
    return mapped.remove_columns(list(_ROW_FEATURES)), stats


def resolve_cache_dir(cfg: Mapping[str, Any]) -> str:
    """data.cache_dir, or output_dir/cache when it is '' (the schema's rule); the local default cache
    when output_dir is a URL, since datasets memory-maps the cache from local disk."""
    if cfg["data"]["cache_dir"]:
        return cfg["data"]["cache_dir"]
    return DEFAULT_CACHE_DIR if is_remote(cfg["output_dir"]) else os.path.join(cfg["output_dir"], "cache")


def tokenizer_fingerprint(tok: Tokenizer) -> str | None:
    """A hash of what decides the ids: vocab/model, special tokens, chat template; None if unknown."""
    h = hashlib.sha256()
    if getattr(tok, "sp", None) is not None:
        h.update(tok.sp.serialized_model_proto())
    elif getattr(tok, "hf", None) is not None and getattr(tok.hf, "is_fast", False):
        h.update(tok.hf.backend_tokenizer.to_str().encode())
        h.update(json.dumps(tok.hf.special_tokens_map, sort_keys=True, default=str).encode())
    else:
        return None
    h.update(json.dumps([type(tok).__name__, tok.bos_id, tok.eos_id, tok.chat_template]).encode())
    return h.hexdigest()


def _cache_key(ds, tok, fmt, stage, settings, on_bad_row, from_pref) -> str | None:
    tok_hash = tokenizer_fingerprint(tok)
    if tok_hash is None:
        log.warning("tokenized data is not cached: cannot fingerprint tokenizer %r", tok)
        return None
    parts = [CACHE_VERSION, ds._fingerprint, tok_hash, fmt, stage, dataclasses.astuple(settings), on_bad_row, from_pref]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _write_cache_note(cache_file, ds, tok, fmt, stage, settings, on_bad_row, from_pref) -> None:
    """A readable note next to the cache file saying what it was made from."""
    note = {"rows_fingerprint": ds._fingerprint, "rows": len(ds), "tokenizer": repr(tok), "format": fmt,
            "stage": stage, "settings": dataclasses.asdict(settings), "on_bad_row": on_bad_row,
            "sft_from_preference": from_pref, "cache_version": CACHE_VERSION}
    with open(os.path.splitext(cache_file)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump(note, f, indent=2)


def _random_key() -> str:
    return os.urandom(16).hex()
