"""Build the next training batch on the host while the device runs the current step.

JAX dispatches a jitted step asynchronously, so drawing batch i+1 (packing, padding, device_put)
right after launching step i overlaps the two; the loop blocks on step i's metrics only afterwards.
Each batch carries the iterator's position right after it was drawn: a checkpoint of step i stores
that position, not the iterator's (already one batch further), so a resume continues with batch i+1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jaxalign.data.iterator import BatchIterator, to_global_arrays


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the iterator stood after drawing a batch."""

    state: dict[str, Any]  # BatchIterator.state(): restoring it continues with the following batch
    epoch: int
    batch_index: int  # of this batch within its epoch
    epoch_done: bool  # this batch was the epoch's last


@dataclasses.dataclass
class Batch:
    host: dict[str, np.ndarray]  # this process's rows
    arrays: dict[str, Any]  # the global, sharded arrays the step takes
    position: Position


class Prefetcher:
    def __init__(self, iterator: BatchIterator, mesh: Mesh):
        self.iterator, self.mesh = iterator, mesh
        self._ready: Batch | None = None

    def prefetch(self) -> None:
        """Draw the next batch now (call right after dispatching a step)."""
        if self._ready is None:
            self._ready = self._draw()

    def take(self) -> Batch:
        """The prefetched batch, or a freshly drawn one."""
        batch, self._ready = self._ready or self._draw(), None
        return batch

    def _draw(self) -> Batch:
        it = self.iterator
        host = next(it)
        position = Position(state=it.state(), epoch=it.epoch, batch_index=it.step - 1,
                            epoch_done=it.step >= it.steps_per_epoch)
        return Batch(host=host, arrays=to_global_arrays(host, self.mesh), position=position)
