"""Splash attention: JAX's Pallas TPU kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), with its own
fused backward, for causal self-attention over packed rows.

The mask is the kernel's own: a causal (with a sliding window: local) mask per head, and the rows' segment ids,
so packed documents never see each other and no dense [length, length] mask exists. Grouped-query attention is
native (the kernel maps each query head to its kv head). Query and key blocks come from model.attention_block,
capped at the row length rounded up to 128 (the TPU's lane width); a row that is not a multiple of the block is
padded with segment 0 inside this function. Under a mesh the kernel runs per shard (`jax.shard_map`): rows over
the data-parallel axes and heads over tensor, as the activations are laid out. Off TPU it runs in Pallas
interpret mode (the tests check it against the xla path there).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxalign.runtime.sharding import logical_to_spec

LANES = 128


@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """What the splash path takes instead of a dense mask: the rows' segment ids [batch, length] (0: padding),
    the sliding window (None: none) and the block size."""

    segment_ids: jax.Array
    window: int | None
    block: int


def _libs():
    """JAX's splash modules, imported when a model uses them (the rest of the package does without)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask

    return splash_attention_kernel, splash_attention_mask


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, length: int, block: int, window: int | None, interpret: bool):
    kernel_lib, mask_lib = _libs()
    shape = (length, length)
    one = mask_lib.CausalMask(shape) if window is None else mask_lib.LocalMask(shape, (window - 1, 0), 0)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # the mask tables as constants, not as tracers of the first caller's trace
        return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                          q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: SegmentMask, interpret: bool) -> jax.Array:
    """q: [B, T, H, D]; k, v: [B, T, KV, D] (self-attention, H a multiple of KV) -> [B, T, H, D]. `interpret`:
    Pallas interpret mode (any backend), else the TPU kernel."""
    t = q.shape[1]
    block = min(mask.block, -(-t // LANES) * LANES)
    pad = -t % block
    seg = mask.segment_ids.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)))
    scale = 1.0 / float(q.shape[-1]) ** 0.5  # the kernel does not scale the logits

    def local(q, k, v, seg):
        kern = _kernel(q.shape[2], q.shape[1], block, mask.window, interpret)

        def row(qr, kr, vr, sr):  # the kernel's layout: [heads, length, head_dim]
            qr = (qr.astype(jnp.float32) * scale).astype(qr.dtype)
            out = kern(qr.swapaxes(0, 1), kr.swapaxes(0, 1), vr.swapaxes(0, 1),
                       segment_ids=_libs()[0].SegmentIds(sr, sr))
            return out.swapaxes(0, 1)

        return jax.vmap(row)(q, k, v, seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, seg)[:, :t]
    q_spec = logical_to_spec(("batch", None, "act_heads", None), q.shape, mesh)
    kv_spec = logical_to_spec(("batch", None, "act_kv_heads", None), k.shape, mesh)
    if q_spec[2] != kv_spec[2]:  # a shard's query heads must be its kv heads' groups: else keep heads whole
        q_spec = kv_spec = PartitionSpec(q_spec[0], None, None, None)
    # check_vma off: the kernel's pallas_call outputs carry no varying-axes annotation (each shard is its own)
    out = jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None)),
                        out_specs=q_spec, check_vma=False)(q, k, v, seg)
    return out[:, :t]
