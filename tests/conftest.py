"""Test set-up: 8 virtual CPU devices so every sharding path runs, set before jax is imported."""

import os

# The concurrency-optimized CPU scheduler can run two collectives of one virtual device at once and
# deadlock them (seen as a 40 s abort in DPO steps on 8 virtual devices of 2 cores); turned off.
# 8 device threads on 2 loaded cores can also take longer than XLA's default 40 s to meet at a
# collective, which XLA treats as fatal: the limit is raised.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
