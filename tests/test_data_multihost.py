"""Two processes (4 CPU devices each) build only their rows; the assembled global batches equal
the single-process ones."""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxalign.data.iterator import BatchIterator

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
REPO = WORKER.parents[1]


def _worker_module():
    # Only its constants are used here; importing it does not start jax.distributed.
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _data(rng):
    def ids(low, high):
        return rng.integers(3, 64, int(rng.integers(low, high))).tolist()

    sft = []
    for _ in range(80):
        input_ids = ids(2, 40)
        sft.append({"input_ids": input_ids, "loss_mask": [i >= len(input_ids) // 3 for i in range(len(input_ids))]})
    dpo = [{"prompt_ids": ids(1, 20), "chosen_ids": ids(1, 30), "rejected_ids": ids(1, 30)} for _ in range(30)]
    return {"sft": sft, "dpo": dpo}


def test_two_processes_assemble_the_single_process_global_batch(tmp_path):
    worker = _worker_module()
    data = _data(np.random.default_rng(0))
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(data))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(data_path), str(tmp_path)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=90)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("multi-host worker timed out:\n" + "\n".join(p.communicate()[0] or "" for p in procs))
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out

    for name, _, stage, options in worker.CASES:
        it = BatchIterator(data[stage], stage, **worker.COMMON, **options)
        expected = [next(it) for _ in range(worker.STEPS)]
        for process_id in range(2):
            got = np.load(tmp_path / f"{name}.{process_id}.npz")
            for step, batch in enumerate(expected):
                for key, value in batch.items():
                    np.testing.assert_array_equal(got[f"{step}/{key}"], value, err_msg=f"{name} {step}/{key}")
