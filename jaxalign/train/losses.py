"""SFT, DPO and reward-model losses as pure functions of arrays.

Each is written as a sum over this micro-batch divided by a normaliser of the WHOLE effective batch
(all micro-batches, all devices): trained tokens for SFT, pairs for DPO and the reward model. Summing micro-batch losses
and gradients then gives exactly the loss and update of one large batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


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


def dpo_pair_losses(chosen_logratios: jax.Array, rejected_logratios: jax.Array, beta: float, loss_type: str,
                    label_smoothing: float = 0.0) -> jax.Array:
    """Per-pair DPO loss from log-ratios log πθ(y|x) - log πref(y|x) (summed, or length-averaged for IPO).

    Definitions as TRL's: sigmoid (with label smoothing = conservative DPO), robust, hinge, ipo.
    """
    d = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * jax.nn.log_sigmoid(beta * d) - eps * jax.nn.log_sigmoid(-beta * d)
    if loss_type == "robust":
        return (-(1 - eps) * jax.nn.log_sigmoid(beta * d) + eps * jax.nn.log_sigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return jax.nn.relu(1 - beta * d)
    if loss_type == "ipo":
        return jnp.square(d - 1 / (2 * beta))
    raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {DPO_LOSSES}")


def dpo_loss(policy_logps: jax.Array, ref_logps: jax.Array, num_tokens: jax.Array, num_pairs: jax.Array, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             sft_weight: float = 0.0, chosen_nll_sum: jax.Array | None = None,
             chosen_tokens_total: jax.Array | None = None,
             valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO loss and TRL's metrics for a micro-batch of pairs.

    policy_logps, ref_logps, num_tokens: [2B] summed completion log-probs and completion lengths,
    chosen rows first, then rejected (row i and row B + i form a pair). `num_pairs` counts the
    pairs of the whole batch, so the returned values are this micro-batch's share of batch means.
    `sft_weight` > 0 adds the RPO term: sft_weight * token-mean NLL of the chosen completions.
    `valid` [B] marks real pairs; padding pairs (an eval batch's tail) contribute nothing.
    """
    b = policy_logps.shape[0] // 2
    chosen_ratio = policy_logps[:b] - ref_logps[:b]
    rejected_ratio = policy_logps[b:] - ref_logps[b:]
    if loss_type == "ipo":  # IPO compares log-ratios averaged over completion length
        lengths = jnp.maximum(num_tokens, 1).astype(jnp.float32)
        losses = dpo_pair_losses(chosen_ratio / lengths[:b], rejected_ratio / lengths[b:], beta, loss_type)
    else:
        losses = dpo_pair_losses(chosen_ratio, rejected_ratio, beta, loss_type, label_smoothing)
    n = jnp.maximum(num_pairs, 1).astype(jnp.float32)
    w = jnp.ones((b,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    loss = jnp.sum(losses * w) / n
    # Rewards always come from summed log-probs, whatever the loss.
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    metrics = {
        "rewards/chosen": jnp.sum(chosen_rewards * w) / n,
        "rewards/rejected": jnp.sum(rejected_rewards * w) / n,
        "rewards/accuracies": jnp.sum((chosen_rewards > rejected_rewards).astype(jnp.float32) * w) / n,
        "rewards/margins": jnp.sum((chosen_rewards - rejected_rewards) * w) / n,
        "logps/chosen": jnp.sum(policy_logps[:b] * w) / n,
        "logps/rejected": jnp.sum(policy_logps[b:] * w) / n,
    }
    if sft_weight:
        nll = chosen_nll_sum / jnp.maximum(chosen_tokens_total, 1).astype(jnp.float32)
        loss = loss + sft_weight * nll
        metrics["nll_loss"] = nll
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
