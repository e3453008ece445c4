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
`data.num_workers` processes (0 = one per core; one process for small data) that apply
`jaxalign.data.row_rules` to the rows this process reads and sends them, written in row order as
they come, so memory holds a few chunks, never the dataset. `resolve_cache_dir(cfg)` gives
data.cache_dir or, when that is '', `output_dir/cache` (the schema's rule); with no config at all,
or an output_dir that is a URL, ~/.cache/jaxalign.
"""

from __future__ import annotations

import atexit
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
import tqdm

from jaxalign.data.examples import TokenizeSettings, data_value
from jaxalign.data.formats import resolve_format
from jaxalign.data.row_rules import DataStats, RowRules, init_worker, run_chunk
from jaxalign.data.store import META_FILE, StoreWriter, TokenStore
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import JaxalignError
from jaxalign.runtime.paths import is_remote

log = logging.getLogger(__name__)

# Bump when tokenization output changes for the same inputs: old cache files are then ignored.
CACHE_VERSION = 2
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxalign")
CHUNK_ROWS = 256
ROWS_PER_WORKER = 2000  # below this a worker's start-up (imports, tokenizer) costs more than it saves



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
    if stage not in ("sft", "dpo", "rm", "kto"):
        raise JaxalignError(f"tokenize_dataset: stage must be 'sft', 'dpo', 'rm' or 'kto', got {stage!r}")
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
        # KTO reads preference rows as DPO stores them (each side becomes an unpaired example: data/kto.py).
        rules_stage = "dpo" if stage == "kto" and fmt == "preference" else stage
        job = RowRules(tokenizer, settings, rules_stage, fmt, on_bad_row, source, "margin" in ds.column_names)
        store, stats = _write_store(job, ds, path, _workers(data_value(cfg_data, "num_workers"), len(ds)),
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


def _workers(requested: int, rows: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested or cores, rows // ROWS_PER_WORKER))


def _write_store(rules: RowRules, ds: datasets.Dataset, path: str, workers: int,
                 note: dict) -> tuple[TokenStore, DataStats]:
    """Tokenize in chunks (over `workers` processes), writing each chunk as it comes, in row order.
    This process reads the rows and sends each chunk's to a worker, so a worker never imports `datasets`."""
    starts = range(0, len(ds), CHUNK_ROWS)
    tasks = ((s, ds[s:s + CHUNK_ROWS]) for s in starts)  # lazy: the pool's feeder blocks on a full pipe
    stats = DataStats()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with StoreWriter(path, rules.columns, rules.scalars) as writer, contextlib.ExitStack() as stack:
        if workers > 1:
            # spawn, not fork: the parent may hold JAX's threads, which a forked child would inherit mid-lock.
            # The rules (with the tokenizer) outgrow a pipe's buffer, so each worker's launch waits for the
            # one before to import row_rules and unpickle them: kept light (no datasets, no JAX), < 1 s.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(
                workers, initializer=init_worker, initargs=(rules,)))
            results = pool.imap(run_chunk, tasks)
        else:
            results = itertools.starmap(rules.chunk, tasks)
        for chunk, chunk_stats in tqdm.tqdm(results, total=len(starts), desc=f"tokenizing ({rules.stage}, {rules.fmt})",
                                            unit="chunk", disable=len(starts) < 8):
            writer.add(chunk)
            stats = stats + chunk_stats
        stats.from_cache = False
        store = writer.finish({"stats": stats.to_dict(), "note": note})
    return store, stats


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
