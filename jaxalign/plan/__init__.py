"""`jaxalign plan`: will this config fit, and how long will a step take, before any accelerator is rented.

    jaxalign plan --config configs/real/llama3.1-8b-dpo.yaml --accelerator v5p
    jaxalign plan --config configs/real/llama3.1-8b-dpo.yaml --accelerator h100 --mesh fsdp=8

The train step of the config is built exactly as `jaxalign train` builds it (same model, objective,
optimizer, shardings) from abstract shapes, so no weights are read or allocated:

* when the mesh fits on this machine's devices and the accelerator is this machine's kind (e.g. `cpu`),
  the step is compiled on them and XLA's own `memory_analysis()` is printed beside the estimate;
* otherwise it is lowered for the accelerator's platform on a `jax.sharding.AbstractMesh` of the asked
  size (any size: no devices are needed), which checks that every sharding is valid, and the memory
  is the estimate below.

Per-device memory estimate (bytes; b = rows per device per micro-batch, T = sequence length,
a = bytes of the activation dtype, E hidden, H heads, K kv heads, D head dim, M intermediate, V vocab,
L layers, t = tensor-parallel size):

* parameters, gradients, optimizer state, reference parameters: exact, from each array's shape,
  dtype and sharding on the mesh (gradients: one more copy of the parameters; gradient accumulation
  adds one more for the running sum; AdamW keeps mu and nu in the parameter dtype);
* activations kept for the backward pass, per layer, by remat policy (elements per row-token):
    none:    a*(4E + (2H+2K)D/t + 4M/t) + (H/t)*T*(4+a)     (x, norms, q k v, attn out, MLP, probs)
    minimal: a*(3E + (H+2K)D/t + 2M/t)                       (projection outputs only)
    dots:    a*(3E + (2H+2K)D/t + 2M/t) + 4*(H/t)*T          (every matmul output, scores included)
    full:    a*E                                             (the layer input only)
  times L*b*T; the (H/t)*T terms (the T x T attention scores) vanish with a fused attention kernel
  (cuDNN on GPU). Plus the working set of the one layer being recomputed / differentiated
  (the "none" amount for one layer) and the LM head: 3 fp32 [b, T or chunk, V/t] buffers (logits,
  softmax, their gradient);
* DPO with `dpo.reference: model` adds the frozen reference's parameters; its forward pass keeps
  nothing for backward (one layer's working set, already counted);
* peak = the sum. Checked against XLA's memory analysis of a compiled tiny model (tests/test_plan.py).

FLOPs per optimizer step (model FLOPs, the numerator of MFU; N = parameters in matmuls, i.e. all
but the input embedding unless it is tied to the LM head; tokens = rows x T, padding included):
    policy forward + backward    6 * N * tokens
    attention (QK^T and PV)      12 * L * H * D * T * tokens     (the whole T x T, as the kernel computes)
    DPO reference forward        2 * N * tokens + 4 * L * H * D * T * tokens   (dpo.reference: model)
Remat recomputation (one more forward with remat full) is hardware work, not model FLOPs.
Predicted step time = FLOPs / (devices x peak bf16 FLOP/s x MFU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, abstract_model
from jaxalign.runtime import sharding as sharding_lib
from jaxalign.runtime.sharding import MESH_AXES, merged_rules, resolve_mesh_shape
from jaxalign.train.step import batch_shardings

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per device (a TPU chip, a GPU)
    hbm_bytes: float  # per device
    platform: str  # what the step is lowered for
    note: str


# Datasheet numbers (Cloud TPU system architecture pages; NVIDIA H100/H200/A100 datasheets, SXM,
# dense, no sparsity). A TPU "device" is a chip: v5p-64 = 64 TensorCores = 32 chips (2 cores per chip,
# one JAX device each); v5e-8 and v6e-256 count chips.
ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("v5p", 459e12, 95 * GiB, "tpu", "TPU v5p chip: 459 TFLOP/s bf16, 95 GB HBM2e"),
    Accelerator("v5e", 197e12, 16 * GiB, "tpu", "TPU v5e chip: 197 TFLOP/s bf16, 16 GB HBM2"),
    Accelerator("v6e", 918e12, 32 * GiB, "tpu", "TPU v6e (Trillium) chip: 918 TFLOP/s bf16, 32 GB HBM"),
    Accelerator("h100", 989e12, 80 * GiB, "cuda", "H100 SXM: 989 TFLOP/s bf16 dense, 80 GB HBM3"),
    Accelerator("h200", 989e12, 141 * GiB, "cuda", "H200 SXM: 989 TFLOP/s bf16 dense, 141 GB HBM3e"),
    Accelerator("a100", 312e12, 80 * GiB, "cuda", "A100 SXM 80GB: 312 TFLOP/s bf16 dense, 80 GB HBM2e"),
    Accelerator("cpu", 1e11, 8 * GiB, "cpu", "nominal: 0.1 TFLOP/s and 8 GiB per virtual device"),
)}
# Share of HBM a program can use (the runtime and XLA keep some; on GPU see XLA_PYTHON_CLIENT_MEM_FRACTION).
USABLE_FRACTION = 0.9


# ----------------------------------------------------------------------------- the step, abstractly


@contextlib.contextmanager
def abstract_mesh_context(mesh: AbstractMesh, rules: Mapping[str, Any]):
    """`sharding.use_mesh` for an AbstractMesh: logical-name constraints resolve against it."""
    token = sharding_lib._active_rules.set(rules)
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            yield mesh
    finally:
        sharding_lib._active_rules.reset(token)


def mesh_context(mesh, rules):
    if isinstance(mesh, AbstractMesh):
        return abstract_mesh_context(mesh, rules)
    return sharding_lib.use_mesh(mesh, rules)


def abstract_mesh(sizes: Mapping[str, int], num_devices: int) -> AbstractMesh:
    shape = resolve_mesh_shape(sizes, num_devices)
    return AbstractMesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def model_config_of(cfg) -> ModelConfig:
    """The architecture from `model.config` (no file read), else the config.json at `model.path`."""
    if cfg.model.config:
        return ModelConfig.from_hf_dict(dict(cfg.model.config), source="model.config")
    path = cfg.dpo.init_from if cfg.stage == "dpo" and cfg.dpo.init_from else cfg.model.path
    if not path:
        raise JaxalignError("set model.config (an inline HF architecture) or model.path to plan a run")
    from jaxalign.checkpoint import model_io

    return model_io.load_model_config(path)


def _spec_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _with_sharding(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _opt_state_shardings(opt_abstract, params_abstract, mesh):
    """Optimizer state leaves shaped like the parameter tree (Adam's mu, nu) take the parameters'
    shardings, as `jit(optimizer.init)(params)` gives them; the rest (counts) are replicated."""
    p_def = jax.tree.structure(params_abstract)
    p_shard = jax.tree.map(lambda a: a.sharding, params_abstract)
    replicated = NamedSharding(mesh, PartitionSpec())

    def is_param_tree(x):
        return not isinstance(x, jax.ShapeDtypeStruct) and jax.tree.structure(x) == p_def

    return jax.tree.map(lambda x: p_shard if is_param_tree(x) else replicated, opt_abstract, is_leaf=is_param_tree)


def batch_shapes(cfg) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The train step's batch: name -> (shape, dtype) at data.max_length (the largest bucket)."""
    rows = cfg.train.batch_size * (2 if cfg.stage == "dpo" else 1)
    length = cfg.data.max_length
    shapes = {k: ((rows, length), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    shapes["loss_mask"] = ((rows, length), np.bool_)
    if cfg.stage == "dpo" and cfg.dpo.reference == "precomputed":
        shapes["ref_logps"] = ((rows,), np.float32)
    return shapes


@dataclasses.dataclass
class AbstractStep:
    """The jitted train step and abstract arguments (ShapeDtypeStructs with shardings)."""

    jitted: Any
    state: Any
    batch: dict[str, jax.ShapeDtypeStruct]
    ref_params: Any
    model_cfg: ModelConfig
    mesh: Any
    rules: dict[str, Any]

    def trace(self):
        with mesh_context(self.mesh, self.rules):
            return self.jitted.trace(self.state, self.batch, self.ref_params)

    def lower(self, platform: str | None = None):
        """Lowered for `platform` ('tpu', 'cuda', 'cpu'); None = the local backend."""
        traced = self.trace()
        with mesh_context(self.mesh, self.rules):
            return traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()


def build_abstract_step(cfg, mesh, total_steps: int = 1000) -> AbstractStep:
    """`jaxalign train`'s step for `cfg` on `mesh` (a Mesh or an AbstractMesh), with no memory allocated."""
    from jaxalign.run.loop import model_options, objective_from_config
    from jaxalign.train.optimizer import build_optimizer
    from jaxalign.train.step import TrainState, jit_train_step, make_train_step

    rules = merged_rules(dict(cfg.mesh.rules))
    model_cfg = model_config_of(cfg)
    with mesh_context(mesh, rules):
        graphdef, state, shardings = abstract_model(model_cfg, mesh, rules, **model_options(cfg))
        params = _with_sharding(nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
        optimizer, schedule = build_optimizer(cfg.optimizer, total_steps)
        opt = jax.eval_shape(optimizer.init, params)
        opt = _with_sharding(opt, _opt_state_shardings(opt, params, mesh))
        replicated = NamedSharding(mesh, PartitionSpec())
        train_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                                 opt_state=opt)
        shapes = batch_shapes(cfg)
        rows = shapes["tokens"][0][0]
        dp = math.prod(mesh.shape[a] for a in MESH_AXES if a in _spec_axes(
            sharding_lib.logical_to_spec(("batch",), None, mesh, rules)[0]))
        accum = cfg.train.batch_size // cfg.train.micro_batch_size if cfg.train.micro_batch_size else 1
        if (rows // accum) % dp:
            unit = "pairs (2 rows each)" if cfg.stage == "dpo" else "rows"
            raise JaxalignError(
                f"train.batch_size={cfg.train.batch_size} {unit}"
                + (f" in micro-batches of {cfg.train.micro_batch_size}" if accum > 1 else "")
                + f" cannot be split over the {dp} data-parallel devices of mesh {dict(mesh.shape)}: "
                f"use a multiple of {dp // math.gcd(dp, 2) if cfg.stage == 'dpo' else dp} per micro-batch")
        shards = batch_shardings({k: s for k, (s, _) in shapes.items()}, mesh)
        batch = {k: jax.ShapeDtypeStruct(s, d, sharding=shards[k]) for k, (s, d) in shapes.items()}
        ref = params if cfg.stage == "dpo" and cfg.dpo.reference == "model" else None
        step = make_train_step(graphdef, objective_from_config(cfg), optimizer, schedule, accum)
        jitted = jit_train_step(step, jax.tree.map(lambda x: x.sharding, train_state), shards,
                                None if ref is None else jax.tree.map(lambda x: x.sharding, ref))
    return AbstractStep(jitted, train_state, batch, ref, model_cfg, mesh, rules)


# ----------------------------------------------------------------------------- the estimate


def shard_bytes(tree, mesh) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        spec = leaf.sharding.spec
        shape = list(leaf.shape)
        for dim, axes in enumerate(spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            shape[dim] = -(-shape[dim] // math.prod(mesh.shape[a] for a in axes))
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def _axis_size(mesh, rules, logical: str, dim: int) -> int:
    spec = sharding_lib.logical_to_spec((logical,), (dim,), mesh, rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


def fused_attention(cfg, accelerator: Accelerator) -> bool:
    """True when attention runs as a fused kernel that keeps no T x T scores (cuDNN on GPU)."""
    impl = cfg.model.attention
    return impl == "cudnn" or (impl == "auto" and accelerator.platform == "cuda")


def activation_bytes(mc: ModelConfig, remat: str, rows: int, length: int, a: int, t_heads: int, t_kv: int,
                     t_mlp: int, fused: bool) -> dict[str, float]:
    """Saved activations of all layers and the working set of one layer, for `rows` rows per device."""
    E, H, K, D, M, T, L = (mc.hidden_size, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim,
                           mc.intermediate_size, length, mc.num_hidden_layers)
    hq, hk, m = H / t_heads, K / t_kv, M / t_mlp
    scores = 0.0 if fused else hq * T
    per_token = {
        "none": a * (4 * E + (2 * hq + 2 * hk) * D + 4 * m) + scores * (4 + a),
        "minimal": a * (3 * E + (hq + 2 * hk) * D + 2 * m),
        "dots": a * (3 * E + (2 * hq + 2 * hk) * D + 2 * m) + 4 * scores,
        "full": a * E,
    }
    saved = per_token[remat] * L * rows * T
    working = per_token["none"] * rows * T
    return {"saved": saved, "layer": working}


@dataclasses.dataclass
class Plan:
    config_path: str
    accelerator: Accelerator
    mesh_shape: dict[str, int]
    model_cfg: ModelConfig
    stage: str
    reference: str | None
    rows: int
    micro_rows: int
    length: int
    remat: str
    chunk: int
    memory: dict[str, float]  # per device, bytes
    flops: dict[str, float]
    mfu: float
    lowered_seconds: float | None = None
    compiled: dict[str, float] | None = None  # XLA memory analysis (bytes), when compiled locally
    suggestions: list[str] = dataclasses.field(default_factory=list)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh_shape.values())

    @property
    def peak(self) -> float:
        return self.memory["peak"]

    @property
    def usable(self) -> float:
        return self.accelerator.hbm_bytes * USABLE_FRACTION

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    @property
    def step_seconds(self) -> float:
        return self.flops["total"] / (self.devices * self.accelerator.peak_flops * self.mfu)

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    def report(self) -> str:
        mc, acc = self.model_cfg, self.accelerator
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        n_mm = matmul_params(mc)
        lines = [
            f"jaxalign plan: {self.config_path} on {self.devices} x {acc.name} ({acc.note})",
            f"mesh         {mesh}",
            f"model        {mc.model_type}: {_count(mc.num_params)} parameters ({_count(n_mm)} in matmuls), "
            f"{mc.num_hidden_layers} layers, hidden {mc.hidden_size}, heads {mc.num_attention_heads}/"
            f"{mc.num_key_value_heads} kv, vocab {mc.vocab_size}",
            f"stage        {self.stage}" + (f" (reference: {self.reference})" if self.reference else "")
            + f"; {self.rows} rows x {self.length} tokens = {self.tokens:,} tokens per step; "
            + (f"micro-batch {self.micro_rows} rows; " if self.micro_rows != self.rows else "")
            + f"remat {self.remat}; logits chunk {self.chunk or 'off'}",
            "",
            "per-device memory (estimate)                  GiB",
        ]
        labels = [("params", "parameters"), ("reference", "reference parameters (frozen)"),
                  ("grads", "gradients"), ("accum", "gradient accumulator"), ("opt_state", "optimizer state"),
                  ("activations", f"activations (remat {self.remat}, all layers)"),
                  ("layer", "one layer's working set"), ("logits", "LM head (logits, softmax, grad)")]
        for key, label in labels:
            if self.memory.get(key):
                lines.append(f"  {label:<42} {self.memory[key] / GiB:8.2f}")
        lines.append(f"  {'peak':<42} {self.peak / GiB:8.2f}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {'usable HBM (' + f'{USABLE_FRACTION:.0%} of {acc.hbm_bytes / GiB:.0f})':<42} "
                     f"{self.usable / GiB:8.2f}   -> {verdict}")
        if self.compiled:
            c = self.compiled
            lines.append(f"  XLA memory analysis (compiled here): arguments {c['argument'] / GiB:.3f}, outputs "
                         f"{c['output'] / GiB:.3f}, aliased {c['alias'] / GiB:.3f}, temporaries {c['temp'] / GiB:.3f}"
                         f" -> peak {c['peak'] / GiB:.3f} GiB")
        f = self.flops
        lines += ["", "FLOPs per step (model FLOPs)"]
        rows = [("policy fwd+bwd", f"6 * N * tokens = 6 * {n_mm:.3g} * {self.tokens:,}", f["policy"]),
                ("attention", "12 * L * H * D * T * tokens", f["attention"])]
        if f.get("reference"):
            rows.append(("reference fwd", "(2 * N + 4 * L * H * D * T) * tokens", f["reference"]))
        rows.append(("total", "", f["total"]))
        lines += [f"  {label:<16} {formula:<40} {value:10.3e}" for label, formula, value in rows]
        lines.append(f"predicted step time at {self.mfu:.0%} MFU: {self.step_seconds:.3g} s "
                     f"({self.tokens / self.step_seconds:,.0f} tokens/s, "
                     f"{self.tokens / self.step_seconds / self.devices:,.0f} per device)")
        if self.lowered_seconds is not None:
            where = "compiled on local devices" if self.compiled else f"lowered for {acc.platform} on an abstract mesh"
            lines.append(f"train step {where} in {self.lowered_seconds:.1f} s: shardings valid")
        if self.suggestions:
            lines += ["", "to make it fit:" if not self.fits else "suggestions:"]
            lines += [f"  {s}" for s in self.suggestions]
        return "\n".join(lines)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def matmul_params(mc: ModelConfig) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a lookup) unless it is tied."""
    return mc.num_params if mc.tie_word_embeddings else mc.num_params - mc.vocab_size * mc.hidden_size


def step_flops(mc: ModelConfig, tokens: int, length: int, stage: str, reference: str | None) -> dict[str, float]:
    n = matmul_params(mc)
    attn_fwd = 4 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * length * tokens
    out = {"policy": 6.0 * n * tokens, "attention": 3.0 * attn_fwd}
    if stage == "dpo" and reference == "model":
        out["reference"] = 2.0 * n * tokens + attn_fwd
    out["total"] = sum(out.values())
    return out


def estimate_memory(cfg, step: AbstractStep, accelerator: Accelerator) -> dict[str, float]:
    mesh, rules, mc = step.mesh, step.rules, step.model_cfg
    params = shard_bytes(step.state.params, mesh)
    accum_steps = cfg.train.batch_size // cfg.train.micro_batch_size if cfg.train.micro_batch_size else 1
    rows = step.batch["tokens"].shape[0]
    length = step.batch["tokens"].shape[1]
    dp = _axis_size(mesh, rules, "batch", rows)
    micro_rows_per_device = max(rows // accum_steps // dp, 1)
    a = _dtype_bytes(cfg.model.dtype)
    t_heads = _axis_size(mesh, rules, "act_heads", mc.num_attention_heads)
    t_kv = _axis_size(mesh, rules, "act_kv_heads", mc.num_key_value_heads)
    t_mlp = _axis_size(mesh, rules, "act_mlp", mc.intermediate_size)
    t_vocab = _axis_size(mesh, rules, "act_vocab", mc.vocab_size)
    acts = activation_bytes(mc, cfg.model.remat, micro_rows_per_device, length, a, t_heads, t_kv, t_mlp,
                            fused_attention(cfg, accelerator))
    chunk = cfg.model.logits_chunk_size
    head_positions = min(chunk, length) if chunk > 0 else length
    logits = 3 * 4 * micro_rows_per_device * head_positions * mc.vocab_size / t_vocab
    memory = {
        "params": params,
        "reference": shard_bytes(step.ref_params, mesh) if step.ref_params is not None else 0,
        "grads": params,
        "accum": params if accum_steps > 1 else 0,
        "opt_state": shard_bytes(step.state.opt_state, mesh),
        "activations": acts["saved"],
        "layer": acts["layer"],
        "logits": logits,
    }
    memory["peak"] = sum(memory.values())
    return memory


def compiled_memory(compiled) -> dict[str, float] | None:
    """XLA's memory analysis of a compiled step (per device): peak = arguments + outputs - aliased + temporaries."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
           "temp": m.temp_size_in_bytes}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


# ----------------------------------------------------------------------------- planning


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=64,tensor=4' -> {'fsdp': 64, 'tensor': 4} (axes not named keep the config's sizes)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in MESH_AXES:
            raise JaxalignError(f"--mesh {text!r}: expected AXIS=SIZE,... with axes {', '.join(MESH_AXES)}")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise JaxalignError(f"--mesh {text!r}: size of {key.strip()} must be an integer") from None
    return out


def _local_kind() -> str:
    return {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())


def plan(cfg, *, accelerator: str = "cpu", mesh: Mapping[str, int] | None = None, devices: int | None = None,
         mfu: float = 0.4, config_path: str = "", compile_local: bool | None = None,
         suggest: bool = True, lower: bool = True) -> Plan:
    """Build, lower (or compile, when the mesh fits on this machine) and estimate `cfg`'s train step."""
    if accelerator not in ACCELERATORS:
        raise JaxalignError(f"unknown accelerator {accelerator!r}; known: {', '.join(ACCELERATORS)}")
    if not 0 < mfu <= 1:
        raise JaxalignError(f"--mfu must be in (0, 1], got {mfu}")
    acc = ACCELERATORS[accelerator]
    sizes = {k: int(cfg.mesh[k]) for k in MESH_AXES}
    sizes.update(mesh or {})
    if devices is None:
        if -1 in sizes.values():
            if acc.platform != _local_kind():
                raise JaxalignError(f"mesh {sizes} has a -1 axis: pass --devices N (the slice's device count) "
                                    "or give every axis a size with --mesh")
            devices = jax.device_count()
        else:
            devices = math.prod(sizes.values())
    shape = dict(zip(MESH_AXES, resolve_mesh_shape(sizes, devices)))
    if shape != {k: cfg.mesh[k] for k in MESH_AXES}:  # the plan's mesh becomes the config's (for suggestions)
        from jaxalign.config import apply_overrides

        cfg = apply_overrides(cfg, [f"mesh.{k}={v}" for k, v in shape.items()])
    local = acc.platform == _local_kind() and devices <= jax.device_count()
    if compile_local is not None:
        local = local and compile_local
    if local:
        mesh_obj = Mesh(np.asarray(jax.devices()[:devices]).reshape(tuple(shape.values())), MESH_AXES,
                        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    else:
        mesh_obj = AbstractMesh(tuple(shape.values()), MESH_AXES,
                                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    t0 = time.perf_counter()
    step = build_abstract_step(cfg, mesh_obj)
    compiled, seconds = None, None
    if local and lower:
        compiled = compiled_memory(step.lower().compile())
    elif lower:
        step.lower(acc.platform)
    if lower:
        seconds = time.perf_counter() - t0
    result = _make_plan(cfg, step, acc, shape, mfu, config_path)
    result.lowered_seconds, result.compiled = seconds, compiled
    if suggest:
        result.suggestions = suggestions(cfg, result, config_path)
    return result


def _make_plan(cfg, step: AbstractStep, acc: Accelerator, shape, mfu: float, config_path: str) -> Plan:
    mc = step.model_cfg
    rows, length = step.batch["tokens"].shape
    accum = cfg.train.batch_size // cfg.train.micro_batch_size if cfg.train.micro_batch_size else 1
    reference = cfg.dpo.reference if cfg.stage == "dpo" else None
    return Plan(config_path=config_path, accelerator=acc, mesh_shape=shape, model_cfg=mc, stage=cfg.stage,
                reference=reference, rows=rows, micro_rows=rows // accum, length=length, remat=cfg.model.remat,
                chunk=cfg.model.logits_chunk_size, memory=estimate_memory(cfg, step, acc),
                flops=step_flops(mc, rows * length, length, cfg.stage, reference), mfu=mfu)


def _shape_of(cfg, devices: int) -> dict[str, int]:
    return dict(zip(MESH_AXES, resolve_mesh_shape({k: int(cfg.mesh[k]) for k in MESH_AXES}, devices)))


def _estimate_only(cfg, acc: Accelerator, shape: dict[str, int]) -> Plan:
    """The estimate for a variant of the config (no lowering: for suggestions)."""
    mesh = AbstractMesh(tuple(shape.values()), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    return _make_plan(cfg, build_abstract_step(cfg, mesh), acc, shape, 0.4, "")


def candidate_changes(cfg, shape: dict[str, int]) -> list[tuple[str, list[str]]]:
    """(description, --set overrides) of single changes that lower per-device memory."""
    out = []
    n = math.prod(shape.values())
    if shape["data"] > 1:
        out.append((f"shard parameters and optimizer state over all {n} devices (data -> fsdp)",
                    ["mesh.data=1", f"mesh.fsdp={shape['fsdp'] * shape['data']}"]))
    if cfg.model.remat != "full":
        out.append(("recompute each layer in the backward pass", ["model.remat=full"]))
    if cfg.model.logits_chunk_size == 0 or cfg.model.logits_chunk_size > 256:
        out.append(("compute the LM head 256 positions at a time", ["model.logits_chunk_size=256"]))
    if cfg.stage == "dpo" and cfg.dpo.reference == "model":
        out.append(("precompute the reference log-probs (no second model in memory)", ["dpo.reference=precomputed"]))
    bs, per_pair = cfg.train.batch_size, 2 if cfg.stage == "dpo" else 1
    micro = cfg.train.micro_batch_size or bs
    dp = shape["data"] * shape["fsdp"]
    smaller = [m for m in range(micro - 1, 0, -1) if bs % m == 0 and (m * per_pair) % dp == 0]
    if smaller:
        unit = ("pair" if per_pair == 2 else "row") + ("s" if smaller[-1] > 1 else "")
        out.append((f"accumulate gradients over micro-batches of {smaller[-1]} {unit}",
                    [f"train.micro_batch_size={smaller[-1]}"]))
    if shape["tensor"] == 1 and shape["fsdp"] % 4 == 0:
        out.append(("tensor parallelism over 4 devices (splits activations too)",
                    [f"mesh.fsdp={shape['fsdp'] // 4}", "mesh.tensor=4"]))
    return out


def _sets(sets: Sequence[str]) -> str:
    return " ".join(f"--set {s}" for s in sets)


def suggestions(cfg, p: Plan, config_path: str = "") -> list[str]:
    """What makes the step fit: single changes by effect, a combination when none alone does, and else
    the smallest number of devices (more fsdp) it fits on."""
    from jaxalign.config import apply_overrides, validate

    if p.fits:
        headroom = p.usable - p.peak
        return [f"{headroom / GiB:.1f} GiB of headroom per device: a larger train.batch_size or "
                "data.max_length may fit"] if headroom > 0.3 * p.usable else []

    def estimate(c):
        return _estimate_only(c, p.accelerator, _shape_of(c, p.devices))

    tried = []
    for desc, sets in candidate_changes(cfg, p.mesh_shape):
        try:
            variant = validate(apply_overrides(cfg, sets))
            tried.append((estimate(variant).peak, desc, sets, variant))
        except JaxalignError:
            continue
    tried.sort(key=lambda t: t[0])
    lines = [f"{_sets(sets)}: {desc} -> peak {peak / GiB:.1f} GiB" + (" (fits)" if peak <= p.usable else "")
             for peak, desc, sets, _ in tried]
    if any(peak <= p.usable for peak, *_ in tried):
        return lines
    # Greedy: add changes in order of effect while each still helps, until it fits.
    combined, sets_all, best = cfg, [], p.peak
    for _, _, sets, _ in tried:
        try:
            trial = validate(apply_overrides(combined, sets))
            peak = estimate(trial).peak
        except JaxalignError:
            continue
        if peak < best:
            combined, sets_all, best = trial, sets_all + sets, peak
        if best <= p.usable:
            lines.append(f"together: {_sets(sets_all)} -> peak {best / GiB:.1f} GiB (fits)")
            return lines
    # More devices: the smallest slice (fsdp doubled) it fits on, as it is and with the changes above.
    found = []
    for variant, extra in ((cfg, []), (combined, sets_all)) if sets_all else ((cfg, []),):
        devices = p.devices
        while devices < 16384:
            devices *= 2
            fsdp = devices // (variant.mesh.data * variant.mesh.tensor)
            try:
                trial = validate(apply_overrides(variant, [f"mesh.fsdp={fsdp}"]))
                est = _estimate_only(trial, p.accelerator, _shape_of(trial, devices))
            except JaxalignError:
                continue
            if est.fits:
                found.append(f"fits on {devices} x {p.accelerator.name} (peak {est.peak / GiB:.1f} GiB): "
                             + _sets([f"mesh.fsdp={fsdp}"] + extra))
                break
    if found:
        lines.append(f"no change above makes it fit on {p.devices} x {p.accelerator.name}; more devices:")
        lines += [f"  {line}" for line in found]
    else:
        lines.append(f"does not fit on up to 16384 x {p.accelerator.name}: use an accelerator with more memory")
    return lines


# ----------------------------------------------------------------------------- CLI


def _run(args: argparse.Namespace) -> int:
    from jaxalign.config import load_stage_config

    cfg = load_stage_config(args.config, args.set)
    result = plan(cfg, accelerator=args.accelerator, mesh=parse_mesh(args.mesh) if args.mesh else None,
                  devices=args.devices, mfu=args.mfu, config_path=args.config)
    print(result.report())
    return 0


def add_cli(subparsers: argparse._SubParsersAction, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    p = subparsers.add_parser(
        "plan", help="per-device memory, FLOPs and step time of a config's train step, before renting hardware",
        description="Build the config's train step from abstract shapes (no weights), lower it for the "
                    "accelerator on a mesh of the asked size (compile it when it fits on this machine's devices), "
                    "and print per-device memory (parameters, optimizer state, activations, peak), FLOPs per "
                    "step, the predicted step time at an MFU, whether it fits in HBM, and what would make it fit. "
                    "The formulas are in jaxalign/plan.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="accelerators (per device):\n" + "\n".join(f"  {a.name:5} {a.note}" for a in ACCELERATORS.values()))
    p.add_argument("--config", required=True, help="the run's YAML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--mesh", default="", help="mesh sizes, e.g. fsdp=32 or data=2,fsdp=16,tensor=2 (default: the "
                                              "config's mesh)")
    p.add_argument("--devices", type=int, default=None,
                   help="total devices (resolves a -1 mesh axis; default: the product of the mesh sizes)")
    p.add_argument("--accelerator", default="cpu", choices=list(ACCELERATORS),
                   help="device kind: peak FLOP/s and HBM from the datasheet table (default cpu)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step time (default 0.4)")
    commands["plan"] = _run


def plan_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxalign")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable] = {}
    add_cli(sub, commands)
    args = parser.parse_args(argv)
    return commands[args.command](args)
