"""Hugging Face safetensors <-> jaxalign parameters.

One table (`tensor_table`) says which HF tensor each of our parameters comes from and how its
axes are laid out; reading and writing both derive from it. I/O streams: a load builds every
parameter with `jax.make_array_from_callback`, so each device reads only the block of the file it
holds; a save gathers one HF tensor at a time to the host and appends it to the open file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, nullcontext
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy reader needs)
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open

from jaxalign import paths
from jaxalign.errors import JaxalignError
from jaxalign.models.config import ModelConfig
from jaxalign.models.llama import layer_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype codes <-> dtype names (numpy reads BF16 through ml_dtypes, bundled with jax).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_ST_CODES = {name: code for code, name in _ST_DTYPES.items()}

# HF tensors that carry no parameters (old Llama checkpoints saved the RoPE buffer).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# --- the table: our parameter <-> HF tensor ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How one of our parameters is stored in a HF checkpoint.

    `groups` says how the (per-layer) axes of our parameter merge into the HF tensor's axes, in our
    axis order: wq [E, H, D] with groups (1, 2) is [E, H*D]. `transpose` then reverses those merged
    axes, because HF stores a linear layer as [out_features, in_features] and we store [in, out].
    """

    param: tuple[str, ...]  # path in the pure-dict state, e.g. ("layers", "wq")
    hf: str  # HF tensor name; "{i}" stands for the layer index of a stacked parameter
    groups: tuple[int, ...]
    transpose: bool = False

    @property
    def stacked(self) -> bool:
        return self.param[0] == "layers"

    def hf_names(self, cfg: ModelConfig) -> list[str]:
        return [self.hf.format(i=i) for i in range(cfg.num_hidden_layers)] if self.stacked else [self.hf]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor shape for one (per-layer) parameter of our `shape`."""
        merged = _merge(shape, self.groups)
        return merged[::-1] if self.transpose else merged

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        merged = x.reshape(_merge(x.shape, self.groups))
        return np.ascontiguousarray(merged.T if self.transpose else merged)

    def from_hf(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (x.T if self.transpose else x).reshape(shape)


def _merge(shape: tuple[int, ...], groups: tuple[int, ...]) -> tuple[int, ...]:
    bounds = np.cumsum((0,) + groups)
    return tuple(math.prod(shape[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


_LAYER = "model.layers.{i}."
# The table. (our param path, HF name, groups, transpose); a model has the rows whose param it has.
_TABLE = (
    (("embed",), "model.embed_tokens.weight", (1, 1), False),
    (("layers", "attn_norm"), _LAYER + "input_layernorm.weight", (1,), False),
    (("layers", "wq"), _LAYER + "self_attn.q_proj.weight", (1, 2), True),
    (("layers", "wk"), _LAYER + "self_attn.k_proj.weight", (1, 2), True),
    (("layers", "wv"), _LAYER + "self_attn.v_proj.weight", (1, 2), True),
    (("layers", "bq"), _LAYER + "self_attn.q_proj.bias", (2,), False),
    (("layers", "bk"), _LAYER + "self_attn.k_proj.bias", (2,), False),
    (("layers", "bv"), _LAYER + "self_attn.v_proj.bias", (2,), False),
    (("layers", "wo"), _LAYER + "self_attn.o_proj.weight", (2, 1), True),
    (("layers", "bo"), _LAYER + "self_attn.o_proj.bias", (1,), False),
    (("layers", "mlp_norm"), _LAYER + "post_attention_layernorm.weight", (1,), False),
    (("layers", "w_gate"), _LAYER + "mlp.gate_proj.weight", (1, 1), True),
    (("layers", "w_up"), _LAYER + "mlp.up_proj.weight", (1, 1), True),
    (("layers", "w_down"), _LAYER + "mlp.down_proj.weight", (1, 1), True),
    (("final_norm",), "model.norm.weight", (1,), False),
    (("lm_head",), "lm_head.weight", (1, 1), True),  # absent when tied: the output projection is embed.T
)


def tensor_table(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter of a model with config `cfg`, in HF checkpoint order."""
    present = param_shapes(cfg)
    return [TensorMap(*row) for row in _TABLE if row[0] in present]


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our full parameter shapes (stacked [L, ...] for layer params), by pure-dict path."""
    shapes = {("embed",): (cfg.vocab_size, cfg.hidden_size), ("final_norm",): (cfg.hidden_size,)}
    shapes.update({("layers", name): shape for name, shape in layer_shapes(cfg).items()})
    if not cfg.tie_word_embeddings:
        shapes[("lm_head",)] = (cfg.hidden_size, cfg.vocab_size)
    return shapes


def expected_hf_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a model with config `cfg`."""
    shapes = param_shapes(cfg)
    out = {}
    for entry in tensor_table(cfg):
        shape = shapes[entry.param][1:] if entry.stacked else shapes[entry.param]
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


def _hf_block(entry: TensorMap, shape: tuple[int, ...], index: tuple[slice, ...]):
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


def _read_param_block(reader: _Reader, entry: TensorMap, hf_name: str, shape: tuple[int, ...],
                      index: tuple[slice, ...]) -> np.ndarray:
    hf_index, block, rest = _hf_block(entry, shape, index)
    return entry.from_hf(reader.read(hf_name, hf_index), block)[rest]


def _load_param(reader: _Reader, entry: TensorMap, cfg: ModelConfig, shape: tuple[int, ...],
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
    by_param = {entry.param: entry for entry in tensor_table(cfg)}
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


# --- writing ----------------------------------------------------------------------------------

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
    entry: TensorMap
    layer: int | None
    shape: tuple[int, ...]


def _plan_tensors(cfg: ModelConfig) -> list[_Planned]:
    """Every HF tensor, layer by layer (as transformers orders them), with its HF shape."""
    shapes = param_shapes(cfg)
    table = tensor_table(cfg)

    def planned(entry: TensorMap, layer: int | None) -> _Planned:
        shape = shapes[entry.param][1:] if entry.stacked else shapes[entry.param]
        name = entry.hf.format(i=layer) if entry.stacked else entry.hf
        return _Planned(name, entry, layer, entry.hf_shape(shape))

    out = [planned(e, None) for e in table if e.param == ("embed",)]
    out += [planned(e, i) for i in range(cfg.num_hidden_layers) for e in table if e.stacked]
    out += [planned(e, None) for e in table if not e.stacked and e.param != ("embed",)]
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
    value = _get(params, t.entry.param)
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
        multihost_utils.sync_global_devices("jaxalign.convert.save_hf")
    return written


def iter_hf_tensors(hf_dir: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of a HF checkpoint, one at a time (tests, inspection)."""
    files = safetensors_files(hf_dir)
    with ExitStack() as stack:
        reader = _Reader(files, stack)
        for name in sorted(reader.names()):
            yield name, reader.read(name, ())
