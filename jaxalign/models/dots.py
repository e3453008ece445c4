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

from jaxalign.runtime.sharding import is_split


def flat_dot(x: jax.Array, w: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
    """x [..., in...] @ w [in..., out...] -> [..., out...], contracting x's last `n_in` axes with w's first."""
    if x.shape[x.ndim - n_in:] != w.shape[:n_in]:
        raise ValueError(f"flat_dot: x {x.shape} and w {w.shape} do not share their {n_in} contracted axes")
    if is_split("length") or is_split("head_dim"):
        # Merging [batch, length] (or [heads, head_dim]) is free only when the minor axis is whole; where mesh.rules
        # split it, the partitioner reshards the merged axis (10 all-to-alls became 110 in a 2-layer model's grad).
        return jnp.tensordot(x, w, axes=n_in, preferred_element_type=preferred_element_type)
    lead, out = x.shape[:x.ndim - n_in], w.shape[n_in:]
    fan_in = math.prod(w.shape[:n_in])
    y = jnp.dot(x.reshape(math.prod(lead), fan_in), w.reshape(fan_in, math.prod(out)),
                preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out)
