"""Training checkpoints: Orbax CheckpointManager over RUN/checkpoints/{step}/.

Each step dir holds `params/` (the same Orbax layout as a model checkpoint's `params/`, so a step
dir is itself a usable model path), `opt_state/`, and `meta/` (JSON: step, data-iterator state,
RNG seed, metrics). Retention keeps the newest `keep` and the best by the validation metric.
Saves are asynchronous: training continues while the previous checkpoint is written.
"""

from __future__ import annotations

import logging
import math
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxalign.errors import JaxalignError

log = logging.getLogger(__name__)


def _best_metric(metrics: dict[str, float], name: str) -> float:
    return metrics.get(name, math.nan)


class RunCheckpointer:
    """Save and restore train state plus metadata; retention by recency and validation metric."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
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
        if metrics is not None and self.best_metric and not math.isfinite(metrics.get(self.best_metric, 0.0)):
            raise JaxalignError(f"step {step}: refusing to save a checkpoint with non-finite "
                                f"{self.best_metric}={metrics.get(self.best_metric)}")
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  meta=ocp.args.JsonSave({**meta, "step": step}))
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restore onto the shardings carried by the abstract targets (any mesh layout)."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                  opt_state=ocp.args.StandardRestore(abstract_opt_state),
                                  meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out["params"], out["opt_state"], out["meta"]

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


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target that allocates nothing."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
