"""Local paths and object-store URLs (gs://, s3://, ...) behind one pathlib-like API.

    run = as_path(cfg.output_dir)            # pathlib.Path, or etils.epath.Path for a URL
    append_text(run / "metrics.jsonl", line)
    tok = local_copy("gs://bucket/tokenizer") # a local dir, for libraries that read local files only

Local paths stay `pathlib.Path`, so local behaviour is the standard library's. URLs become
`etils.epath.Path`, which reads and writes through fsspec (gcsfs for gs://: the `gcs` extra).
Every run-dir, checkpoint, data, model and tokenizer path goes through `as_path`, because pathlib
and os.path turn "gs://b/x" into "gs:/b/x", and through `absolute`, because epath's own
`absolute()` puts the working directory in front of a URL.

What object stores lack, and what stands in for it here:
- append: `append_text` rewrites the object (gcsfs opens "a" as "w", dropping what was there);
- rename: `write_text_atomic` writes the object directly (one object write is atomic already),
  `move` copies then deletes;
- directories: mkdir does nothing and a "directory" exists while objects share its prefix;
- local files: `local_copy` / `downloaded` fetch what sentencepiece, transformers, datasets and
  safetensors' memory maps read, and `local_dir_for` uploads what `save_pretrained` writes.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob as globlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Union

import fsspec
from etils import epath

from jaxalign.errors import JaxalignError

REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")  # the URL schemes etils.epath serves

Path = Union[pathlib.Path, epath.Path]
PathLike = Union[str, os.PathLike]

# gcsfs caches directory listings forever by default; in a multi-host job that hides the files
# other hosts wrote (checkpoint steps, best.json) from a host that listed the directory earlier.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_remote(path: PathLike) -> bool:
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def as_path(path: PathLike) -> Path:
    """`pathlib.Path` for a local path, `etils.epath.Path` for a URL."""
    return epath.Path(os.fspath(path)) if is_remote(path) else pathlib.Path(path)


def exists(path: PathLike) -> bool:
    """os.path.exists for a local path (so "" does not exist, where pathlib reads it as "."); the
    store's answer for a URL (an error naming it when the store cannot be reached). Likewise `isfile`
    and `isdir`."""
    return _ask(path, "exists") if is_remote(path) else os.path.exists(path)


def isfile(path: PathLike) -> bool:
    return _ask(path, "is_file") if is_remote(path) else os.path.isfile(path)


def isdir(path: PathLike) -> bool:
    return _ask(path, "is_dir") if is_remote(path) else os.path.isdir(path)


def _ask(url: PathLike, question: str) -> bool:
    try:
        return getattr(as_path(url), question)()
    except Exception as e:  # fsspec back ends raise their own types (httpx, google.auth, botocore, ...)
        raise JaxalignError(f"{os.fspath(url)} cannot be reached ({type(e).__name__}: {e}); without network "
                            "access, point the config at a local copy") from e


def offline_hint(path: PathLike) -> str:
    """What to add to "PATH does not exist" for a hub URL read with HF_HUB_OFFLINE set ('' otherwise)."""
    if os.fspath(path).startswith("hf://") and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return " (HF_HUB_OFFLINE is set, so the hub is not read: point the config at a local copy)"
    return ""


def absolute(path: PathLike) -> Path:
    """`path` made absolute; a URL already is."""
    path = as_path(path)
    return path if is_remote(path) else path.absolute()


def mtime(path: PathLike) -> float:
    """Last modification time in seconds since the epoch (whole seconds for a URL)."""
    path = as_path(path)
    return path.stat().mtime if is_remote(path) else path.stat().st_mtime


# ----------------------------------------------------------------------------- writing


def write_text_atomic(path: PathLike, text: str) -> None:
    """Readers see the old or the new text, never part of it: a local file is written under a
    temporary name and renamed over `path`; an object store replaces an object in one step."""
    path = as_path(path)
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def append_text(path: PathLike, text: str) -> None:
    """Append to a text file; an object store has no append, so there the object is rewritten."""
    path = as_path(path)
    if is_remote(path):
        path.write_text((path.read_text() if path.exists() else "") + text)
        return
    with path.open("a") as f:
        f.write(text)


def copy_file(src: PathLike, dst: PathLike) -> None:
    src, dst = as_path(src), as_path(dst)
    if not (is_remote(src) or is_remote(dst)):
        shutil.copy2(src, dst)
        return
    with src.open("rb") as fin, dst.open("wb") as fout:  # streamed: weight shards can be many GB
        shutil.copyfileobj(fin, fout, 16 << 20)


def copy_tree(src: PathLike, dst: PathLike, keep: Callable[[str], bool] | None = None) -> None:
    """Copy the files under `src` (those whose name `keep` accepts) to the same places under `dst`."""
    src, dst = as_path(src), as_path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            copy_tree(item, dst / item.name, keep)
        elif keep is None or keep(item.name):
            copy_file(item, dst / item.name)


def remove(path: PathLike) -> None:
    """Delete a file or a whole directory tree (a local symlink itself, not what it points to)."""
    path = as_path(path)
    if is_remote(path):
        path.rmtree()
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def move(src: PathLike, dst: PathLike) -> None:
    """Move a file or directory tree; an object store has no rename, so it is copied then deleted."""
    src, dst = as_path(src), as_path(dst)
    if not (is_remote(src) or is_remote(dst)):
        shutil.move(str(src), str(dst))
        return
    if src.is_dir():
        copy_tree(src, dst)
    else:
        copy_file(src, dst)
    remove(src)


@contextlib.contextmanager
def local_dir_for(out_dir: PathLike) -> Iterator[pathlib.Path]:
    """A local directory whose files end up in `out_dir`: `out_dir` itself when it is local, else a
    temporary one uploaded on exit (for libraries that write local files only)."""
    out = as_path(out_dir)
    if not is_remote(out):
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="jaxalign-upload-") as tmp:
        yield pathlib.Path(tmp)
        copy_tree(tmp, out)


# ----------------------------------------------------------------------------- reading


def glob(pattern: str) -> list[str]:
    """Paths matching a glob pattern, local or a URL (wildcards after the bucket), sorted."""
    if not is_remote(pattern):
        return sorted(globlib.glob(pattern))
    scheme, rest = pattern.split("://", 1)
    bucket, _, pattern_in_bucket = rest.partition("/")
    return sorted(str(p) for p in epath.Path(f"{scheme}://{bucket}").glob(pattern_in_bucket))


@functools.cache
def _scratch_root() -> pathlib.Path:
    """This process's directory for downloads (under TMPDIR), removed when the process exits."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="jaxalign-remote-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def local_copy(path: PathLike, keep: Callable[[str], bool] | None = None) -> pathlib.Path:
    """A local path holding what `path` (a file or a directory tree) holds: `path` itself when it is
    local, else a download (of the files whose name `keep` accepts) that lasts until the process exits."""
    path = as_path(path)
    if not is_remote(path):
        return path
    local = pathlib.Path(tempfile.mkdtemp(dir=_scratch_root())) / path.name
    if path.is_dir():
        copy_tree(path, local, keep)
    else:
        copy_file(path, local)
    return local


@contextlib.contextmanager
def downloaded(path: PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[pathlib.Path]:
    """`local_copy` for the duration of a with-block: a download is deleted at its end."""
    local = local_copy(path, keep)
    try:
        yield local
    finally:
        if is_remote(path):
            shutil.rmtree(local.parent, ignore_errors=True)
