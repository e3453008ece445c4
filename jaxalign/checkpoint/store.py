"""Training checkpoints: Orbax CheckpointManager over RUN/checkpoints/{step}/.

Each step dir holds `params/` (the same Orbax layout as a model checkpoint's `params/`, so a step
dir is itself a usable model path), `opt_state/`, and `meta/` (JSON: step, data-iterator state,
RNG seed, metrics). Retention keeps the newest `keep` and the best by the validation metric.
Saves are asynchronous: training continues while the previous checkpoint is written.

Faults: a save killed half-way leaves `{step}.orbax-checkpoint-tmp-*`, which is never listed as a
step and is deleted when the next run opens the dir; a step that will not restore (a truncated
file, another architecture or vocabulary) raises a JaxalignError naming the step dir and what
differs, and `quarantine` moves it out of the way so a resume can fall back to an older one; a
non-finite model (NaN/inf parameters or validation metric) is refused, so it is never saved or best.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxalign.errors import JaxalignError
from jaxalign.runtime import paths
from jaxalign.runtime.paths import Path, PathLike

log = logging.getLogger(__name__)


QUARANTINE_DIR = "skipped_checkpoints"  # RUN/skipped_checkpoints/{step}: steps a resume could not restore


class NonFiniteModel(JaxalignError):
    """A checkpoint refused because the model is not finite (parameters or validation metric)."""


def _best_metric(metrics: dict[str, float], name: str) -> float:
    return metrics.get(name, math.nan)


class RunCheckpointer:
    """Save and restore train state plus metadata; retention by recency and validation metric."""

    def __init__(self, directory: PathLike, *, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True):
        self.directory = paths.absolute(directory)
        self.best_metric, self.best_mode = best_metric, best_mode
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric:
            # BestN keeps the last n after sorting ascending: reverse the sort to keep the minimum.
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: _best_metric(m, best_metric), reverse=best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # best_fn also makes Orbax persist each step's metrics (read back by best_step()).
            best_fn=(lambda m: _best_metric(m, best_metric)) if best_metric else None,
            best_mode=best_mode, enable_async_checkpointing=async_save, create=True,
            # A killed run leaves a half-written step in a temporary dir: remove it on the next start.
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any],
             metrics: dict[str, float] | None = None) -> bool:
        """Write checkpoint `step` (asynchronously); refuse non-finite params so no NaN model is saved."""
        for name in (self.best_metric, "eval/loss"):
            if metrics and name in metrics and not math.isfinite(metrics[name]):
                raise NonFiniteModel(f"step {step}: refusing to save a checkpoint with non-finite "
                                     f"{name}={metrics[name]}")
        if not all_finite(params):
            raise NonFiniteModel(f"step {step}: refusing to save a checkpoint whose parameters are not all finite "
                                 "(NaN or inf)")
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  meta=ocp.args.JsonSave({**meta, "step": step}))
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restore onto the shardings carried by the abstract targets (any mesh layout).

        Raises JaxalignError naming the step dir and what differs (tensor shapes, missing tensors) or,
        when the layout matches but the data cannot be read, that the checkpoint is corrupt."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                  opt_state=ocp.args.StandardRestore(abstract_opt_state),
                                  meta=ocp.args.JsonRestore())
        try:
            out = self.manager.restore(step, args=args)
            if not isinstance(out["meta"], dict):
                raise ValueError(f"meta/ holds {type(out['meta']).__name__}, not the checkpoint's metadata")
        except Exception as e:  # Orbax/TensorStore raise many types (ValueError, JSONDecodeError, Exception)
            where = self.directory / str(step)
            raise JaxalignError(mismatch_message(where, saved_tensors(where / "params"), abstract_params, e)) from e
        return out["params"], out["opt_state"], out["meta"]

    def quarantine(self, step: int) -> Path | None:
        """Move step dir `step` to RUN/skipped_checkpoints/ (process 0) and forget it: kept for a
        post-mortem, out of the way of retention, resume and a later save of the same step."""
        src = self.directory / str(step)
        dest = None
        if jax.process_index() == 0 and src.exists():
            root = self.directory.parent / QUARANTINE_DIR
            root.mkdir(parents=True, exist_ok=True)
            dest = root / str(step)
            n = 1
            while dest.exists():
                dest, n = root / f"{step}.{n}", n + 1
            paths.move(src, dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxalign.checkpoint.store.quarantine.{step}")
        self.manager.reload()
        return dest

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def metric(self, step: int) -> float | None:
        """The best-metric value recorded with checkpoint `step` (None when it has none)."""
        if not self.best_metric:
            return None
        value = (self.manager.metrics(step) or {}).get(self.best_metric)
        return None if value is None or not math.isfinite(value) else float(value)

    def best_step(self) -> int | None:
        """The step with the best validation metric among those kept (None without evaluations).
        A tie goes to the later step, as the BestN retention policy breaks it."""
        scored = [(value if self.best_mode == "min" else -value, -step)
                  for step in self.all_steps() if (value := self.metric(step)) is not None]
        return -min(scored)[1] if scored else None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def array_shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
    """name ("layers/attn/wq") -> shape of every array in a pytree, or in Orbax's saved metadata of one."""
    tree = getattr(tree, "tree", tree)  # Orbax TreeMetadata
    return {_leaf_name(path): (tuple(leaf.shape) if getattr(leaf, "shape", None) is not None else None)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_differences(saved: Any, wanted: Any, limit: int = 6) -> list[str]:
    """What differs between a checkpoint's tensors (`saved`: Orbax metadata) and a model's (`wanted`)."""
    have, want = array_shapes(saved), array_shapes(wanted)
    diffs = [f"{name}: checkpoint has shape {have[name]}, the model {want[name]}"
             for name in want if name in have and have[name] != want[name]]
    diffs += [f"{name}: missing from the checkpoint" for name in want if name not in have]
    diffs += [f"{name}: in the checkpoint but not in the model" for name in have if name not in want]
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


def saved_tensors(params_dir: Path) -> Any:
    """Orbax's metadata (names, shapes) of the tensors saved in `params_dir`; None when unreadable."""
    try:
        return ocp.StandardCheckpointHandler().metadata(paths.absolute(params_dir))
    except Exception:  # noqa: BLE001  (unreadable: the caller says the checkpoint is corrupt)
        return None


def mismatch_message(where: Any, saved: Any, wanted: Any, error: BaseException) -> str:
    """The error for a parameter restore that failed: what differs, or that the data is unreadable.
    `saved` is None (or empty) when Orbax could not read even the checkpoint's tensor metadata."""
    readable = saved is not None and bool(array_shapes(saved))
    diffs = tree_differences(saved, wanted) if readable else []
    if diffs:
        return (f"checkpoint {where} does not fit the model (another architecture or vocabulary?): "
                + "; ".join(diffs))
    what = "its tensors match the model but reading them failed" if readable else "reading it failed"
    return f"checkpoint {where} cannot be read (a truncated, missing or corrupt file?): {what}: {_first_line(error)}"


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def all_finite(tree: Any) -> bool:
    """Whether every floating-point value in the pytree is finite (one jitted reduction, any sharding)."""
    dtype = lambda x: x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype  # noqa: E731
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(dtype(x), jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target that allocates nothing."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
