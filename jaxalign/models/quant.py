"""A quantised frozen base for LoRA (QLoRA): every projection weight (q ... down, adapted or not, as
QLoRA and bitsandbytes do; embeddings, norms and the LM head stay as loaded) is stored as

    nf4   QLoRA's NormalFloat-4 codes, one fp32 absmax scale per block of `block_size` consecutive
          input features of one output feature (bitsandbytes' blocks along a torch weight's rows);
          with double quantisation the scales themselves are int8 (per output feature, qwix's min-max
          over [0, max]: each scale within max/255).
    int8  int8 codes with one fp32 absmax scale per output feature (weight-only).

and dequantised to the compute dtype inside the scanned layer, one layer at a time. The arithmetic
is qwix's (qwix.quantize / qwix.dequantize); this module only chooses the layout: each [L, in...,
out...] weight is viewed as [L, IN, OUT] (the HF tensor's merged axes, untransposed), so blocks
run over the flattened input features exactly as in the torch weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import qwix

from jaxalign.errors import JaxalignError
from jaxalign.models.config import ModelConfig
from jaxalign.models.dots import flat_dot
from jaxalign.models.params import BY_NAME, Param, _merge
from jaxalign.runtime.sharding import named_sharding

# The projections a quantised base stores quantised (all seven, whatever lora.targets adapts).
QUANTIZED = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# QLoRA's NormalFloat-4 levels (Dettmers et al. 2023, appendix E; the table qwix quantises to).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    kind: str  # "int8" or "nf4"
    block_size: int = 64  # nf4: input features per absmax scale
    double: bool = False  # nf4: the scales quantised again (int8)

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@flax.struct.dataclass
class Quantized:
    """One stacked weight, quantised: codes [L, IN, OUT] and their scales ([L, IN/block, OUT] for nf4,
    [L, 1, OUT] for int8; a qwix QArray when double-quantised). Slicing the leading [L] axis (the
    layer scan does) gives one layer's weight."""

    codes: jax.Array  # nf4: two 4-bit codes a byte (uint8 [L, IN/2, OUT]); int8: [L, IN, OUT]
    scale: Any
    qtype: Any = flax.struct.field(pytree_node=False)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # one layer's [in..., out...]

    def indices(self) -> jax.Array:
        """The codes one per element ([..., IN, OUT]): nf4's level indices, or the int8 values."""
        if self.qtype != "nf4":
            return self.codes
        pairs = jnp.stack([self.codes >> 4, self.codes & 15], axis=-2)  # [..., IN/2, 2, OUT]
        return pairs.reshape(*self.codes.shape[:-2], -1, self.codes.shape[-1]).astype(jnp.uint4)

    def dense(self, dtype) -> jax.Array:
        scale = qwix.dequantize(self.scale) if isinstance(self.scale, qwix.QArray) else self.scale
        if self.qtype == "nf4":
            # A lookup of our own: qwix's NF4 lookup ravels the array, which loses its sharding (every
            # tensor-parallel shard would gather all codes).
            levels = jnp.take(jnp.asarray(NF4_LEVELS, jnp.float32), self.indices().astype(jnp.int32))
            blocks = levels.reshape(*levels.shape[:-2], scale.shape[-2], -1, levels.shape[-1])
            w = (blocks * scale[..., :, None, :]).reshape(levels.shape)
        else:
            w = qwix.dequantize(qwix.QArray(self.codes, scale, None, self.qtype))
        return w.reshape(*w.shape[:-2], *self.shape).astype(dtype)


def cast(w, dtype):
    """A dense weight cast to the compute dtype; a quantised one is left for `project` to dequantise."""
    return w if isinstance(w, Quantized) else w.astype(dtype)


def project(x: jax.Array, w, n_in: int, dtype) -> jax.Array:
    """x [..., in...] times a dense or quantised weight [in..., out...] (`n_in` axes contracted). A quantised
    one is dequantised under jax.checkpoint, so the backward pass dequantises it again instead of the layer
    scan saving every layer's dense weight."""
    if not isinstance(w, Quantized):
        return flat_dot(x, w, n_in)
    return jax.checkpoint(lambda x, w: flat_dot(x, w.dense(dtype), n_in))(x, w)


def _view(p: Param, cfg: ModelConfig) -> tuple[int, int]:
    return _merge(p.shape(cfg), p.groups)  # (IN, OUT)


def check_block_size(cfg: ModelConfig, spec: QuantSpec) -> None:
    """nf4's blocks must tile every projection's input features."""
    if spec.kind != "nf4":
        return
    for name in QUANTIZED:
        n_in = _view(BY_NAME[name], cfg)[0]
        if n_in % spec.block_size or spec.block_size % 2:
            raise JaxalignError(f"lora.quant_block_size={spec.block_size} does not divide {name}'s {n_in} input "
                                "features; use an even divisor of every projection's input size (64 is standard)")


def quantize_weight(w: jax.Array, p: Param, cfg: ModelConfig, spec: QuantSpec) -> Quantized:
    """[L, in..., out...] -> Quantized, one layer at a time (nf4's nearest-level search is 16 wide)."""
    n_in, n_out = _view(p, cfg)
    flat = w.reshape(w.shape[0], n_in, n_out)

    def one(x):  # one layer [IN, OUT], in fp32 so the scales are fp32 (as bitsandbytes keeps them)
        x = x.astype(jnp.float32)
        if spec.kind == "nf4":
            q = qwix.quantize(x, "nf4", channelwise_axes=(1,), tiled_axes={0: spec.block_size})
        else:
            q = qwix.quantize(x, jnp.int8, channelwise_axes=(1,))
        return q.qvalue, q.scale

    codes, scale = jax.lax.map(one, flat)
    if spec.kind == "nf4":  # packed by hand: XLA's CPU runtime keeps uint4 arrays a byte per element
        pairs = codes.astype(jnp.uint8).reshape(codes.shape[0], n_in // 2, 2, n_out)
        codes = (pairs[:, :, 0] << 4) | pairs[:, :, 1]
    if spec.double:  # int8 scales, min-max per output feature of each layer
        scale = qwix.quantize(scale, jnp.int8, channelwise_axes=(0, 2), calibration_method="minmax")
    return Quantized(codes, scale, "nf4" if spec.kind == "nf4" else jnp.int8, p.shape(cfg))


def abstract_quantized(params: dict[str, Any], cfg: ModelConfig, spec: QuantSpec, mesh, rules=None) -> dict[str, Any]:
    """The quantised tree as ShapeDtypeStructs with shardings (what quantize_base makes and `plan` counts):
    codes and scales take their weight's first input and first output axis names."""
    check_block_size(cfg, spec)
    layers = dict(params["layers"])
    for name in QUANTIZED:
        p = BY_NAME[name]
        axes = ("layers", p.axes[0], p.axes[p.groups[0]])
        out = jax.eval_shape(lambda w, p=p: quantize_weight(w, p, cfg, spec), layers[name])
        layers[name] = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=named_sharding(axes, s.shape, mesh, rules)), out)
    return {**params, "layers": layers}


def quantize_base(params: dict[str, Any], cfg: ModelConfig, spec: QuantSpec, mesh, rules=None) -> dict[str, Any]:
    """The pure parameter tree with its projections quantised, placed by the rules table."""
    target = abstract_quantized(params, cfg, spec, mesh, rules)["layers"]
    layers = dict(params["layers"])
    for name in QUANTIZED:
        shardings = jax.tree.map(lambda s: s.sharding, target[name])
        layers[name] = jax.jit(lambda w, p=BY_NAME[name]: quantize_weight(w, p, cfg, spec),
                               out_shardings=shardings)(layers[name])
    return {**params, "layers": layers}


def dequantized(params: dict[str, Any], dtype=None) -> dict[str, Any]:
    """A quantised tree back to dense weights (in `dtype`, else fp32): the model a QLoRA base stands for."""
    layers = {name: w.dense(dtype or jnp.float32) if isinstance(w, Quantized) else w
              for name, w in params["layers"].items()}
    return {**params, "layers": layers}
