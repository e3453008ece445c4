"""Worker processes on this machine joined over localhost, as the multi-host tests run them."""

import os
import re
import socket
import subprocess
import sys

import pytest


def xla_flags(devices: int) -> str:
    """The suite's XLA_FLAGS (tests/conftest.py) with `devices` virtual CPU devices per process."""
    return re.sub(r"--xla_force_host_platform_device_count=\d+", f"--xla_force_host_platform_device_count={devices}",
                  os.environ["XLA_FLAGS"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_workers(script, args_of_process: list[list[str]], env: dict, cwd=None) -> list[subprocess.Popen]:
    """`python SCRIPT ARGS...` once per entry of `args_of_process`, output (stderr too) captured."""
    return [subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for args in args_of_process]


def wait_workers(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each worker's output once all have exited; a timeout kills them all and fails the test with their
    output, and a worker that failed fails it with the end of its own."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("workers timed out:\n" + "\n".join(p.communicate()[0] or "" for p in procs))
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i}:\n{out[-6000:]}"
    return outputs
