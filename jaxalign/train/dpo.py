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
    simpo_gamma: float = 0.5  # SimPO's target margin
    use_weighting: bool = False  # WPO: each pair's losses times its weight (train/step.py computes it)
    # No reference (CPO, SimPO, ORPO): the log-ratios are the policy's log-probs, and the rewards and logps/*
    # metrics are TRL's CPO/ORPO trainers': token means where a loss is length-normalised, else sums.
    reference_free: bool = False

    def __post_init__(self):
        unknown = [t for t in self.loss_types if t not in LOSS_TYPES]
        if unknown or len(self.loss_weights) != len(self.loss_types):
            raise ValueError(f"loss types {self.loss_types} (known: {LOSS_TYPES}) with weights {self.loss_weights}")

    @property
    def length_desensitised(self) -> bool:
        return self.ld_alpha != 1.0

    @property
    def mean_rewards(self) -> bool:
        return self.reference_free and any(t in ("ipo", "simpo", "orpo") for t in self.loss_types)


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


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x < 0, on the branch that avoids cancellation (at -ln 2, as TRL's ORPO)."""
    return jnp.where(x < -math.log(2), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _log_odds(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
    """log(odds(y+) / odds(y-)) with odds(y) = p / (1 - p) of token-mean log-probs."""
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


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
    n = jnp.maximum(lengths, 1).astype(jnp.float32)
    if kind in ("ipo", "sigmoid_norm", "simpo"):  # scores averaged over each reply's tokens
        mean_delta = cs / n[:b] - rs / n[b:]
        if kind == "simpo":  # CPO's form: β · mean delta - γ, label-smoothed
            m = beta * mean_delta - spec.simpo_gamma
            return -(1 - eps) * ls(m) - eps * ls(-m), valid
        return (jnp.square(mean_delta - 1 / (2 * beta)) if kind == "ipo" else -ls(beta * mean_delta)), valid
    if kind == "orpo":  # -λ log σ(log odds ratio) of the token-mean log-probs; λ is β (TRL's ORPO; + its NLL)
        return -beta * ls(_log_odds(chosen_ratio / n[:b], rejected_ratio / n[b:])), valid
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
             chosen_tokens_total: jax.Array | None = None, valid: jax.Array | None = None,
             pair_weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective's loss and TRL's metrics for a micro-batch of pairs.

    policy_logps, ref_logps, num_tokens: [2B] summed (LD-DPO: weighted) completion log-probs and completion
    lengths, chosen first (row i and B + i form a pair). `num_pairs` counts the pairs of the whole batch.
    The `sft` term is chosen_nll_sum / chosen_tokens_total: the token-mean NLL of the batch's chosen replies
    (for `orpo`, which includes it, of the prompts and chosen replies, as TRL's ORPOTrainer counts it).
    `valid` [B] marks real pairs; padding pairs (an eval batch's tail, empty slots) contribute nothing.
    `pair_weights` [B] (WPO) multiply every term's per-pair loss, the `sft` term's as TRL's: nll × their mean.
    """
    b = policy_logps.shape[0] // 2
    chosen_ratio = policy_logps[:b] - ref_logps[:b]
    rejected_ratio = policy_logps[b:] - ref_logps[b:]
    n = jnp.maximum(num_pairs, 1).astype(jnp.float32)
    w = jnp.ones((b,), bool) if valid is None else valid
    mean = lambda x, weight=w: jnp.sum(x * weight.astype(jnp.float32)) / n  # noqa: E731
    loss, metrics = jnp.float32(0.0), {}
    pw = jnp.ones((b,), jnp.float32) if pair_weights is None else pair_weights
    for kind, weight in zip(spec.loss_types, spec.loss_weights):
        if kind in ("sft", "orpo"):  # ORPO is its odds-ratio term plus this NLL (of prompt and reply: see step.py)
            nll = chosen_nll_sum / jnp.maximum(chosen_tokens_total, 1).astype(jnp.float32)
            scaled = nll if pair_weights is None else nll * mean(pw)
            loss, metrics["nll_loss"] = loss + weight * scaled, nll
        if kind != "sft":
            losses, places = pair_losses(kind, spec, chosen_ratio, rejected_ratio, num_tokens, policy_logps,
                                         ref_logps, w)
            loss = loss + weight * mean(losses * pw, places)
    # Rewards come from the log-ratios whatever the loss and f-divergence (reference-free: see mean_rewards).
    if spec.mean_rewards:
        per_token = jnp.maximum(num_tokens, 1).astype(jnp.float32)
        chosen_ratio, rejected_ratio = chosen_ratio / per_token[:b], rejected_ratio / per_token[b:]
        policy_logps = policy_logps / per_token
    if "orpo" in spec.loss_types:
        log_odds = _log_odds(chosen_ratio, rejected_ratio)
        metrics |= {"log_odds_ratio": mean(jax.nn.log_sigmoid(log_odds)), "log_odds_chosen": mean(log_odds)}
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
