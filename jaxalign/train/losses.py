"""SFT and reward-model losses as pure functions of arrays (the DPO family: `jaxalign.train.dpo`).

Each is written as a sum over this micro-batch divided by a normaliser of the WHOLE effective batch
(all micro-batches, all devices): trained tokens for SFT, pairs for the reward model. Summing micro-batch losses
and gradients then gives exactly the loss and update of one large batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sft_loss(logp: jax.Array, lse: jax.Array, correct: jax.Array, loss_mask: jax.Array, num_tokens: jax.Array,
             z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-level cross-entropy: sum of NLL over trained tokens / trained tokens in the whole batch.

    logp, lse, correct: per-token log-prob of the target, logsumexp of the logits, argmax == target.
    z_loss adds z_loss * lse² (PaLM's auxiliary loss keeping the softmax normaliser near 1).
    """
    mask = loss_mask.astype(jnp.float32)
    denom = jnp.maximum(num_tokens, 1).astype(jnp.float32)
    nll = -jnp.sum(logp * mask) / denom
    loss = nll + (z_loss * jnp.sum(jnp.square(lse) * mask) / denom if z_loss else 0.0)
    metrics = {"nll": nll, "mean_token_accuracy": jnp.sum(correct * mask) / denom}
    return loss, metrics


def reward_loss(rewards: jax.Array, num_pairs: jax.Array, *, margin: jax.Array | None = None,
                center_coefficient: float = 0.0,
                valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry reward-model loss and metrics, as TRL's RewardTrainer defines them, for a micro-batch.

    rewards: [2B] scores, chosen rows first (row i and B + i form a pair). Per pair:
    -log sigmoid(r+ - r- - margin), plus center_coefficient * (r+ + r-)^2 (keeps rewards centred on 0).
    `margin` [B] (a dataset column; None = 0); `valid` [B] marks real pairs; `num_pairs` counts the
    pairs of the whole batch, so the values are this micro-batch's share of batch means.
    """
    b = rewards.shape[0] // 2
    chosen, rejected = rewards[:b], rewards[b:]
    diff = chosen - rejected
    losses = -jax.nn.log_sigmoid(diff if margin is None else diff - margin)
    if center_coefficient:
        losses = losses + center_coefficient * jnp.square(chosen + rejected)
    n = jnp.maximum(num_pairs, 1).astype(jnp.float32)
    w = jnp.ones((b,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    mean = lambda x: jnp.sum(x * w) / n  # noqa: E731
    return mean(losses), {"accuracy": mean((diff > 0).astype(jnp.float32)), "margin": mean(diff),
                          "rewards/chosen": mean(chosen), "rewards/rejected": mean(rejected)}
