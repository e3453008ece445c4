"""The checkpoint side of a run: saving with the best tracked by validation, restoring the newest
checkpoint that fits, and the log kept consistent with it. A mixin of `jaxalign.run.loop.Trainer`
(it uses the trainer's state, iterator, run dir and checkpointer).

best.json names the best evaluated checkpoint and is written only once that checkpoint has
committed (an async save still in flight is not yet a model path); ties go to the later step, as
Orbax's BestN retention breaks them.
"""

from __future__ import annotations

import json
import logging
import math

import jax
import jax.numpy as jnp

from jaxalign.checkpoint import model_io
from jaxalign.checkpoint.store import NonFiniteModel, abstract_like
from jaxalign.errors import JaxalignError
from jaxalign.run import lifecycle
from jaxalign.runtime import paths
from jaxalign.runtime.distributed import agree
from jaxalign.runtime.sharding import use_mesh
from jaxalign.train.step import TrainState

log = logging.getLogger(__name__)


class RunCheckpoints:
    """save / restore_latest / best tracking for a Trainer."""

    def save(self, step: int, eval_metrics: dict[str, float] | None = None) -> None:
        """Checkpoint `step` asynchronously; with validation metrics, track the best in RUN/best.json
        (written once that checkpoint has committed: `flush_best`)."""
        # The position after the last trained batch (the prefetcher may have drawn one more).
        data_state = self.trained_position.state if self.trained_position else self.train_iter.state()
        meta = {"data_iterator": data_state, "seed": self.cfg.train.seed, "total_steps": self.total_steps}
        metrics = None if not eval_metrics else {k: v for k, v in eval_metrics.items() if k.startswith("eval/")}
        try:
            self.ckpt.save(step, self.state.params, self.state.opt_state, meta, metrics)  # waits for the last save
        except NonFiniteModel as e:  # skipping more updates cannot repair the model: stop, whatever on_nonfinite
            raise JaxalignError(f"{e}: a non-finite model is never saved or marked best; last good checkpoint: "
                                f"{self.last_good_checkpoint()}. Lower optimizer.lr (or raise warmup), or check "
                                "the data and the starting weights") from None
        self.flush_best()  # the previous save has committed: its best.json can be written
        self.last_saved = step
        if self.improves_best(metrics):
            self.best, self.best_pending = (step, metrics[self.ckpt.best_metric]), True

    def improves_best(self, eval_metrics: dict[str, float] | None) -> bool:
        """Whether these validation metrics beat the best checkpoint's. A tie goes to the later step, as
        Orbax's BestN retention decides it: best.json must name the checkpoint retention keeps."""
        name = self.ckpt.best_metric
        if not eval_metrics or not name or name not in eval_metrics or not math.isfinite(eval_metrics[name]):
            return False
        value = eval_metrics[name]
        return self.best is None or (value <= self.best[1] if self.ckpt.best_mode == "min" else value >= self.best[1])

    def flush_best(self, wait: bool = False) -> None:
        """Write best.json once the checkpoint it names has committed (`wait`: block until then)."""
        if not self.best_pending:
            return
        if wait:
            self.ckpt.wait()
        elif self.ckpt.manager.is_saving_in_progress():
            return
        self.best_pending = False
        self.write_best()

    def write_best(self) -> None:
        """RUN/best.json from self.best, replaced atomically."""
        if jax.process_index() != 0:
            return
        path = self.run / model_io.BEST_FILE
        if self.best is None:
            path.unlink(missing_ok=True)
            return
        step, value = self.best
        lifecycle.write_json_atomic(path, {"step": step, "metric": self.ckpt.best_metric, "value": value})

    def last_good_checkpoint(self) -> str:
        """The newest complete checkpoint (after pending async writes finish), for error messages."""
        self.ckpt.wait()
        last = self.ckpt.latest_step()
        return str(self.run / "checkpoints" / str(last)) if last is not None else "none"

    def restore_latest(self) -> None:
        """Continue from the newest checkpoint that restores. Newer ones that do not (a truncated file,
        another architecture) are named in the log and moved to RUN/skipped_checkpoints/."""
        steps = agree("listing the checkpoints", self.ckpt.all_steps, lambda s: {"checkpoint steps": str(s)})
        if not steps:
            log.info("--resume: no checkpoint in %s yet, starting from the beginning", self.run / "checkpoints")
            self.truncate_metrics(0)  # a run killed before its first checkpoint logged steps it redoes now
            self.write_best()
            return
        failures: list[tuple[int, str]] = []
        with use_mesh(self.mesh, self.rules):
            for step in reversed(steps):
                try:
                    params, opt_state, meta = self.ckpt.restore(step, abstract_like(self.state.params),
                                                                abstract_like(self.state.opt_state))
                    if "data_iterator" not in meta:
                        raise JaxalignError(f"checkpoint {self.run / 'checkpoints' / str(step)}: meta/ has no "
                                            "data-iterator state")
                    break
                except JaxalignError as e:
                    failures.append((step, str(e)))
                    log.warning("--resume: skipping checkpoint %s: %s", self.run / "checkpoints" / str(step), e)
            else:
                raise JaxalignError(
                    f"--resume: no checkpoint in {self.run / 'checkpoints'} restores onto this run's model:\n"
                    + "\n".join(f"  {message}" for _, message in failures)
                    + "\nMake model.config and the tokenizer match the run's config.yaml, or start over with "
                    "--overwrite")
        agree("restoring", lambda: None, {"restored step": str(step)})
        for bad, _ in failures:
            moved = self.ckpt.quarantine(bad)
            log.warning("--resume: fell back from checkpoint %d to %d; the skipped one was moved to %s",
                        bad, step, moved)
        self.state = TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), self.state_shardings.step),
                                params=params, opt_state=opt_state)
        self.train_iter.restore(meta["data_iterator"])
        self.last_saved = step
        # The best among the checkpoints kept (best.json may name a step whose save never completed).
        best_step = self.ckpt.best_step()
        self.best = None if best_step is None else (best_step, self.ckpt.metric(best_step))
        self.write_best()
        self.truncate_metrics(step)
        log.info("resumed from %s at step %d", self.run / "checkpoints" / str(step), step)

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics.jsonl records of steps after `step`: the resumed run logs them again, so the
        log keeps one record per step (and kind), as an uninterrupted run's."""
        path = self.metrics_log.path
        if jax.process_index() != 0 or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                record_step = json.loads(line).get("step", 0)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        paths.write_text_atomic(path, "".join(kept))
