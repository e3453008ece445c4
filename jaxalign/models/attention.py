"""Causal grouped-query attention with segment ids (packed rows), a sliding window, and a KV cache.

Masking rules, shared by every implementation: a query at row index i sees key j when j <= i, both
belong to the same segment, the key is not padding (segment 0), and i - j < sliding_window.

Shared-prompt DPO rows (`jaxalign.data.batching`, dpo.share_prompt) add branch ids: 0 for the shared
prompt, 1 and 2 for the chosen and rejected replies laid after it. A query also needs the key in the
shared prompt or in its own branch (a reply never sees the other), and the window counts positions,
not row indices (the chosen reply sits between the prompt and the rejected one).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging

import jax
import jax.numpy as jnp

from jaxalign.models.splash import SegmentMask, splash_attention

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
log = logging.getLogger(__name__)


# The platform a step is traced for when it is lowered ahead of time for another one (`plan`: TPU from a CPU).
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_target", default=None)


@contextlib.contextmanager
def target_platform(platform: str | None):
    """Trace attention for `platform` ('tpu', 'cuda', 'cpu'; None: the local backend)."""
    token = _target.set(platform)
    try:
        yield
    finally:
        _target.reset(token)


def backend() -> str:
    target = _target.get()
    return jax.default_backend() if target is None else {"cuda": "gpu", "rocm": "gpu"}.get(target, target)


def resolve(implementation: str) -> str:
    """`auto`: splash on TPU, cuDNN on GPU, the xla path elsewhere."""
    if implementation == "auto":
        return {"tpu": "splash", "gpu": "cudnn"}.get(backend(), "xla")
    return implementation


@functools.lru_cache(maxsize=None)
def announce(implementation: str) -> None:
    """Say once per process which attention runs, and what it falls back to."""
    chosen = resolve(implementation)
    how = {"xla": "the xla path (grouped matmuls, query blocks that skip masked keys, a dense mask)",
           "cudnn": "cuDNN through jax.nn.dot_product_attention, given a dense mask",
           "splash": "the splash Pallas kernel with causal and segment-id masks (interpret mode off TPU); "
                     "decoding with a KV cache and shared-prompt rows use the xla path"}[chosen]
    log.info("attention on %s: %s%s", backend(), how, " (model.attention auto)" if implementation ==
             "auto" else "")


@functools.lru_cache(maxsize=None)
def note_shared_prompt_mask(implementation: str) -> None:
    """Say once (per implementation) how shared-prompt rows are masked: no kernel here fuses their mask."""
    chosen = resolve(implementation)
    if chosen == "xla":
        log.info("shared-prompt DPO: the xla attention path applies the prompt/branch mask")
    elif chosen == "splash":
        log.warning("shared-prompt DPO: the splash kernel's masks cannot say 'the prompt, then only your own "
                    "reply', so these rows run on the xla path with a dense mask; dpo.share_prompt: false keeps "
                    "two padded rows per pair on the splash kernel instead")
    else:
        log.warning("shared-prompt DPO: %s attention is given the prompt/branch mask as a dense [batch, length, "
                    "length] mask (no fused prefix-sharing kernel); dpo.share_prompt: false keeps two padded "
                    "rows per pair instead", chosen)


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_offset: jax.Array | int = 0,
                   sliding_window: int | None = None, branch_ids: jax.Array | None = None,
                   positions: jax.Array | None = None) -> jax.Array:
    """Boolean [batch, q_len, kv_len] mask. `q_offset` is the row index of the first query (KV cache).
    `branch_ids` and `positions` [batch, len] (self-attention only): the shared-prompt rule above."""
    q_idx = jnp.arange(q_segment_ids.shape[1])[:, None] + q_offset
    kv_idx = jnp.arange(kv_segment_ids.shape[1])[None, :]
    mask = (kv_idx <= q_idx)[None]
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask &= (kv_segment_ids != 0)[:, None, :]
    if branch_ids is not None:
        mask &= (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    if sliding_window is not None:
        if branch_ids is not None:
            mask &= positions[:, :, None] - positions[:, None, :] < sliding_window
        else:
            mask &= (q_idx - kv_idx < sliding_window)[None]
    return mask


# The xla path splits causal self-attention (training, scoring) into up to this many query blocks of
# at least CAUSAL_BLOCK_MIN rows; block i skips the keys after its last query, which the causal mask
# hides anyway: 4 blocks compute 10/16 of the [T, S] scores (same result, bit for bit).
CAUSAL_BLOCKS, CAUSAL_BLOCK_MIN = 4, 128


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, causal: bool = False) -> jax.Array:
    """Reference path. q: [B, T, H, D]; k, v: [B, S, KV, D]; H a multiple of KV; softmax in fp32.

    `causal`: queries and keys are the same positions (no KV cache), so the causal part of `mask`
    holds and key blocks past a query block's end can be skipped (see CAUSAL_BLOCKS).
    """
    t = q.shape[1]
    blocks = min(CAUSAL_BLOCKS, t // CAUSAL_BLOCK_MIN) if causal and k.shape[1] == t else 1
    if blocks <= 1:
        return _grouped_attention(q, k, v, mask)
    bounds = [t * i // blocks for i in range(blocks + 1)]
    return jnp.concatenate([_grouped_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask[:, lo:hi, :hi])
                            for lo, hi in zip(bounds[:-1], bounds[1:])], axis=1)


def _grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Query heads are grouped over their shared kv head instead of repeating k and v in memory: the
    G = H / KV queries of a kv head are laid end to end ([B, KV, G·T, D]), so both products are plain
    batched matmuls over (B, KV) with no size-1 group axis. On CPU this layout saves the transposes
    and copies of the [B, H, T, S] scores that a 5-d [B, KV, G, T, S] einsum makes XLA insert.
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    scores = jnp.einsum("bkqd,bskd->bkqs", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(
        jnp.float32)
    mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)
    # A large finite negative (not -inf) keeps fully masked rows (padding queries) finite.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bskd->bkqd", probs, v)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask, implementation: str = "auto",
              causal: bool = False) -> jax.Array:
    """`mask`: a dense boolean [B, T, S] mask, or for the splash kernel a `splash.SegmentMask` (the model gives
    one for causal self-attention without branches). `causal`: q and k are the same positions (no KV cache);
    lets the xla path skip masked blocks."""
    implementation = resolve(implementation)
    if isinstance(mask, SegmentMask):
        return splash_attention(q, k, v, mask, interpret=backend() != "tpu")
    if implementation in ("xla", "splash"):  # splash: decoding and shared-prompt rows (announce says so)
        return xla_attention(q, k, v, mask, causal)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=None)
    raise NotImplementedError(f"attention implementation {implementation!r} is not available on "
                              f"{jax.default_backend()}; use one of {', '.join(IMPLEMENTATIONS)}")
