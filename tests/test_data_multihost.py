"""Two processes (4 CPU devices each) build only their rows from token stores; the assembled global
batches equal the single-process ones, and in SFT the processes read disjoint examples."""

import importlib.util
import json
import os
import pathlib

import numpy as np
from local_processes import free_port, start_workers, wait_workers, xla_flags

from jaxalign.data.iterator import BatchIterator
from jaxalign.data.store import PAIR_COLUMNS, SFT_COLUMNS, StoreWriter

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
REPO = WORKER.parents[1]


def _worker_module():
    # Only its constants are used here; importing it does not start jax.distributed.
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    for stage, examples in data.items():
        with StoreWriter(str(tmp_path / "stores" / stage), SFT_COLUMNS if stage == "sft" else PAIR_COLUMNS) as w:
            w.add({c: (np.concatenate([ex[c] for ex in examples]), [len(ex[c]) for ex in examples])
                   for c in examples[0]})
            w.finish({})
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    port = free_port()
    wait_workers(start_workers(WORKER, [[i, port, tmp_path / "stores", tmp_path] for i in range(2)], env, REPO), timeout=90)

    for name, _, stage, options in worker.CASES:
        it = BatchIterator(data[stage], stage, **worker.COMMON, **options)
        expected = [next(it) for _ in range(worker.STEPS)]
        for process_id in range(2):
            got = np.load(tmp_path / f"{name}.{process_id}.npz")
            for step, batch in enumerate(expected):
                for key, value in batch.items():
                    np.testing.assert_array_equal(got[f"{step}/{key}"], value, err_msg=f"{name} {step}/{key}")
    # Each process read only the examples of its rows: in SFT those are disjoint. A DPO process holds
    # one side of every pair of the batch (chosen rows first), so both read every pair.
    read = [json.loads((tmp_path / f"read.{i}.json").read_text()) for i in range(2)]
    for name, _, stage, options in worker.CASES:
        it = BatchIterator(data[stage], stage, **worker.COMMON, **options)
        batches = [it._plan(0)[step] for step in range(worker.STEPS)]
        used = {i for units in batches for u in units for i in (u if isinstance(u, list) else [u])}
        assert set(read[0][name]) | set(read[1][name]) == used, name
        if stage == "sft":
            assert not set(read[0][name]) & set(read[1][name]) and read[0][name] and read[1][name], name

