"""Tokenize a dataset of normalized rows into the examples the batching code consumes; cache them on disk.

    store, stats = tokenize_dataset(load_rows(path), tok, cfg.data, "sft", loss_on=cfg.sft.loss_on,
                                    cache_dir=resolve_cache_dir(cfg))
    store[0]  # {"input_ids": [...], "loss_mask": [...]}

Each row is normalized (`jaxalign.data.formats`, `jaxalign.data.preference`) and then tokenized by
`jaxalign.data.examples`, whose doc gives the example layouts and the tokenization and truncation
rules. Every skip, drop and truncation is counted in `DataStats`; nothing disappears silently.

Store: the examples go to a token store (`jaxalign.data.store`: flat arrays on disk, read by
memory map), one per (rows fingerprint, tokenizer fingerprint, chat template, settings, code
version) under `cache_dir/tokenized/`, with the stats beside them; a later run or stage with the
same inputs opens it without tokenizing. Rows are tokenized in chunks of CHUNK_ROWS over
`data.num_workers` processes (0 = one per core; one process for small data), written in row order
as they come, so memory holds a few chunks, never the dataset. `resolve_cache_dir(cfg)` gives
data.cache_dir or, when that is '', `output_dir/cache` (the schema's rule); with no config at all,
or an output_dir that is a URL, ~/.cache/jaxalign.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import datasets
import numpy as np
import tqdm

from jaxalign.data.examples import (
    Dropped,
    TokenizeSettings,
    data_value,
    tokenize_preference_example,
    tokenize_sft_example,
)
from jaxalign.data.formats import BadRow, normalize_sft_row, resolve_format
from jaxalign.data.preference import normalize_preference_row, preference_to_sft
from jaxalign.data.store import META_FILE, PAIR_COLUMNS, SFT_COLUMNS, StoreWriter, TokenStore
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import JaxalignError
from jaxalign.runtime.paths import is_remote

log = logging.getLogger(__name__)

# Bump when tokenization output changes for the same inputs: old cache files are then ignored.
CACHE_VERSION = 2
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxalign")

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
        """Count one row's outcome, as `_Job.row` gives it: kept with its truncation flags, or dropped."""
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


# ----------------------------------------------------------------------------- datasets


def tokenize_dataset(
    ds: datasets.Dataset | Callable[[], datasets.Dataset],
    tokenizer: Tokenizer,
    cfg_data: Mapping[str, Any],
    stage: str,
    *,
    loss_on: str = "completion",
    cache_dir: str | None = None,
    source: str = "",
    rows_key: str | None = None,
) -> tuple[TokenStore, DataStats]:
    """Normalize and tokenize every row into a token store: (store, stats). See the module doc.

    ds: the rows, or a function giving them (called only when no store holds them yet). rows_key: a
    fingerprint of the rows known without loading them (`sources.rows_fingerprint`); default ds's own.
    cfg_data: the `data` config section (format, lengths, truncation, on_bad_row, sft_from_preference,
    cache_dir, num_workers). stage: "sft", or "dpo" / "rm" (pairs; a `margin` column is kept for the
    reward model's loss, TRL's). loss_on: `sft.loss_on`. cache_dir: overrides data.cache_dir.
    source: the name quoted in errors for rows without a `_source` column (see `load_rows`).
    """
    if stage not in ("sft", "dpo", "rm"):
        raise JaxalignError(f"tokenize_dataset: stage must be 'sft', 'dpo' or 'rm', got {stage!r}")
    stage = "dpo" if stage == "rm" else stage  # the same pairs, the same cache
    settings = TokenizeSettings.from_config(cfg_data, loss_on if stage == "sft" else "completion")
    on_bad_row = data_value(cfg_data, "on_bad_row")
    from_pref = data_value(cfg_data, "sft_from_preference")
    fmt_spec = data_value(cfg_data, "format")  # with the rows, it decides the format (auto detection)
    if rows_key is None:
        ds = ds() if callable(ds) else ds
        rows_key = ds._fingerprint
    key = _cache_key(rows_key, tokenizer, fmt_spec, stage, settings, on_bad_row, from_pref)
    root = os.path.join(os.path.expanduser(cache_dir or data_value(cfg_data, "cache_dir") or DEFAULT_CACHE_DIR),
                        "tokenized")
    path = os.path.join(root, f"{stage}-{key[:32]}") if key else _scratch_dir()
    if key and os.path.isfile(os.path.join(path, META_FILE)):
        store = TokenStore(path)
        stats = dataclasses.replace(DataStats.from_dict(store.meta["stats"]), from_cache=True)
        fmt = store.meta["note"]["format"]
    else:
        ds = ds() if callable(ds) else ds
        fmt = resolve_format(ds.column_names, fmt_spec, stage, from_pref)
        job = _Job(ds, tokenizer, settings, stage, fmt, on_bad_row, source, "margin" in ds.column_names)
        store, stats = _write_store(job, path, _workers(data_value(cfg_data, "num_workers"), len(ds)),
                                    {"rows_fingerprint": rows_key, "rows": len(ds), "tokenizer": repr(tokenizer),
                                     "format": fmt, "stage": stage, "settings": dataclasses.asdict(settings),
                                     "on_bad_row": on_bad_row, "sft_from_preference": from_pref,
                                     "cache_version": CACHE_VERSION})
    log.info("tokenized %s rows (%s, %s%s): %s", source or "data", stage, fmt, ", from the store" * stats.from_cache,
             stats.summary())
    if stats.rows_out == 0:
        raise JaxalignError(f"every one of the {stats.rows_in} rows of {source or 'the data'} was dropped:\n"
                            + stats.summary())
    return store, stats


@dataclasses.dataclass
class _Job:
    """What a tokenizing process needs: the rows and the rules (pickled once per worker)."""

    ds: datasets.Dataset
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

    def chunk(self, span: tuple[int, int]) -> tuple[dict[str, Any], DataStats]:
        """Rows [start, end) as store columns (flat values, lengths) and their stats."""
        start, end = span
        columns = self.ds[start:end]
        names = list(columns)
        stats = DataStats()
        kept: list[dict] = []
        for k, values in enumerate(zip(*(columns[c] for c in names))):
            example, flags = self.row(dict(zip(names, values)), start + k)
            stats.count(example, flags)
            if example is not None:
                kept.append(example)
        out: dict[str, Any] = {}
        for c in (PAIR_COLUMNS if self.stage == "dpo" else SFT_COLUMNS):
            lists = [ex[c] for ex in kept]
            flat = list(itertools.chain.from_iterable(lists))
            out[c] = (np.array(flat, SFT_COLUMNS.get(c, "int32")), np.array([len(v) for v in lists], np.int64))
        if self.margins:
            out["margin"] = np.array([ex["margin"] for ex in kept], np.float32)
        return out, stats


_WORKER_JOB: _Job | None = None
CHUNK_ROWS = 256
ROWS_PER_WORKER = 2000  # below this a worker's start-up (imports, tokenizer) costs more than it saves


def _init_worker(job: _Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job


def _run_chunk(span: tuple[int, int]):
    return _WORKER_JOB.chunk(span)


def _workers(requested: int, rows: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested or cores, rows // ROWS_PER_WORKER))


def _write_store(job: _Job, path: str, workers: int, note: dict) -> tuple[TokenStore, DataStats]:
    """Tokenize in chunks (over `workers` processes), writing each chunk as it comes, in row order."""
    spans = [(s, min(s + CHUNK_ROWS, len(job.ds))) for s in range(0, len(job.ds), CHUNK_ROWS)]
    stats = DataStats()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with StoreWriter(path, PAIR_COLUMNS if job.stage == "dpo" else SFT_COLUMNS,
                     ["margin"] if job.margins else []) as writer, contextlib.ExitStack() as stack:
        if workers > 1:
            # spawn, not fork: the parent may hold JAX's threads, which a forked child would inherit mid-lock.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(job,)))
            results = pool.imap(_run_chunk, spans)
        else:
            results = map(job.chunk, spans)
        for chunk, chunk_stats in tqdm.tqdm(results, total=len(spans), desc=f"tokenizing ({job.stage}, {job.fmt})",
                                            unit="chunk", disable=len(spans) < 8):
            writer.add(chunk)
            stats = stats + chunk_stats
        stats.from_cache = False
        store = writer.finish({"stats": stats.to_dict(), "note": note})
    return store, stats


def _margin(row: dict[str, Any]) -> float:
    value = row.get("margin")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise BadRow("bad_margin", f"'margin' must be a finite number, got {value!r:.40}")
    return float(value)


def _scratch_dir() -> str:
    """A store for data that cannot be cached (unfingerprinted tokenizer), removed at exit."""
    path = tempfile.mkdtemp(prefix="jaxalign-tokens-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return os.path.join(path, "store")


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


def _cache_key(rows_key, tok, fmt, stage, settings, on_bad_row, from_pref) -> str | None:
    tok_hash = tokenizer_fingerprint(tok)
    if tok_hash is None:
        log.warning("tokenized data is not cached: cannot fingerprint tokenizer %r", tok)
        return None
    parts = [CACHE_VERSION, rows_key, tok_hash, fmt, stage, dataclasses.astuple(settings), on_bad_row, from_pref]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
