"""Epochs of global batches with exact resume, each process building only its own rows.

Every process opens the same tokenized examples (a token store, `jaxalign.data.store`, or a list)
and derives the same plan for an epoch from (seed, epoch) and the examples' lengths alone:

* SFT, packed (data.packing): shuffle, best-fit-decreasing pack the whole epoch into rows of
  data.max_length, shuffle the rows, and cut them into batches of train.batch_size rows. Every
  step has the same [batch_size, max_length] shape (one compile); batch_size counts packed rows.
* SFT, unpacked: batch_size examples per step, one per row, padded to a bucketed length.
* DPO and the reward model (rm): batch_size pairs per step -> 2 * batch_size rows (chosen first),
  bucketed length; a reward model's pairs with a `margin` give the batch a [2 * batch_size] `margin`.

The iterator's whole state is (epoch, step within the epoch), so `state()` is a tiny JSON dict
and `restore()` resumes with exactly the batches an uninterrupted run would have produced next.
A plain index-based iterator rather than grain: the per-epoch packing plan is the only state
and fits in a few lines. A short last batch is dropped (`drop_remainder`, training) or padded
with empty rows (loss_mask all zero; eval).

Multi-host: rows are laid over processes by `batch_sharding` (the batch axis over the
data-parallel mesh axes); `host_rows` says which global rows this process's devices hold, the
iterator reads and builds only those (SFT: disjoint examples per process; DPO: a process's rows
hold one side of every pair of the batch, so it reads those pairs), and `to_global_arrays`
assembles the global jax.Arrays.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxalign.data.batching import (
    bucket_length,
    check_pair,
    dpo_ref_logps,
    dpo_rows,
    pair_lengths,
    pair_margins,
)
from jaxalign.data.packing import pack_bfd, pack_rows
from jaxalign.errors import JaxalignError
from jaxalign.runtime.sharding import batch_sharding, data_parallel_size

STATE_VERSION = 1
# state() keys that must match on restore: a different value would give different batches.
_PLAN_KEYS = ("stage", "num_examples", "seed", "shuffle", "packing", "batch_size", "max_length",
              "pad_to_multiple_of", "drop_remainder", "mixture")


def host_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
    """Global row indices held by this process's devices, ascending (the local data's row order)."""
    shards = data_parallel_size(mesh)
    if global_rows % shards:
        raise JaxalignError(f"a batch of {global_rows} rows cannot be split over {shards} data-parallel devices "
                            f"(mesh {dict(mesh.shape)}); make train.batch_size a multiple of {shards} "
                            "(for DPO, 2 * batch_size rows)")
    index_map = batch_sharding(mesh, 2).addressable_devices_indices_map((global_rows, 1))
    spans = sorted({idx[0].indices(global_rows)[:2] for idx in index_map.values()})
    return np.concatenate([np.arange(start, stop) for start, stop in spans])


def to_global_arrays(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                     global_rows: int | None = None) -> dict[str, jax.Array]:
    """Global arrays sharded by `batch_sharding` from this process's rows (`host_rows` order)."""
    local_rows = len(next(iter(host_batch.values())))
    if global_rows is None:
        shards = data_parallel_size(mesh)
        probe = batch_sharding(mesh, 2).addressable_devices_indices_map((shards, 1))
        local_shards = len({idx[0].indices(shards)[:2] for idx in probe.values()})
        global_rows = local_rows // local_shards * shards
    out = {}
    for key, value in host_batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim)
        out[key] = jax.make_array_from_process_local_data(sharding, value, (global_rows, *value.shape[1:]))
    return out


class BatchIterator:
    """Host batches (dicts of numpy arrays, this process's rows) for SFT or DPO, epoch after epoch.

    `examples`: SFT `{"input_ids", "loss_mask"}` or DPO `{"prompt_ids", "chosen_ids", "rejected_ids"}`.
    `epochs`: stop after this many (None = run forever; the train loop counts steps).
    `mesh`: build only the rows this process holds under it (None = all rows).
    """

    def __init__(self, examples: Sequence[Mapping], stage: str, *, batch_size: int, max_length: int,
                 pad_to_multiple_of: int = 64, packing: bool = True, shuffle: bool = True, seed: int = 0,
                 pad_id: int = 0, epochs: int | None = None, drop_remainder: bool = True,
                 mesh: Mesh | None = None):
        if stage not in ("sft", "dpo", "rm"):
            raise JaxalignError(f"stage must be 'sft', 'dpo' or 'rm', got {stage!r}")
        if batch_size < 1:
            raise JaxalignError(f"train.batch_size must be >= 1, got {batch_size}")
        self.examples = examples
        self.stage = stage
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packing = packing and stage == "sft"
        self.shuffle = shuffle
        self.seed = seed
        self.pad_id = pad_id
        self.epochs = epochs
        self.drop_remainder = drop_remainder
        self.paired = stage != "sft"
        self.global_rows = 2 * batch_size if self.paired else batch_size
        self.local_rows = host_rows(mesh, self.global_rows) if mesh is not None else np.arange(self.global_rows)
        self.lengths = self._lengths()
        self.epoch, self.step = 0, 0
        self._plan_cache: tuple[int, list[list]] | None = None
        if not self._plan(0):
            unit = "packed rows" if self.packing else "pairs" if self.paired else "examples"
            raise JaxalignError(f"the data gives {len(self._units(0))} {unit}, fewer than one batch of "
                                f"train.batch_size={batch_size}; lower the batch size or add data")

    def _lengths(self) -> np.ndarray:
        """Tokens per example ([n] for SFT, [n, 2] chosen/rejected for DPO), checked once; a token
        store gives them from its offsets, without reading an example."""
        if hasattr(self.examples, "lengths"):
            lengths = self.examples.lengths()
            if self.paired:
                for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
                    empty = np.flatnonzero(self.examples.column_lengths(column) == 0)
                    if empty.size:
                        check_pair(self.examples[int(empty[0])], f"example {int(empty[0])}")
        elif self.paired:
            for i, pair in enumerate(self.examples):
                check_pair(pair, f"example {i}")
            lengths = np.array([pair_lengths(p) for p in self.examples], np.int64).reshape(-1, 2)
        else:
            lengths = np.array([len(ex["input_ids"]) for ex in self.examples], np.int64)
        longest = lengths.max(axis=-1) if lengths.ndim == 2 else lengths
        if longest.size and longest.max() > self.max_length:
            i = int(np.argmax(longest > self.max_length))
            raise JaxalignError(f"example {i} has {int(longest[i])} tokens, more than data.max_length="
                                f"{self.max_length}; the tokenize stage truncates, so the cached tokens are stale "
                                "(clear data.cache_dir) or max_length changed")
        return lengths

    # --- the plan of an epoch: a list of batches, each a list of units (example ids or packed rows)

    def _units(self, epoch: int) -> list:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.examples)
        # A weighted mixture draws each training epoch (data/mixture.py); one pass (eval, scoring the
        # reference) visits every example once.
        if getattr(self.examples, "weighted", False) and self.epochs is None:
            order = self.examples.epoch_order(rng, self.shuffle, epoch)
        else:
            order = rng.permutation(n) if self.shuffle else np.arange(n)
        if not self.packing:
            return order.tolist()
        rows = [[int(order[i]) for i in b] for b in pack_bfd(self.lengths[order], self.max_length)]
        # BFD emits long-example rows first; shuffle rows so batches do not track length.
        return [rows[i] for i in rng.permutation(len(rows))] if self.shuffle else rows

    def _plan(self, epoch: int) -> list[list]:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            units = self._units(epoch)
            batches = [units[i:i + self.batch_size] for i in range(0, len(units), self.batch_size)]
            if self.drop_remainder and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            self._plan_cache = (epoch, batches)
        return self._plan_cache[1]

    @property
    def steps_per_epoch(self) -> int:
        """Batches in the current epoch (packed SFT may differ by a row's worth between epochs)."""
        return len(self._plan(self.epoch))

    def steps_in_epochs(self, epochs: int) -> int:
        """Batches in the first `epochs` epochs. Packed epochs of a weighted mixture (a new draw each
        epoch) are planned one by one; otherwise every epoch has epoch 0's count."""
        if not (self.packing and getattr(self.examples, "weighted", False)):
            return epochs * len(self._plan(0))
        return sum(len(self._plan(e)) for e in range(epochs))

    # --- iteration

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self.epochs is not None and self.epoch >= self.epochs:
                raise StopIteration
            plan = self._plan(self.epoch)
            if self.step < len(plan):
                break
            self.epoch, self.step = self.epoch + 1, 0
        batch = self._build(plan[self.step])
        self.step += 1
        return batch

    def _build(self, units: list) -> dict[str, np.ndarray]:
        return build_host_batch(units, self.examples.__getitem__, self.lengths, self)

    # --- resume

    def state(self) -> dict[str, Any]:
        """JSON-serializable position: restoring it continues with exactly the next batch."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step,
                "stage": self.stage, "num_examples": len(self.examples), "seed": self.seed,
                "shuffle": self.shuffle, "packing": self.packing, "batch_size": self.batch_size,
                "max_length": self.max_length, "pad_to_multiple_of": self.pad_to_multiple_of,
                "drop_remainder": self.drop_remainder,
                "mixture": self.examples.plan_state() if hasattr(self.examples, "plan_state") else None}

    def restore(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise JaxalignError(f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self.state()
        changed = [f"{k}: {state.get(k)!r} -> {mine[k]!r}" for k in _PLAN_KEYS if state.get(k) != mine[k]]
        if changed:
            raise JaxalignError("cannot resume the data iterator exactly: the data or its settings changed since "
                                f"the checkpoint ({'; '.join(changed)}); restore them or start a new run")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def make_iterator(examples: Sequence[Mapping], cfg: Any, *, stage: str | None = None, train: bool = True,
                  mesh: Mesh | None = None, pad_id: int = 0) -> BatchIterator:
    """The iterator a run's config asks for: training (shuffled, endless, full batches) or eval
    (in order, one pass, eval.batch_size, the last batch padded with empty rows)."""
    data = cfg.data
    if hasattr(examples, "epoch_rows"):  # a Stream (data.streaming): training only
        from jaxalign.data.streaming import StreamIterator  # it builds on this module

        return StreamIterator(examples, stage or cfg.stage, batch_size=cfg.train.batch_size,
                              max_length=data.max_length, pad_to_multiple_of=data.pad_to_multiple_of,
                              packing=data.packing, shuffle=data.shuffle, seed=cfg.train.seed,
                              shuffle_buffer=data.shuffle_buffer, pad_id=pad_id, mesh=mesh)
    return BatchIterator(
        examples, stage or cfg.stage,
        batch_size=cfg.train.batch_size if train else cfg.eval.batch_size,
        max_length=data.max_length, pad_to_multiple_of=data.pad_to_multiple_of, packing=data.packing,
        shuffle=data.shuffle and train, seed=cfg.train.seed, pad_id=pad_id,
        epochs=None if train else 1, drop_remainder=train, mesh=mesh)


def build_host_batch(units: list, get, lengths: np.ndarray, plan) -> dict[str, np.ndarray]:
    """This process's rows of the batch of `units` (example ids, or packed rows of them): `get(i)` is
    example i, `lengths[i]` its tokens; `plan` gives stage, paired, batch_size, packing, local_rows,
    max_length, pad_to_multiple_of and pad_id (a BatchIterator, or the streaming one)."""
    if plan.paired:  # a process's rows hold one side of every pair (chosen rows first), so read all
        pairs = [get(i) for i in units]
        length = bucket_length(int(lengths[units].max()), plan.pad_to_multiple_of, plan.max_length)
        rows = dpo_rows(pairs, plan.batch_size)
        batch = pack_rows([rows[r] for r in plan.local_rows], length, plan.pad_id)
        extra = {"ref_logps": dpo_ref_logps(pairs, plan.batch_size),
                 "margin": pair_margins(pairs, plan.batch_size) if plan.stage == "rm" else None}
        return batch | {k: v[plan.local_rows] for k, v in extra.items() if v is not None}
    # SFT: read only the examples of this process's rows
    fetch = lambda r: [get(i) for i in units[r]] if plan.packing else [get(units[r])]  # noqa: E731
    local = [fetch(r) if r < len(units) else [] for r in plan.local_rows]
    length = plan.max_length if plan.packing else bucket_length(
        int(lengths[units].max()), plan.pad_to_multiple_of, plan.max_length)
    return pack_rows(local, length, plan.pad_id)
