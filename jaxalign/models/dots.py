"""One matmul for every projection: x [..., in...] times w [in..., out...] as a single 2-d dot.

Why not an einsum such as "bte,em->btm": its weight gradient contracts two axes (batch and length),
and XLA's CPU backend lowers that dot with a transposed copy of the [tokens, out] gradient, a strided
write that cost a fifth of a training step (benchmarks/RESULTS.md). Flattening the leading axes (a
free reshape) makes every dot, forward and backward, a plain [tokens, in] x [in, out] product.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def flat_dot(x: jax.Array, w: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
    """x [..., in...] @ w [in..., out...] -> [..., out...], contracting x's last `n_in` axes with w's first."""
    lead, out = x.shape[:x.ndim - n_in], w.shape[n_in:]
    fan_in = math.prod(w.shape[:n_in])
    y = jnp.dot(x.reshape(math.prod(lead), fan_in), w.reshape(fan_in, math.prod(out)),
                preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out)
