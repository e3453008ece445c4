"""Facts about the machine a run measures on: CPU, versions, load, whether other jobs are running."""

from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Any


def cpu_busy(seconds: float = 3.0) -> float:
    """Fraction of all cores busy over `seconds` (/proc/stat), with none of our work running."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


QUIET = {"max_busy": 0.0, "timeout": 0.0}  # --wait-quiet: before each measurement, wait for an idle machine


def wait_quiet() -> float | None:
    """Block until the other jobs on this machine leave it (nearly) idle, or QUIET["timeout"] passes."""
    if QUIET["max_busy"] <= 0:
        return None
    deadline = time.time() + QUIET["timeout"]
    busy = cpu_busy()
    while busy > QUIET["max_busy"] and time.time() < deadline:
        time.sleep(10)
        busy = cpu_busy()
    return busy


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            versions[mod] = "missing"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def device_info() -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count()}


