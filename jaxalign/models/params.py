"""The one parameter table: every weight of the decoder, its shape, logical axes, initialiser, whether
weight decay applies, and the HF tensor it is stored as. The model, the HF reader and writer and the
optimizer's decay mask all read it, so a new weight is one row here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from jaxalign.models.config import ModelConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Param:
    """One weight. Layer weights (path ("layers", name)) are stacked on a leading [L] axis.

    `groups` says how the (per-layer) axes merge into the HF tensor's axes, in our axis order: wq
    [E, H, D] with groups (1, 2) is [E, H*D]. `transpose` then reverses those merged axes, because HF
    stores a linear layer as [out_features, in_features] and we store [in, out].
    """

    path: tuple[str, ...]  # in the pure-dict state, e.g. ("layers", "wq")
    shape: Callable[[ModelConfig], Shape]  # per layer for a stacked weight
    axes: tuple[str, ...]  # logical names of the per-layer shape
    init: str  # "normal" (initializer_range), "ones" or "zeros"
    decay: bool  # weight decay applies (norm scales and biases: only with decay_norms_and_biases)
    hf: str  # HF tensor name; "{i}" stands for the layer index of a stacked weight
    groups: tuple[int, ...]
    transpose: bool = False
    present: Callable[[ModelConfig], bool] = lambda cfg: True

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"

    def full_shape(self, cfg: ModelConfig) -> Shape:
        return ((cfg.num_hidden_layers,) if self.stacked else ()) + self.shape(cfg)

    def full_axes(self) -> tuple[str, ...]:
        return (("layers",) if self.stacked else ()) + self.axes

    def hf_names(self, cfg: ModelConfig) -> list[str]:
        return [self.hf.format(i=i) for i in range(cfg.num_hidden_layers)] if self.stacked else [self.hf]

    def hf_shape(self, shape: Shape) -> Shape:
        """The HF tensor shape for one (per-layer) weight of our `shape`."""
        merged = _merge(shape, self.groups)
        return merged[::-1] if self.transpose else merged

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        merged = x.reshape(_merge(x.shape, self.groups))
        return np.ascontiguousarray(merged.T if self.transpose else merged)

    def from_hf(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return (x.T if self.transpose else x).reshape(shape)


def _merge(shape: Shape, groups: tuple[int, ...]) -> Shape:
    bounds = np.cumsum((0,) + groups)
    return tuple(math.prod(shape[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


def _attn(heads: str) -> Callable[[ModelConfig], Shape]:
    return lambda c: (c.hidden_size, getattr(c, heads), c.head_dim)


def _bias(heads: str) -> Callable[[ModelConfig], Shape]:
    return lambda c: (getattr(c, heads), c.head_dim)


_L = "model.layers.{i}."
_qkv_bias = lambda c: c.qkv_bias  # noqa: E731
# In HF checkpoint order.
PARAMS: tuple[Param, ...] = (
    Param(("embed",), lambda c: (c.vocab_size, c.hidden_size), ("vocab", "embed"), "normal", True,
          "model.embed_tokens.weight", (1, 1)),
    Param(("layers", "attn_norm"), lambda c: (c.hidden_size,), ("norm",), "ones", False,
          _L + "input_layernorm.weight", (1,)),
    Param(("layers", "wq"), _attn("num_attention_heads"), ("embed", "heads", "head_dim"), "normal", True,
          _L + "self_attn.q_proj.weight", (1, 2), True),
    Param(("layers", "wk"), _attn("num_key_value_heads"), ("embed", "kv_heads", "head_dim"), "normal", True,
          _L + "self_attn.k_proj.weight", (1, 2), True),
    Param(("layers", "wv"), _attn("num_key_value_heads"), ("embed", "kv_heads", "head_dim"), "normal", True,
          _L + "self_attn.v_proj.weight", (1, 2), True),
    Param(("layers", "bq"), _bias("num_attention_heads"), ("heads", "head_dim"), "zeros", False,
          _L + "self_attn.q_proj.bias", (2,), present=_qkv_bias),
    Param(("layers", "bk"), _bias("num_key_value_heads"), ("kv_heads", "head_dim"), "zeros", False,
          _L + "self_attn.k_proj.bias", (2,), present=_qkv_bias),
    Param(("layers", "bv"), _bias("num_key_value_heads"), ("kv_heads", "head_dim"), "zeros", False,
          _L + "self_attn.v_proj.bias", (2,), present=_qkv_bias),
    Param(("layers", "wo"), lambda c: (c.num_attention_heads, c.head_dim, c.hidden_size),
          ("heads", "head_dim", "embed"), "normal", True, _L + "self_attn.o_proj.weight", (2, 1), True),
    Param(("layers", "bo"), lambda c: (c.hidden_size,), ("norm",), "zeros", False,
          _L + "self_attn.o_proj.bias", (1,), present=lambda c: c.o_bias),
    Param(("layers", "mlp_norm"), lambda c: (c.hidden_size,), ("norm",), "ones", False,
          _L + "post_attention_layernorm.weight", (1,)),
    Param(("layers", "w_gate"), lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal", True,
          _L + "mlp.gate_proj.weight", (1, 1), True),
    Param(("layers", "w_up"), lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal", True,
          _L + "mlp.up_proj.weight", (1, 1), True),
    Param(("layers", "w_down"), lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed"), "normal", True,
          _L + "mlp.down_proj.weight", (1, 1), True),
    Param(("final_norm",), lambda c: (c.hidden_size,), ("norm",), "ones", False, "model.norm.weight", (1,)),
    # Absent when tied (the output projection is then embed.T) and in a reward model.
    Param(("lm_head",), lambda c: (c.hidden_size, c.vocab_size), ("embed", "vocab"), "normal", True,
          "lm_head.weight", (1, 1), True, present=lambda c: not c.tie_word_embeddings and not c.num_labels),
    # A reward model's scalar head (HF *ForSequenceClassification's `score`, [num_labels, hidden]).
    Param(("score",), lambda c: (c.hidden_size, c.num_labels), ("embed", "labels"), "normal", True,
          "score.weight", (1, 1), True, present=lambda c: c.num_labels > 0),
)

# Every weight by name (a weight's name is unique across the model).
BY_NAME = {p.name: p for p in PARAMS}

# Names of the weights weight decay skips by default (a weight's name is unique across the model).
NO_DECAY = frozenset(p.name for p in PARAMS if not p.decay)


def params_of(cfg: ModelConfig) -> list[Param]:
    """The weights a model with config `cfg` has, in HF checkpoint order."""
    return [p for p in PARAMS if p.present(cfg)]


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], Shape]:
    """Full parameter shapes (stacked [L, ...] for layer weights), by pure-dict path."""
    return {p.path: p.full_shape(cfg) for p in params_of(cfg)}
