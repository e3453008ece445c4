"""Test set-up: 8 virtual CPU devices so every sharding path runs, set before jax is imported."""

import os

# (tests/test_pipeline.py runs its pipeline subprocess with
# --xla_cpu_enable_concurrency_optimized_scheduler=false, which avoids a collective deadlock seen
# there; set globally, the same flag deadlocked the in-process DPO loop instead, so it is not.)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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
