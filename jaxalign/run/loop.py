"""`jaxalign train`: one loop for both stages; the config's `stage` picks the objective and batches.

Run dir: config.yaml (resolved), status.json and manifest.json (jaxalign.run.lifecycle),
metrics.jsonl, model/ (model description + tokenizer, so every checkpoint is a model path),
checkpoints/{step}/, best.json, data_stats.json, summary.json. Process 0 writes shared files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxalign.checkpoint import lora_io, model_io
from jaxalign.checkpoint.store import RunCheckpointer
from jaxalign.config import save_config
from jaxalign.data.batching import by_pair
from jaxalign.data.iterator import make_iterator, to_global_arrays
from jaxalign.data.prefetch import Position, Prefetcher
from jaxalign.errors import JaxalignError
from jaxalign.models.flops import train_step_flops
from jaxalign.models.quant import quantize_base
from jaxalign.run import lifecycle
from jaxalign.run.build import (
    build_model_and_tokenizer,
    build_train_state,
    check_model_source,
    has_reference_forward,
    init_lora_adapters,
    initial_model_path,
    lora_spec,
    mesh_from_config,
    objective_from_config,
    quant_spec,
    reference_kind,
)
from jaxalign.run.heldout import heldout_metrics, weight_key
from jaxalign.run.lifecycle import check_run_dir
from jaxalign.run.metrics import MetricsLog, mean_over
from jaxalign.run.resume import RunCheckpoints
from jaxalign.runtime import run_lock
from jaxalign.runtime.distributed import agree
from jaxalign.runtime.preemption import PreemptionWatch
from jaxalign.runtime.sharding import use_mesh
from jaxalign.train.step import batch_shardings, jit_train_step, make_eval_step, reference_logps

log = logging.getLogger(__name__)

# The train step's `nonfinite` metric: which check refused the update.
NONFINITE = {1: "non-finite loss or gradients", 2: "an update that would make the weights non-finite"}


def check_policy_is_reference(metrics: dict) -> None:
    """LoRA DPO's first step: fresh adapters (B = 0) must leave the policy equal to the reference (the
    base, adapters off), so every implicit reward is 0. Anything else is a wiring error: stop loudly."""
    rewards = {k: float(metrics[k]) for k in ("rewards/chosen", "rewards/rejected")}
    if any(not abs(v) <= 1e-4 for v in rewards.values()):
        raise JaxalignError(f"LoRA DPO step 1: the policy differs from its reference (the base with the adapters "
                            f"off) before any update ({', '.join(f'{k}={v:.3g}' for k, v in rewards.items())}); "
                            "fresh adapters must start with B = 0")


class Trainer(RunCheckpoints):
    """Everything one run holds: mesh, model state, data iterators, compiled steps, checkpoints.

    Set-up reads before it writes: the run dir, the config against a resumed run's, the model source
    and the data are checked (on every process, agreed in one collective each) and the checkpoint to
    resume from is restored before config.yaml, the model description, the manifest or the status are
    written, so a start that fails leaves an existing run as it was."""

    def __init__(self, cfg, *, resume: bool = False, overwrite: bool = False):
        self.cfg, self.lock, self.config_hash = cfg, None, lifecycle.config_hash(cfg)
        checked = agree("checking the run", lambda: (check_run_dir(cfg, resume, overwrite), check_model_source(cfg)),
                        {"config hash": self.config_hash})
        # One run per output dir: taken before anything in it is written or replaced.
        self.lock = run_lock.acquire_for_job(cfg.output_dir)
        try:
            self._init(cfg, *checked, resume, overwrite)
        except BaseException:
            self.release_lock()
            raise

    def _init(self, cfg, run, checked, resume: bool, overwrite: bool) -> None:
        self.run = run
        self.mesh, self.rules = mesh_from_config(cfg)
        self.stage = cfg.stage
        self.weight_key = weight_key(self.stage)
        model_cfg, self.tokenizer = checked
        self.model_cfg = model_cfg
        self.lora = lora_spec(cfg)
        self.quant = quant_spec(cfg)  # QLoRA: how the frozen base is stored
        self.reference = reference_kind(cfg)
        # A LoRA run's base (path + fingerprint): recorded in RUN/model/, compared on --resume.
        self.lora_base = lora_io.lora_description(self.lora, initial_model_path(cfg), self.quant,
                                                  cfg.model.param_dtype) if self.lora else None
        self.pad_id = self.tokenizer.pad_id or 0
        manifest = agree("loading the data", lambda: self._load_data(model_cfg),
                         lambda m: {"data fingerprint": m["data"], "total steps": str(m["total_steps"])})
        if resume:
            lifecycle.check_manifest_fits(run, manifest)
        with use_mesh(self.mesh, self.rules):
            model, _, source_dtype = build_model_and_tokenizer(cfg, self.mesh, self.rules, checked)
            self.graphdef, params = nnx.split(model)
            params = nnx.to_pure_dict(params)
            del model  # QLoRA: the dense base is freed once quantised
            self.objective = objective_from_config(cfg)
            if self.quant:  # before any reference is taken: adapters-off (or precomputed) is this base
                params = quantize_base(params, model_cfg, self.quant, self.mesh, self.rules)
            self.ref_params = None
            if self.reference == "model":  # a frozen copy: never donated, never updated
                self.ref_params = jax.tree.map(jnp.copy, params)
            elif self.reference == "precomputed":
                self.precompute_reference(params)
            # What the step gets beside the trained weights: the live reference, or the base under LoRA's
            # adapters (for DPO also the reference, adapters off). Never donated.
            self.frozen_params = params if self.lora else self.ref_params
            trained = init_lora_adapters(model_cfg, self.lora, self.mesh, self.rules, cfg.train.seed) \
                if self.lora else params
            self.state, self.state_shardings, self.step_fn_raw = build_train_state(
                cfg, self.mesh, self.graphdef, trained, self.total_steps)
            self.eval_fn = jax.jit(make_eval_step(self.graphdef, self.objective, self.lora))
            self._compiled: dict[tuple, Any] = {}
        self.metrics_log = MetricsLog(run)
        self.best: tuple[int, float] | None = None
        self.best_pending = False  # self.best's checkpoint is still being written: best.json waits for it
        self.last_saved: int | None = None
        if resume:  # restored before anything is written: a checkpoint that does not fit changes nothing
            self.ckpt = self.checkpointer()
            self.restore_latest()
        agree("writing the run dir", lambda: self._write_run_files(overwrite, model_cfg, source_dtype, manifest))
        if not resume:
            self.ckpt = self.checkpointer()

    def _load_data(self, model_cfg) -> dict[str, Any]:
        """Tokenized examples and the train iterator (local work on each process); returns the manifest."""
        from jaxalign.data.pipeline import load_examples
        from jaxalign.data.tokenize import tokenizer_fingerprint

        cfg = self.cfg
        first = None  # process 0 writes the token store; the others then open it (shared cache_dir)
        if jax.process_count() > 1:
            first = agree("tokenizing on process 0", lambda: jax.process_index() == 0 and load_examples(cfg, self.tokenizer))
        self.train_examples, self.eval_examples, self.data_stats = first or load_examples(cfg, self.tokenizer)
        data = lifecycle.examples_fingerprint(self.train_examples, self.eval_examples)
        self.train_iter = make_iterator(self.train_examples, cfg, mesh=self.mesh, pad_id=self.pad_id)
        self.trained_position: Position | None = None  # the data position after the last trained step
        self.total_steps = self.planned_steps()
        return {"stage": cfg.stage, "architecture": model_cfg.to_dict(),
                "tokenizer": tokenizer_fingerprint(self.tokenizer), "data": data,
                "total_steps": self.total_steps, "config_hash": self.config_hash,
                "lora_base": self.lora_base and self.lora_base["base_fingerprint"]}

    def _write_run_files(self, overwrite: bool, model_cfg, source_dtype, manifest) -> None:
        """config.yaml, model/, data_stats.json, manifest.json and status `running` (process 0)."""
        if jax.process_index() != 0:
            return
        lifecycle.replace_run_dir(self.run, overwrite)
        save_config(self.cfg, self.run / "config.yaml")
        model_io.write_model_description(self.run / model_io.RUN_MODEL_DIR, model_cfg, self.tokenizer,
                                         source_dtype, self.cfg.model.param_dtype, lora=self.lora_base)
        lifecycle.write_json_atomic(self.run / "data_stats.json", {k: v.to_dict() for k, v in self.data_stats.items()})
        lifecycle.write_json_atomic(self.run / lifecycle.MANIFEST_FILE, manifest)
        (self.run / "summary.json").unlink(missing_ok=True)  # of an earlier, unfinished attempt
        self.write_status(lifecycle.RUNNING, int(self.state.step))

    def checkpointer(self) -> RunCheckpointer:
        best_metric = self.best_metric_name()
        return RunCheckpointer(self.run / "checkpoints", keep=self.cfg.checkpoint.keep,
                               best_metric=best_metric if self.cfg.checkpoint.keep_best else None,
                               best_mode="min" if best_metric == "eval/loss" else "max",
                               async_save=self.cfg.checkpoint.async_save)

    def write_status(self, state: str, step: int, message: str = "") -> None:
        if jax.process_index() == 0:
            lifecycle.write_status(self.run, state, step=step, total_steps=self.total_steps, message=message)

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # --- set-up helpers ------------------------------------------------------------------------

    def planned_steps(self) -> int:
        if self.cfg.train.max_steps > 0:
            return self.cfg.train.max_steps
        return max(1, self.train_iter.steps_in_epochs(self.cfg.train.epochs))

    def best_metric_name(self) -> str:
        choice = self.cfg.checkpoint.best_metric
        if choice == "eval_rewards_accuracy" or (choice == "auto" and self.stage == "dpo"):
            return "eval/rewards/accuracies"
        if choice == "eval_accuracy" or (choice == "auto" and self.stage == "rm"):
            return "eval/accuracy"
        return "eval/loss"

    def precompute_reference(self, params) -> None:
        """`dpo.reference: precomputed`: score every pair once with the starting weights, through the eval
        iterator (the batches evaluation builds), and keep the log-probs with the data, so no second
        model is held during training. The examples are not changed: a token store gets a view with
        the log-probs beside it (a list is copied); the train iterator is rebuilt over it."""
        # Replicated: every process reads all log-probs and (shared-prompt layout) which pair each slot holds.
        fn = jax.jit(lambda p, b: (reference_logps(nnx.merge(self.graphdef, p), b, self.objective.chunk_size,
                                                   self.objective.dpo.ld_alpha),
                                   b.get("pair_index")),
                     out_shardings=jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

        def scored(examples):
            if not examples:  # no held-out set: nothing to score (an iterator needs a batch)
                return []
            it = make_iterator(examples, self.cfg, train=False, mesh=self.mesh, pad_id=self.pad_id)
            chosen, rejected = np.concatenate([by_pair(*jax.device_get(fn(params, to_global_arrays(host, self.mesh))),
                                                       it.batch_size) for host in it], axis=1).tolist()
            if hasattr(examples, "with_scalars"):
                n = len(examples)
                return examples.with_scalars(ref_chosen_logp=np.array(chosen[:n]), ref_rejected_logp=np.array(rejected[:n]))
            return [{**ex, "ref_chosen_logp": c, "ref_rejected_logp": r}
                    for ex, c, r in zip(examples, chosen, rejected)]

        self.train_examples, self.eval_examples = scored(self.train_examples), scored(self.eval_examples)
        self.train_iter = make_iterator(self.train_examples, self.cfg, mesh=self.mesh, pad_id=self.pad_id)

    def compiled_step(self, batch):
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in self._compiled:
            ref_shardings = None if self.frozen_params is None else jax.tree.map(lambda x: x.sharding,
                                                                                 self.frozen_params)
            shards = batch_shardings({k: v.shape for k, v in batch.items()}, self.mesh)
            self._compiled[key] = jit_train_step(self.step_fn_raw, self.state_shardings, shards, ref_shardings)
        return self._compiled[key]

    # --- evaluation ----------------------------------------------------------------------------

    def evaluate(self, params=None) -> dict[str, float]:
        """Metrics over the held-out set (or its first train.eval_batches batches), as training defines them."""
        if not self.eval_examples:
            return {}
        metrics = heldout_metrics(self.eval_fn, self.state.params if params is None else params, self.eval_examples,
                                  self.cfg, self.mesh, self.rules, ref_params=self.frozen_params,
                                  max_batches=self.cfg.train.eval_batches, pad_id=self.pad_id)
        return {f"eval/{k}": v for k, v in metrics.items()}

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Run to train.max_steps (or the planned epochs). SIGTERM (or SIGINT) stops after the current step
        with a checkpoint of it written (summary["state"] "preempted"; `--resume` continues exactly); on an error,
        pending checkpoint writes complete before it propagates, status.json says "failed", and the run
        dir's lock is released. Only a run that trained to its last step is "finished"."""
        cfg = self.cfg
        start = int(self.state.step)
        end = self.total_steps
        pending: list[dict] = []
        last_eval: dict[str, float] = {}
        nonfinite_steps = streak = 0
        t_last = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=start, disable=jax.process_index() != 0, dynamic_ncols=True,
                   desc=f"{self.stage}")
        preempted_at = None
        feed = Prefetcher(self.train_iter, self.mesh)
        # The watch stays on until the last checkpoint has committed: a second SIGTERM cannot cut it short.
        with PreemptionWatch() as preempt, use_mesh(self.mesh, self.rules), self._finish_on_error(bar):
            if start < end and preempt.requested():  # a stop signal during set-up: nothing new to save
                end = preempted_at = start
            for step in range(start + 1, end + 1):
                drawn = feed.take()
                batch = drawn.arrays
                self.state, metrics = self.compiled_step(batch)(self.state, batch, self.frozen_params)
                if step < end:
                    feed.prefetch()  # host work for the next step while the device runs this one
                self.trained_position = position = drawn.position
                head = None if self.objective.head_everywhere else batch.get("loss_index")  # model FLOPs of the head
                pending.append({**metrics, "model_flops": train_step_flops(
                    self.model_cfg, *batch["tokens"].shape, live_reference=has_reference_forward(self.reference),
                    head_positions=getattr(head, "size", None))["total"]})
                if step == 1 and self.lora and self.reference == "adapters_off":
                    check_policy_is_reference(metrics)
                kind = int(metrics["nonfinite"])
                streak = streak + 1 if kind else 0
                if kind:
                    nonfinite_steps += 1
                    what = NONFINITE[kind]
                    if cfg.train.on_nonfinite == "stop" or streak > cfg.train.max_nonfinite_skips:
                        why = ("" if cfg.train.on_nonfinite == "stop" else
                               f"{streak} non-finite steps in a row (train.max_nonfinite_skips="
                               f"{cfg.train.max_nonfinite_skips}): ")
                        raise JaxalignError(
                            f"{why}{what} at step {step} (epoch {position.epoch}, batch {position.batch_index} of "
                            f"the epoch); the update was not applied; last good checkpoint: "
                            f"{self.last_good_checkpoint()}. Lower optimizer.lr (or raise warmup), or check the "
                            "data and the starting weights")
                    log.warning("step %d: %s; update skipped", step, what)
                bar.update(1)
                is_last = step == self.total_steps
                if step % cfg.train.log_every == 0 or is_last:
                    record = self.log_train(step, pending, time.perf_counter() - t_last, nonfinite_steps)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    pending, t_last = [], time.perf_counter()
                evaluated = None
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or is_last:
                    evaluated = last_eval = self.evaluate()
                    if evaluated:
                        self.metrics_log.write({"step": step, **evaluated})
                        log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in evaluated.items()))
                # Every evaluation that beats the best is saved, so the best checkpoint is the best evaluated.
                if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or is_last or (
                        cfg.checkpoint.save_at_epoch_end and position.epoch_done) or self.improves_best(evaluated):
                    self.save(step, evaluated)
                else:
                    self.flush_best()
                if preempt.requested() and step < end:  # every process stops at this same step
                    log.warning("received %s: stopping after step %d", signal.Signals(preempt.received).name
                                if preempt.received else "a stop signal on another process", step)
                    end = preempted_at = step
                    break
            if start < end < self.total_steps:
                if pending:
                    self.log_train(end, pending, time.perf_counter() - t_last, nonfinite_steps)
                if self.last_saved != end:
                    self.save(end)
            bar.close()
            self.flush_best(wait=True)
            self.ckpt.close()
            summary = self.finish(start, end, preempted_at, nonfinite_steps, last_eval)
        self.metrics_log.close()
        self.release_lock()
        return summary

    def finish(self, start: int, end: int, preempted_at: int | None, nonfinite_steps: int,
               last_eval: dict[str, float]) -> dict[str, Any]:
        """summary.json, then status.json (finished, or preempted: resumable); the summary."""
        state = lifecycle.FINISHED if end == self.total_steps else lifecycle.PREEMPTED
        try:
            best = str(model_io.resolve_model_path(self.run))
        except JaxalignError:  # stopped before its first checkpoint
            best = None
        summary = {"state": state, "steps": end, "total_steps": self.total_steps, "nonfinite_steps": nonfinite_steps,
                   **last_eval, "best_checkpoint": best}
        message = ""
        if end < self.total_steps:
            summary["stopped_at"] = end
            message = f"stopped after step {end} of {self.total_steps}; continue with --resume"
        if preempted_at is not None:
            summary["preempted"] = True
            where = self.run / "checkpoints" / str(end) if end > start else "no new checkpoint (stopped before a step)"
            log.warning("preempted: stopped after step %d with %s written; continue with --resume", end, where)
        if jax.process_index() == 0:
            lifecycle.write_json_atomic(self.run / "summary.json", summary)
        self.write_status(state, end, message)
        return summary

    @contextlib.contextmanager
    def _finish_on_error(self, bar):
        """On any error in the loop: let pending checkpoint writes complete (so the last good checkpoint
        is whole), mark the run failed and release the run dir's lock before the error propagates."""
        try:
            yield
        except BaseException as e:
            bar.close()
            try:
                self.flush_best(wait=True)
                self.ckpt.close()
            except BaseException:  # noqa: BLE001  (the original error matters more)
                log.exception("while finishing checkpoint writes after an error")
            message = "interrupted (a second SIGINT)" if isinstance(e, KeyboardInterrupt) else str(e) or type(e).__name__
            try:
                self.write_status(lifecycle.FAILED, int(self.state.step), message[:2000])
            except Exception:  # noqa: BLE001
                log.exception("while marking the run failed")
            self.metrics_log.close()
            self.release_lock()
            raise

    def log_train(self, step: int, pending: list[dict], seconds: float, nonfinite: int) -> dict:
        records = jax.device_get(pending)
        flops = sum(r.pop("model_flops") for r in records)
        tokens = sum(int(r["num_input_tokens"]) for r in records)  # the global batches', all processes
        record = {"step": step, **mean_over(records, self.weight_key), "epoch": self.trained_position.epoch if self.trained_position else self.train_iter.epoch,
                  "tokens": tokens, "tokens_per_sec": tokens / max(seconds, 1e-9), "model_flops_per_sec": flops / max(seconds, 1e-9),
                  "nonfinite_steps": nonfinite}
        record["grad_norm"] = float(np.mean([float(r["grad_norm"]) for r in records if math.isfinite(r["grad_norm"])]
                                            or [math.nan]))
        record["lr"] = float(records[-1]["lr"])
        if self.stage != "sft":  # pairs_per_sec, or KTO's examples_per_sec
            unit = self.weight_key.removeprefix("num_")
            record[f"{unit}_per_sec"] = sum(float(r[self.weight_key]) for r in records) / max(seconds, 1e-9)
        self.metrics_log.write(record)
        return record


def train(cfg, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    return Trainer(cfg, resume=resume, overwrite=overwrite).train()
