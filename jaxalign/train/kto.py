"""KTO (unpaired preferences) as a pure function of per-sequence log-probs, with TRL 1.16's KTOTrainer
definitions and metrics.

Each example is a completion y of its prompt x with a label (desirable or not), and a KL completion y′ (another
example's completion under x, `jaxalign.data.kto`). With Δ = log πθ(y|x) − log πref(y|x) summed over y's tokens
and z0 = max(0, mean over the batch of log πθ(y′|x) − log πref(y′|x)) (not back-propagated):
desirable examples lose λD (1 − σ(β(Δ − z0))), undesirable ones λU (1 − σ(β(z0 − Δ))); the loss is the mean
over examples. `apo_zero_unpaired` (APO-zero, unpaired) drops z0: 1 − σ(βΔ) and σ(βΔ).

Values are this micro-batch's sums over the examples (desirable, undesirable) of the WHOLE batch, so they add
up over micro-batches; z0 is each micro-batch's own mean (TRL's: each device's batch's, averaged).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclasses.dataclass(frozen=True)
class KTOLoss:
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"

    def __post_init__(self):
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"unknown KTO loss {self.loss_type!r}; expected one of {KTO_LOSS_TYPES}")


def kto_loss(policy_logps: jax.Array, ref_logps: jax.Array, labels: jax.Array, norms: dict[str, jax.Array],
             spec: KTOLoss, valid: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """policy_logps, ref_logps: [2B] summed completion log-probs, the examples' completions first, then their KL
    completions; labels [B] (1 desirable, 0 undesirable); valid [B] marks real examples; norms: the whole
    batch's `examples`, `desirable` and `undesirable` counts."""
    b = labels.shape[0]
    w = valid.astype(jnp.float32)
    ratio = policy_logps[:b] - ref_logps[:b]
    kl = jax.lax.stop_gradient(policy_logps[b:] - ref_logps[b:])
    in_micro = jnp.maximum(jnp.sum(w), 1.0)
    z0 = jnp.maximum(jnp.sum(kl * w) / in_micro, 0.0) if spec.loss_type == "kto" else jnp.float32(0.0)
    desirable = labels > 0.5
    if spec.loss_type == "kto":
        d_loss, u_loss = 1 - jax.nn.sigmoid(spec.beta * (ratio - z0)), 1 - jax.nn.sigmoid(spec.beta * (z0 - ratio))
    else:
        d_loss, u_loss = 1 - jax.nn.sigmoid(spec.beta * ratio), jax.nn.sigmoid(spec.beta * ratio)
    losses = jnp.where(desirable, spec.desirable_weight * d_loss, spec.undesirable_weight * u_loss)
    count = lambda k: jnp.maximum(norms[k], 1).astype(jnp.float32)  # noqa: E731
    loss = jnp.sum(losses * w) / count("examples")
    rewards = spec.beta * ratio
    d, u = w * desirable, w * ~desirable
    chosen, rejected = jnp.sum(rewards * d) / count("desirable"), jnp.sum(rewards * u) / count("undesirable")
    return loss, {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": jnp.sum(policy_logps[:b] * d) / count("desirable"),
        "logps/rejected": jnp.sum(policy_logps[:b] * u) / count("undesirable"),
        "kl": z0 * jnp.sum(w) / count("examples"),  # micro-batch shares that add up to the batch's mean z0
    }
