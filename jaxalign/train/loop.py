"""`jaxalign train`: one loop for both stages; the config's `stage` picks the objective and batches.

Run dir: config.yaml (resolved), metrics.jsonl, model/ (model description + tokenizer, so every
checkpoint is a model path), checkpoints/{step}/, best.json, eval/. Process 0 writes shared files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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

from jaxalign import model_io, paths, run_lock
from jaxalign.checkpoint import NonFiniteModel, RunCheckpointer, abstract_like
from jaxalign.config import save_config
from jaxalign.data.iterator import make_iterator, to_global_arrays
from jaxalign.data.prefetch import Position, Prefetcher
from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, init_model
from jaxalign.preemption import PreemptionWatch
from jaxalign.sharding import make_mesh, merged_rules, use_mesh
from jaxalign.train.optimizer import build_optimizer
from jaxalign.train.step import (
    Objective, TrainState, batch_shardings, jit_train_step, make_eval_step, make_train_step, reference_logps,
)

log = logging.getLogger(__name__)


def objective_from_config(cfg) -> Objective:
    return Objective(stage=cfg.stage, chunk_size=cfg.model.logits_chunk_size, z_loss=cfg.sft.z_loss,
                     beta=cfg.dpo.beta, loss_type=cfg.dpo.loss, label_smoothing=cfg.dpo.label_smoothing,
                     sft_weight=cfg.dpo.sft_weight)


def model_options(cfg) -> dict[str, Any]:
    m = cfg.model
    return {"dtype": m.dtype, "param_dtype": m.param_dtype, "remat": m.remat, "attention": m.attention,
            "scan_layers": m.scan_layers}


def initial_model_path(cfg) -> str:
    """DPO starts from `dpo.init_from` (an SFT run dir, a checkpoint or an HF dir) when given."""
    if cfg.stage == "dpo" and cfg.dpo.init_from:
        return cfg.dpo.init_from
    return cfg.model.path


def initial_model_key(cfg) -> str:
    """The config key that names the starting model (for error messages)."""
    return "dpo.init_from" if cfg.stage == "dpo" and cfg.dpo.init_from else "model.path"


def check_run_dir(cfg, resume: bool, overwrite: bool) -> paths.Path:
    """Refuse to mix two runs in one dir: an existing run needs --resume or --overwrite. Writes nothing."""
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
    return run


def check_model_source(cfg):
    """Resolve the starting model's architecture and the run's tokenizer, and check they fit, before
    anything is written or loaded: (ModelConfig, tokenizer)."""
    path = initial_model_path(cfg)
    if path:
        key = initial_model_key(cfg)
        try:
            model_cfg = model_io.load_model_config(path)
        except JaxalignError as e:
            raise JaxalignError(f"{key}={path!r}: {e}") from None
        if cfg.model.config:
            wanted = ModelConfig.from_hf_dict(dict(cfg.model.config), source="model.config")
            diff = [f"{f.name}: model.config has {getattr(wanted, f.name)!r}, {key} has "
                    f"{getattr(model_cfg, f.name)!r}" for f in dataclasses.fields(ModelConfig)
                    if getattr(wanted, f.name) != getattr(model_cfg, f.name)]
            if diff:
                raise JaxalignError(f"{key}={path!r} is another architecture than model.config ("
                                    + "; ".join(diff) + "); make them agree, or remove model.config "
                                    f"to take the architecture of {key}")
    else:
        if not cfg.model.config:
            raise JaxalignError("set model.path (an HF dir or jaxalign checkpoint) or model.config (an inline "
                                "HF-style architecture to initialise randomly)")
        model_cfg = ModelConfig.from_hf_dict(dict(cfg.model.config), source="model.config")
    tokenizer = run_tokenizer(cfg)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        where = f"{initial_model_key(cfg)}={path!r}" if path else "model.config"
        tok = cfg.tokenizer.path or "the model's own tokenizer"
        raise JaxalignError(f"the tokenizer ({tok}) has {tokenizer.vocab_size} tokens but the model's vocab_size "
                            f"({where}) is {model_cfg.vocab_size}: token ids past {model_cfg.vocab_size - 1} "
                            "would have no embedding; use the tokenizer the model was trained with")
    return model_cfg, tokenizer


def prepare_run_dir(cfg, resume: bool, overwrite: bool) -> paths.Path:
    """Create (or, with --overwrite, replace) the run dir and write the resolved config."""
    run = check_run_dir(cfg, resume, overwrite)
    _barrier("jaxalign.prepare_run_dir.checked")  # multi-host: every process checked before process 0 writes
    if (run / "config.yaml").exists() and overwrite:
        if jax.process_index() == 0:
            for child in run.iterdir():  # everything but the lock this run holds
                if child.name != run_lock.LOCK_FILE:
                    paths.remove(child)
    if jax.process_index() == 0:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
    _barrier("jaxalign.prepare_run_dir.written")
    return run


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def load_model_and_tokenizer(cfg, mesh, rules, checked=None):
    """(model, tokenizer, source dtype); `checked` is check_model_source's result when already done."""
    model_cfg, tokenizer = checked or check_model_source(cfg)
    path = initial_model_path(cfg)
    options = model_options(cfg)
    if path:
        model = model_io.load_model(path, mesh, rules, **options)
        dtype = model_io.source_dtype(path)
    else:
        model = init_model(model_cfg, mesh, rules, seed=cfg.train.seed, **options)
        dtype = cfg.model.param_dtype
    return model, tokenizer, dtype


def run_tokenizer(cfg):
    """The run's tokenizer: tokenizer.path, else the starting model's own."""
    from jaxalign.tokenizer import load_tokenizer

    path = initial_model_path(cfg)
    tok_path = cfg.tokenizer.path or (str(model_io.tokenizer_path(path)) if path else "")
    if not tok_path:
        raise JaxalignError("set tokenizer.path (or model.path to a model dir with a tokenizer)")
    return load_tokenizer(tok_path, cfg.tokenizer.chat_template, cfg.model.trust_remote_code)


class MetricsLog:
    """metrics.jsonl (one JSON object per record) on process 0, plus TensorBoard when installed.

    The TensorBoard writer (a thread, a queue and an open event file) is opened on the first record
    and closed by `close()` at the end of `Trainer.train`, so runs in one process do not pile them up."""

    def __init__(self, run: paths.Path):
        self.path = run / "metrics.jsonl"
        self.writer = None
        # tensorboardX writes to gs:// and s3:// itself; it would take other URLs for local paths.
        local_or_known = not paths.is_remote(run) or str(run).startswith(("gs://", "s3://"))
        self.tensorboard_dir = run / "tensorboard" if local_or_known else None

    def _open_writer(self) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self.tensorboard_dir = None
            return
        try:
            self.writer = SummaryWriter(str(self.tensorboard_dir))
        except ImportError as e:  # gs:// needs google-cloud-storage, s3:// boto3 (the `gcs` extra has the first)
            log.warning("no TensorBoard events in %s: %s", self.tensorboard_dir, e)
            self.tensorboard_dir = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        paths.append_text(self.path, json.dumps(record) + "\n")
        if self.writer is None and self.tensorboard_dir is not None:
            self._open_writer()
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, record["step"])
            self.writer.flush()


def mean_over(records: list[dict[str, Any]], weight_key: str) -> dict[str, float]:
    """Average metrics of several batches, each weighted by its tokens (SFT) or pairs (DPO)."""
    weights = np.array([float(r[weight_key]) for r in records])
    total = max(weights.sum(), 1.0)
    keys = [k for k in records[0] if not k.startswith("num_")]
    out = {k: float(sum(float(r[k]) * w for r, w in zip(records, weights)) / total) for k in keys}
    out[weight_key] = float(weights.sum())
    return out


class Trainer:
    """Everything one run holds: mesh, model state, data iterators, compiled steps, checkpoints."""

    def __init__(self, cfg, *, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        # Every check that needs no weights runs before the run dir is written or anything compiles.
        check_run_dir(cfg, resume, overwrite)
        checked = check_model_source(cfg)
        # One run per output dir: taken before anything in it is written or replaced.
        self.lock = run_lock.acquire_for_job(cfg.output_dir)
        try:
            self._init(cfg, checked, resume, overwrite)
        except BaseException:
            self.release_lock()
            raise

    def _init(self, cfg, checked, resume: bool, overwrite: bool) -> None:
        from jaxalign.data.pipeline import load_examples

        self.run = prepare_run_dir(cfg, resume, overwrite)
        self.rules = merged_rules(dict(cfg.mesh.rules))
        self.mesh = make_mesh({k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")})
        self.stage = cfg.stage
        self.weight_key = "num_tokens" if self.stage == "sft" else "num_pairs"
        with use_mesh(self.mesh, self.rules):
            model, self.tokenizer, source_dtype = load_model_and_tokenizer(cfg, self.mesh, self.rules, checked)
            model_io.write_model_description(self.run / model_io.RUN_MODEL_DIR, model.cfg, self.tokenizer,
                                             source_dtype, cfg.model.param_dtype)
            self.graphdef, params = nnx.split(model)
            params = nnx.to_pure_dict(params)
            self.train_examples, self.eval_examples, self.data_stats = load_examples(cfg, self.tokenizer, self.run)
            self.objective = objective_from_config(cfg)
            self.ref_params = None
            if self.stage == "dpo":
                if cfg.dpo.reference == "model":
                    # A frozen copy: never donated, never updated.
                    self.ref_params = jax.tree.map(jnp.copy, params)
                else:
                    self.precompute_reference(params)
            pad_id = self.tokenizer.pad_id or 0
            self.train_iter = make_iterator(self.train_examples, cfg, mesh=self.mesh, pad_id=pad_id)
            self.trained_position: Position | None = None  # the data position after the last trained step
            self.pad_id = pad_id
            self.total_steps = self.planned_steps()
            optimizer, self.schedule = build_optimizer(cfg.optimizer, self.total_steps)
            self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                    opt_state=jax.jit(optimizer.init)(params))
            self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
            accum = cfg.train.batch_size // cfg.train.micro_batch_size if cfg.train.micro_batch_size else 1
            self.step_fn_raw = make_train_step(self.graphdef, self.objective, optimizer, self.schedule, accum)
            self.eval_fn = jax.jit(make_eval_step(self.graphdef, self.objective))
            self._compiled: dict[tuple, Any] = {}
        best_metric = self.best_metric_name()
        self.ckpt = RunCheckpointer(self.run / "checkpoints", keep=cfg.checkpoint.keep,
                                    best_metric=best_metric if cfg.checkpoint.keep_best else None,
                                    best_mode="max" if best_metric == "eval/rewards/accuracies" else "min",
                                    async_save=cfg.checkpoint.async_save)
        self.metrics_log = MetricsLog(self.run)
        self.best: tuple[int, float] | None = None
        self.last_saved: int | None = None
        if resume:
            self.restore_latest()

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # --- set-up helpers ------------------------------------------------------------------------

    def planned_steps(self) -> int:
        if self.cfg.train.max_steps > 0:
            return self.cfg.train.max_steps
        return max(1, self.cfg.train.epochs * self.train_iter.steps_per_epoch)

    def best_metric_name(self) -> str:
        choice = self.cfg.checkpoint.best_metric
        if choice == "eval_rewards_accuracy" or (choice == "auto" and self.stage == "dpo"):
            return "eval/rewards/accuracies"
        return "eval/loss"

    def precompute_reference(self, params) -> None:
        """`dpo.reference: precomputed`: score every pair once with the starting weights and keep
        the log-probs with the data, so no second model is held during training."""
        from jaxalign.data.batching import dpo_batch

        # Replicated output: every process reads all log-probs (multi-host: no non-addressable shards).
        fn = jax.jit(lambda p, b: reference_logps(nnx.merge(self.graphdef, p), b, self.objective.chunk_size),
                     out_shardings=jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        for examples in (self.train_examples, self.eval_examples):
            bs = self.cfg.eval.batch_size
            for start in range(0, len(examples), bs):
                chunk = examples[start:start + bs]
                length = max(max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
                                 for e in chunk), 2)
                length = -(-length // self.cfg.data.pad_to_multiple_of) * self.cfg.data.pad_to_multiple_of
                host = dpo_batch(chunk, length, self.tokenizer.pad_id or 0, num_pairs=bs)
                logps = np.asarray(jax.device_get(fn(params, host)))
                for j, ex in enumerate(chunk):
                    ex["ref_chosen_logp"], ex["ref_rejected_logp"] = float(logps[j]), float(logps[bs + j])

    def compiled_step(self, batch):
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in self._compiled:
            ref_shardings = None if self.ref_params is None else jax.tree.map(lambda x: x.sharding, self.ref_params)
            shards = batch_shardings({k: v.shape for k, v in batch.items()}, self.mesh)
            self._compiled[key] = jit_train_step(self.step_fn_raw, self.state_shardings, shards, ref_shardings)
        return self._compiled[key]

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self, step: int, eval_metrics: dict[str, float] | None = None) -> None:
        """Checkpoint `step` asynchronously; with validation metrics, track the best in RUN/best.json."""
        # The position after the last trained batch (the prefetcher may have drawn one more).
        data_state = self.trained_position.state if self.trained_position else self.train_iter.state()
        meta = {"data_iterator": data_state, "seed": self.cfg.train.seed, "total_steps": self.total_steps}
        metrics = None if not eval_metrics else {k: v for k, v in eval_metrics.items() if k.startswith("eval/")}
        try:
            self.ckpt.save(step, self.state.params, self.state.opt_state, meta, metrics)
        except NonFiniteModel as e:  # skipping more updates cannot repair the model: stop, whatever on_nonfinite
            raise JaxalignError(f"{e}: a non-finite model is never saved or marked best; last good checkpoint: "
                                f"{self.last_good_checkpoint()}. Lower optimizer.lr (or raise warmup), or check "
                                "the data and the starting weights") from None
        self.last_saved = step
        name = self.ckpt.best_metric
        if metrics and name in metrics:
            value = metrics[name]
            # A tie goes to the later step, as Orbax's BestN retention decides it: best.json must name
            # the checkpoint retention keeps.
            better = self.best is None or (value <= self.best[1] if self.ckpt.best_mode == "min"
                                           else value >= self.best[1])
            if better:
                self.best = (step, value)
                self.write_best()

    def write_best(self) -> None:
        """RUN/best.json from self.best. Written before the async save completes: readers fall back to
        the latest complete step until it does."""
        if jax.process_index() != 0:
            return
        path = self.run / model_io.BEST_FILE
        if self.best is None:
            path.unlink(missing_ok=True)
            return
        step, value = self.best
        path.write_text(json.dumps({"step": step, "metric": self.ckpt.best_metric, "value": value}))

    def last_good_checkpoint(self) -> str:
        """The newest complete checkpoint (after pending async writes finish), for error messages."""
        self.ckpt.wait()
        last = self.ckpt.latest_step()
        return str(self.run / "checkpoints" / str(last)) if last is not None else "none"

    def restore_latest(self) -> None:
        """Continue from the newest checkpoint that restores. Newer ones that do not (a truncated file,
        another architecture) are named in the log and moved to RUN/skipped_checkpoints/."""
        steps = self.ckpt.all_steps()
        if not steps:
            log.info("--resume: no checkpoint in %s yet, starting from the beginning", self.run / "checkpoints")
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

    # --- evaluation ----------------------------------------------------------------------------

    def evaluate(self, params=None) -> dict[str, float]:
        """Metrics over the held-out set (or its first eval.batches batches), same definitions as training."""
        if not self.eval_examples:
            return {}
        params = self.state.params if params is None else params
        it = make_iterator(self.eval_examples, self.cfg, train=False, mesh=self.mesh, pad_id=self.pad_id)
        records = []
        with use_mesh(self.mesh, self.rules):
            for i, host in enumerate(it):
                if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                    break
                batch = to_global_arrays(host, self.mesh)
                records.append(jax.device_get(self.eval_fn(params, batch, self.ref_params)))
        return {f"eval/{k}" if not k.startswith("num_") else f"eval/{k}": v
                for k, v in mean_over(records, self.weight_key).items()}

    # --- the loop ------------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Run to train.max_steps (or the planned epochs). `stop_after`: return after that step as a
        preempted run would, with a checkpoint of it written; `--resume` then continues exactly.
        SIGTERM does the same after the current step (summary["preempted"]); on an error, pending
        checkpoint writes complete before it propagates, and the run dir's lock is released."""
        cfg = self.cfg
        start = int(self.state.step)
        end = self.total_steps if stop_after is None else max(start, min(stop_after, self.total_steps))
        pending: list[dict] = []
        last_eval: dict[str, float] = {}
        nonfinite_steps = 0
        t_last = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=start, disable=jax.process_index() != 0, dynamic_ncols=True,
                   desc=f"{self.stage}")
        preempt, preempted_at = PreemptionWatch(), None
        feed = Prefetcher(self.train_iter, self.mesh)
        with use_mesh(self.mesh, self.rules), preempt, self._finish_on_error(bar):
            for step in range(start + 1, end + 1):
                drawn = feed.take()
                batch = drawn.arrays
                self.state, metrics = self.compiled_step(batch)(self.state, batch, self.ref_params)
                if step < end:
                    feed.prefetch()  # host work for the next step while the device runs this one
                self.trained_position = position = drawn.position
                pending.append(metrics)
                if int(metrics["nonfinite"]):
                    nonfinite_steps += 1
                    if cfg.train.on_nonfinite == "stop":
                        raise JaxalignError(
                            f"non-finite loss or gradients at step {step} (epoch {position.epoch}, batch "
                            f"{position.batch_index} of the epoch); the update was not applied; last good "
                            f"checkpoint: {self.last_good_checkpoint()}")
                    log.warning("step %d: non-finite loss or gradients; update skipped", step)
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
                epoch_end = position.epoch_done
                if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or is_last or (
                        cfg.checkpoint.save_at_epoch_end and epoch_end):
                    self.save(step, evaluated)
                if preempt.requested() and step < end:  # every process stops at this same step
                    log.warning("received %s: stopping after step %d", signal.Signals(preempt.received).name
                                if preempt.received else "a stop signal on another process", step)
                    end = preempted_at = step
                    break
            if end < self.total_steps and end > start:
                if pending:
                    self.log_train(end, pending, time.perf_counter() - t_last, nonfinite_steps)
                if self.last_saved != end:
                    self.save(end)
        bar.close()
        self.ckpt.close()  # waits for the async writes
        summary = {"steps": end, "nonfinite_steps": nonfinite_steps, **last_eval,
                   "best_checkpoint": str(model_io.resolve_model_path(self.run))}
        if end < self.total_steps:
            summary["stopped_at"] = end
        if preempted_at is not None:
            summary["preempted"] = True
            log.warning("preempted: stopped after step %d with checkpoint %s written; continue with --resume",
                        end, self.run / "checkpoints" / str(end))
        if jax.process_index() == 0:
            (self.run / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics_log.close()
        self.release_lock()
        return summary

    @contextlib.contextmanager
    def _finish_on_error(self, bar):
        """On any error in the loop: let pending checkpoint writes complete (so the last good checkpoint
        is whole) and release the run dir's lock before the error propagates."""
        try:
            yield
        except BaseException:
            bar.close()
            try:
                self.ckpt.close()
            except Exception:  # noqa: BLE001  (the original error matters more)
                log.exception("while finishing checkpoint writes after an error")
            self.metrics_log.close()
            self.release_lock()
            raise

    def log_train(self, step: int, pending: list[dict], seconds: float, nonfinite: int) -> dict:
        records = jax.device_get(pending)
        tokens = sum(int(r["num_input_tokens"]) for r in records)  # the global batches', all processes
        record = {"step": step, **mean_over(records, self.weight_key), "epoch": self.trained_position.epoch if self.trained_position else self.train_iter.epoch,
                  "tokens": tokens, "tokens_per_sec": tokens / max(seconds, 1e-9), "nonfinite_steps": nonfinite}
        record["grad_norm"] = float(np.mean([float(r["grad_norm"]) for r in records if math.isfinite(r["grad_norm"])]
                                            or [math.nan]))
        record["lr"] = float(records[-1]["lr"])
        if self.stage == "dpo":
            record["pairs_per_sec"] = sum(float(r["num_pairs"]) for r in records) / max(seconds, 1e-9)
        self.metrics_log.write(record)
        return record


def train(cfg, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    return Trainer(cfg, resume=resume, overwrite=overwrite).train()
