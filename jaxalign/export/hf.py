"""A model as a Hugging Face directory: safetensors shards, config.json, generation_config.json and the
tokenizer (`save_hf`), and the pipeline's export stage (`export_run`). Streams: one HF tensor at a time is gathered to process 0's host and appended to the open
file, so the host never holds the whole model; the tensor layout comes from `models/params.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxalign.checkpoint import model_io
from jaxalign.errors import JaxalignError
from jaxalign.models.config import ModelConfig
from jaxalign.models.hf import _ST_CODES, INDEX_FILE, SINGLE_FILE, dir_listing
from jaxalign.models.params import Param, param_shapes, params_of
from jaxalign.run import lifecycle
from jaxalign.run.build import mesh_from_config, run_tokenizer
from jaxalign.runtime import paths
from jaxalign.runtime.sharding import use_mesh

log = logging.getLogger(__name__)


def _pure_params(state_or_model: Any) -> dict[str, Any]:
    if isinstance(state_or_model, nnx.Module):
        state_or_model = nnx.state(state_or_model, nnx.Param)
    if isinstance(state_or_model, nnx.State):
        return nnx.to_pure_dict(state_or_model)
    return dict(state_or_model)


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@jax.jit
def _take_layer(x: jax.Array, i: jax.Array) -> jax.Array:
    # A traced index: one compiled program per param shape, not one per layer.
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _to_host(x: jax.Array, dtype: np.dtype) -> np.ndarray:
    """One array on process 0's host, cast on device first (fewer bytes to move)."""
    x = jnp.asarray(x).astype(dtype)
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass(frozen=True)
class _Planned:
    name: str
    entry: Param
    layer: int | None
    shape: tuple[int, ...]


def _plan_tensors(cfg: ModelConfig) -> list[_Planned]:
    """Every HF tensor, layer by layer (as transformers orders them), with its HF shape."""
    shapes = param_shapes(cfg)
    table = params_of(cfg)

    def planned(entry: Param, layer: int | None) -> _Planned:
        shape = shapes[entry.path][1:] if entry.stacked else shapes[entry.path]
        name = entry.hf.format(i=layer) if entry.stacked else entry.hf
        return _Planned(name, entry, layer, entry.hf_shape(shape))

    out = [planned(e, None) for e in table if e.path == ("embed",)]
    out += [planned(e, i) for i in range(cfg.num_hidden_layers) for e in table if e.stacked]
    out += [planned(e, None) for e in table if not e.stacked and e.path != ("embed",)]
    return out


def _plan_files(tensors: list[_Planned], itemsize: int, max_shard_bytes: int) -> list[list[_Planned]]:
    """Consecutive tensors into files of at most `max_shard_bytes` (a larger tensor gets a file alone)."""
    files: list[list[_Planned]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += nbytes
    return files


def _safetensors_header(tensors: list[_Planned], dtype_name: str) -> bytes:
    """The file header, written before any data: every offset follows from the shapes alone."""
    itemsize = np.dtype(jnp.dtype(dtype_name)).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * itemsize
        header[t.name] = {"dtype": _ST_CODES[dtype_name], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors itself does
    return struct.pack("<Q", len(raw)) + raw


def _hf_tensor(params: Mapping[str, Any], t: _Planned, dtype: np.dtype) -> np.ndarray:
    value = _get(params, t.entry.path)
    if t.layer is not None:
        value = _take_layer(value, jnp.int32(t.layer))
    return t.entry.to_hf(_to_host(value, dtype))


def _dtype_name(dtype: Any) -> str:
    name = np.dtype(jnp.dtype(dtype)).name
    if name not in _ST_CODES:
        raise JaxalignError(f"export dtype {name!r} is not supported; use one of {', '.join(_ST_CODES)}")
    return name


def hf_config_dict(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    # transformers 5 reads "dtype"; 4.x reads "torch_dtype".
    return {**cfg.to_hf_dict(), "dtype": dtype, "torch_dtype": dtype}


def generation_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    ids = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
           "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def save_hf(state_or_model: Any, cfg: ModelConfig, out_dir: paths.PathLike, tokenizer: Any = None,
            dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> list[paths.Path]:
    """Write a HF model directory (config, generation config, safetensors, optional tokenizer).

    `state_or_model` is a Decoder, its nnx.State or the pure dict of its params; `dtype` defaults to
    the params' dtype (pass the source checkpoint's to round-trip). Params are gathered to the host
    one HF tensor at a time; every process must call this, process 0 writes. Returns the files written.
    """
    params = _pure_params(state_or_model)
    dtype_name = _dtype_name(dtype if dtype is not None else _get(params, ("embed",)).dtype)
    np_dtype = np.dtype(jnp.dtype(dtype_name))
    out_dir = paths.as_path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise JaxalignError(f"output directory {out_dir} is not empty (holds: {dir_listing(out_dir)}); "
                            "choose a new or empty directory")
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    files = _plan_files(_plan_tensors(cfg), np_dtype.itemsize, max_shard_bytes)
    names = ([SINGLE_FILE] if len(files) == 1 else
             [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))])
    for file_name, tensors in zip(names, files):
        with (out_dir / file_name).open("wb") if writer else nullcontext() as f:
            if writer:
                f.write(_safetensors_header(tensors, dtype_name))
            for t in tensors:  # all processes take part in each gather
                arr = _hf_tensor(params, t, np_dtype)
                if writer:
                    f.write(arr.tobytes())
    written = [out_dir / n for n in names]
    if writer:
        if len(files) > 1:
            itemsize = np_dtype.itemsize
            index = {"metadata": {"total_size": sum(math.prod(t.shape) * itemsize for ts in files for t in ts)},
                     "weight_map": {t.name: n for n, ts in zip(names, files) for t in ts}}
            (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            written.append(out_dir / INDEX_FILE)
        (out_dir / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype_name), indent=2) + "\n")
        (out_dir / "generation_config.json").write_text(json.dumps(generation_config_dict(cfg), indent=2) + "\n")
        written += [out_dir / "config.json", out_dir / "generation_config.json"]
        if tokenizer is not None:
            with paths.local_dir_for(out_dir) as local:
                tokenizer.save_pretrained(str(local))
    if jax.process_count() > 1:  # nobody reads the directory before process 0 has finished it
        multihost_utils.sync_global_devices("jaxalign.export.hf.save_hf")
    return written


def export_config(model_cfg: ModelConfig, tokenizer) -> ModelConfig:
    """The model config to export: its EOS ids joined with the tokenizer's EOS (the ids `jaxalign generate`
    stops at), and the tokenizer's BOS when the model names none, so transformers' `generate` stops where
    jaxalign's does."""
    eos = sorted(set(model_cfg.eos_token_ids) | {tokenizer.eos_id})
    return dataclasses.replace(
        model_cfg, eos_token_id=eos[0] if len(eos) == 1 else tuple(eos),
        bos_token_id=tokenizer.bos_id if model_cfg.bos_token_id is None else model_cfg.bos_token_id)


def export_run(cfg, dpo_dir: paths.Path, out: paths.Path) -> paths.Path:
    """The pipeline's export stage: a run's best model in HF format at `out`, complete only with its
    COMPLETE marker (a partial one is redone)."""
    fmt = cfg.export.format
    if lifecycle.is_complete(out):
        done = json.loads((out / lifecycle.COMPLETE_FILE).read_text()).get("format", "merged")
        if done == fmt:
            log.info("export: %s exists, skipped", out)
            return out
        log.info("export: %s holds a %s export; writing it again as %s (export.format)", out, done, fmt)
        if jax.process_index() == 0:
            paths.remove(out)
    if jax.process_index() == 0:
        lifecycle.clear_incomplete(out, "the export")
    mesh, rules = mesh_from_config(cfg)
    tokenizer = run_tokenizer(cfg)
    with use_mesh(mesh, rules):
        if fmt == "peft":
            export_peft(dpo_dir, out, tokenizer, mesh, rules)
        else:
            model = model_io.load_model(dpo_dir, mesh, rules)
            save_hf(model, export_config(model.cfg, tokenizer), out, tokenizer=tokenizer,
                    dtype=model_io.source_dtype(dpo_dir))
    if jax.process_index() == 0:
        lifecycle.mark_complete(out, model=str(model_io.resolve_model_path(dpo_dir)), format=fmt)
    return out


def export_peft(run: paths.Path, out: paths.Path, tokenizer, mesh, rules=None) -> None:
    """A LoRA run as PEFT loads it: adapter_config.json + adapter_model.safetensors (+ tokenizer) in `out`,
    and the model they sit on (the run's base: for DPO from an SFT run, that run merged) in HF format in
    out/base, which the adapter config names. A QLoRA run's base is written dense, as PEFT users load it."""
    from jaxalign.checkpoint import lora_io
    from jaxalign.models import peft

    spec, adapters, base = lora_io.load_adapters(run, mesh, rules)
    base_model = model_io.load_model(base, mesh, rules)
    save_hf(base_model, export_config(base_model.cfg, tokenizer), out / "base", tokenizer=tokenizer,
            dtype=model_io.source_dtype(base))
    adapters = multihost_utils.process_allgather(adapters, tiled=True)  # small: every process holds them whole
    if jax.process_index() == 0:
        with paths.local_dir_for(out) as local:  # safetensors and tokenizers write local files only
            peft.write_peft_dir(local, adapters, base_model.cfg, spec, str(paths.absolute(out / "base")))
            tokenizer.save_pretrained(str(local))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxalign.export.hf.export_peft")
