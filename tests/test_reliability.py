"""Reliability: each test injects a fault and checks the run survives it (or stops with a clear error).

Same set-up as test_train_loop (real HH rows, the Llama 2 tokenizer, a tiny random Llama on 8 virtual
CPU devices), smaller: 12 steps of 8 sequences of 64 tokens. A persistent XLA compilation cache shared
by this module's in-process runs and subprocesses keeps every run after the first cheap to start.

Faults: SIGTERM mid-run (preemption), SIGKILL while an async checkpoint is being written, truncated /
other-architecture / other-vocabulary checkpoints, NaN gradients and NaN weights, a second run on the
same output dir (live and stale locks), remote code in a HF model dir, unsafe YAML, pickle readers.
"""

import ast
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from local_processes import free_port, start_workers, wait_workers, xla_flags
from run_faults import (
    FAULT_STEPS as STEPS,
    assert_same_losses,
    fault_config,
    logged_steps,
    start_cli,
    tmp_dirs,
    train_reference,
    wait_for,
    write_config,
)
from tiny_runs import TINY_LLAMA, read_metrics

from jaxalign.checkpoint import model_io
from jaxalign.checkpoint.store import (
    QUARANTINE_DIR,
    NonFiniteModel,
    RunCheckpointer,
    all_finite,
    array_shapes,
    saved_tensors,
)
from jaxalign.config import load_config
from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, init_model
from jaxalign.run import lifecycle
from jaxalign.run.lifecycle import EXIT_PREEMPTED
from jaxalign.run.loop import Trainer, check_model_source
from jaxalign.runtime import run_lock
from jaxalign.runtime.sharding import make_mesh, use_mesh

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxalign"


@pytest.fixture(scope="module")
def base(shared_data, tmp_path_factory, jax_cache):
    root = tmp_path_factory.mktemp("reliability")
    return root, fault_config(shared_data, root)


@pytest.fixture(scope="module")
def reference(base):
    """The uninterrupted run every fault test compares with (checkpoints at 4, 8, 12; evals at 6, 12)."""
    return train_reference(*base)


# --- 1, 2, 5: preemption, a kill during an async checkpoint write, a second run on the same dir -----------

def test_sigterm_then_sigkill_during_a_save_then_resume_matches_uninterrupted_run(base, reference, jax_cache,
                                                                                   caplog):
    """`jaxalign train` in a subprocess gets SIGTERM mid-run: it finishes the step, writes a checkpoint of
    it, waits for the write and exits 75, status "preempted" (a second run on the dir meanwhile is refused). `--resume`
    (checkpointing every step) is SIGKILLed while an async save is in flight. A last resume takes over
    the stale lock, ignores and removes the half-written step and ends with the uninterrupted run's
    losses, bitwise, each step logged once."""
    root, cfg = base
    path, config = write_config(root, "preempted", cfg)
    run = pathlib.Path(config.output_dir)

    proc = start_cli(path, jax_cache)
    try:
        wait_for(lambda: max(logged_steps(run), default=0) >= 3, proc, "step 3")
        # A second run on the same output dir, while the first one trains: refused, naming the holder.
        with pytest.raises(JaxalignError, match=rf"in use by another run \(pid {proc.pid} on host "):
            Trainer(config, resume=True)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]  # "stopped early, resumable"
    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["stopped_at"]
    assert summary["preempted"] is True and summary["state"] == "preempted" and 3 <= stopped < STEPS, summary
    assert lifecycle.read_status(run)["state"] == "preempted" and lifecycle.read_status(run)["step"] == stopped
    assert f"received SIGTERM: stopping after step {stopped}" in err and "continue with --resume" in err
    assert max(logged_steps(run)) == stopped  # no step lost: the checkpoint is of the last step run
    assert (run / "checkpoints" / str(stopped) / "params").is_dir() and not tmp_dirs(run)
    assert not (run / run_lock.LOCK_FILE).exists()  # released on the way out

    # Resume, checkpointing every step; SIGKILL the moment a step dir is being written.
    proc = start_cli(path, jax_cache, "--resume", "--set", "checkpoint.every_steps=1")
    try:
        wait_for(lambda: bool(tmp_dirs(run)), proc, "an async checkpoint write", poll=0.001)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    partial = tmp_dirs(run)
    print(f"\nkilled during a save: partial step dirs left {partial}")
    if not partial:  # the rename won the race against the kill: leave a partial step as the kill would
        complete = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
        shutil.copytree(run / "checkpoints" / str(complete), run / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp-1")
        for f in (run / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp-1" / "params").rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
        partial = tmp_dirs(run)
    killed_at = max(logged_steps(run))
    assert json.loads((run / run_lock.LOCK_FILE).read_text())["pid"] == proc.pid  # left behind by the kill

    assert lifecycle.read_status(run)["state"] == "running"  # as the kill left it: not finished
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(config, resume=True)
    assert "taking over the stale lock" in caplog.text and str(proc.pid) in caplog.text
    resumed = int(trainer.state.step)
    assert stopped <= resumed <= killed_at and str(resumed) in {p.name for p in (run / "checkpoints").iterdir()}
    trainer.train()
    assert lifecycle.read_status(run)["state"] == "finished"
    assert_same_losses(run, reference, STEPS)
    assert not tmp_dirs(run), f"partial checkpoint {partial} not cleaned up"
    assert not (run / run_lock.LOCK_FILE).exists()


TWO_PROCESS_WORKER = """
import json, os, pathlib, signal, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, out, run = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
from jaxalign.errors import JaxalignError
from jaxalign.runtime.preemption import PreemptionWatch
from jaxalign.runtime.run_lock import acquire_for_job
stopped = None
with PreemptionWatch() as watch:
    for step in range(1, 100):
        if pid == 1 and step == 3:  # only process 1 is preempted
            os.kill(os.getpid(), signal.SIGTERM)
        if watch.requested():
            stopped = step
            break
try:
    acquire_for_job(run)
    lock = "acquired"
except JaxalignError as e:
    lock = str(e)
pathlib.Path(out, f"{pid}.json").write_text(json.dumps({"stopped": stopped, "received": watch.received, "lock": lock}))
jax.distributed.shutdown()
"""


def test_two_processes_stop_at_the_same_step_and_share_the_lock_verdict(tmp_path):
    """Multi-host: SIGTERM reaches only process 1 at step 3; both stop after step 3. Process 0 finds the
    run dir locked by a live run; both processes refuse (process 1 learns it by broadcast)."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    (run / run_lock.LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(),
                                                      "started": "now", "proc_start": None}))
    port = free_port()
    worker = tmp_path / "worker.py"
    worker.write_text(TWO_PROCESS_WORKER)
    env = {**os.environ, "XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(PACKAGE.parent)}
    wait_workers(start_workers(worker, [[i, port, tmp_path, run] for i in range(2)], env), timeout=120)
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    assert [r["stopped"] for r in results] == [3, 3]
    assert [r["received"] for r in results] == [None, signal.SIGTERM]
    assert results[0]["lock"].startswith(f"output dir {run} is in use by another run (pid {os.getpid()}")
    assert results[1]["lock"] == f"output dir {run} is in use by another run (process 0 could not lock it; see its log)"


# --- 3: corrupt or mismatched checkpoints ------------------------------------------------------------

def truncate_params(step_dir: pathlib.Path) -> None:
    for f in (step_dir / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the tensor data files
            f.write_bytes(f.read_bytes()[:10])


# Orbax's metadata reader leaves an "Event loop is closed" traceback behind when a checkpoint is unreadable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_or_mismatched_checkpoints_are_named_and_resume_falls_back(base, reference, tmp_path, caplog):
    root, cfg = base
    run = tmp_path / "truncated"
    shutil.copytree(reference, run)
    (run / model_io.BEST_FILE).write_text(json.dumps({"step": 12, "metric": "eval/loss", "value": 0.0}))
    truncate_params(run / "checkpoints" / "12")

    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    with use_mesh(mesh), pytest.raises(JaxalignError, match=r"checkpoint .*truncated/checkpoints/12 cannot be "
                                                           r"read \(a truncated, missing or corrupt file\?\)"):
        model_io.load_model(run / "checkpoints" / "12", mesh)

    _, config = write_config(root, "unused", cfg)
    config.output_dir = str(run)
    previous = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit() and int(p.name) < 12)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(config, resume=True)
    assert int(trainer.state.step) == previous
    assert f"skipping checkpoint {run}/checkpoints/12: checkpoint {run}/checkpoints/12 cannot be read" in caplog.text
    assert f"fell back from checkpoint 12 to {previous}" in caplog.text
    assert (run / QUARANTINE_DIR / "12" / "params").is_dir() and not (run / "checkpoints" / "12").exists()
    best = run / model_io.BEST_FILE  # re-derived from the checkpoints that restore (none of which has an eval)
    assert not best.exists() or json.loads(best.read_text())["step"] != 12
    trainer.train()  # the steps after it again, as the uninterrupted run had them
    assert_same_losses(run, reference, STEPS)
    assert (run / "checkpoints" / "12" / "params").is_dir()  # written again, whole

    # Checkpoints of another architecture, or another vocabulary, than the run's model: --resume names
    # each one and what differs, and moves nothing (the config is what is wrong).
    other = tmp_path / "other" / "checkpoints"
    shapes = array_shapes(saved_tensors(reference / "checkpoints" / "12" / "params"))
    write_fake_checkpoint(other, 5, {**shapes, "layers/w_gate": (2, 32, 96), "layers/w_down": (2, 96, 32)})
    write_fake_checkpoint(other, 6, {**shapes, "embed": (1000, 32)})
    trainer.run, trainer.ckpt = other.parent, RunCheckpointer(other, async_save=False)
    with pytest.raises(JaxalignError, match=r"--resume: no checkpoint in .*other/checkpoints restores") as info:
        trainer.restore_latest()
    trainer.ckpt.close()
    message = str(info.value)
    assert (f"checkpoint {other}/5 does not fit the model (another architecture or vocabulary?): layers/w_down: "
            "checkpoint has shape (2, 96, 32), the model (2, 64, 32); layers/w_gate: checkpoint has shape "
            "(2, 32, 96), the model (2, 32, 64)") in message, message
    assert f"checkpoint {other}/6 does not fit the model (another architecture or vocabulary?): embed: checkpoint " \
           "has shape (1000, 32), the model (32000, 32)" in message, message
    assert sorted(p.name for p in other.iterdir()) == ["5", "6"]

    # A model checkpoint whose params/ hold another vocabulary than its jaxalign_model.json says.
    model_dir = tmp_path / "other" / "model_ckpt"
    shutil.copytree(run / "model", model_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(model_dir / "params", nested_zeros({**shapes, "embed": (512, 32)}))
    with use_mesh(mesh), pytest.raises(JaxalignError, match=r"checkpoint .*model_ckpt does not fit the model .*"
                                                           r"embed: checkpoint has shape \(512, 32\), the model "
                                                           r"\(32000, 32\).*model_ckpt/jaxalign_model\.json"):
        model_io.load_model(model_dir, mesh)

    # A HF model dir whose safetensors file was cut short (an interrupted download).
    from safetensors.numpy import save_file

    from jaxalign.export.hf import hf_config_dict
    from jaxalign.models.hf import expected_hf_tensors

    hf, small = tmp_path / "hf", ModelConfig.from_hf_dict({**TINY_LLAMA, "vocab_size": 64})
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config_dict(small, "float32")))
    save_file({n: np.zeros(s, np.float32) for n, s in expected_hf_tensors(small).items()},
              str(hf / "model.safetensors"))
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    with use_mesh(mesh), pytest.raises(JaxalignError, match=r"model .*/hf cannot be read \(a truncated or corrupt "
                                                           r"file\?\): SafetensorError"):
        model_io.load_model(hf, mesh)


def nested_zeros(shapes: dict[str, tuple]) -> dict:
    """{"a/b": shape} -> {"a": {"b": zeros(shape)}}"""
    tree: dict = {}
    for name, shape in shapes.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = np.zeros(shape, np.float32)
    return tree


def write_fake_checkpoint(directory: pathlib.Path, step: int, shapes: dict[str, tuple]) -> None:
    ckpt = RunCheckpointer(directory, async_save=False)
    ckpt.save(step, nested_zeros(shapes), {"count": np.int32(step)}, {"data_iterator": {}})
    ckpt.close()




# --- 4: non-finite loss, gradients or weights ---------------------------------------------------------

def test_nonfinite_gradients_stop_names_step_batch_and_last_good_checkpoint(base, reference):
    """lr=1e30 without warmup: step 1's update blows the weights up and step 2's gradients are NaN.
    With train.on_nonfinite=stop the run ends there, naming the step, the batch and the last checkpoint
    (whose write it waited for); the lock is released."""
    root, cfg = base
    _, config = write_config(root, "nan_stop", cfg, [
        "optimizer.lr=1e30", "optimizer.warmup_steps=0", "train.max_steps=4", "checkpoint.every_steps=1",
        "train.eval_every=0", "train.on_nonfinite=stop"])
    run = pathlib.Path(config.output_dir)
    with pytest.raises(JaxalignError, match=r"non-finite loss or gradients at step 2 \(epoch 0, batch 1 of the "
                                            rf"epoch\); the update was not applied; last good checkpoint: "
                                            rf"{run}/checkpoints/1\. Lower optimizer.lr"):
        Trainer(config).train()
    train, _ = read_metrics(run)
    assert sorted(train) == [1] and np.isfinite(train[1]["loss"])
    assert (run / "checkpoints" / "1" / "params").is_dir() and not tmp_dirs(run)
    assert not (run / run_lock.LOCK_FILE).exists()


def test_nan_weights_are_never_saved_or_marked_best(base, tmp_path):
    """A starting checkpoint with NaN weights, train.on_nonfinite=skip (the default): every update is
    skipped and counted in metrics.jsonl, and the first checkpoint is refused, naming the step."""
    root, cfg = base
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    with use_mesh(mesh):
        model = init_model(ModelConfig.from_hf_dict(TINY_LLAMA), mesh)
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: x * np.float32("nan"), state))
        model_io.save_model_checkpoint(model, tmp_path / "nan_model")
    _, config = write_config(root, "nan_init", cfg, [f"model.path={tmp_path / 'nan_model'}", "model.config=null",
                                                     "train.max_steps=3", "checkpoint.every_steps=2"])
    run = pathlib.Path(config.output_dir)
    with pytest.raises(JaxalignError, match=r"step 2: refusing to save a checkpoint whose parameters are not all "
                                            r"finite.*never saved or marked best; last good checkpoint: none"):
        Trainer(config).train()
    train, _ = read_metrics(run)
    assert [train[s]["nonfinite_steps"] for s in (1, 2)] == [1, 2]  # skipped and counted until the save
    assert not [p for p in (run / "checkpoints").iterdir()] and not (run / model_io.BEST_FILE).exists()

    # The checkpointer on its own: a NaN validation loss or NaN parameters are refused; nothing is best.
    ckpt = RunCheckpointer(tmp_path / "ckpt", keep=2, best_metric="eval/loss", async_save=False)
    good, bad = {"w": np.ones(3, np.float32)}, {"w": np.array([1, np.inf, 0], np.float32)}
    opt = {"count": np.int32(0)}
    assert all_finite(good) and not all_finite(bad) and all_finite({"n": np.int32(3)})
    with pytest.raises(NonFiniteModel, match="non-finite eval/loss=nan"):
        ckpt.save(1, good, opt, {}, {"eval/loss": float("nan")})
    with pytest.raises(NonFiniteModel, match="not all finite"):
        ckpt.save(2, bad, opt, {}, {"eval/loss": 1.0})
    ckpt.save(3, good, opt, {}, {"eval/loss": 2.0})
    assert ckpt.all_steps() == [3] and ckpt.best_step() == 3
    ckpt.close()


# --- 5: the run-dir lock --------------------------------------------------------------------------------

def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    import socket

    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = {"pid": sleeper.pid, "hostname": socket.gethostname(), "started": "2025-01-01T00:00:00+00:00",
                "proc_start": run_lock._proc_start(sleeper.pid)}
        (run / run_lock.LOCK_FILE).write_text(json.dumps(live))
        with pytest.raises(JaxalignError, match=rf"in use by another run \(pid {sleeper.pid} on host "
                                                rf"{socket.gethostname()}, started 2025-01-01.*delete "):
            run_lock.RunLock(run).acquire()
        # A recycled pid (same number, another process start time) is not the holder.
        (run / run_lock.LOCK_FILE).write_text(json.dumps({**live, "proc_start": live["proc_start"] - 1}))
        lock = run_lock.RunLock(run).acquire()
        lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()

    # The holder died (SIGKILL, crash): its lock is stale, taken over with a warning, released at the end.
    (run / run_lock.LOCK_FILE).write_text(json.dumps({**live, "proc_start": None}))
    with caplog.at_level(logging.WARNING):
        lock = run_lock.RunLock(run).acquire()
    assert f"taking over the stale lock {run / run_lock.LOCK_FILE}" in caplog.text
    assert json.loads((run / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / run_lock.LOCK_FILE).exists()

    # Another host's lock cannot be checked from here: refused, with the file to delete.
    (run / run_lock.LOCK_FILE).write_text(json.dumps({**live, "hostname": "elsewhere"}))
    with pytest.raises(JaxalignError, match=r"on host elsewhere.*delete .*run\.lock"):
        run_lock.RunLock(run).acquire()
    (run / run_lock.LOCK_FILE).write_text("{half a lock")  # an unreadable lock: its writer never finished
    run_lock.RunLock(run).acquire().release()


# --- 8: safety of inputs ---------------------------------------------------------------------------------

def test_no_pickle_readers_and_no_unsafe_yaml_in_the_package():
    """No module imports a pickle-family reader, calls yaml.load / unsafe loaders, allows pickles in
    numpy, or hard-codes trust_remote_code=True."""
    unsafe_modules = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "torch"}
    problems = []
    files = sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "tools").glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            problems += [f"{path}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in unsafe_modules]
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "torch.load"):
                    problems.append(f"{path}:{node.lineno} calls {func}")
                for kw in node.keywords:
                    if kw.arg in ("allow_pickle", "trust_remote_code") and isinstance(kw.value, ast.Constant) \
                            and kw.value.value is True:
                        problems.append(f"{path}:{node.lineno} passes {kw.arg}=True")
    assert len(files) > 20 and not problems, problems


def test_yaml_python_tags_are_never_constructed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "c.yaml"
    path.write_text(f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(JaxalignError, match=r"cannot parse config file"):
        load_config(path)
    # An override is YAML too: a tag it cannot safely construct stays a plain string.
    cfg = load_config(None, [f"output_dir=!!python/object/apply:os.system ['touch {marker}']"])
    assert cfg.output_dir.startswith("!!python/object") and not marker.exists()


def test_remote_code_in_a_hf_dir_runs_only_with_trust_remote_code(base, tmp_path, jax_cache):
    """A HF dir whose config.json and tokenizer_config.json point `auto_map` at a module that creates a
    marker file: loading its config, weights and tokenizer the way a run does never imports it."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxalign.export.hf import hf_config_dict
    from jaxalign.models.hf import expected_hf_tensors

    root, cfg = base
    hf = tmp_path / "hf"
    marker = tmp_path / "remote_code_ran"
    small = ModelConfig.from_hf_dict({**TINY_LLAMA, "vocab_size": 64})
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    hf.mkdir()
    rng = np.random.default_rng(0)
    save_file({name: rng.normal(0, 0.02, shape).astype(np.float32)
               for name, shape in expected_hf_tensors(small).items()}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(hf_config_dict(small, "float32")))
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(hf)
    (hf / "evil_code.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                     "from transformers import LlamaConfig as EvilConfig\n"
                                     "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    for name, auto_map in (("config.json", {"AutoConfig": "evil_code.EvilConfig",
                                            "AutoModelForCausalLM": "evil_code.EvilModel"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["evil_code.EvilTokenizer",
                                                                        "evil_code.EvilTokenizer"]})):
        data = json.loads((hf / name).read_text())
        (hf / name).write_text(json.dumps({**data, "auto_map": auto_map}))

    _, config = write_config(root, "remote", cfg, [f"model.path={hf}", "model.config=null", "tokenizer.path="])
    assert config.model.trust_remote_code is False  # the default
    try:
        check_model_source(config)  # the model's config and tokenizer, as a run reads them
    except JaxalignError as e:  # refusing to load the custom tokenizer class is fine too
        assert "trust_remote_code" in str(e) or "custom code" in str(e), e
    with use_mesh(mesh):
        model_io.load_model(hf, mesh)
    try:
        model_io.model_tokenizer(hf)  # what eval / generate / export use
    except JaxalignError as e:
        assert "trust_remote_code" in str(e) or "custom code" in str(e), e
    assert not marker.exists(), "remote code ran without trust_remote_code"

    # The control: with the flag, the same loader imports the module (in a subprocess, so the dynamic
    # module lands in a scratch HF cache).
    code = ("from jaxalign.data.tokenizer import load_tokenizer\n"
            f"try:\n    load_tokenizer({str(hf)!r}, trust_remote_code=True)\nexcept Exception as e:\n"
            "    print('load failed after import:', e)\n")
    env = {**os.environ, **jax_cache, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=120)
    assert marker.exists(), "the control did not import the remote code: the test proves nothing"
