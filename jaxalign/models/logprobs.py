"""Per-token and per-sequence log-probabilities: the quantity SFT, DPO and scoring are built on.

Batch convention (shared by the data pipeline, the losses and `score`): `tokens[b, t]` is the input
at row index t and `targets[b, t]` the token it predicts (the next one); `loss_mask[b, t]` is 1 where
that prediction counts. Packed rows mask the last token of each sequence, so no sequence is trained
to predict the first token of the next.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxalign.models.dots import flat_dot


def logit_stats(logits: jax.Array, targets: jax.Array, squares: bool = False) -> dict[str, jax.Array]:
    """Per target: log softmax(logits)[target] ("logp"), logsumexp ("lse"), argmax == target ("correct"), and with
    `squares` log Σ softmax² ("lss", WPO's weights; not differentiated).

    One max over the vocab serves both the stable logsumexp and "correct" (the target's logit is the
    largest; on an exact tie any of the tied tokens counts, where argmax would pick the first): an
    argmax is a second, slower pass over the [tokens, vocab] logits (on CPU ~10% of the LM head).
    """
    logits = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= top).astype(jnp.float32)
    out = {"logp": target_logit - lse, "lse": lse, "correct": correct}
    if squares:
        shifted = jax.lax.stop_gradient(logits - lse[..., None])
        out["lss"] = jnp.log(jnp.sum(jnp.exp(2 * shifted), axis=-1))
    return out


# model.logits_chunk_size -1 (auto): the fused head at this many positions a chunk from this vocabulary size up
# (Llama 3, Qwen2.5; benchmarks/lm_head.py: at 128k, 4 x 2048 tokens, 1.6 GiB of temporaries, not 7.8).
AUTO_CHUNK, AUTO_VOCAB = 256, 65536


def resolve_chunk(chunk_size: int, vocab_size: int) -> int:
    """The chunk a model.logits_chunk_size means for this vocabulary: -1 = auto, 0 = the whole logits."""
    return chunk_size if chunk_size >= 0 else AUTO_CHUNK if vocab_size >= AUTO_VOCAB else 0


def token_stats(model, hidden: jax.Array, targets: jax.Array, chunk_size: int = -1,
                squares: bool = False) -> dict[str, jax.Array]:
    """`logit_stats` of each target given final hidden states [batch, length, embed].

    With a chunk (`resolve_chunk`) the LM head and log-softmax run that many positions at a time inside one
    custom VJP (`fused_logit_stats`), so [tokens, vocab] fp32 logits exist for one chunk at a time, forward
    and back.
    """
    chunk_size = resolve_chunk(chunk_size, model.cfg.vocab_size)
    if chunk_size <= 0 or hidden.shape[1] <= chunk_size:
        return logit_stats(model.logits(hidden), targets, squares)
    w = model.output_embedding()
    logp, lse, correct, lss = fused_logit_stats(hidden, w.astype(hidden.dtype), targets, chunk_size, squares)
    return {"logp": logp, "lse": lse, "correct": correct} | ({"lss": lss} if squares else {})


def _chunks(x: jax.Array, size: int) -> jax.Array:
    """[batch, length, ...] -> [length / size, batch, size, ...], zero-padded: scanned over the unsharded axis."""
    x = jnp.pad(x, [(0, 0), (0, -x.shape[1] % size)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], -1, size, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x: jax.Array, length: int) -> jax.Array:
    return x.swapaxes(0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :length]


def _chunk_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    return flat_dot(h, w, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_logit_stats(hidden: jax.Array, w: jax.Array, targets: jax.Array, chunk_size: int, squares: bool = False):
    """(logp, lse, correct, lss: zeros unless `squares`) [batch, length] of `logit_stats(hidden @ w, targets)`, chunk
    by chunk along the length.
    Hand-written VJP: the backward recomputes a chunk's logits and forms softmax - onehot from the saved lse, so
    neither pass keeps more than one chunk's [batch, chunk, vocab] arrays (autodiff would keep every chunk's)."""
    return _fused_forward(hidden, w, targets, chunk_size, squares)[0]


def _fused_forward(hidden, w, targets, chunk_size, squares):
    def one(xs):
        stats = logit_stats(_chunk_logits(xs[0], w), xs[1], squares)
        return stats["logp"], stats["lse"], stats["correct"], stats.get("lss", jnp.zeros_like(stats["lse"]))

    out = jax.lax.map(one, (_chunks(hidden, chunk_size), _chunks(targets, chunk_size)))
    logp, lse, correct, lss = (_unchunk(x, hidden.shape[1]) for x in out)
    return (logp, lse, correct, lss), (hidden, w, targets, lse)


def _fused_backward(chunk_size, squares, residuals, cotangents):
    hidden, w, targets, lse = residuals
    g_logp, g_lse, _, _ = cotangents  # `correct` is a count and `lss` a weight: no gradient

    def one(dw, xs):
        h, t, lse_c, gl, gz = xs
        logits = _chunk_logits(h, w)
        # d/dlogits of gl * (logit_t - lse) + gz * lse = (gz - gl) * softmax + gl * onehot(t)
        g = jnp.exp(logits - lse_c[..., None]) * (gz - gl)[..., None]
        g = g + jnp.where(jnp.arange(logits.shape[-1]) == t[..., None], gl[..., None], 0.0)
        dh = flat_dot(g.astype(w.dtype), w.T, preferred_element_type=jnp.float32)
        dw = dw + flat_dot(h.reshape(-1, h.shape[-1]).T, g.astype(h.dtype).reshape(-1, g.shape[-1]),
                           preferred_element_type=jnp.float32)
        return dw, dh.astype(hidden.dtype)

    xs = tuple(_chunks(x, chunk_size) for x in (hidden, targets, lse, g_logp, g_lse))
    dw, dh = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), xs)
    return _unchunk(dh, hidden.shape[1]), dw.astype(w.dtype), None


fused_logit_stats.defvjp(_fused_forward, _fused_backward)


def token_logprobs(model, hidden: jax.Array, targets: jax.Array, chunk_size: int = -1) -> jax.Array:
    """Log-prob of each target given final hidden states [batch, length, embed]."""
    return token_stats(model, hidden, targets, chunk_size)["logp"]


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over the last axis of `values` where `mask` is set."""
    return jnp.sum(jnp.where(mask.astype(bool), values, 0.0), axis=-1)


def sequence_logprobs(model, batch: dict[str, jax.Array], chunk_size: int = -1) -> tuple[jax.Array, jax.Array]:
    """(summed log-prob of the masked targets, number of masked targets) per row."""
    hidden, _ = model.hidden_states(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
    logp = token_logprobs(model, hidden, batch["targets"], chunk_size)
    mask = batch["loss_mask"]
    return masked_sum(logp, mask), jnp.sum(mask.astype(jnp.int32), axis=-1)
