"""Test set-up: 8 virtual CPU devices so every sharding path runs, set before jax is imported."""

import os

# LLVM optimisation level 0: compiling, not running, is what the tiny test models spend their time on
# (tests/test_train_step.py: 153 s -> 72 s); results are IEEE-exact either way (no fast-math).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
# XLA's CPU collectives block the pool thread they run on until all devices arrive, and one device can
# wait in several at once (a scan body's all-gather beside one of the program around it). The client
# sizes its thread pools to the device count, so 8 virtual devices can fill every thread with waiters
# while the devices they wait for have none left: a hang, then a fatal 40 s rendezvous timeout (seen
# with either CPU scheduler). PJRT_NPROC sizes the pools; 4 threads per device keeps threads free.
# Subprocesses inherit it.
os.environ.setdefault("PJRT_NPROC", "32")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent compilation cache for the session, here and in every subprocess: the tests build the
# same tiny programs many times (each Trainer jits anew; each killed and resumed run starts cold).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    import tempfile  # noqa: E402

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxalign-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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


@pytest.fixture(scope="session")
def jax_cache() -> dict:
    """The session's persistent compilation cache settings (set above, so subprocesses inherit them),
    for tests that hand a subprocess its environment explicitly."""
    return {name: os.environ[name] for name in ("JAX_COMPILATION_CACHE_DIR",
                                                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                                                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")}


# The longest files first (worker-seconds measured on the 2-core machine): with `-n 2 --dist loadfile`
# the two workers then finish together. In collection order the pipeline file, a quarter of the
# suite, started halfway through and ran on alone after everything else had finished.
LONGEST_FIRST = ("test_pipeline.py", "test_train_loop.py", "test_multihost_train.py", "test_run_lifecycle.py",
                 "test_qlora_train.py", "test_reliability.py", "test_dpo_objectives.py", "test_lora_train.py",
                 "test_train_step.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order kept
