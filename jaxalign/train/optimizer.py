"""AdamW with warmup then cosine/linear decay, a weight-decay mask and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from jaxalign.models.params import NO_DECAY


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then decay to `lr * min_lr_ratio` at `total_steps`."""
    warmup = opt_cfg.warmup_steps or int(round(opt_cfg.warmup_ratio * total_steps))
    peak, end = opt_cfg.lr, opt_cfg.lr * opt_cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if opt_cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_cfg.min_lr_ratio)
    elif opt_cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params, decay_norms_and_biases: bool = False):
    """True for every parameter weight decay applies to."""

    def keep(path, _):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return decay_norms_and_biases or not names.intersection(NO_DECAY)

    return jax.tree_util.tree_map_with_path(keep, params)


def build_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    if opt_cfg.name == "adamw":
        core = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay,
                           mask=lambda p: decay_mask(p, opt_cfg.decay_norms_and_biases))
    else:
        core = optax.sgd(schedule)
    chain = [optax.clip_by_global_norm(opt_cfg.max_grad_norm)] if opt_cfg.max_grad_norm > 0 else []
    return optax.chain(*chain, core), schedule
