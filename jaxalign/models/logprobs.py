"""Per-token and per-sequence log-probabilities: the quantity SFT, DPO and scoring are built on.

Batch convention (shared by the data pipeline, the losses and `score`): `tokens[b, t]` is the input
at row index t and `targets[b, t]` the token it predicts (the next one); `loss_mask[b, t]` is 1 where
that prediction counts. Packed rows mask the last token of each sequence, so no sequence is trained
to predict the first token of the next.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logit_stats(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """Per target: log softmax(logits)[target] ("logp"), logsumexp ("lse"), argmax == target ("correct").

    One max over the vocab serves both the stable logsumexp and "correct" (the target's logit is the
    largest; on an exact tie any of the tied tokens counts, where argmax would pick the first): an
    argmax is a second, slower pass over the [tokens, vocab] logits (on CPU ~10% of the LM head).
    """
    logits = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= top).astype(jnp.float32)
    return {"logp": target_logit - lse, "lse": lse, "correct": correct}


def token_stats(model, hidden: jax.Array, targets: jax.Array, chunk_size: int = 0) -> dict[str, jax.Array]:
    """`logit_stats` of each target given final hidden states [batch, length, embed].

    With `chunk_size` > 0 the vocab projection runs over `chunk_size` positions at a time and is
    recomputed in the backward pass, so fp32 logits of the whole batch never exist at once.
    """
    length = hidden.shape[1]
    if chunk_size <= 0 or length <= chunk_size:
        return logit_stats(model.logits(hidden), targets)
    pad = -length % chunk_size
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    padded_targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk_size
    hs = hidden.reshape(hidden.shape[0], n, chunk_size, -1).swapaxes(0, 1)
    ts = padded_targets.reshape(targets.shape[0], n, chunk_size).swapaxes(0, 1)
    w = model.output_embedding()

    @jax.checkpoint
    def chunk(h, t):
        logits = jnp.einsum("bce,ev->bcv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        return logit_stats(logits, t)

    out = jax.lax.map(lambda xs: chunk(*xs), (hs, ts))
    return {k: v.swapaxes(0, 1).reshape(targets.shape[0], -1)[:, :length] for k, v in out.items()}


def token_logprobs(model, hidden: jax.Array, targets: jax.Array, chunk_size: int = 0) -> jax.Array:
    """Log-prob of each target given final hidden states [batch, length, embed]."""
    return token_stats(model, hidden, targets, chunk_size)["logp"]


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over the last axis of `values` where `mask` is set."""
    return jnp.sum(jnp.where(mask.astype(bool), values, 0.0), axis=-1)


def sequence_logprobs(model, batch: dict[str, jax.Array], chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
    """(summed log-prob of the masked targets, number of masked targets) per row."""
    hidden, _ = model.hidden_states(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
    logp = token_logprobs(model, hidden, batch["targets"], chunk_size)
    mask = batch["loss_mask"]
    return masked_sum(logp, mask), jnp.sum(mask.astype(jnp.int32), axis=-1)
