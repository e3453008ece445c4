"""The one place a model path is opened: a Hugging Face directory or a jaxalign model checkpoint.

A jaxalign model checkpoint directory holds:
    jaxalign_model.json   ModelConfig.to_dict(), the source checkpoint's dtype, the format version
    params/               Orbax checkpoint of the parameters as a pure dict (nnx.to_pure_dict)
    tokenizer/            tokenizer files (optional)
A LoRA run's description also names its base model (path and fingerprint) and its adapters; its
params/ then hold the adapters only, and loading it gives the base with the adapters merged in. A
PEFT adapter directory (adapter_config.json) loads the same way, on top of its base_model_name_or_path.
Params restore straight onto any mesh: Orbax reads each device's block for the target sharding.
Paths may be URLs (gs://...): Orbax reads those itself; a Hugging Face directory at a URL is
downloaded (config, safetensors) to local disk first, since safetensors are memory-mapped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxalign.checkpoint.store import mismatch_message, saved_tensors
from jaxalign.errors import JaxalignError
from jaxalign.models import Decoder, ModelConfig, abstract_model, peft
from jaxalign.models.hf import dir_listing, hf_source_dtype, is_hf_model_file, load_hf_state
from jaxalign.runtime import paths
from jaxalign.runtime.paths import Path, PathLike

MODEL_FILE = "jaxalign_model.json"
RUN_MODEL_DIR = "model"  # RUN/model/: the run's model description and tokenizer
BEST_FILE = "best.json"  # RUN/best.json: {"step", "metric", "value"} of the best checkpoint
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_NAME = "jaxalign-model"
FORMAT_VERSION = 1

# Files a HF tokenizer may consist of (copied verbatim when jaxalign.data.tokenizer is unavailable).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def resolve_model_path(path: PathLike) -> Path:
    """The model directory a user-given path stands for.

    Accepted: a Hugging Face model dir, a jaxalign model checkpoint, a training run dir (its best
    checkpoint by validation, else its latest), or one step dir of a run (RUN/checkpoints/{step}).
    """
    path = paths.as_path(path).expanduser()
    if not path.exists():
        raise JaxalignError(f"model path {path} does not exist")
    if not path.is_dir():
        raise JaxalignError(f"model path {path} is a file; expected a directory (a Hugging Face model "
                            f"directory or a jaxalign model checkpoint)")
    if (path / RUN_MODEL_DIR / MODEL_FILE).is_file() and (path / "checkpoints").is_dir():
        return run_checkpoint(path)
    return path


def run_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """RUN/checkpoints/{step}: the best by validation (RUN/best.json) when `which` is "best" and
    one is recorded, else the latest complete step."""
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()
                   and (p / PARAMS_DIR).is_dir())
    if not steps:
        raise JaxalignError(f"run dir {run_dir} has no complete checkpoint yet")
    best_file = run_dir / BEST_FILE
    if which == "best" and best_file.is_file():
        best = json.loads(best_file.read_text()).get("step")
        if best in steps:
            return run_dir / "checkpoints" / str(best)
    return run_dir / "checkpoints" / str(steps[-1])


def _meta_dir(path: Path) -> Path:
    """Where MODEL_FILE and the tokenizer live: the checkpoint itself, or RUN/model/ for a step dir."""
    if (path / MODEL_FILE).is_file():
        return path
    run_model = path.parent.parent / RUN_MODEL_DIR
    if (path / PARAMS_DIR).is_dir() and path.parent.name == "checkpoints" and (run_model / MODEL_FILE).is_file():
        return run_model
    return path


def detect_model_format(path: PathLike) -> str:
    """"hf" (config.json), "jaxalign" (jaxalign_model.json) or "peft" (adapter_config.json)."""
    path = resolve_model_path(path)
    if (_meta_dir(path) / MODEL_FILE).is_file():
        return "jaxalign"
    if (path / "config.json").is_file():
        return "hf"
    if peft.is_peft_dir(path):
        return "peft"
    raise JaxalignError(
        f"{path} is neither a Hugging Face model directory (config.json + *.safetensors) nor a jaxalign "
        f"model checkpoint ({MODEL_FILE} + {PARAMS_DIR}/); it contains: {dir_listing(path)}")


def lora_meta(path: Path) -> dict[str, Any] | None:
    """A LoRA run's description of its adapters and base (checkpoint/lora_io.py), or None."""
    return _read_meta(path).get("lora") if detect_model_format(path) == "jaxalign" else None


def peft_base(path: Path) -> Path:
    """The base model a PEFT adapter directory names (base_model_name_or_path), which must be local."""
    base = json.loads((path / peft.CONFIG_FILE).read_text()).get("base_model_name_or_path") or ""
    if not base or not paths.exists(base):
        raise JaxalignError(f"{path / peft.CONFIG_FILE}: base_model_name_or_path {base!r} is not a local model "
                            "directory; point it at the base model the adapters were trained on")
    return resolve_model_path(base)


def _read_meta(path: Path) -> dict[str, Any]:
    meta = json.loads((_meta_dir(path) / MODEL_FILE).read_text())
    version = meta.get("format_version")
    if meta.get("format") != FORMAT_NAME or not isinstance(version, int) or version > FORMAT_VERSION:
        raise JaxalignError(f"{path / MODEL_FILE}: format {meta.get('format')!r} version {version!r} is not "
                            f"readable by this jaxalign (reads {FORMAT_NAME!r} up to version {FORMAT_VERSION})")
    return meta


@contextlib.contextmanager
def readable(path: Path):
    """Turn a library's error on a damaged file (truncated safetensors, broken JSON) into a JaxalignError
    naming the model directory."""
    try:
        yield
    except JaxalignError:
        raise
    except Exception as e:  # safetensors, json, OSError, ...: all mean the same to the user
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise JaxalignError(f"model {path} cannot be read (a truncated or corrupt file?): {type(e).__name__}: "
                            f"{detail}") from e


def load_model_config(path: PathLike) -> ModelConfig:
    path = resolve_model_path(path)
    with readable(path):
        if detect_model_format(path) == "peft":
            return load_model_config(peft_base(path))
        if detect_model_format(path) == "hf":
            config = path / "config.json"  # detect_model_format found it
            return ModelConfig.from_hf_dict(json.loads(config.read_text()), source=str(config))
        return ModelConfig.from_dict(_read_meta(path)["model_config"])


def source_dtype(path: PathLike) -> str | None:
    """The dtype the model was originally published in (what an HF export writes by default)."""
    path = resolve_model_path(path)
    with readable(path):
        if detect_model_format(path) == "peft":
            return source_dtype(peft_base(path))
        if detect_model_format(path) == "hf":
            return hf_source_dtype(path)
        return _read_meta(path).get("source_dtype")


def load_model(path: PathLike, mesh: Mesh, rules: Mapping[str, Any] | None = None,
               **options: Any) -> Decoder:
    """A Decoder with the weights at `path`, each parameter placed sharded over `mesh`.

    `options` are Decoder's (dtype, param_dtype, remat, attention, scan_layers); weights are cast
    to `param_dtype` (default float32).
    """
    path = resolve_model_path(path)
    cfg = load_model_config(path)
    kind = detect_model_format(path)
    if kind == "peft" or lora_meta(path):
        from jaxalign.checkpoint import lora_io  # it loads the base through this function

        return lora_io.load_merged(path, mesh, rules, **options)
    graphdef, abstract, shardings = abstract_model(cfg, mesh, rules, **options)
    if kind == "hf":
        with readable(path), paths.downloaded(path, keep=is_hf_model_file) as local:
            state = load_hf_state(local, cfg, shardings, options.get("param_dtype", "float32"))
    else:
        state = _restore_params(path, abstract, shardings)
    return nnx.merge(graphdef, state)


def _restore_params(path: Path, abstract: nnx.State, shardings: nnx.State) -> nnx.State:
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise JaxalignError(f"{path}: no {PARAMS_DIR}/ directory (found: {dir_listing(path)})")
    # The target's shardings (not the saved ones) decide placement, so any mesh can restore.
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(paths.absolute(params_dir), target)
    except Exception as e:  # Orbax/TensorStore raise many types: say what differs, or that it is corrupt
        raise JaxalignError(mismatch_message(path, saved_tensors(params_dir), target, e)
                            + f" (the model is described by {_meta_dir(path) / MODEL_FILE})") from e
    nnx.replace_by_pure_dict(abstract, restored)  # in place: keeps each Variable's metadata
    return abstract


def save_model_checkpoint(model: Decoder, out_dir: PathLike, tokenizer: Any = None,
                          source_dtype: str | None = None) -> Path:
    """Write `model` as a jaxalign model checkpoint (every process must call this; process 0 writes files).

    `tokenizer` is anything with `save_pretrained(dir)`; `source_dtype` is the dtype of the HF
    checkpoint the weights came from, so an export writes that dtype again.
    """
    out_dir = paths.absolute(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise JaxalignError(f"output directory {out_dir} is not empty (holds: {dir_listing(out_dir)}); "
                            "choose a new or empty directory")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_dir / PARAMS_DIR, params)
        ckptr.wait_until_finished()
    write_model_description(out_dir, model.cfg, tokenizer, source_dtype,
                            jax.numpy.dtype(params["embed"].dtype).name)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxalign.checkpoint.model_io.save_model_checkpoint")
    return out_dir


def write_model_description(out_dir: PathLike, cfg: ModelConfig, tokenizer: Any = None,
                            source_dtype: str | None = None, param_dtype: str = "float32",
                            lora: Mapping[str, Any] | None = None) -> None:
    """MODEL_FILE (+ tokenizer/) in `out_dir`: what makes params/ beside it, or a run's step dirs, a model.
    `lora` (lora_description): params/ hold adapters on that base."""
    if jax.process_index() != 0:
        return
    out_dir = paths.as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_config": cfg.to_dict(),
            "source_dtype": source_dtype, "param_dtype": param_dtype, **({"lora": dict(lora)} if lora else {})}
    (out_dir / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        with paths.local_dir_for(out_dir / TOKENIZER_DIR) as local:
            tokenizer.save_pretrained(str(local))


# --- tokenizers -------------------------------------------------------------------------------

def tokenizer_path(path: PathLike) -> Path:
    """Where the tokenizer of a model directory lives: the HF directory itself, or CKPT/tokenizer/."""
    path = resolve_model_path(path)
    where = _tokenizer_dir(path)
    if not has_tokenizer(where):
        raise JaxalignError(f"no tokenizer files in {where} (looked for {', '.join(TOKENIZER_FILES[:3])}, ...); "
                            "pass a tokenizer path explicitly")
    return where


def _tokenizer_dir(path: Path) -> Path:
    """An HF dir holds its tokenizer; a jaxalign model keeps it in tokenizer/; a PEFT dir may hold one,
    else its base's."""
    kind = detect_model_format(path)
    if kind == "peft":
        return path if has_tokenizer(path) else _tokenizer_dir(peft_base(path))
    return path if kind == "hf" else _meta_dir(path) / TOKENIZER_DIR


def has_tokenizer(directory: PathLike) -> bool:
    directory = paths.as_path(directory)
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


class TokenizerFiles:
    """A tokenizer as its files: `save_pretrained` copies them (no tokenizer library involved)."""

    def __init__(self, directory: PathLike):
        self.directory = paths.as_path(directory)

    def save_pretrained(self, out_dir: str) -> None:
        paths.as_path(out_dir).mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (self.directory / name).is_file():
                paths.copy_file(self.directory / name, paths.as_path(out_dir) / name)


def model_tokenizer(path: PathLike) -> Any:
    """The tokenizer stored with a model (an object with `save_pretrained`), or None when there is none.

    Uses `jaxalign.data.tokenizer.load_tokenizer` when that module exists, else copies the files.
    """
    path = resolve_model_path(path)
    where = _tokenizer_dir(path)
    if not has_tokenizer(where):
        return None
    if importlib.util.find_spec("jaxalign.data.tokenizer") is not None:
        from jaxalign.data.tokenizer import load_tokenizer

        return load_tokenizer(str(where))
    return TokenizerFiles(where)
