"""Causal grouped-query attention with segment ids (packed rows), a sliding window, and a KV cache.

Masking rules, shared by every implementation: a query at row index i sees key j when j <= i, both
belong to the same segment, the key is not padding (segment 0), and i - j < sliding_window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_offset: jax.Array | int = 0,
                   sliding_window: int | None = None) -> jax.Array:
    """Boolean [batch, q_len, kv_len] mask. `q_offset` is the row index of the first query (KV cache)."""
    q_idx = jnp.arange(q_segment_ids.shape[1])[:, None] + q_offset
    kv_idx = jnp.arange(kv_segment_ids.shape[1])[None, :]
    mask = (kv_idx <= q_idx)[None]
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask &= (kv_segment_ids != 0)[:, None, :]
    if sliding_window is not None:
        mask &= (q_idx - kv_idx < sliding_window)[None]
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference path. q: [B, T, H, D]; k, v: [B, S, KV, D]; H a multiple of KV; softmax in fp32.

    Query heads are grouped over their shared kv head instead of repeating k and v in memory.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(
        jnp.float32)
    # A large finite negative (not -inf) keeps fully masked rows (padding queries) finite.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str = "auto") -> jax.Array:
    if implementation == "auto":
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if implementation == "xla":
        return xla_attention(q, k, v, mask)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=None)
    raise NotImplementedError(f"attention implementation {implementation!r} is not available on "
                              f"{jax.default_backend()}; use one of 'auto', 'xla', 'cudnn'")
