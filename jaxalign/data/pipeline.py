"""From a run's config to tokenized train and held-out examples: the one entry point stages use."""

from __future__ import annotations

import logging
from typing import Any

from jaxalign.data.sources import load_rows, split_train_eval
from jaxalign.data.tokenize import DataStats, resolve_cache_dir, tokenize_dataset
from jaxalign.errors import JaxalignError

log = logging.getLogger(__name__)


def _examples(ds) -> list[dict[str, Any]]:
    """Plain dicts (fast random access for the iterator), bookkeeping columns dropped."""
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in ds.to_list()]


def load_examples(cfg, tokenizer, stage: str | None = None) -> tuple[list[dict], list[dict], dict[str, DataStats]]:
    """(train examples, held-out examples, stats by split) for `stage` (default cfg.stage).

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
    rows = load_rows(data.train, data.split, data.max_rows)
    train_rows, held_out = split_train_eval(rows, data.eval_fraction, cfg.train.seed)
    if data.eval:
        held_out = load_rows(data.eval, data.split, data.max_rows)
    cache_dir = resolve_cache_dir(cfg)

    def tokenize(ds, name):
        return tokenize_dataset(ds, tokenizer, data, stage, loss_on=cfg.sft.loss_on, cache_dir=cache_dir,
                                source=name)

    train_ds, train_stats = tokenize(train_rows, str(data.train))
    stats = {"train": train_stats}
    eval_examples: list[dict] = []
    if held_out is not None:
        eval_ds, stats["eval"] = tokenize(held_out, str(data.eval or data.train))
        eval_examples = _examples(eval_ds)
    for split, s in stats.items():
        log.info("%s data: %s", split, s.summary())
    return _examples(train_ds), eval_examples, stats
