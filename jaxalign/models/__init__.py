"""Model construction: every parameter is created directly on its shards, never whole on one device."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxalign.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, load_hf_config
from jaxalign.models.llama import Decoder
from jaxalign.runtime.sharding import state_shardings

__all__ = ["Decoder", "ModelConfig", "SUPPORTED_MODEL_TYPES", "load_hf_config", "abstract_model", "init_model"]


def _constructor(cfg: ModelConfig, seed: int, options: Mapping[str, Any]) -> Callable[[], Decoder]:
    def build() -> Decoder:
        # Placement is ours (jaxalign.runtime.sharding, divisibility-aware), not Flax's eager sharding.
        with nnx.use_eager_sharding(False):
            return Decoder(cfg, rngs=nnx.Rngs(seed), **options)

    return build


def abstract_model(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, Any] | None = None,
                   **options: Any) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, abstract state, shardings) of a model, with no memory allocated.

    `options` are Decoder's keyword options (dtype, param_dtype, remat, attention, scan_layers).
    """
    build = _constructor(cfg, 0, options)
    # jax.eval_shape, not nnx.eval_shape: the latter would resolve sharding names without our rules.
    graphdef, state = jax.eval_shape(lambda: nnx.split(build()))
    return graphdef, state, state_shardings(state, mesh, rules)


def init_model(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, Any] | None = None, seed: int = 0,
               **options: Any) -> Decoder:
    """A randomly initialised model whose parameters are born sharded over `mesh`."""
    graphdef, _, shardings = abstract_model(cfg, mesh, rules, **options)
    build = _constructor(cfg, seed, options)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
