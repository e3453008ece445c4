"""PEFT's LoRA adapter directory (adapter_config.json + adapter_model.safetensors) <-> stacked adapters.

PEFT stores one `lora_A.weight` [r, in_features] and `lora_B.weight` [out_features, r] per layer and
module, under the base model's module path prefixed by "base_model.model."; here A is [L, in..., r]
and B [L, r, out...] in the weight's own axis order (models/lora.py), so converting is a reshape and
a transpose per layer, with the flattening order of the HF weight (models/params.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxalign.errors import JaxalignError
from jaxalign.models.config import ModelConfig
from jaxalign.models.lora import BY_NAME, TARGETS, LoraSpec, adapter_shapes, resolve_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def is_peft_dir(path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _key(name: str, layer: int, which: str) -> str:
    return _PREFIX + BY_NAME[name].hf.format(i=layer).replace(".weight", f".lora_{which}.weight")


def to_peft_tensors(adapters: Mapping[str, Mapping[str, Any]], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """PEFT's tensors (float32) of stacked adapters."""
    out = {}
    for name, ab in adapters.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        rank = a.shape[-1]
        for i in range(cfg.num_hidden_layers):
            out[_key(name, i, "A")] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            out[_key(name, i, "B")] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    return out


def from_peft_tensors(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, spec: LoraSpec,
                      source: str = "adapter") -> dict[str, dict[str, np.ndarray]]:
    """Stacked adapters of PEFT's tensors; a missing or mis-shaped tensor is an error naming it."""
    # PEFT files written with an adapter name keep it in the key ("....lora_A.default.weight").
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    out = {}
    for name, shapes in adapter_shapes(cfg, spec).items():
        stacked = {"a": [], "b": []}
        for i in range(cfg.num_hidden_layers):
            for which, ours in (("A", "a"), ("B", "b")):
                key = _key(name, i, which)
                if key not in tensors:
                    raise JaxalignError(f"{source}: no tensor {key} (has {len(tensors)} tensors, e.g. "
                                        f"{', '.join(sorted(tensors)[:3])})")
                t = np.asarray(tensors[key], np.float32).T
                want = shapes[ours][1:]
                if t.size != int(np.prod(want)):
                    raise JaxalignError(f"{source}: {key} has shape {tuple(t.shape[::-1])}, expected "
                                        f"{int(np.prod(want[:-1] if ours == 'a' else want[1:]))} x {spec.rank} "
                                        "features for this model and rank")
                stacked[ours].append(t.reshape(want))
        out[name] = {k: np.stack(v) for k, v in stacked.items()}
    return out


def peft_config(spec: LoraSpec, base_model: str) -> dict[str, Any]:
    """adapter_config.json for these adapters (what `peft.PeftModel.from_pretrained` reads)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
            "target_modules": spec.peft_modules(), "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True if spec.init == "kaiming" else "gaussian", "inference_mode": True,
            "modules_to_save": None, "use_dora": False}


def spec_from_peft_config(config: Mapping[str, Any], source: str = CONFIG_FILE) -> LoraSpec:
    """The LoraSpec of a PEFT adapter config; features this model does not apply are refused by name."""
    if config.get("peft_type", "LORA") != "LORA":
        raise JaxalignError(f"{source}: peft_type {config.get('peft_type')!r}; only LORA adapters are read")
    unsupported = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
                   "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    for key, plain in unsupported.items():
        if config.get(key) is not None and config.get(key) != plain:
            raise JaxalignError(f"{source}: {key}={config[key]!r} is not supported (only {plain!r})")
    modules = config.get("target_modules") or []
    if isinstance(modules, str):  # PEFT allows a regex or "all-linear"
        if modules != "all-linear":
            raise JaxalignError(f"{source}: target_modules as a regex ({modules!r}) is not supported; list the "
                                f"modules ({', '.join(TARGETS)})")
        modules = [modules]
    init = config.get("init_lora_weights", True)
    return LoraSpec(rank=int(config["r"]), alpha=float(config.get("lora_alpha", 8)),
                    targets=resolve_targets(modules, f"{source}: target_modules"),
                    dropout=float(config.get("lora_dropout", 0.0)), rslora=bool(config.get("use_rslora", False)),
                    init="gaussian" if init == "gaussian" else "kaiming")


def read_peft_dir(path, cfg: ModelConfig) -> tuple[LoraSpec, dict[str, dict[str, np.ndarray]], str]:
    """(spec, stacked adapters, base_model_name_or_path) of a PEFT adapter directory."""
    from safetensors.numpy import load_file

    config = json.loads((path / CONFIG_FILE).read_text())
    spec = spec_from_peft_config(config, str(path / CONFIG_FILE))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise JaxalignError(f"{path}: no {WEIGHTS_FILE} beside {CONFIG_FILE}")
    adapters = from_peft_tensors(load_file(str(weights)), cfg, spec, str(weights))
    return spec, adapters, config.get("base_model_name_or_path") or ""


def write_peft_dir(out_dir, adapters, cfg: ModelConfig, spec: LoraSpec, base_model: str) -> None:
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(peft_config(spec, base_model), indent=2) + "\n")
    save_file(to_peft_tensors(adapters, cfg), str(out_dir / WEIGHTS_FILE))
