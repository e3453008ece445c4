"""Low-rank adapters (LoRA) as PEFT defines them. A target projection W becomes

    y = x W + scale * dropout(x) A B,    scale = alpha / r   (alpha / sqrt(r) with rsLoRA),

A initialised as PEFT does (Kaiming-uniform, or Gaussian with std 1/r) and B = 0, so fresh adapters
leave the model unchanged. The base weights stay the model's own (frozen) tree; the adapters are a
separate pure dict of stacked per-layer arrays, {"wq": {"a": [L, E, r], "b": [L, r, H, D]}, ...}: A
carries its weight's input axes and B its output axes (models/params.py), so the sharding table
places an adapter as it places its weight, and the scanned layer slices them with the weights.

Written here rather than taken from qwix: qwix adds an adapter per dot_general call site of a Flax
module at trace time, while this model's layer body is one pure function scanned over [L]-stacked
weights, so its adapters must be stacked (and checkpointed, merged, exported) the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.config.schema import LORA_TARGETS
from jaxalign.errors import JaxalignError
from jaxalign.models.config import ModelConfig
from jaxalign.models.dots import flat_dot
from jaxalign.models.params import BY_NAME, Param
from jaxalign.runtime.sharding import named_sharding

# PEFT's module names -> this model's weights, in checkpoint order; "all-linear" is all of them
# (PEFT's all-linear leaves out the LM head, as here).
TARGETS = dict(zip(LORA_TARGETS, ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")))
SHORT_NAMES = {name.split("_")[0]: name for name in TARGETS}  # q, k, v, o, gate, up, down
RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # weight names (wq, ...), in checkpoint order
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"  # or "gaussian"

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def peft_modules(self) -> list[str]:
        return [hf for hf, ours in TARGETS.items() if ours in self.targets]


def resolve_targets(names: Iterable[str], key: str = "lora.targets") -> tuple[str, ...]:
    """PEFT module names (q_proj ... down_proj), short names (q ... down) or "all-linear" -> weight
    names in checkpoint order; an unknown name is an error naming the closest valid one."""
    wanted = set()
    for name in names:
        if name == "all-linear":
            wanted.update(TARGETS.values())
            continue
        full = SHORT_NAMES.get(name, name)
        if full not in TARGETS:
            valid = [*TARGETS, *SHORT_NAMES, "all-linear"]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise JaxalignError(f"{key}: unknown target {name!r}{hint}; valid: {', '.join(valid)}")
        wanted.add(TARGETS[full])
    if not wanted:
        raise JaxalignError(f"{key} is empty: name at least one projection (or all-linear)")
    return tuple(w for w in TARGETS.values() if w in wanted)


def _split(p: Param, cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """(input shape, output shape, input axes, output axes) of one layer's weight: `groups[0]` leading
    axes are the input features (params.py stores a linear layer as [in..., out...])."""
    n_in = p.groups[0]
    shape = p.shape(cfg)
    return shape[:n_in], shape[n_in:], p.axes[:n_in], p.axes[n_in:]


def adapter_shapes(cfg: ModelConfig, spec: LoraSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    out = {}
    for name in spec.targets:
        ins, outs, _, _ = _split(BY_NAME[name], cfg)
        out[name] = {"a": (cfg.num_hidden_layers, *ins, spec.rank), "b": (cfg.num_hidden_layers, spec.rank, *outs)}
    return out


def adapter_axes(cfg: ModelConfig, spec: LoraSpec) -> dict[str, dict[str, tuple[str, ...]]]:
    out = {}
    for name in spec.targets:
        _, _, in_axes, out_axes = _split(BY_NAME[name], cfg)
        out[name] = {"a": ("layers", *in_axes, RANK_AXIS), "b": ("layers", RANK_AXIS, *out_axes)}
    return out


def abstract_adapters(cfg: ModelConfig, spec: LoraSpec, mesh, rules=None) -> dict[str, dict[str, Any]]:
    """The adapters as fp32 ShapeDtypeStructs placed by the rules table (what init, restore and plan target)."""
    return jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(s, jnp.float32, sharding=named_sharding(a, s, mesh, rules)),
                        adapter_shapes(cfg, spec), adapter_axes(cfg, spec), is_leaf=lambda x: isinstance(x, tuple))


def init_adapters(cfg: ModelConfig, spec: LoraSpec, key: jax.Array, dtype=jnp.float32) -> dict[str, dict[str, Any]]:
    """Fresh adapters: B = 0; A as PEFT's default (kaiming_uniform_(a=sqrt 5) on its [r, in] weight,
    i.e. U(-1/sqrt(in), 1/sqrt(in))) or, with init "gaussian", N(0, 1/r)."""
    out = {}
    for i, (name, shapes) in enumerate(adapter_shapes(cfg, spec).items()):
        a_shape = shapes["a"]
        k = jax.random.fold_in(key, i)
        if spec.init == "gaussian":
            a = jax.random.normal(k, a_shape, dtype) / spec.rank
        else:
            bound = 1.0 / math.sqrt(math.prod(a_shape[1:-1]))
            a = jax.random.uniform(k, a_shape, dtype, -bound, bound)
        out[name] = {"a": a, "b": jnp.zeros(shapes["b"], dtype)}
    return out


class LoraInputs(NamedTuple):
    """What the layer needs to apply adapters: the stacked adapters, the scale, and for training with
    dropout one PRNG key per layer ([L] keys; None = no dropout, as at evaluation)."""

    adapters: dict[str, dict[str, jax.Array]]
    scale: float
    dropout: float = 0.0
    keys: jax.Array | None = None


def delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * x A B for one layer: x [..., in...] contracts its last a.ndim - 1 axes with A [in..., r]."""
    return flat_dot(flat_dot(x, a, a.ndim - 1), b) * scale


def dropped(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout on the adapter's input (PEFT's lora_dropout); identity without a key."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def merge(params: dict[str, Any], adapters: dict[str, dict[str, jax.Array]], scale: float) -> dict[str, Any]:
    """The base parameter tree with W + scale * A B folded into each target (computed in fp32, stored
    in W's dtype): the model the adapters stand for, with nothing left to apply."""
    layers = dict(params["layers"])
    for name, ab in adapters.items():
        w = layers[name]
        update = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(ab["a"].astype(jnp.float32),
                                                                     ab["b"].astype(jnp.float32))
        layers[name] = (w.astype(jnp.float32) + scale * update).astype(w.dtype)
    return {**params, "layers": layers}


class Adapted:
    """A model seen through adapters: `hidden_states` applies them (with dropout when given a key);
    everything else (logits, the output embedding, cfg) is the base model's, untouched by LoRA."""

    def __init__(self, model, adapters: dict, spec: LoraSpec, key: jax.Array | None = None):
        self.model, self.adapters, self.spec, self.key = model, adapters, spec, key

    def hidden_states(self, tokens, positions=None, segment_ids=None, cache=None, branch_ids=None):
        keys = None
        if self.key is not None and self.spec.dropout > 0:
            keys = jax.random.split(self.key, self.model.cfg.num_hidden_layers)
        lora = LoraInputs(self.adapters, self.spec.scale, self.spec.dropout, keys)
        return self.model.hidden_states(tokens, positions, segment_ids, cache, lora=lora, branch_ids=branch_ids)

    def __call__(self, tokens, positions=None, segment_ids=None):
        return self.model.logits(self.hidden_states(tokens, positions, segment_ids)[0])

    def __getattr__(self, name):
        return getattr(self.model, name)
