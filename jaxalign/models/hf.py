"""Reading Hugging Face safetensors into jaxalign parameters (writing: `jaxalign.export.hf`).

The parameter table (`models/params.py`) says which HF tensor each of our parameters comes from and
how its axes are laid out. A load streams: every parameter is built with
`jax.make_array_from_callback`, so each device reads only the block of the file it holds.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterator, Mapping
from contextlib import ExitStack

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy reader needs)
import numpy as np
from flax import nnx
from safetensors import safe_open

from jaxalign.errors import JaxalignError
from jaxalign.models.config import ModelConfig
from jaxalign.models.params import Param, param_shapes, params_of
from jaxalign.runtime import paths

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype codes <-> dtype names (numpy reads BF16 through ml_dtypes, bundled with jax).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_ST_CODES = {name: code for code, name in _ST_DTYPES.items()}

# HF tensors that carry no parameters (old Llama checkpoints saved the RoPE buffer).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def expected_hf_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a model with config `cfg`."""
    shapes = param_shapes(cfg)
    out = {}
    for entry in params_of(cfg):
        shape = shapes[entry.path][1:] if entry.stacked else shapes[entry.path]
        out.update({name: entry.hf_shape(shape) for name in entry.hf_names(cfg)})
    return out


# --- reading ----------------------------------------------------------------------------------

def is_hf_model_file(name: str) -> bool:
    """The files reading a HF model dir needs (the rest, e.g. *.bin duplicates, is not downloaded)."""
    return name.endswith((".safetensors", ".json"))


def safetensors_files(hf_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """HF tensor name -> the safetensors file holding it (via the index when the model is sharded)."""
    hf_dir = pathlib.Path(hf_dir)
    if not hf_dir.is_dir():
        raise JaxalignError(f"model directory {hf_dir} does not exist")
    if not (hf_dir / "config.json").is_file():
        raise JaxalignError(f"no config.json in {hf_dir} (found: {dir_listing(hf_dir)}); "
                            "expected a Hugging Face model directory")
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = {name: hf_dir / file for name, file in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise JaxalignError(f"{index} lists files that are not in {hf_dir}: {', '.join(missing)}")
        return files
    found = sorted(hf_dir.glob("*.safetensors"))
    if not found:
        raise JaxalignError(f"no *.safetensors files in {hf_dir} (found: {dir_listing(hf_dir)}); jaxalign reads "
                            "safetensors only: re-save the model with save_pretrained(safe_serialization=True)")
    files = {}
    for path in found:
        with safe_open(path, framework="np") as f:
            files.update({name: path for name in f.keys()})
    return files


def dir_listing(directory: paths.Path, limit: int = 20) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    if not names:
        return "nothing, the directory is empty"
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class _Reader:
    """Open safetensors files of a model; reads blocks of tensors without loading whole files."""

    def __init__(self, files: Mapping[str, pathlib.Path], stack: ExitStack):
        handles = {path: stack.enter_context(safe_open(path, framework="np")) for path in set(files.values())}
        self._slices = {name: handles[path].get_slice(name) for name, path in files.items()}

    def names(self) -> list[str]:
        return list(self._slices)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slices[name].get_shape())

    def dtype(self, name: str) -> str:
        code = self._slices[name].get_dtype()
        if code not in _ST_DTYPES:
            raise JaxalignError(f"tensor {name}: dtype {code} is not supported (expected one of {list(_ST_DTYPES)})")
        return _ST_DTYPES[code]

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._slices[name][index]


def check_hf_tensors(reader: _Reader, cfg: ModelConfig, where: str) -> None:
    """Fail with the tensor's name when the checkpoint does not hold exactly the model's tensors."""
    expected = expected_hf_tensors(cfg)
    found = {n for n in reader.names() if not n.endswith(_IGNORED_SUFFIXES)}
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise JaxalignError(f"{where}: tensor {', '.join(missing[:5])}{more} missing for a {cfg.model_type} model "
                            f"with {cfg.num_hidden_layers} layers (tie_word_embeddings={cfg.tie_word_embeddings})")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise JaxalignError(f"{where}: tensor {name} has shape {list(reader.shape(name))}, expected "
                                f"{list(shape)} from config.json")
    extra = sorted(found - set(expected))
    if extra:
        more = f" and {len(extra) - 10} more" if len(extra) > 10 else ""
        raise JaxalignError(f"{where}: unexpected tensors {', '.join(extra[:10])}{more}: the checkpoint does not "
                            f"match its config.json (model_type {cfg.model_type}, "
                            f"tie_word_embeddings={cfg.tie_word_embeddings}, attention bias={cfg.qkv_bias})")


def _normalize(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _hf_block(entry: Param, shape: tuple[int, ...], index: tuple[slice, ...]):
    """What to read from the HF tensor for our block `index` of a (per-layer) param of `shape`.

    Returns (HF slices, shape of the read block in our axes, slices left to apply to it). A merged
    HF axis is read contiguously: sliced by the first of its axes, the others read whole.
    """
    merged, block, rest = [], [], []
    start = 0
    for g in entry.groups:
        dims, sl = shape[start:start + g], index[start:start + g]
        inner = math.prod(dims[1:])
        merged.append(slice(sl[0].start * inner, sl[0].stop * inner))
        block += [sl[0].stop - sl[0].start, *dims[1:]]
        rest += [slice(None), *sl[1:]]
        start += g
    return tuple(merged[::-1] if entry.transpose else merged), tuple(block), tuple(rest)


def _read_param_block(reader: _Reader, entry: Param, hf_name: str, shape: tuple[int, ...],
                      index: tuple[slice, ...]) -> np.ndarray:
    hf_index, block, rest = _hf_block(entry, shape, index)
    return entry.from_hf(reader.read(hf_name, hf_index), block)[rest]


def _load_param(reader: _Reader, entry: Param, cfg: ModelConfig, shape: tuple[int, ...],
                sharding: jax.sharding.Sharding, dtype: np.dtype) -> jax.Array:
    def block(index: tuple[slice, ...]) -> np.ndarray:
        index = _normalize(index, shape)
        if not entry.stacked:
            return _read_param_block(reader, entry, entry.hf, shape, index).astype(dtype)
        # Stacked layers: fill the requested [layers, ...] block one layer tensor at a time.
        layers = range(index[0].start, index[0].stop)
        out = np.empty((len(layers),) + tuple(s.stop - s.start for s in index[1:]), dtype)
        for k, i in enumerate(layers):
            out[k] = _read_param_block(reader, entry, entry.hf.format(i=i), shape[1:], index[1:])
        return out

    return jax.make_array_from_callback(shape, sharding, block)


def load_hf_state(hf_dir: str | pathlib.Path, cfg: ModelConfig, shardings: nnx.State,
                  param_dtype: str = "float32") -> nnx.State:
    """The parameters of a HF safetensors checkpoint as a model state placed per `shardings`.

    `shardings` is the third result of `jaxalign.models.abstract_model`. Each device reads only its
    own block of each tensor; values are cast to `param_dtype`.
    """
    files = safetensors_files(hf_dir)
    shapes = param_shapes(cfg)
    dtype = np.dtype(jnp.dtype(param_dtype))
    by_param = {entry.path: entry for entry in params_of(cfg)}
    with ExitStack() as stack:
        reader = _Reader(files, stack)
        check_hf_tensors(reader, cfg, str(hf_dir))

        def one(path, variable: nnx.Variable) -> nnx.Variable:
            key = tuple(k.key for k in path)
            if key not in by_param:
                raise JaxalignError(f"model parameter {'/'.join(key)} has no HF tensor mapping")
            return variable.replace(_load_param(reader, by_param[key], cfg, shapes[key], variable.get_value(), dtype))

        return jax.tree_util.tree_map_with_path(one, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def hf_source_dtype(hf_dir: paths.PathLike) -> str:
    """The dtype a HF checkpoint was saved in: config.json's `dtype`/`torch_dtype`, else the embedding's."""
    hf = json.loads((paths.as_path(hf_dir) / "config.json").read_text())
    name = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(name, str) and name in _ST_CODES:
        return name
    with paths.downloaded(hf_dir, keep=is_hf_model_file) as local, ExitStack() as stack:
        files = safetensors_files(local)
        reader = _Reader({"model.embed_tokens.weight": files["model.embed_tokens.weight"]}, stack)
        return reader.dtype("model.embed_tokens.weight")


def iter_hf_tensors(hf_dir: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of a HF checkpoint, one at a time (tests, inspection)."""
    files = safetensors_files(hf_dir)
    with ExitStack() as stack:
        reader = _Reader(files, stack)
        for name in sorted(reader.names()):
            yield name, reader.read(name, ())
