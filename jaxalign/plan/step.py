"""`jaxalign train`'s step for a config, built from abstract shapes: nothing is read or allocated."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign.checkpoint import model_io
from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, abstract_model, attention
from jaxalign.models.lora import abstract_adapters
from jaxalign.models.quant import abstract_quantized
from jaxalign.run.build import (
    accumulation_steps,
    build_train_state,
    initial_model_path,
    lora_spec,
    model_options,
    quant_spec,
    reference_kind,
)
from jaxalign.runtime.sharding import data_parallel_size, merged_rules, use_mesh
from jaxalign.train.step import batch_shardings, jit_train_step


def model_config_of(cfg) -> ModelConfig:
    """The architecture from `model.config` (no file read), else the config.json at `model.path`."""
    if cfg.model.config:
        return ModelConfig.from_hf_dict(dict(cfg.model.config), source="model.config")
    path = initial_model_path(cfg)
    if not path:
        raise JaxalignError("set model.config (an inline HF architecture) or model.path to plan a run")
    return model_io.load_model_config(path)


def batch_shapes(cfg) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The train step's batch: name -> (shape, dtype) at data.max_length (the largest bucket). DPO is
    planned in the padded layout (2 rows per pair), a bound on the shared-prompt one, which computes the
    prompt once (P + C + R + 1 tokens a pair against 2 * (P + max(C, R)))."""
    rows = cfg.train.batch_size * (1 if cfg.stage == "sft" else 2)
    length = cfg.data.max_length
    shapes = {k: ((rows, length), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    shapes["loss_mask"] = ((rows, length), np.bool_)
    if reference_kind(cfg) == "precomputed":
        shapes["ref_logps"] = ((rows,), np.float32)
    if cfg.stage == "kto":
        shapes["label"] = ((rows,), np.float32)
    return shapes


@dataclasses.dataclass
class AbstractStep:
    """The jitted train step and abstract arguments (ShapeDtypeStructs with shardings). `frozen` is the
    step's third argument: the live reference (dpo.reference: model) or LoRA's frozen base, else None."""

    jitted: Any
    state: Any
    batch: dict[str, jax.ShapeDtypeStruct]
    frozen: Any
    model_cfg: ModelConfig
    mesh: Any
    rules: dict[str, Any]

    def trace(self, platform: str | None = None):
        """Traced for `platform` (attention picks its kernel for it: splash for 'tpu'); None = the local backend."""
        with use_mesh(self.mesh, self.rules), attention.target_platform(platform):
            return self.jitted.trace(self.state, self.batch, self.frozen)

    def lower(self, platform: str | None = None):
        """Lowered for `platform` ('tpu', 'cuda', 'cpu'); None = the local backend."""
        traced = self.trace(platform)
        with use_mesh(self.mesh, self.rules):
            return traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()


def build_abstract_step(cfg, mesh, total_steps: int = 1000) -> AbstractStep:
    """`jaxalign train`'s step for `cfg` on `mesh` (a Mesh or an AbstractMesh), with no memory allocated:
    the same builders as the trainer's (run.build), fed abstract parameters."""
    rules = merged_rules(dict(cfg.mesh.rules))
    model_cfg = model_config_of(cfg)
    with use_mesh(mesh, rules):
        graphdef, state, shardings = abstract_model(model_cfg, mesh, rules, **model_options(cfg))
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
        spec = lora_spec(cfg)
        trained = params if spec is None else abstract_adapters(model_cfg, spec, mesh, rules)
        train_state, state_shardings, step = build_train_state(cfg, mesh, graphdef, trained, total_steps)
        shapes = batch_shapes(cfg)
        rows, dp, accum = shapes["tokens"][0][0], data_parallel_size(mesh, rules), accumulation_steps(cfg)
        if (rows // accum) % dp:
            unit = "rows" if cfg.stage == "sft" else "pairs (2 rows each)"
            raise JaxalignError(
                f"train.batch_size={cfg.train.batch_size} {unit}"
                + (f" in micro-batches of {cfg.train.micro_batch_size}" if accum > 1 else "")
                + f" cannot be split over the {dp} data-parallel devices of mesh {dict(mesh.shape)}: "
                f"use a multiple of {dp // math.gcd(dp, 2) if cfg.stage != 'sft' else dp} per micro-batch")
        shards = batch_shardings({k: s for k, (s, _) in shapes.items()}, mesh)
        batch = {k: jax.ShapeDtypeStruct(s, d, sharding=shards[k]) for k, (s, d) in shapes.items()}
        frozen = params if spec is not None or reference_kind(cfg) == "model" else None
        if quant_spec(cfg):
            frozen = abstract_quantized(params, model_cfg, quant_spec(cfg), mesh, rules)
        jitted = jit_train_step(step, state_shardings, shards, None if frozen is None else jax.tree.map(
            lambda x: x.sharding, frozen))
    return AbstractStep(jitted, train_state, batch, frozen, model_cfg, mesh, rules)
