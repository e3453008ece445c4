"""Per-device memory of a train step, by formula (see `jaxalign.plan`), and the accelerator table."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import ModelConfig
from jaxalign.models.logprobs import resolve_chunk
from jaxalign.run.build import accumulation_steps
from jaxalign.runtime import sharding as sharding_lib

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


def shard_bytes(tree, mesh) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        spec = leaf.sharding.spec
        shape = list(leaf.shape)
        for dim, entry in enumerate(spec):
            shape[dim] = -(-shape[dim] // math.prod(mesh.shape[a] for a in sharding_lib.axes_tuple(entry)))
        total += math.prod(shape) * dtype_bits(leaf.dtype) // 8
    return total


def dtype_bits(dtype) -> int:
    """Bits per element as XLA stores it (int4/uint4 are packed two to a byte)."""
    for info in (jnp.iinfo, jnp.finfo):
        try:
            return info(dtype).bits
        except ValueError:
            pass
    return np.dtype(dtype).itemsize * 8


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def fused_attention(cfg, accelerator: Accelerator) -> bool:
    """True when attention runs as a fused kernel that keeps no T x T scores (cuDNN on GPU, splash on TPU)."""
    impl = cfg.model.attention
    return impl in ("cudnn", "splash") or (impl == "auto" and accelerator.platform in ("cuda", "tpu"))


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


def estimate_memory(cfg, step, accelerator: Accelerator) -> dict[str, float]:
    mesh, rules, mc = step.mesh, step.rules, step.model_cfg
    trained = shard_bytes(step.state.params, mesh)  # the model, or LoRA's adapters
    frozen = shard_bytes(step.frozen, mesh) if step.frozen is not None else 0
    lora = cfg.lora.enabled
    accum_steps = accumulation_steps(cfg)
    rows = step.batch["tokens"].shape[0]
    length = step.batch["tokens"].shape[1]
    dp = sharding_lib.logical_axis_size("batch", rows, mesh, rules)
    micro_rows_per_device = max(rows // accum_steps // dp, 1)
    a = _dtype_bytes(cfg.model.dtype)
    t_heads = sharding_lib.logical_axis_size("act_heads", mc.num_attention_heads, mesh, rules)
    t_kv = sharding_lib.logical_axis_size("act_kv_heads", mc.num_key_value_heads, mesh, rules)
    t_mlp = sharding_lib.logical_axis_size("act_mlp", mc.intermediate_size, mesh, rules)
    t_vocab = sharding_lib.logical_axis_size("act_vocab", mc.vocab_size, mesh, rules)
    acts = activation_bytes(mc, cfg.model.remat, micro_rows_per_device, length, a, t_heads, t_kv, t_mlp,
                            fused_attention(cfg, accelerator))
    chunk = resolve_chunk(cfg.model.logits_chunk_size, mc.vocab_size)
    head_positions = min(chunk, length) if chunk > 0 else length
    logits = 3 * 4 * micro_rows_per_device * head_positions * mc.vocab_size / t_vocab
    memory = {
        # LoRA: the frozen base plus the adapters; its reference is that base (adapters off), no copy.
        "params": trained + (frozen if lora else 0),
        "reference": 0 if lora else frozen,
        "grads": trained,
        "accum": trained if accum_steps > 1 else 0,
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
