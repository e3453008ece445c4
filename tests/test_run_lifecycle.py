"""The run lifecycle (jaxalign.run.lifecycle): status, exit codes, resume checks, best-by-validation,
signals and non-finite streaks, each injected into a real run (processes and signals, no mocks).

Same tiny set-up as test_reliability (real HH rows copied to a local file, the Llama 2 tokenizer, a
2-layer random Llama on 8 virtual CPU devices): 12 steps of 8 sequences of 64 tokens.
"""

import gzip
import hashlib
import json
import pathlib
import signal

import numpy as np
import pytest
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
from tiny_runs import read_metrics

from jaxalign import cli
from jaxalign.checkpoint import model_io
from jaxalign.config import load_config, load_stage_config
from jaxalign.errors import JaxalignError
from jaxalign.run import lifecycle
from jaxalign.run.lifecycle import EXIT_PREEMPTED
from jaxalign.run.loop import Trainer
from jaxalign.runtime import run_lock
from jaxalign.runtime.sharding import make_mesh, use_mesh


@pytest.fixture(scope="module")
def base(shared_data, tmp_path_factory, jax_cache):
    """The fault tests' config on a copy of the first 120 HH rows as a plain JSONL file (a test edits it)."""
    root = tmp_path_factory.mktemp("lifecycle")
    with gzip.open(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as f:
        rows = [next(f) for _ in range(120)]
    data = root / "hh.jsonl"
    data.write_text("".join(rows))
    cfg = fault_config(shared_data, root)
    cfg["data"]["train"] = str(data)
    return root, cfg


@pytest.fixture(scope="module")
def reference(base):
    """An uninterrupted run: finished, checkpoints at 4, 8, 12."""
    return train_reference(*base)


def snapshot(run: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def cli_run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


# --- a resume that does not fit changes nothing --------------------------------------------------------

def test_a_resume_that_does_not_fit_names_each_key_and_leaves_every_file_byte_identical(base, reference, capsys):
    """`train --resume` with another architecture, learning rate, step count or stage fails before anything
    is written, naming each differing key; every file of the run is byte-identical afterwards and its
    checkpoints still load as a model. So does a resume whose data file changed under the same config."""
    root, cfg = base
    path = root / "ref.yaml"
    before = snapshot(reference)
    cases = {
        "model.config.hidden_size=64": ["model.config: the run has", '"hidden_size": 32', '"hidden_size": 64'],
        "optimizer.lr=0.1": ["optimizer.lr: the run has 0.003, now 0.1"],
        "train.max_steps=20": ["train.max_steps: the run has 12, now 20"],
    }
    for change, expected in cases.items():
        code, err = cli_run(["train", "--config", str(path), "--resume", "--set", change], capsys)
        assert code == 2, err
        assert "was started with other settings than these (config.yaml)" in err and "Nothing in" in err, err
        for text in expected:
            assert text in err, (change, err)
        assert snapshot(reference) == before, change
    # Two changes at once: both named.
    code, err = cli_run(["train", "--config", str(path), "--resume", "--set", "optimizer.lr=0.1",
                         "--set", "data.max_length=128"], capsys)
    assert code == 2 and "optimizer.lr" in err and "data.max_length: the run has 64, now 128" in err, err
    # The data file changed under the same config: the manifest's data fingerprint differs.
    data = pathlib.Path(cfg["data"]["train"])
    original = data.read_text()
    try:
        lines = original.splitlines(keepends=True)
        data.write_text("".join(lines[1:]))  # one row fewer at the front: other rows, other order
        code, err = cli_run(["train", "--config", str(path), "--resume"], capsys)
    finally:
        data.write_text(original)
    assert code == 2 and "(manifest.json)" in err and "data: the run has" in err, err
    assert snapshot(reference) == before
    # The checkpoints are still a model (the description was not rewritten with another architecture).
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    with use_mesh(mesh):
        model = model_io.load_model(reference, mesh)
    assert model.cfg.hidden_size == 32
    # Settings of how the run runs may change: a resume of the finished run with other checkpointing and
    # logging succeeds, trains nothing and stays finished.
    code, err = cli_run(["train", "--config", str(path), "--resume", "--set", "checkpoint.every_steps=1",
                         "--set", "train.log_every=5", "--set", "mesh.fsdp=4", "--set", "mesh.data=2"], capsys)
    assert code == 0, err
    assert lifecycle.read_status(reference)["state"] == "finished"
    assert sorted(read_metrics(reference)[0]) == list(range(1, STEPS + 1))


# --- best by validation ------------------------------------------------------------------------------

def test_every_evaluation_can_become_the_best_checkpoint(base):
    """With checkpoints only at the end (every_steps 0) and an eval every step, the best checkpoint is the
    best of all evaluations, not of the evals that happen to fall on a save step; best.json names it and
    it is a complete checkpoint."""
    root, cfg = base
    _, config = write_config(root, "best", cfg, [
        "train.eval_every=1", "checkpoint.every_steps=0", "checkpoint.keep=1", "checkpoint.save_at_epoch_end=false",
        "optimizer.lr=0.05", "optimizer.warmup_steps=0"])
    run = pathlib.Path(config.output_dir)
    Trainer(config).train()
    _, evals = read_metrics(run)
    losses = {r["step"]: r["eval/loss"] for r in evals}
    best_step = min(sorted(losses, reverse=True), key=lambda s: losses[s])  # ties: the later step
    print(f"\neval losses by step: { {s: round(v, 4) for s, v in losses.items()} }; best {best_step}")
    assert best_step != STEPS, "the run's last eval is its best: this test needs one that is not"
    best = json.loads((run / model_io.BEST_FILE).read_text())
    assert best["step"] == best_step and best["value"] == pytest.approx(losses[best_step])
    assert (run / "checkpoints" / str(best_step) / "params").is_dir() and not tmp_dirs(run)
    assert model_io.resolve_model_path(run) == run / "checkpoints" / str(best_step)
    kept = sorted(int(p.name) for p in (run / "checkpoints").iterdir())
    assert kept == [best_step, STEPS], kept  # the best and the latest (keep=1)


# --- signals -------------------------------------------------------------------------------------------

def test_sigint_stops_like_sigterm_and_a_second_sigterm_does_not_cut_the_final_write(base, reference, jax_cache):
    """`jaxalign train` gets SIGINT after step 3: it checkpoints and exits 75. Resumed, it gets SIGTERM and,
    while that final checkpoint is being written, a second SIGTERM: the write completes, exit 75 again,
    status preempted. A last resume ends with the uninterrupted run's losses, bitwise."""
    root, cfg = base
    # Checkpoints only where the run stops, so each stop writes one (the second SIGTERM's target).
    only_at_stops = ["checkpoint.every_steps=0", "checkpoint.keep_best=false", "checkpoint.save_at_epoch_end=false"]
    path, config = write_config(root, "signals", cfg, only_at_stops)
    sets = [a for s in only_at_stops for a in ("--set", s)]
    run = pathlib.Path(config.output_dir)

    proc = start_cli(path, jax_cache, *sets)
    try:
        wait_for(lambda: max(logged_steps(run), default=0) >= 3, proc, "step 3")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    first = lifecycle.read_status(run)
    assert first["state"] == "preempted" and "received SIGINT" in err, err[-2000:]

    proc = start_cli(path, jax_cache, "--resume", *sets)
    try:
        wait_for(lambda: max(logged_steps(run), default=0) >= first["step"] + 2, proc, "two more steps")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: bool(tmp_dirs(run)) or lifecycle.state_of(run) == "preempted", proc,
                 "the final checkpoint write", poll=0.001)
        proc.send_signal(signal.SIGTERM)  # while the write is in flight
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    status = lifecycle.read_status(run)
    assert status["state"] == "preempted" and status["step"] > first["step"]
    assert (run / "checkpoints" / str(status["step"]) / "params").is_dir() and not tmp_dirs(run)

    trainer = Trainer(config, resume=True)
    assert int(trainer.state.step) == status["step"]
    trainer.train()
    assert lifecycle.read_status(run)["state"] == "finished"
    assert_same_losses(run, reference, STEPS)


def test_resume_of_a_run_killed_before_its_first_checkpoint_logs_each_step_once(base, reference, jax_cache):
    """kill -9 after step 3 of a run that checkpoints only at the end: status stays `running` (not
    finished); `--resume` finds no checkpoint, starts from the beginning, and metrics.jsonl ends with one
    record per step, equal to the uninterrupted run's."""
    root, cfg = base
    only_at_end = ["checkpoint.every_steps=0", "checkpoint.keep_best=false", "checkpoint.save_at_epoch_end=false"]
    path, config = write_config(root, "killed_early", cfg, only_at_end)
    run = pathlib.Path(config.output_dir)
    proc = start_cli(path, jax_cache, *[a for s in only_at_end for a in ("--set", s)])
    try:
        wait_for(lambda: max(logged_steps(run), default=0) >= 3, proc, "step 3")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert max(logged_steps(run)) < STEPS and lifecycle.read_status(run)["state"] == "running"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    Trainer(config, resume=True).train()
    assert lifecycle.read_status(run)["state"] == "finished"
    assert_same_losses(run, reference, STEPS)


# --- non-finite updates --------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # lr=1e39 to float32: the point
def test_an_update_to_nonfinite_weights_is_refused_and_a_streak_of_skips_stops(base):
    """lr=1e39 (inf in float32): step 1's loss and gradients are finite, but its update would make the
    weights inf. Under on_nonfinite=stop that stops at step 1; under skip, each update is refused and the
    run stops after train.max_nonfinite_skips+1 in a row, naming the last good checkpoint; status failed."""
    root, cfg = base
    common = ["optimizer.lr=1e39", "optimizer.warmup_steps=0", "train.eval_every=0", "checkpoint.every_steps=0"]
    _, config = write_config(root, "inf_stop", cfg, [*common, "train.on_nonfinite=stop"])
    with pytest.raises(JaxalignError, match=r"^an update that would make the weights non-finite at step 1 "):
        Trainer(config).train()
    _, config = write_config(root, "inf_skip", cfg, [*common, "train.on_nonfinite=skip", "train.max_nonfinite_skips=3"])
    run = pathlib.Path(config.output_dir)
    with pytest.raises(JaxalignError, match=r"^4 non-finite steps in a row \(train.max_nonfinite_skips=3\): an "
                                            r"update that would make the weights non-finite at step 4 .*last good "
                                            r"checkpoint: none"):
        Trainer(config).train()
    train, _ = read_metrics(run)
    assert [train[s]["nonfinite_steps"] for s in (1, 2, 3)] == [1, 2, 3] and 4 not in train  # stopped in step 4
    assert np.isfinite(train[1]["loss"]) and np.isfinite(train[1]["grad_norm"])  # a "finite" step
    status = lifecycle.read_status(run)
    assert status["state"] == "failed" and "4 non-finite steps in a row" in status["message"]
    assert not (run / run_lock.LOCK_FILE).exists()


# --- one config for every entry point -------------------------------------------------------------------

def test_every_entry_point_resolves_the_stage_overrides_and_an_empty_data_train_names_the_keys(base, tmp_path, capsys):
    """`train --set stage=sft` on a pipeline config applies sft.overrides, as `pipeline` does (the --set
    overrides win over them); with no data anywhere the error names data.train and the overrides key."""
    root, cfg = base
    pipeline_cfg = {k: v for k, v in cfg.items() if k != "train"}
    data = dict(pipeline_cfg["data"], train="")
    pipeline_cfg["data"] = data
    pipeline_cfg["sft"] = {"overrides": {"data": {"train": cfg["data"]["train"]}, "train": {"max_steps": 7}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(pipeline_cfg))
    resolved = load_stage_config(path, ["stage=sft"])
    assert resolved.data.train == cfg["data"]["train"] and resolved.train.max_steps == 7
    assert load_stage_config(path, ["stage=sft", "train.max_steps=3"]).train.max_steps == 3
    assert load_config(path).data.train == ""  # the file itself is left as it is
    code = cli.main(["data", "inspect", "--config", str(path), "--set", "stage=sft"])
    out = capsys.readouterr()
    assert code == 0 and "rows" in out.out, out.err

    # `pipeline --resume` (what the launchers pass) parses; a pipeline resumes its unfinished stages anyway.
    assert cli.build_parser().parse_args(["pipeline", "--config", str(path), "--resume"]).resume is True

    empty = tmp_path / "empty.yaml"
    empty.write_text(json.dumps({**pipeline_cfg, "sft": {}, "output_dir": str(tmp_path / "empty_run")}))
    code, err = cli_run(["train", "--config", str(empty)], capsys)
    assert code == 2 and "data.train is empty" in err and "sft.overrides.data.train" in err, err
    assert not (tmp_path / "empty_run" / "config.yaml").exists()
