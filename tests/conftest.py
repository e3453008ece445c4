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
        if os.environ.get("CI") == "true":  # CI always has it: a missing folder is a broken set-up
            pytest.fail(f"shared data not found at {SHARED_DATA}")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache for this module (in-process and in subprocesses): a run after the
    first reuses its executables instead of compiling them again. Restored afterwards."""
    import jax
    from jax._src import compilation_cache

    path = str(tmp_path_factory.mktemp("jax_cache"))
    settings = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    old = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()

