"""The DPO family of losses as pure functions of per-sequence log-probs, with TRL 1.16's names and definitions
(`DPOConfig.loss_type`, `loss_weights`, `f_divergence_type`, `ld_alpha`), and TRL's metrics.

Each value is a sum over this micro-batch divided by the pairs (or, for the `sft` term, the chosen tokens) of
the WHOLE effective batch, so micro-batch values add up to the batch's. `aot` and `aot_unpaired` sort the
pairs' log-ratios across the batch, so theirs are the values of each micro-batch's own sort (as TRL's are of
each device's batch).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxalign.config.schema import DPO_LOSS_TYPES as LOSS_TYPES, F_DIVERGENCES


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """A DPO objective: a weighted sum of TRL loss types over the same log-ratios."""

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5  # f_alpha_divergence_coef
    discopop_tau: float = 0.05
    ld_alpha: float = 1.0  # LD-DPO: weight of the reply tokens past the shorter reply's length; 1 = off

    def __post_init__(self):
        unknown = [t for t in self.loss_types if t not in LOSS_TYPES]
        if unknown or len(self.loss_weights) != len(self.loss_types):
            raise ValueError(f"loss types {self.loss_types} (known: {LOSS_TYPES}) with weights {self.loss_weights}")

    @property
    def length_desensitised(self) -> bool:
        return self.ld_alpha != 1.0


def f_scores(logratios: jax.Array, kind: str, alpha: float = 0.5) -> jax.Array:
    """f'(π/πref) of f-DPO for each log-ratio: reverse KL gives the log-ratio itself."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if kind == "forward_kl":
        return 1 - jnp.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + jax.nn.log_sigmoid(logratios)
    if kind == "alpha_divergence":  # clamped as TRL does, so exp stays finite
        return (jnp.exp(jnp.minimum((alpha - 1.0) * logratios, 80.0)) - 1.0) / (alpha - 1.0)
    raise ValueError(f"unknown f-divergence {kind!r}; expected one of {F_DIVERGENCES}")


def _sorted_difference(a: jax.Array, b: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sort(a) - sort(b) over the valid pairs, which of its places are real): padding sorts last in both."""
    big = jnp.finfo(a.dtype).max
    diff = jnp.sort(jnp.where(valid, a, big)) - jnp.sort(jnp.where(valid, b, big))
    real = jnp.arange(a.shape[0]) < jnp.sum(valid)
    return jnp.where(real, diff, 0.0), real


def pair_losses(kind: str, spec: PreferenceLoss, chosen_ratio: jax.Array, rejected_ratio: jax.Array,
                lengths: jax.Array, policy_logps: jax.Array, ref_logps: jax.Array,
                valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-pair loss [B], weight of each place [B]) of one loss type other than `sft`.

    chosen_ratio, rejected_ratio [B]: log πθ(y|x) - log πref(y|x); lengths, policy_logps, ref_logps [2B],
    chosen first. The weight is `valid`, except for the sorted losses, whose places are ranks, not pairs.
    """
    beta, eps = spec.beta, spec.label_smoothing
    b = chosen_ratio.shape[0]
    cs, rs = (f_scores(x, spec.f_divergence, spec.f_alpha) for x in (chosen_ratio, rejected_ratio))
    z = beta * (cs - rs)
    cr, rr = beta * chosen_ratio, beta * rejected_ratio
    ls = jax.nn.log_sigmoid
    if kind == "sigmoid":
        return -(1 - eps) * ls(z) - eps * ls(-z), valid
    if kind == "robust":
        return (-(1 - eps) * ls(z) + eps * ls(-z)) / (1 - 2 * eps), valid
    if kind == "hinge":
        return jax.nn.relu(1 - z), valid
    if kind in ("ipo", "sigmoid_norm"):  # scores averaged over each reply's tokens
        n = jnp.maximum(lengths, 1).astype(jnp.float32)
        mean_delta = cs / n[:b] - rs / n[b:]
        return (jnp.square(mean_delta - 1 / (2 * beta)) if kind == "ipo" else -ls(beta * mean_delta)), valid
    if kind == "exo_pair":  # KL(softmax of the two rewards || (1 - ε, ε))
        return jax.nn.sigmoid(z) * (ls(z) - math.log1p(-eps)) + jax.nn.sigmoid(-z) * (ls(-z) - math.log(eps)), valid
    if kind == "nca_pair":
        return -ls(cr) - 0.5 * ls(-cr) - 0.5 * ls(-rr), valid
    if kind == "bco_pair":
        return -ls(cr) - ls(-rr), valid
    if kind == "sppo_hard":
        return jnp.square(chosen_ratio - 0.5 / beta) + jnp.square(rejected_ratio + 0.5 / beta), valid
    if kind in ("aot", "aot_unpaired"):
        a, c = ((policy_logps[:b] - policy_logps[b:], ref_logps[:b] - ref_logps[b:]) if kind == "aot"
                else (chosen_ratio, rejected_ratio))
        delta, real = _sorted_difference(a, c, valid)
        return -ls(beta * delta) * (1 - eps) - ls(-beta * delta) * eps, real
    if kind == "apo_zero":
        return 1 - jax.nn.sigmoid(cr) + jax.nn.sigmoid(rr), valid
    if kind == "apo_down":
        return jax.nn.sigmoid(cr) + 1 - jax.nn.sigmoid(beta * (chosen_ratio - rejected_ratio)), valid
    if kind == "discopop":  # logistic and exponential losses mixed by σ(z / τ)
        mix = jax.nn.sigmoid(z / spec.discopop_tau)
        return -ls(z) * (1 - mix) + jnp.exp(-z) * mix, valid
    raise ValueError(f"unknown DPO loss {kind!r}; expected one of {LOSS_TYPES}")


def dpo_loss(policy_logps: jax.Array, ref_logps: jax.Array, num_tokens: jax.Array, num_pairs: jax.Array,
             spec: PreferenceLoss, *, chosen_nll_sum: jax.Array | None = None,
             chosen_tokens_total: jax.Array | None = None,
             valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective's loss and TRL's metrics for a micro-batch of pairs.

    policy_logps, ref_logps, num_tokens: [2B] summed (LD-DPO: weighted) completion log-probs and completion
    lengths, chosen first (row i and B + i form a pair). `num_pairs` counts the pairs of the whole batch.
    The `sft` term is chosen_nll_sum / chosen_tokens_total: the token-mean NLL of the batch's chosen replies.
    `valid` [B] marks real pairs; padding pairs (an eval batch's tail, empty slots) contribute nothing.
    """
    b = policy_logps.shape[0] // 2
    chosen_ratio = policy_logps[:b] - ref_logps[:b]
    rejected_ratio = policy_logps[b:] - ref_logps[b:]
    n = jnp.maximum(num_pairs, 1).astype(jnp.float32)
    w = jnp.ones((b,), bool) if valid is None else valid
    mean = lambda x, weight=w: jnp.sum(x * weight.astype(jnp.float32)) / n  # noqa: E731
    loss, metrics = jnp.float32(0.0), {}
    for kind, weight in zip(spec.loss_types, spec.loss_weights):
        if kind == "sft":
            nll = chosen_nll_sum / jnp.maximum(chosen_tokens_total, 1).astype(jnp.float32)
            loss, metrics["nll_loss"] = loss + weight * nll, nll
            continue
        losses, places = pair_losses(kind, spec, chosen_ratio, rejected_ratio, num_tokens, policy_logps, ref_logps, w)
        loss = loss + weight * mean(losses, places)
    # Rewards always come from the log-ratios, whatever the loss and f-divergence.
    chosen_rewards, rejected_rewards = spec.beta * chosen_ratio, spec.beta * rejected_ratio
    return loss, {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "logps/chosen": mean(policy_logps[:b]),
        "logps/rejected": mean(policy_logps[b:]),
        **metrics,
    }
