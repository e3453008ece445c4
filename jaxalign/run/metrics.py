"""What a run logs: metrics.jsonl (+ TensorBoard when installed), and batch metrics averaged by weight."""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np

from jaxalign.runtime import paths

log = logging.getLogger(__name__)


class MetricsLog:
    """metrics.jsonl (one JSON object per record) on process 0, plus TensorBoard when installed.

    The TensorBoard writer (a thread, a queue and an open event file) is opened on the first record
    and closed by `close()` at the end of `Trainer.train`, so runs in one process do not pile them up."""

    def __init__(self, run: paths.Path):
        self.path = run / "metrics.jsonl"
        self.writer = None
        # tensorboardX writes to gs:// and s3:// itself; it would take other URLs for local paths.
        local_or_known = not paths.is_remote(run) or str(run).startswith(("gs://", "s3://"))
        self.tensorboard_dir = run / "tensorboard" if local_or_known else None

    def _open_writer(self) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self.tensorboard_dir = None
            return
        try:
            self.writer = SummaryWriter(str(self.tensorboard_dir))
        except ImportError as e:  # gs:// needs google-cloud-storage, s3:// boto3 (the `gcs` extra has the first)
            log.warning("no TensorBoard events in %s: %s", self.tensorboard_dir, e)
            self.tensorboard_dir = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        paths.append_text(self.path, json.dumps(record) + "\n")
        if self.writer is None and self.tensorboard_dir is not None:
            self._open_writer()
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, record["step"])
            self.writer.flush()


def mean_over(records: list[dict[str, Any]], weight_key: str) -> dict[str, float]:
    """Average metrics of several batches, each weighted by its tokens (SFT) or pairs (DPO)."""
    weights = np.array([float(r[weight_key]) for r in records])
    total = max(weights.sum(), 1.0)
    keys = [k for k in records[0] if not k.startswith("num_")]
    out = {k: float(sum(float(r[k]) * w for r, w in zip(records, weights)) / total) for k in keys}
    out[weight_key] = float(weights.sum())
    return out
