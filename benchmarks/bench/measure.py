"""Timing, memory and synthetic batches: what every worker measures with."""

from __future__ import annotations

import os
import time
from typing import Any

from bench.shapes import Shape


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def jax_memory() -> dict[str, float]:
    """Peak memory of the process: host RSS on CPU, the allocator's peak on an accelerator."""
    import jax

    dev = jax.devices()[0]
    out = {"peak_host_rss_mb": peak_rss_mb()}
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def timed_steps(run_one, warmup: int, steps: int, cpu_times: list | None = None) -> list[float]:
    """Wall time of each of `steps` calls after `warmup` untimed ones (run_one blocks until done).

    `cpu_times` (if given) receives the process CPU seconds (user + system, all threads) of each call:
    on a shared machine it is far less disturbed by other jobs than the wall time."""
    for _ in range(warmup):
        run_one()
    times = []
    for _ in range(steps):
        c, t = os.times(), time.perf_counter()
        run_one()
        times.append(time.perf_counter() - t)
        if cpu_times is not None:
            c2 = os.times()
            cpu_times.append(c2.user + c2.system - c.user - c.system)
    return times


def synthetic_batch(s: Shape, stage: str, seed: int = 0, rows: int | None = None, seq: int | None = None):
    """Host arrays of one full batch: every position is a real token (no padding), as a packed SFT row.

    SFT rows hold two packed sequences each (segment ids 1 and 2, positions restarting); DPO rows are
    prompt + completion, chosen rows first, each rejected row sharing its chosen row's prompt, trained
    on the completion only; with `ref_logps` for a precomputed reference.
    """
    import numpy as np

    rows = s.batch if rows is None else rows
    seq = s.seq if seq is None else seq
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, s.vocab, (rows, seq + 1)).astype(np.int32)
    col = np.arange(seq)[None, :]
    if stage == "sft":
        cut = rng.integers(seq // 4, 3 * seq // 4, (rows, 1))
        segment_ids = np.where(col < cut, 1, 2).astype(np.int32)
        positions = np.where(col < cut, col, col - cut).astype(np.int32)
        loss_mask = col != cut - 1  # no sequence predicts the next one's first token
        loss_mask &= col != seq - 1
    else:
        pairs = rows // 2
        ids[pairs:, : seq // 4] = ids[:pairs, : seq // 4]
        segment_ids = np.ones((rows, seq), np.int32)
        positions = np.broadcast_to(col, (rows, seq)).astype(np.int32)
        loss_mask = np.broadcast_to(col >= seq // 4 - 1, (rows, seq)).copy()
        loss_mask[:, -1] = False
    batch = {"tokens": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": loss_mask, "segment_ids": segment_ids,
             "positions": positions}
    if stage == "dpo":
        batch["ref_logps"] = (-2.0 * loss_mask.sum(-1)).astype(np.float32)
    return batch


def apply_variant(options: dict[str, Any], chunk_size: int, variant: dict[str, Any]) -> tuple[dict, int]:
    options = dict(options)
    for key, value in variant.items():
        key = key.removeprefix("model.")
        if key == "logits_chunk_size":
            chunk_size = int(value)
        elif key in ("remat", "attention", "dtype", "param_dtype"):
            options[key] = value
        elif key == "scan_layers":
            options[key] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        else:
            raise SystemExit(f"--variant: unknown key {key!r} (model.logits_chunk_size, model.remat, "
                             "model.attention, model.scan_layers, model.dtype, model.param_dtype)")
    return options, chunk_size
