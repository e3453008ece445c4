"""LoRA runs and PEFT adapter directories: a base model plus adapters, loaded merged.

A LoRA run's model description (model_io.MODEL_FILE, key "lora") records its adapters (rank, alpha,
targets, ...), how its frozen base was stored (`quantize`: None or models/quant.QuantSpec's fields)
and the base itself by resolved path and fingerprint; its params/ hold the adapters only. Loading
it gives the model the adapters were trained as: the base (quantised and dequantised again under
QLoRA, as the adapters saw it) with W + scale * A B folded in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxalign.checkpoint import model_io
from jaxalign.checkpoint.store import mismatch_message, saved_tensors
from jaxalign.errors import JaxalignError
from jaxalign.models import Decoder, ModelConfig, lora as lora_lib, peft, quant
from jaxalign.models.llama import DTYPES
from jaxalign.runtime import paths
from jaxalign.runtime.paths import Path, PathLike


def lora_description(spec: lora_lib.LoraSpec, base: PathLike, quantize: quant.QuantSpec | None = None,
                     param_dtype: str = "float32") -> dict:
    """What MODEL_FILE records of a LoRA run: the adapters, the base's storage (quantised from weights
    in `param_dtype`), and the base (resolved path + fingerprint)."""
    base = model_io.resolve_model_path(base)
    stored = {**quantize.describe(), "param_dtype": param_dtype} if quantize else None
    return {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets), "dropout": spec.dropout,
            "rslora": spec.rslora, "init": spec.init, "quantize": stored,
            "base": str(paths.absolute(base)), "base_fingerprint": model_fingerprint(base)}


def lora_spec_of(description: Mapping[str, Any]) -> lora_lib.LoraSpec:
    return lora_lib.LoraSpec(rank=description["rank"], alpha=description["alpha"],
                             targets=tuple(description["targets"]), dropout=description["dropout"],
                             rslora=description["rslora"], init=description["init"])


def quant_spec_of(description: Mapping[str, Any]) -> quant.QuantSpec | None:
    q = description.get("quantize")
    return quant.QuantSpec(q["kind"], q["block_size"], q["double"]) if q else None


def model_fingerprint(path: PathLike) -> str:
    """Identity of the weights a model path resolves to, cheap on a large model: every file's name and
    size, and the bytes at its start and end (so retrained weights of the same shapes differ)."""
    path = model_io.resolve_model_path(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path)}:{size}:".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(1 << 16))
            if size > 1 << 17:
                fh.seek(size - (1 << 16))
                digest.update(fh.read())
    return digest.hexdigest()[:16]


def load_merged(path: Path, mesh: Mesh, rules: Mapping[str, Any] | None = None, **options: Any) -> Decoder:
    """A LoRA run (or step) or a PEFT adapter directory as one model with the adapters merged in."""
    if model_io.detect_model_format(path) == "peft":
        with model_io.readable(path):
            spec, adapters, _ = peft.read_peft_dir(path, model_io.load_model_config(path))
        return _merged(model_io.load_model(model_io.peft_base(path), mesh, rules, **options), adapters, spec)
    lora = model_io.lora_meta(path)
    quantize = quant_spec_of(lora)
    # QLoRA: the base quantised from the weights training quantised (its param_dtype), merged in the asked one.
    base_options = {**options, "param_dtype": lora["quantize"]["param_dtype"]} if quantize else options
    base = model_io.load_model(_checked_base(path, lora), mesh, rules, **base_options)
    spec = lora_spec_of(lora)
    return _merged(base, _restore_adapters(path, base.cfg, spec, mesh, rules), spec, quantize, mesh, rules,
                   options.get("param_dtype", "float32"))


def load_adapters(path: PathLike, mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """A LoRA run's (or step's) adapters, not merged: (spec, adapters, base model path)."""
    path = model_io.resolve_model_path(path)
    lora = model_io.lora_meta(path)
    if not lora:
        raise JaxalignError(f"{path} holds full weights, not LoRA adapters (its run did not set lora.enabled)")
    spec = lora_spec_of(lora)
    cfg = model_io.load_model_config(path)
    return spec, _restore_adapters(path, cfg, spec, mesh, rules), _checked_base(path, lora)


def _checked_base(path: Path, lora: Mapping[str, Any]) -> str:
    base = lora["base"]
    if not paths.exists(base):
        raise JaxalignError(f"{path}: its adapters were trained on {base}, which no longer exists")
    if model_fingerprint(base) != lora["base_fingerprint"]:
        raise JaxalignError(f"{path}: its adapters were trained on {base}, whose weights have changed since "
                            f"(fingerprint {model_fingerprint(base)}, recorded {lora['base_fingerprint']})")
    return base


def _restore_adapters(path: Path, cfg: ModelConfig, spec: lora_lib.LoraSpec, mesh: Mesh, rules) -> dict:
    target = lora_lib.abstract_adapters(cfg, spec, mesh, rules)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(paths.absolute(path / model_io.PARAMS_DIR), target)
    except Exception as e:
        raise JaxalignError(mismatch_message(path, saved_tensors(path / model_io.PARAMS_DIR), target, e)
                            + " (LoRA adapters)") from e


def _merged(model: Decoder, adapters, spec: lora_lib.LoraSpec, quantize: quant.QuantSpec | None = None,
            mesh: Mesh | None = None, rules=None, param_dtype: str = "float32") -> Decoder:
    """The base with W + scale * A B folded in, each weight keeping its sharding; under QLoRA W is the
    dequantised base the adapters were trained on, and every weight is cast to `param_dtype`."""
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    shardings = jax.tree.map(lambda x: x.sharding, pure)
    if quantize is not None:
        dtype = DTYPES[param_dtype]
        dense = lambda q: jax.tree.map(lambda x: x.astype(dtype), quant.dequantized(q, dtype))  # noqa: E731
        pure = jax.jit(dense, out_shardings=shardings)(quant.quantize_base(pure, model.cfg, quantize, mesh, rules))
    merged = jax.jit(lora_lib.merge, static_argnums=2, out_shardings=shardings)(pure, adapters, spec.scale)
    nnx.replace_by_pure_dict(state, merged)
    return nnx.merge(graphdef, state)
