"""From a run's config to tokenized train and held-out examples: the one entry point stages use."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from jaxalign.data.sources import load_rows, rows_fingerprint, split_train_eval
from jaxalign.data.store import TokenStore
from jaxalign.data.tokenize import DataStats, resolve_cache_dir, tokenize_dataset
from jaxalign.errors import JaxalignError

log = logging.getLogger(__name__)


def load_examples(cfg, tokenizer, stage: str | None = None) -> tuple[TokenStore, Sequence[dict], dict[str, DataStats]]:
    """(train examples, held-out examples, stats by split) for `stage` (default cfg.stage), as token
    stores (`jaxalign.data.store`; the held-out set is [] when there is none).

    The held-out set is `data.eval` when given, else a seeded `data.eval_fraction` of `data.train`.
    Stats: every truncation and drop, by reason (a run writes them to RUN/data_stats.json). Writes
    nothing but the tokenized cache.
    """
    stage = stage or cfg.stage
    data = cfg.data
    if not data.train:
        raise JaxalignError(
            f"data.train is empty: set data.train to the {stage.upper()} training data (a file, dir, glob or hub "
            f"id), or, in a pipeline config, {stage}.overrides.data.train (every command applies the overrides of "
            "the config's `stage`)")
    cache_dir = resolve_cache_dir(cfg)
    # Rows are loaded only when a store lacks them: a warm store opens without reading the files.
    splits = functools.cache(lambda: split_train_eval(load_rows(data.train, data.split, data.max_rows),
                                                      data.eval_fraction, cfg.train.seed))
    train_key = rows_fingerprint(data.train, data.split, data.max_rows)

    def tokenize(rows, rows_key, name, part=""):
        # A part of data.train is named by the split that made it: the fraction and the seed.
        key = f"{rows_key}:{part}:{data.eval_fraction}:{cfg.train.seed}" if part and rows_key else rows_key
        return tokenize_dataset(rows, tokenizer, data, stage, loss_on=cfg.sft.loss_on, cache_dir=cache_dir,
                                source=name, rows_key=key)

    train, train_stats = tokenize(lambda: splits()[0], train_key, str(data.train), "train")
    stats = {"train": train_stats}
    eval_examples: Sequence[dict] = []
    if data.eval:
        eval_examples, stats["eval"] = tokenize(lambda: load_rows(data.eval, data.split, data.max_rows),
                                                rows_fingerprint(data.eval, data.split, data.max_rows), str(data.eval))
    elif data.eval_fraction:
        eval_examples, stats["eval"] = tokenize(lambda: splits()[1], train_key, str(data.train), "held_out")
    for split, s in stats.items():
        log.info("%s data: %s", split, s.summary())
    return train, eval_examples, stats
