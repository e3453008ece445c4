"""launch/tpu.sh and launch/gpu.sh in --dry-run: the exact gcloud / python commands, and usage errors."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU, GPU = REPO / "launch" / "tpu.sh", REPO / "launch" / "gpu.sh"
CONFIG = "configs/real/llama3.1-8b-dpo.yaml"
SLICE = ["--name", "align", "--zone", "us-east5-a"]


def run(script, *args, env=None):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=30)


def dry(script, *args, env=None) -> list[list[str]]:
    """The printed commands, each split as the shell would."""
    out = run(script, *args, "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def remote(cmd: list[str]) -> str:
    """The --command=... of a `gcloud compute tpus tpu-vm ssh` line."""
    return next(a for a in cmd if a.startswith("--command=")).removeprefix("--command=")


# --- tpu.sh --------------------------------------------------------------------------------------

def test_create_plain():
    [cmd] = dry(TPU, *SLICE, "--create", "--accelerator", "v5p-64", "--version", "v2-alpha-tpuv5")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "align", "--zone=us-east5-a",
                   "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5"]


def test_create_spot_with_project():
    [cmd] = dry(TPU, *SLICE, "--project", "my-proj", "--create", "--accelerator", "v6e-256", "--version",
                "v2-alpha-tpuv6e", "--spot")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "align", "--zone=us-east5-a",
                   "--project=my-proj", "--accelerator-type=v6e-256", "--version=v2-alpha-tpuv6e", "--spot"]


def test_create_queued_waits_until_active():
    create, wait = dry(TPU, *SLICE, "--create", "--accelerator", "v5p-64", "--version", "v2-alpha-tpuv5", "--queued")
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "align", "--node-id=align",
                      "--zone=us-east5-a", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5"]
    assert wait == ["gcloud", "compute", "tpus", "queued-resources", "describe", "align", "--zone=us-east5-a",
                    "--format=value(state.state)"]
    create, _ = dry(TPU, *SLICE, "--create", "--accelerator", "v5p-64", "--version", "v2-alpha-tpuv5", "--queued",
                    "--spot")
    assert create[-1] == "--spot"


def test_run_syncs_installs_and_starts_on_every_worker():
    cmds = dry(TPU, *SLICE, "--config", CONFIG, "--set", "train.max_steps=10", "--set", "run_name=my run")
    tar, scp, unpack, install, start = cmds
    assert tar[0] == "(cd" and "git ls-files" in " ".join(tar) and "tar" in " ".join(tar)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[6:] == ["align:jaxalign-src.tgz", "--zone=us-east5-a", "--worker=all"]
    assert scp[5].endswith("jaxalign-align.tgz")
    for cmd in (unpack, install, start):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "align"]
        assert "--worker=all" in cmd and "--zone=us-east5-a" in cmd
    assert remote(unpack) == "mkdir -p jaxalign && tar -xzf jaxalign-src.tgz -C jaxalign && rm jaxalign-src.tgz"
    assert ".venv/bin/pip install -q -e '.[tpu]'" in remote(install)
    line = remote(start)
    assert "nohup .venv/bin/jaxalign train --config configs/real/llama3.1-8b-dpo.yaml --set train.max_steps=10 " \
           "--set run_name=my\\ run > logs/worker-$ID.log 2>&1 < /dev/null &" in line
    assert "ID=${TPU_WORKER_ID:-" in line and "echo $! > logs/worker-$ID.pid" in line


def test_run_options_and_create_then_run():
    cmds = dry(TPU, *SLICE, "--create", "--accelerator", "v5p-64", "--version", "v2-alpha-tpuv5", "--config",
               CONFIG, "--job", "pipeline", "--resume", "--no-install", "--remote-dir", "work/ja")
    assert cmds[0][4] == "create" and len(cmds) == 5  # create, tar, scp, unpack, start (no install)
    line = remote(cmds[-1])
    assert line.startswith("cd work/ja && ") and "jaxalign pipeline --config" in line and line.count("--resume") == 1


def test_status_logs_stop_delete():
    describe, workers = dry(TPU, *SLICE, "--status")
    assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "align", "--zone=us-east5-a",
                        "--format=value(state,acceleratorType,health)"]
    assert "--worker=all" in workers and "running" in remote(workers)
    queued, *_ = dry(TPU, *SLICE, "--status", "--queued")
    assert queued[3:5] == ["queued-resources", "describe"]

    [logs] = dry(TPU, *SLICE, "--logs")
    assert logs[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "align", "--zone=us-east5-a"]
    assert "--worker=0" in logs and remote(logs) == "tail -n 200 jaxalign/logs/worker-0.log"
    [logs] = dry(TPU, *SLICE, "--logs", "--worker", "3", "--follow")
    assert "--worker=3" in logs and remote(logs) == "tail -n 200 -f jaxalign/logs/worker-3.log"

    [stop] = dry(TPU, *SLICE, "--stop")
    assert "--worker=all" in stop and "kill -TERM $(cat logs/worker-$ID.pid)" in remote(stop)

    [delete] = dry(TPU, *SLICE, "--delete")
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "align", "--zone=us-east5-a", "--quiet"]
    [delete] = dry(TPU, *SLICE, "--delete", "--queued")
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "align", "--zone=us-east5-a",
                      "--force", "--quiet"]


@pytest.mark.parametrize("args, message", [
    ([], "--name is required"),
    (["--name", "a"], "--zone is required"),
    (SLICE, "nothing to do"),
    ([*SLICE, "--bogus"], "unknown argument '--bogus'"),
    ([*SLICE, "--create", "--version", "v"], "--create needs --accelerator"),
    ([*SLICE, "--create", "--accelerator", "v5p-64"], "--create needs --version"),
    ([*SLICE, "--status", "--delete"], "each run alone"),
    ([*SLICE, "--status", "--config", CONFIG], "run alone"),
    ([*SLICE, "--logs", "--worker", "x"], "--worker must be a worker number"),
    ([*SLICE, "--stop", "--worker", "1"], "--worker and --follow go with --logs"),
    ([*SLICE, "--config", CONFIG, "--set", "novalue"], "--set expects KEY=VALUE"),
    ([*SLICE, "--stop", "--set", "a=b"], "--set goes with --config"),
    ([*SLICE, "--config", CONFIG, "--job", "eval"], "--job must be train or pipeline"),
    ([*SLICE, "--zone"], "--zone needs a value"),
    ([*SLICE, "--config", "/elsewhere/c.yaml"], "the config must be inside the project"),
])
def test_tpu_usage_errors_exit_2(args, message):
    out = run(TPU, *args, "--dry-run")
    assert out.returncode == 2 and message in out.stderr and out.stdout == "", (out.stdout, out.stderr)


def test_help():
    for script in (TPU, GPU):
        out = run(script, "--help")
        assert out.returncode == 0 and out.stdout.startswith("usage: ")


# --- gpu.sh --------------------------------------------------------------------------------------

def test_gpu_single_host_sets_the_xla_flags():
    env = {"XLA_FLAGS": "", "XLA_PYTHON_CLIENT_MEM_FRACTION": ""}
    *exports, cmd = dry(GPU, "--config", CONFIG, "--set", "train.max_steps=5", "--gpus", "0,1,2,3", env=env)
    assert exports == [["export", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"],
                       ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"], ["export", "CUDA_VISIBLE_DEVICES=0,1,2,3"]]
    assert cmd[1:] == ["-m", "jaxalign.cli", "train", "--config", CONFIG, "--set", "train.max_steps=5"]


def test_gpu_multi_node_exports_the_process_group_and_keeps_user_flags():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "XLA_PYTHON_CLIENT_MEM_FRACTION": ""}
    *exports, cmd = dry(GPU, "--config", CONFIG, "--nodes", "4", "--node-rank", "2", "--coordinator", "gpu0:8476",
                        "--mem-fraction", "0.85", "--job", "pipeline", "--resume", env=env)
    assert ["export", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/tmp/x"] in exports
    assert ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.85"] in exports
    for pair in (["export", "JAXALIGN_COORDINATOR=gpu0:8476"], ["export", "JAXALIGN_NUM_PROCESSES=4"],
                 ["export", "JAXALIGN_PROCESS_ID=2"]):
        assert pair in exports
    assert cmd[1:] == ["-m", "jaxalign.cli", "pipeline", "--config", CONFIG, "--resume"]


@pytest.mark.parametrize("args, message", [
    ([], "--config is required"),
    (["--config", CONFIG, "--nodes", "2"], "needs all of --nodes, --node-rank and --coordinator"),
    (["--config", CONFIG, "--nodes", "2", "--node-rank", "2", "--coordinator", "a:1"], "--node-rank must be in 0..1"),
    (["--config", CONFIG, "--nodes", "2", "--node-rank", "0", "--coordinator", "a"], "HOST:PORT"),
    (["--config", CONFIG, "--gpus", "0;1"], "--gpus must be a list"),
    (["--config", CONFIG, "--mem-fraction", "1.5"], "--mem-fraction must be in (0, 1]"),
    (["--config", CONFIG, "--frobnicate"], "unknown argument"),
])
def test_gpu_usage_errors_exit_2(args, message):
    out = run(GPU, *args, "--dry-run")
    assert out.returncode == 2 and message in out.stderr, (out.stdout, out.stderr)


# --- gpu.sh, running: exit 75 restarts, signals passed on ------------------------------------------

FAKE_JOB = """#!/usr/bin/env bash
# Stands in for the interpreter: logs its arguments, exits with the next code of $CODES (then 0).
echo "$*" >> "$CALLS"
n=$(wc -l < "$CALLS")
code=$(echo "$CODES" | cut -d, -f"$n")
if [[ "$code" == wait ]]; then
  trap 'kill $sleeper; echo got TERM >> "$CALLS"; exit 75' TERM
  sleep 30 & sleeper=$!
  touch "$CALLS.ready"; wait; exit 1
fi
exit "${code:-0}"
"""


@pytest.fixture
def fake_job(tmp_path):
    script = tmp_path / "python"
    script.write_text(FAKE_JOB)
    script.chmod(0o755)
    calls = tmp_path / "calls"
    return lambda codes: ({"PYTHON": str(script), "CALLS": str(calls), "CODES": codes}, calls)


def test_gpu_restarts_a_job_that_exits_75_with_resume(fake_job):
    env, calls = fake_job("75,75,0")
    out = run(GPU, "--config", CONFIG, "--restarts", "3", env=env)
    assert out.returncode == 0, out.stderr
    lines = calls.read_text().splitlines()
    assert lines == [f"-m jaxalign.cli train --config {CONFIG}"] + [f"-m jaxalign.cli train --config {CONFIG} --resume"] * 2
    assert "restart 2 of 3 with --resume" in out.stderr


def test_gpu_restarts_are_bounded_and_other_exit_codes_pass_through(fake_job, tmp_path):
    env, calls = fake_job("75,75,75")
    assert run(GPU, "--config", CONFIG, "--restarts", "1", env=env).returncode == 75
    assert len(calls.read_text().splitlines()) == 2
    calls.unlink()
    env, calls = fake_job("2")
    assert run(GPU, "--config", CONFIG, "--restarts", "4", "--log", str(tmp_path / "log" / "job.log"), env=env).returncode == 2
    assert len(calls.read_text().splitlines()) == 1


def test_gpu_passes_sigterm_on_to_the_job_and_does_not_restart_it(fake_job):
    import signal
    import time

    env, calls = fake_job("wait,0")
    proc = subprocess.Popen(["bash", str(GPU), "--config", CONFIG, "--restarts", "5"], cwd=REPO,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not pathlib.Path(f"{calls}.ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 75  # the job's "stopped early, resumable", passed up to the scheduler
    assert calls.read_text().splitlines()[1:] == ["got TERM"]  # no restart after a signal to the wrapper
