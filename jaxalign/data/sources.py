"""Read rows from files, `save_to_disk` dirs or the hub into a `datasets.Dataset`.

    ds = load_rows("data/train.jsonl.gz")          # also .json, .parquet, .csv (+ .gz/.bz2/.xz)
    ds = load_rows("data/*.jsonl", max_rows=1000)  # a glob, a dir of data files, a saved dir, a hub id
    ds = load_rows("gs://bucket/data/*.jsonl")     # files and dirs may be URLs (see jaxalign.runtime.paths)
    train, held_out = split_train_eval(ds, 0.05, seed=0)

Every returned dataset carries two bookkeeping columns that data errors quote as FILE:ROW:
`_source` (the file, or `hub_id[split]`) and `_row` (1-based: the line number in a JSON
Lines file, the record number otherwise). Format detection ignores columns starting with `_`.

JSON files are checked line by line before `datasets` reads them, because its arrow reader
reports invalid UTF-8 or a malformed line without saying which file or line it was.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
from collections.abc import Iterator
from typing import IO, Any

import datasets
import numpy as np

from jaxalign.errors import JaxalignError
from jaxalign.runtime import paths

_COMPRESSION = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
BOOKKEEPING = ("_source", "_row")


def load_rows(
    path_or_name: str | list[str], split: str = "train", max_rows: int = 0, cache_dir: str | None = None
) -> datasets.Dataset:
    """Rows of one source (or a list of them, concatenated), with `_source` and `_row` columns.

    path_or_name: a data file, a glob, a dir of data files, a dir written by `save_to_disk`,
    or a hub dataset id (read with `load_dataset(name, split=split)`; needs the network).
    max_rows: keep at most the first N rows of each source (0 = all).
    cache_dir: where `datasets` keeps its arrow copy of local files (None = its default).
    """
    if isinstance(path_or_name, (list, tuple)):
        parts = [load_rows(p, split, max_rows, cache_dir) for p in path_or_name]
        return _concat(parts, ", ".join(map(str, path_or_name)))
    name = os.path.expanduser(os.fspath(path_or_name))
    if any(c in name for c in "*?["):
        ds = _concat([_load_file(f, cache_dir) for f in _glob_files(name)], name)
    elif paths.isfile(name):
        ds = _load_file(name, cache_dir)
    elif paths.isdir(name):
        ds = _load_dir(name, split, cache_dir)
    elif _looks_like_path(name):
        raise JaxalignError(f"data file {name!r} does not exist{paths.offline_hint(name)}")
    else:
        ds = _load_hub(name, split, cache_dir)
    if max_rows > 0 and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    return ds


def data_files(name: str) -> list[str] | None:
    """The data files a file, glob or dir of data files stands for, in name order (for streaming);
    None for a hub id. A `save_to_disk` dir is already on disk: it is read without streaming."""
    if any(c in name for c in "*?["):
        return _glob_files(name)
    if paths.isfile(name):
        return [name]
    if paths.isdir(name):
        if _is_saved(name):
            raise JaxalignError(f"data dir {name!r} is a save_to_disk dataset, read from disk as it is: "
                                "set data.streaming: false for it")
        return _dir_files(name)
    if _looks_like_path(name):
        raise JaxalignError(f"data file {name!r} does not exist{paths.offline_hint(name)}")
    return None


def rows_fingerprint(path_or_name: str | list[str], split: str = "train", max_rows: int = 0) -> str | None:
    """A hash of what `load_rows` would read, from local file names, sizes and modification times,
    without reading a row: a token store made from these rows is found before they are loaded. None
    for a hub id or a URL, whose contents are only known by reading them."""
    names = path_or_name if isinstance(path_or_name, (list, tuple)) else [path_or_name]
    files = []
    for name in map(lambda n: os.path.expanduser(os.fspath(n)), names):
        if paths.is_remote(name):
            return None
        if any(c in name for c in "*?["):
            found = sorted(f for f in paths.glob(name) if os.path.isfile(f))
        elif os.path.isfile(name):
            found = [name]
        elif os.path.isdir(name):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(name) for f in fs)
        else:
            return None
        stats = [(os.path.abspath(f), os.stat(f)) for f in found]
        files.append([name, [(f, st.st_size, st.st_mtime_ns) for f, st in stats]])
    return hashlib.sha256(json.dumps([files, split, max_rows]).encode()).hexdigest()


def split_train_eval(
    ds: datasets.Dataset, eval_fraction: float, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, held_out): a seeded random `eval_fraction` of the rows is held out (None if 0).

    Deterministic for a given dataset, fraction and seed; both parts keep the file order.
    """
    if eval_fraction == 0:
        return ds, None
    if not 0 < eval_fraction < 1:
        raise JaxalignError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(ds)
    n_eval = max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise JaxalignError(
            f"data.eval_fraction={eval_fraction} of {n} rows leaves no training rows; lower it or add data"
        )
    order = np.random.default_rng(seed).permutation(n)
    held_out = np.sort(order[:n_eval])
    train = np.sort(order[n_eval:])
    return ds.select(train), ds.select(held_out)


# ----------------------------------------------------------------------------- local files


def data_kind(path: str) -> tuple[str | None, str]:
    """(builder name or None, compression suffix or '') from the file name."""
    stem, ext = os.path.splitext(path.lower())
    compression = ""
    if ext in _COMPRESSION:
        compression, (stem, ext) = ext, os.path.splitext(stem)
    return _BUILDERS.get(ext), compression


def _load_file(path: str, cache_dir: str | None) -> datasets.Dataset:
    builder, compression = data_kind(path)
    if builder is None:
        raise JaxalignError(
            f"data file {path!r}: unknown format; use .jsonl, .json, .parquet or .csv (optionally .gz/.bz2/.xz)"
        )
    rows = _check_json(path, compression) if builder == "json" else None
    try:
        ds = datasets.load_dataset(builder, data_files=_local(path), split="train", cache_dir=cache_dir)
    except Exception as e:  # datasets/arrow raise many types; name the file whatever it was
        raise JaxalignError(f"data file {path!r} could not be read: {type(e).__name__}: {e}") from e
    if len(ds) == 0:
        raise JaxalignError(f"data file {path!r} has no rows")
    if rows is not None and len(rows) != len(ds):  # should not happen: both skip blank lines
        raise JaxalignError(f"data file {path!r}: read {len(ds)} rows but the file has {len(rows)} JSON rows")
    return _tag(ds, path, rows)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, row) for each non-blank line of a JSON Lines file (gzip/bz2/xz by suffix).

    Invalid UTF-8, malformed JSON and non-object lines are errors naming file and line.
    """
    path = os.fspath(path)
    if not paths.isfile(path):
        raise JaxalignError(f"data file not found: {path}")
    with _open_binary(path, data_kind(path)[1]) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JaxalignError(f"{path}:{lineno}: invalid UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():  # datasets skips blank lines too
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxalignError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise JaxalignError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            yield lineno, row


@contextlib.contextmanager
def _open_binary(path: str, compression: str) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed by suffix; `path` may be a URL."""
    with paths.as_path(path).open("rb") as raw:
        if compression not in _COMPRESSION:
            yield raw
            return
        with _COMPRESSION[compression](raw, "rb") as f:
            yield f


def _check_json(path: str, compression: str) -> list[int]:
    """Validate a JSON Lines or JSON-array file; return the 1-based line number of each row."""
    with _open_binary(path, compression) as f:
        first = f.read(64).lstrip()
    if first.startswith(b"["):
        return _check_json_array(path, compression)
    return [lineno for lineno, _ in iter_jsonl(path)]


def _check_json_array(path: str, compression: str) -> list[int]:
    with _open_binary(path, compression) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise JaxalignError(f"{path}:{lineno}: invalid UTF-8") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise JaxalignError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise JaxalignError(f"{path}:{bad + 1}: expected a JSON array of objects; row {bad + 1} is not an object")
    return list(range(1, len(rows) + 1))


def _glob_files(pattern: str) -> list[str]:
    """The files a glob matches, sorted; an error when there are none."""
    files = [f for f in paths.glob(pattern) if paths.isfile(f)]
    if not files:
        raise JaxalignError(f"data: no files match {pattern!r}")
    return files


def _is_saved(path: str) -> bool:
    """A dir written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return any((paths.as_path(path) / f).is_file() for f in ("state.json", "dataset_dict.json"))


def _dir_files(path: str) -> list[str]:
    """The data files directly in a dir, sorted; an error when there are none."""
    files = sorted(os.path.join(path, f.name) for f in paths.as_path(path).iterdir()
                   if f.is_file() and data_kind(f.name)[0] is not None)
    if not files:
        raise JaxalignError(
            f"data dir {path!r} has neither a save_to_disk dataset nor .jsonl/.json/.parquet/.csv files"
        )
    return files


def _load_dir(path: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    if _is_saved(path):
        try:
            ds = datasets.load_from_disk(_local(path))
        except Exception as e:
            raise JaxalignError(f"dataset dir {path!r} could not be read: {type(e).__name__}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise JaxalignError(f"dataset dir {path!r} has no split {split!r}; it has {sorted(ds)} (data.split)")
            ds, path = ds[split], f"{path}[{split}]"
        return _tag(ds, path)
    return _concat([_load_file(f, cache_dir) for f in _dir_files(path)], path)


def _local(path: str) -> str:
    """`path`, or a download of it when it is a URL: datasets reads local files only."""
    return str(paths.local_copy(path)) if paths.is_remote(path) else path


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else that does not exist is a missing file."""
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
        or data_kind(name)[0] is not None
    )


def _load_hub(name: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise JaxalignError(
            f"data {name!r} is not a local file or dir, and loading it as a hub dataset (split {split!r}) "
            f"failed: {type(e).__name__}: {e}"
        ) from e
    return _tag(ds, f"{name}[{split}]")


# ----------------------------------------------------------------------------- bookkeeping


def _tag(ds: datasets.Dataset, source: str, rows: list[int] | None = None) -> datasets.Dataset:
    """Add `_source` and `_row` (replacing any saved earlier)."""
    ds = ds.remove_columns([c for c in BOOKKEEPING if c in ds.column_names])
    rows = np.asarray(rows if rows is not None else np.arange(1, len(ds) + 1), np.int64)
    # Fingerprints from what the columns are made of: datasets would hash the whole columns (~1 s at 50k rows).
    key = hashlib.sha256(f"{ds._fingerprint}\0{source}\0".encode() + rows.tobytes()).hexdigest()[:32]
    ds = ds.add_column("_source", [source] * len(ds), new_fingerprint=key + "s")
    return ds.add_column("_row", rows.tolist(), new_fingerprint=key + "r")


def _concat(parts: list[datasets.Dataset], what: str) -> datasets.Dataset:
    if len(parts) == 1:
        return parts[0]
    try:
        # Loaders disagree on small things (JSON arrays give large_string, CSV string): cast to the first's.
        first = parts[0].features
        parts = [p if p.features == first or set(p.features) != set(first) else p.cast(first) for p in parts]
        return datasets.concatenate_datasets(parts)
    except Exception as e:
        raise JaxalignError(f"data {what!r}: the files cannot be combined (different columns?): {e}") from e
