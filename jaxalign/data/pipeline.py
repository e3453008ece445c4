"""From a run's config to tokenized train and held-out examples: the one entry point stages use."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from jaxalign.data.kto import UnpairedExamples
from jaxalign.data.mixture import Mixture, Part, weighted_sources
from jaxalign.data.sources import load_rows, rows_fingerprint, split_train_eval
from jaxalign.data.streaming import open_stream
from jaxalign.data.tokenize import DataStats, resolve_cache_dir, tokenize_dataset
from jaxalign.errors import JaxalignError

log = logging.getLogger(__name__)


def load_examples(cfg, tokenizer, stage: str | None = None) -> tuple[Sequence[dict], Sequence[dict], dict[str, DataStats]]:
    """(train examples, held-out examples, stats by split) for `stage` (default cfg.stage), as token
    stores (`jaxalign.data.store`), or for a weighted data.train a `Mixture` of one store per source
    (`jaxalign.data.mixture`); the held-out set is [] when there is none.

    The held-out set is `data.eval` when given, else a seeded `data.eval_fraction` of `data.train`
    (of each source of a mixture). With data.streaming the training rows are a `Stream`, read and
    tokenized by its iterator as training goes (`jaxalign.data.streaming`). Stats: every truncation and drop, by reason, as "train" and
    "eval", and per source of a mixture as "train:NAME" (a run writes them to RUN/data_stats.json).
    Writes nothing but the tokenized cache.
    """
    stage = stage or cfg.stage
    data = cfg.data
    if not data.train:
        raise JaxalignError(
            f"data.train is empty: set data.train to the {stage.upper()} training data (a file, dir, glob or hub "
            f"id), or, in a pipeline config, {stage}.overrides.data.train (every command applies the overrides of "
            "the config's `stage`)")
    cache_dir = resolve_cache_dir(cfg)

    def tokenize(rows, rows_key, name, part=""):
        # A part of data.train is named by the split that made it: the fraction and the seed.
        key = f"{rows_key}:{part}:{data.eval_fraction}:{cfg.train.seed}" if part and rows_key else rows_key
        return tokenize_dataset(rows, tokenizer, data, stage, loss_on=cfg.sft.loss_on, cache_dir=cache_dir,
                                source=name, rows_key=key)

    def source(path, split, max_rows, name):
        """(train store, its stats, held-out store or None, its stats) of one source of data.train."""
        # Rows are loaded only when a store lacks them: a warm store opens without reading the files.
        splits = functools.cache(lambda: split_train_eval(load_rows(path, split, max_rows), data.eval_fraction,
                                                          cfg.train.seed))
        key = rows_fingerprint(path, split, max_rows)
        train = tokenize(lambda: splits()[0], key, name, "train")
        held_out = (tokenize(lambda: splits()[1], key, name, "held_out") if data.eval_fraction and not data.eval
                    else (None, None))
        return (*train, *held_out)

    stats: dict[str, DataStats] = {}
    mix = weighted_sources(data.train, data.split, data.max_rows)
    if data.streaming:  # rows tokenized as the iterator reads them: no counts before training
        train, stats["train"], held_out = open_stream(cfg, tokenizer, stage), DataStats(), None
    elif mix is None:
        train, stats["train"], held_out, held_out_stats = source(data.train, data.split, data.max_rows, str(data.train))
    else:
        parts = [(s, *source(s.path, s.split, s.max_rows, s.name)) for s in mix]
        for s, _, st, _, _ in parts:
            stats[f"train:{s.name}"] = st
        stats["train"] = sum((st for _, _, st, _, _ in parts), DataStats(from_cache=True))
        train = Mixture([Part(s.name, store, s.weight, st) for s, store, st, _, _ in parts])
        held_out = Mixture([Part(s.name, h) for s, _, _, h, _ in parts]) if parts[0][3] is not None else None
        held_out_stats = sum((hs for *_, hs in parts), DataStats(from_cache=True)) if held_out else None
    eval_examples: Sequence[dict] = []
    if data.eval:
        eval_examples, stats["eval"] = tokenize(lambda: load_rows(data.eval, data.split, data.max_rows),
                                                rows_fingerprint(data.eval, data.split, data.max_rows), str(data.eval))
    elif held_out is not None:
        eval_examples, stats["eval"] = held_out, held_out_stats
    if stage == "kto":  # each completion beside its KL completion, as pairs (data/kto.py)
        train = UnpairedExamples(train, cfg.train.batch_size, data.max_length)
        eval_examples = (UnpairedExamples(eval_examples, cfg.eval.batch_size, data.max_length) if len(eval_examples)
                         else eval_examples)
    for split, s in stats.items():
        log.info("%s data: %s", split, s.summary())
    return train, eval_examples, stats
