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

FLOPs per optimizer step: model FLOPs as `jaxalign.models.flops` counts them for the benchmarks and
the training log too (N = the matmul weights; tokens = rows x T, padding included; causal attention
counted once, as MaxText does):
    policy forward + backward    6 * N * tokens
    attention (QK^T and PV)      12 * L * H * D * T * tokens / 2
    DPO reference forward        2 * N * tokens + 4 * L * H * D * T * tokens / 2   (dpo.reference: model)
Predicted step time = FLOPs / (devices x peak bf16 FLOP/s x MFU).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence

import jax

from jaxalign.config import apply_overrides, load_stage_config, validate
from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig
from jaxalign.models.flops import matmul_params, train_step_flops
from jaxalign.models.logprobs import resolve_chunk
from jaxalign.plan.memory import ACCELERATORS, USABLE_FRACTION, Accelerator, GiB, compiled_memory, estimate_memory
from jaxalign.plan.step import AbstractStep, build_abstract_step
from jaxalign.run.build import accumulation_steps, has_reference_forward, initial_model_path, reference_kind
from jaxalign.runtime.sharding import MESH_AXES, abstract_mesh, make_mesh, resolve_mesh_shape

__all__ = ["ACCELERATORS", "GiB", "Plan", "add_cli", "build_abstract_step", "matmul_params", "parse_mesh", "plan"]


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
                ("attention", "12 * L * H * D * T * tokens / 2", f["attention"])]
        if f.get("reference"):
            rows.append(("reference fwd", "(2 * N + 4 * L * H * D * T / 2) * tokens", f["reference"]))
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
        cfg = apply_overrides(cfg, [f"mesh.{k}={v}" for k, v in shape.items()])
    local = acc.platform == _local_kind() and devices <= jax.device_count()
    if compile_local is not None:
        local = local and compile_local
    mesh_obj = make_mesh(shape, jax.devices()[:devices]) if local else abstract_mesh(shape, devices)
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
    accum = accumulation_steps(cfg)
    reference = reference_kind(cfg)
    return Plan(config_path=config_path, accelerator=acc, mesh_shape=shape, model_cfg=mc, stage=cfg.stage,
                reference=reference, rows=rows, micro_rows=rows // accum, length=length, remat=cfg.model.remat,
                chunk=resolve_chunk(cfg.model.logits_chunk_size, mc.vocab_size), memory=estimate_memory(cfg, step, acc),
                flops=train_step_flops(mc, rows, length, live_reference=has_reference_forward(reference)), mfu=mfu)


def _shape_of(cfg, devices: int) -> dict[str, int]:
    return dict(zip(MESH_AXES, resolve_mesh_shape({k: int(cfg.mesh[k]) for k in MESH_AXES}, devices)))


def _estimate_only(cfg, acc: Accelerator, shape: dict[str, int]) -> Plan:
    """The estimate for a variant of the config (no lowering: for suggestions)."""
    return _make_plan(cfg, build_abstract_step(cfg, abstract_mesh(shape, math.prod(shape.values()))), acc, shape, 0.4, "")


def candidate_changes(cfg, shape: dict[str, int], vocab_size: int) -> list[tuple[str, list[str]]]:
    """(description, --set overrides) of single changes that lower per-device memory."""
    out = []
    n = math.prod(shape.values())
    if shape["data"] > 1:
        out.append((f"shard parameters and optimizer state over all {n} devices (data -> fsdp)",
                    ["mesh.data=1", f"mesh.fsdp={shape['fsdp'] * shape['data']}"]))
    if cfg.model.remat != "full":
        out.append(("recompute each layer in the backward pass", ["model.remat=full"]))
    if not 0 < resolve_chunk(cfg.model.logits_chunk_size, vocab_size) <= 256:
        out.append(("compute the LM head 256 positions at a time", ["model.logits_chunk_size=256"]))
    if reference_kind(cfg) == "model":
        out.append(("precompute the reference log-probs (no second model in memory)", ["dpo.reference=precomputed"]))
    if not cfg.lora.enabled and (cfg.model.path or initial_model_path(cfg)):
        out.append(("train LoRA adapters (rank 16) on the frozen model: no gradients or optimizer state for "
                    "the base, and DPO's reference is the base itself",
                    ["lora.enabled=true", "lora.rank=16", "lora.alpha=32"]
                    + (["dpo.reference=auto"] if reference_kind(cfg) == "model" else [])))
    if cfg.lora.enabled and cfg.lora.quantize == "none":
        out.append(("store the frozen base in 4-bit NF4 (QLoRA)", ["lora.quantize=nf4"]))
    bs, per_pair = cfg.train.batch_size, 1 if cfg.stage == "sft" else 2
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

    if p.fits:
        headroom = p.usable - p.peak
        return [f"{headroom / GiB:.1f} GiB of headroom per device: a larger train.batch_size or "
                "data.max_length may fit"] if headroom > 0.3 * p.usable else []

    def estimate(c):
        return _estimate_only(c, p.accelerator, _shape_of(c, p.devices))

    tried = []
    for desc, sets in candidate_changes(cfg, p.mesh_shape, p.model_cfg.vocab_size):
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


def _run(args: argparse.Namespace) -> int:

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
                    "The formulas are in jaxalign/plan/__init__.py.",
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
