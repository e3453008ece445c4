"""Held-out metrics of a model: the one evaluation loop behind the trainer's evaluations, `jaxalign eval`
and the SFT gate, with the metrics the train step defines (train.step.make_eval_step)."""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxalign.data.iterator import make_iterator, to_global_arrays
from jaxalign.run.metrics import mean_over
from jaxalign.runtime.sharding import use_mesh


def weight_key(stage: str) -> str:
    """What a batch's metrics are weighted by when averaged: its tokens (SFT), pairs (DPO, reward model) or
    examples (KTO)."""
    return {"sft": "num_tokens", "kto": "num_examples"}.get(stage, "num_pairs")


def heldout_metrics(eval_fn: Callable, params, examples: list[dict], cfg, mesh, rules, *, stage: str = "",
                    ref_params=None, max_batches: int = 0, pad_id: int = 0) -> dict[str, float]:
    """Weighted means of `eval_fn(params, batch, ref_params)` over `examples` in eval batches (the first
    `max_batches` when > 0); `stage` defaults to cfg.stage."""
    stage = stage or cfg.stage
    it = make_iterator(examples, cfg, stage=stage, train=False, mesh=mesh, pad_id=pad_id)
    records = []
    with use_mesh(mesh, rules):
        for i, host in enumerate(it):
            if max_batches and i >= max_batches:
                break
            records.append(jax.device_get(eval_fn(params, to_global_arrays(host, mesh), ref_params)))
    return mean_over(records, weight_key(stage))
