"""Helpers of the fault-injection tests: configs written to files, `jaxalign train` subprocesses and
waiting on them, and what a live or killed run dir shows (logged steps, half-written checkpoints)."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import yaml
from tiny_runs import hh_sft_config, read_metrics

from jaxalign.config import load_config

FAULT_STEPS = 12  # the fault tests' runs: 12 steps of 8 sequences of 64 tokens


def fault_config(shared_data: pathlib.Path, root: pathlib.Path) -> dict:
    """The fault tests' run: SFT on real HH rows, evals at 6 and 12, checkpoints at 4, 8 and 12."""
    return hh_sft_config(
        shared_data, root / "ref", root / "cache",
        data={"max_rows": 96, "eval_fraction": 0.2, "max_length": 64, "max_prompt_length": 32},
        train={"batch_size": 8, "max_steps": FAULT_STEPS, "eval_every": 6, "eval_batches": 1, "log_every": 1},
        eval={"batch_size": 8},
        optimizer={"lr": 3e-3, "warmup_steps": 2},
        checkpoint={"every_steps": 4, "keep": 3},
    )


def train_reference(root: pathlib.Path, cfg: dict) -> pathlib.Path:
    """The uninterrupted run (ROOT/ref) fault tests compare with; it must end finished and unlocked."""
    from jaxalign.run import lifecycle
    from jaxalign.run.loop import Trainer
    from jaxalign.runtime import run_lock

    _, config = write_config(root, "ref", cfg)
    summary = Trainer(config).train()
    run = pathlib.Path(config.output_dir)
    assert summary["steps"] == FAULT_STEPS and summary["state"] == "finished", summary
    assert lifecycle.read_status(run)["state"] == "finished" and lifecycle.read_status(run)["step"] == FAULT_STEPS
    assert not (run / run_lock.LOCK_FILE).exists()
    return run


def write_config(root: pathlib.Path, name: str, cfg: dict, sets=()) -> tuple[pathlib.Path, object]:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(root / name)}))
    return path, load_config(path, list(sets))


def logged_steps(run: pathlib.Path) -> list[int]:
    """Steps in a live or killed run's metrics.jsonl (its last line may be cut short)."""
    steps = []
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except json.JSONDecodeError:
                pass
    return steps


def tmp_dirs(run: pathlib.Path) -> list[str]:
    ckpts = run / "checkpoints"
    return sorted(p.name for p in ckpts.iterdir() if "orbax-checkpoint-tmp" in p.name) if ckpts.is_dir() else []


def assert_same_losses(run: pathlib.Path, ref: pathlib.Path, steps: int) -> None:
    """Every step logged once, with bitwise the uninterrupted run's loss and grad norm; same evals."""
    got, got_evals = read_metrics(run)
    want, want_evals = read_metrics(ref)
    assert sorted(got) == list(range(1, steps + 1))
    for step in got:
        assert (got[step]["loss"], got[step]["grad_norm"]) == (want[step]["loss"], want[step]["grad_norm"]), step
    assert [(r["step"], r["eval/loss"]) for r in got_evals] == [(r["step"], r["eval/loss"]) for r in want_evals]


def start_cli(config: pathlib.Path, env_extra: dict, *args: str) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    return subprocess.Popen([sys.executable, "-m", "jaxalign.cli", "train", "--config", str(config), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def sigkill_past_checkpoint(config_path: pathlib.Path, run: pathlib.Path, step: int, logged: int) -> int:
    """`jaxalign train --config CONFIG_PATH` in a subprocess, SIGKILLed once its step-`step` checkpoint is
    complete and `logged` steps are logged (the steps after the checkpoint are lost and must be redone);
    returns the last logged step."""
    import signal

    # stdout is not read while it runs: discarded, so a full pipe cannot stall the run.
    proc = subprocess.Popen([sys.executable, "-m", "jaxalign.cli", "train", "--config", str(config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "checkpoints" / str(step) / "params").is_dir()
                 and max(logged_steps(run), default=0) >= logged, proc, f"a checkpoint at step {step}", poll=0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return max(logged_steps(run))
