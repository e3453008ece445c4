"""The life of a run dir: its status, what it computes, and whether a `--resume` fits it.

    RUN/status.json    {"state", "step", "total_steps", "updated", "message"}; state is
                       running -> preempted | failed | finished
    RUN/manifest.json  what the run computes (stage, architecture, tokenizer and data fingerprints,
                       total steps, config hash): written when it starts, compared by every resume

Only `finished` lets a pipeline go on to the next stage. `running` (left by a kill -9 or a lost host),
`preempted` and `failed` make a re-run resume the stage from its newest checkpoint. Each file is
replaced atomically (`paths.write_text_atomic`): a reader sees the old or the new one, never part.

A resume is checked before anything in the run dir is written: the resolved config against the run's
config.yaml (`RESUME_MAY_CHANGE` lists the keys that may differ: how the run runs, not what it
computes), then the manifest against the stored one. A mismatch names every differing key.

Directories written in several steps (the pipeline's base/ and export/) are complete only once
`COMPLETE_FILE` is in them, written last; one without it is removed and written again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxalign.errors import JaxalignError
from jaxalign.runtime import paths

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
MANIFEST_FILE = "manifest.json"
COMPLETE_FILE = "COMPLETE"
RUNNING, PREEMPTED, FAILED, FINISHED = "running", "preempted", "failed", "finished"

# Exit codes of `jaxalign train` and `jaxalign pipeline` (README, launch/): 75 is BSD's EX_TEMPFAIL,
# "try again later" - what a scheduler should answer with a re-run (with --resume).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PREEMPTED, EXIT_INTERRUPTED = 0, 1, 2, 75, 130

# Keys that may differ between a run and its --resume: layout, bookkeeping and evaluation, not the
# numbers trained. A prefix ending in "." covers its whole section.
RESUME_MAY_CHANGE = (
    "output_dir", "run_name", "mesh.", "model.remat", "model.attention", "model.logits_chunk_size",
    "model.trust_remote_code", "data.cache_dir", "train.eval_every", "train.eval_batches", "train.log_every",
    "train.on_nonfinite", "train.max_nonfinite_skips", "train.micro_batch_size", "checkpoint.", "eval.",
    "generate.", "export.", "sft.overrides", "dpo.overrides",
)


class Preempted(JaxalignError):
    """A pipeline stage stopped early (SIGTERM/SIGINT): nothing after it ran; a re-run resumes it."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- status


def read_status(run: paths.PathLike) -> dict[str, Any] | None:
    """RUN/status.json, or None when the run has none (not started, or made before run states existed)."""
    path = paths.as_path(run) / STATUS_FILE
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return status if isinstance(status, dict) else None


def state_of(run: paths.PathLike) -> str | None:
    status = read_status(run)
    return None if status is None else status.get("state")


def is_finished(run: paths.PathLike) -> bool:
    return state_of(run) == FINISHED


def write_status(run: paths.PathLike, state: str, *, step: int | None = None, total_steps: int | None = None,
                 message: str = "") -> None:
    """Replace RUN/status.json (call on process 0 only)."""
    record = {"state": state, "step": step, "total_steps": total_steps, "updated": _now(), "message": message}
    paths.write_text_atomic(paths.as_path(run) / STATUS_FILE, json.dumps(record, indent=2) + "\n")


def write_json_atomic(path: paths.PathLike, value: Any) -> None:
    paths.write_text_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- completion markers


def mark_complete(directory: paths.PathLike, **info: Any) -> None:
    """Write `directory`/COMPLETE last, after everything else in it."""
    write_json_atomic(paths.as_path(directory) / COMPLETE_FILE, {"completed": _now(), **info})


def is_complete(directory: paths.PathLike) -> bool:
    return (paths.as_path(directory) / COMPLETE_FILE).is_file()


def clear_incomplete(directory: paths.PathLike, what: str) -> None:
    """Remove a directory left half-written (no COMPLETE marker), so it is written again from scratch."""
    directory = paths.as_path(directory)
    if directory.exists() and not is_complete(directory):
        log.warning("%s %s is incomplete (no %s: an earlier run stopped while writing it); writing it again",
                    what, directory, COMPLETE_FILE)
        paths.remove(directory)


# ----------------------------------------------------------------------------- resume checks


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b": value}; free-form mappings (model.config, mesh.rules, *.overrides) stay one value."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in ("model.config", "mesh.rules", "sft.overrides",
                                                           "dpo.overrides"):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE)


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def differences(stored: Mapping[str, Any], new: Mapping[str, Any], *, keys=None) -> list[str]:
    """'key: the run has X, now Y' for every key (of `keys`, default all but RESUME_MAY_CHANGE) that differs."""
    a, b = flatten(stored), flatten(new)
    names = keys if keys is not None else sorted(k for k in set(a) | set(b) if not _may_change(k))
    return [f"{k}: the run has {_show(a.get(k))}, now {_show(b.get(k))}" for k in names if a.get(k) != b.get(k)]


def mismatch_error(run: paths.Path, diffs: list[str], against: str) -> JaxalignError:
    return JaxalignError(
        f"--resume: {run} was started with other settings than these ({against}):\n  "
        + "\n  ".join(diffs)
        + f"\nNothing in {run} was changed. Resume with the run's own settings ({run / 'config.yaml'}), "
        "or start a new run (another output_dir, or --overwrite to replace this one; to continue from its "
        "weights, set model.path to the run dir)")


def check_config_fits(run: paths.Path, cfg) -> None:
    """On --resume: the resolved config against RUN/config.yaml, before anything is written."""
    from jaxalign.config import config_to_dict, load_config

    stored_path = run / "config.yaml"
    if not stored_path.is_file():
        return
    try:
        stored = load_config(stored_path)
    except JaxalignError as e:
        raise JaxalignError(f"--resume: the run's {stored_path} cannot be read ({e}); start over with "
                            "--overwrite") from None
    diffs = differences(config_to_dict(stored), config_to_dict(cfg))
    if diffs:
        raise mismatch_error(run, diffs, "config.yaml")


def check_manifest_fits(run: paths.Path, manifest: Mapping[str, Any]) -> None:
    """On --resume: what this start would compute against what the run was started with."""
    path = run / MANIFEST_FILE
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("--resume: %s is unreadable; it is written again", path)
        return
    # The config was compared key by key; a fingerprint that cannot be taken (None) is not compared.
    keys = [k for k, v in flatten(manifest).items() if k != "config_hash" and v is not None]
    diffs = differences(stored, manifest, keys=keys)
    if diffs:
        raise mismatch_error(run, diffs, MANIFEST_FILE)


def config_hash(cfg) -> str:
    """A hash of the settings that decide what the run computes (every process must agree on it)."""
    from jaxalign.config import config_to_dict

    kept = {k: v for k, v in flatten(config_to_dict(cfg)).items() if not _may_change(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def examples_fingerprint(*splits) -> str:
    """A hash of the tokenized examples themselves (ids, masks, order): the data a run trains on,
    whatever files, cache or settings it came from. A token store's is the hash it was written with."""
    h = hashlib.sha256()
    for examples in splits:
        h.update(f"split {len(examples) if hasattr(examples, '__len__') else 'stream'}".encode())
        if hasattr(examples, "content_hash"):
            h.update(examples.content_hash.encode())
            continue
        for example in examples:
            for key in sorted(example):
                value = example[key]
                if isinstance(value, (list, tuple)) and all(isinstance(v, (int, bool)) for v in value):
                    h.update(key.encode() + np.asarray(value, np.int64).tobytes())
                else:
                    h.update(key.encode() + json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the run dir


def check_run_dir(cfg, resume: bool, overwrite: bool) -> paths.Path:
    """Refuse to mix two runs in one dir: an existing run needs --resume or --overwrite; a --resume must
    fit the run's config.yaml. Writes nothing."""
    import jax

    from jaxalign.runtime import run_lock

    run = paths.as_path(cfg.output_dir)
    if resume and overwrite:
        raise JaxalignError("--resume and --overwrite exclude each other: continue the run in "
                            f"{run} or replace it, not both")
    holder = run_lock.live_holder(run) if jax.process_count() == 1 and run.is_dir() else None
    if holder:  # multi-host jobs learn it from run_lock.acquire_for_job: process 0 decides
        raise JaxalignError(f"output dir {run} is in use by another run ({run_lock.describe(holder)}); wait for "
                            f"it to finish or choose another output_dir (if it is known to be gone, delete "
                            f"{run / run_lock.LOCK_FILE})")
    if (run / "config.yaml").exists() and not resume and not overwrite:
        raise JaxalignError(f"output dir {run} already holds a run; pass --resume to continue it or "
                            "--overwrite to replace it (or choose another output_dir)")
    if run.exists() and not run.is_dir():
        raise JaxalignError(f"output_dir {run} is a file; choose a directory")
    if resume:
        check_config_fits(run, cfg)
    return run


def replace_run_dir(run: paths.Path, overwrite: bool) -> None:
    """With --overwrite, empty the run dir (but the lock this run holds); create it. Process 0 only."""
    from jaxalign.runtime import run_lock

    if overwrite and (run / "config.yaml").exists():
        for child in run.iterdir():
            if child.name != run_lock.LOCK_FILE:
                paths.remove(child)
    run.mkdir(parents=True, exist_ok=True)
