"""Epochs of global batches with exact resume, each process building only its own rows.

Every process opens the same tokenized examples (a token store, `jaxalign.data.store`, or a list)
and derives the same plan for an epoch from (seed, epoch) and the examples' lengths alone:

* SFT, packed (data.packing): shuffle, best-fit-decreasing pack the whole epoch into rows of
  data.max_length, shuffle the rows, and cut them into batches of train.batch_size rows. Every
  step has the same [batch_size, max_length] shape (one compile); batch_size counts packed rows.
* SFT, unpacked: batch_size examples per step, one per row, padded to a bucketed length.
* DPO and the reward model (rm): batch_size pairs per step -> 2 * batch_size rows (chosen first),
  bucketed length; a reward model's pairs with a `margin` give the batch a [2 * batch_size] `margin`.
* DPO with dpo.share_prompt (data/batching.py's shared-prompt layout): batch_size pairs per step,
  one per row (batch_size rows), or with data.packing best-fit packed into rows as long as the
  batch's longest pair (bucketed), as many rows as that takes; either way rounded up to a multiple
  of the data-parallel devices with empty rows. A packed batch's shape follows its pairs (a new
  shape compiles once); its loss counts real pairs, so it does not depend on the packing.

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

import functools
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
    loss_width,
    pair_lengths,
    pair_scalars,
    round_up,
    shared_batch,
    shared_length,
    with_loss_index,
)
from jaxalign.data.packing import pack_bfd, pack_rows
from jaxalign.errors import JaxalignError
from jaxalign.runtime.sharding import batch_sharding, data_parallel_size

STATE_VERSION = 1
# state() keys that must match on restore: a different value would give different batches.
_PLAN_KEYS = ("stage", "num_examples", "seed", "shuffle", "packing", "batch_size", "max_length",
              "pad_to_multiple_of", "drop_remainder", "mixture", "share_prompt")


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


def row_multiple(mesh: Mesh | None) -> int:
    """What a batch's row count must be a multiple of: the data-parallel devices."""
    return 1 if mesh is None else data_parallel_size(mesh)


@functools.lru_cache(maxsize=256)
def batch_rows(plan, batch_size: int) -> int:
    """Rows of a full batch of `batch_size` examples (for shared-prompt DPO, of one pair a row; packed
    pairs need fewer); `plan` gives shared, paired and row_multiple."""
    if plan.shared:
        return round_up(batch_size, plan.row_multiple)
    return 2 * batch_size if plan.paired else batch_size


def rows_of(mesh: Mesh | None, global_rows: int) -> np.ndarray:
    """`host_rows` (all rows without a mesh), kept per row count: a packed DPO batch's count varies."""
    return np.arange(global_rows) if mesh is None else host_rows(mesh, global_rows)


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
                 mesh: Mesh | None = None, share_prompt: bool = False, micro_batches: int = 1):
        if stage not in ("sft", "dpo", "rm"):
            raise JaxalignError(f"stage must be 'sft', 'dpo' or 'rm', got {stage!r}")
        if batch_size < 1:
            raise JaxalignError(f"train.batch_size must be >= 1, got {batch_size}")
        self.examples = examples
        self.stage = stage
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.shared = share_prompt and stage == "dpo"
        self.packing = packing and (stage == "sft" or self.shared)
        self.shuffle = shuffle
        self.seed = seed
        self.pad_id = pad_id
        self.epochs = epochs
        self.drop_remainder = drop_remainder
        self.paired = stage != "sft"
        self.mesh = mesh
        self.pack_pairs = self.packing and self.shared
        # Shared-prompt rows: split evenly over the data-parallel devices and the step's micro-batches.
        self.row_multiple = row_multiple(mesh) * micro_batches
        self.global_rows = batch_rows(self, batch_size)
        self.local_rows = rows_of(mesh, self.global_rows)
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
        if not self.packing or self.paired:  # pairs are packed batch by batch (build_host_batch)
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
                "drop_remainder": self.drop_remainder, "share_prompt": self.shared,
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
    stage = "dpo" if (stage or cfg.stage) == "kto" else stage  # KTO's examples come as pairs (data/kto.py)
    # the train step's micro-batches (run.build.accumulation_steps); eval steps take the whole batch
    micro = cfg.train.batch_size // cfg.train.micro_batch_size if train and cfg.train.micro_batch_size else 1
    if hasattr(examples, "epoch_rows"):  # a Stream (data.streaming): training only
        from jaxalign.data.streaming import StreamIterator  # it builds on this module

        return StreamIterator(examples, stage or cfg.stage, batch_size=cfg.train.batch_size,
                              max_length=data.max_length, pad_to_multiple_of=data.pad_to_multiple_of,
                              packing=data.packing, shuffle=data.shuffle, seed=cfg.train.seed,
                              shuffle_buffer=data.shuffle_buffer, pad_id=pad_id, mesh=mesh,
                              share_prompt=cfg.dpo.share_prompt, micro_batches=micro)
    return BatchIterator(
        examples, stage or cfg.stage,
        batch_size=cfg.train.batch_size if train else cfg.eval.batch_size,
        max_length=data.max_length, pad_to_multiple_of=data.pad_to_multiple_of, packing=data.packing,
        shuffle=data.shuffle and train, seed=cfg.train.seed, pad_id=pad_id,
        epochs=None if train else 1, drop_remainder=train, mesh=mesh, share_prompt=cfg.dpo.share_prompt,
        micro_batches=micro)


def build_host_batch(units: list, get, lengths: np.ndarray, plan) -> dict[str, np.ndarray]:
    """This process's rows of the batch of `units` (example ids, or packed rows of them): `get(i)` is
    example i, `lengths[i]` its tokens; `plan` gives stage, paired, batch_size, packing, local_rows,
    max_length, pad_to_multiple_of and pad_id (a BatchIterator, or the streaming one)."""
    if getattr(plan, "shared", False):
        return _shared_host_batch(units, get, plan)
    if plan.paired:  # a process's rows hold one side of every pair (chosen rows first), so read all
        pairs = [get(i) for i in units]
        length = bucket_length(int(lengths[units].max()), plan.pad_to_multiple_of, plan.max_length)
        rows = dpo_rows(pairs, plan.batch_size)
        batch = pack_rows([rows[r] for r in plan.local_rows], length, plan.pad_id)
        if plan.stage != "rm":  # a reward model scores a row's last token, not its loss positions
            sides = [len(p[side]) for p in pairs for side in ("chosen_ids", "rejected_ids")]
            batch = with_loss_index(batch, loss_width(sides, plan.pad_to_multiple_of, length))
        extra = {"ref_logps": dpo_ref_logps(pairs, plan.batch_size),
                 "margin": pair_scalars(pairs, "margin", plan.batch_size) if plan.stage == "rm" else None,
                 "label": pair_scalars(pairs, "label", plan.batch_size)}
        return batch | {k: v[plan.local_rows] for k, v in extra.items() if v is not None}
    # SFT: read only the examples of this process's rows
    fetch = lambda r: [get(i) for i in units[r]] if plan.packing else [get(units[r])]  # noqa: E731
    local = [fetch(r) if r < len(units) else [] for r in plan.local_rows]
    length = plan.max_length if plan.packing else bucket_length(
        int(lengths[units].max()), plan.pad_to_multiple_of, plan.max_length)
    return pack_rows(local, length, plan.pad_id)


def _shared_host_batch(units: list, get, plan) -> dict[str, np.ndarray]:
    """This process's rows of a shared-prompt DPO batch (every process lays out all pairs, then keeps its
    rows); `plan` gives batch_size, pack_pairs, row_multiple, mesh, pad_to_multiple_of and pad_id."""
    pairs = [get(i) for i in units]
    sizes = [shared_length(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
    length = round_up(max(sizes), plan.pad_to_multiple_of)
    if plan.pack_pairs:
        bins, slots = [sorted(b) for b in pack_bfd(sizes, length)], plan.batch_size
    else:
        bins, slots = [[k] for k in range(len(units))], 1
    global_rows = round_up(len(bins) if plan.pack_pairs else plan.batch_size, plan.row_multiple)
    laid = [[(k, pairs[k]) for k in b] for b in bins]
    batch = shared_batch([laid[r] if r < len(laid) else [] for r in rows_of(plan.mesh, global_rows)], length, slots,
                         plan.pad_id, with_ref="ref_chosen_logp" in pairs[0], with_label="label" in pairs[0])
    replies = [sum(len(pairs[k]["chosen_ids"]) + len(pairs[k]["rejected_ids"]) for k in b) for b in bins]
    return with_loss_index(batch, loss_width(replies, plan.pad_to_multiple_of, length))
