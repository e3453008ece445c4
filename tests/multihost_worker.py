"""One process of tests/test_data_multihost.py: build this process's rows from the token stores,
assemble, gather, save (and which examples this process read).

Usage: multihost_worker.py PROCESS_ID PORT STORES_DIR OUT_DIR (STORES_DIR/sft, STORES_DIR/dpo). XLA_FLAGS (4 CPU devices) is set by
the parent in this process's environment before jax is imported.
"""

import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxalign.data.iterator import BatchIterator, host_rows, to_global_arrays
from jaxalign.data.store import TokenStore
from jaxalign.runtime.sharding import make_mesh

STEPS = 3
# (name, mesh sizes, stage, iterator options); shared with the parent test.
CASES = [
    ("sft_fsdp8", {"data": 1, "fsdp": 8, "tensor": 1}, "sft", {"batch_size": 8, "packing": True}),
    ("sft_unpacked_data2_fsdp2_tensor2", {"data": 2, "fsdp": 2, "tensor": 2}, "sft",
     {"batch_size": 8, "packing": False}),
    ("dpo_data2_fsdp2_tensor2", {"data": 2, "fsdp": 2, "tensor": 2}, "dpo", {"batch_size": 4}),
]
COMMON = {"max_length": 64, "pad_to_multiple_of": 16, "seed": 3}


class ReadLog(TokenStore):
    """A store that notes the examples read."""

    def __init__(self, path):
        super().__init__(path)
        self.read: set[int] = set()

    def __getitem__(self, i):
        self.read.add(int(i))
        return super().__getitem__(i)


def main(process_id: int, port: int, stores: str, out_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    read = {}
    for name, sizes, stage, options in CASES:
        mesh = make_mesh(sizes)
        store = ReadLog(f"{stores}/{stage}")
        it = BatchIterator(store, stage, mesh=mesh, **COMMON, **options)
        out = {}
        for step in range(STEPS):
            host = next(it)
            assert len(host["tokens"]) == len(host_rows(mesh, it.global_rows)) < it.global_rows
            gathered = multihost_utils.process_allgather(to_global_arrays(host, mesh), tiled=True)
            out.update({f"{step}/{key}": np.asarray(value) for key, value in gathered.items()})
        np.savez(f"{out_dir}/{name}.{process_id}.npz", **out)
        read[name] = sorted(store.read)
    with open(f"{out_dir}/read.{process_id}.json", "w") as f:
        json.dump(read, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
