"""Pack + batch throughput of jaxalign.data on synthetic tokenized examples (no tokenizer, no device).

    python benchmarks/data_throughput.py [--examples 100000] [--max-length 2048] [--batch-size 16]

Prints the time of one best-fit-decreasing plan over all examples and the rows/s and tokens/s of
building host batches for SFT (packed and unpacked) and DPO. Lengths are lognormal, clipped to
[16, max_length]; token ids are random.
"""

import argparse
import gc
import time

import numpy as np

from jaxalign.data.iterator import BatchIterator
from jaxalign.data.packing import bins_efficiency, pack_bfd


def synthetic_sft(n: int, max_length: int, rng: np.random.Generator) -> list[dict]:
    lengths = np.clip(rng.lognormal(np.log(max_length / 4), 0.7, n), 16, max_length).astype(int)
    return [{"input_ids": rng.integers(3, 32000, k).tolist(), "loss_mask": (np.arange(k) >= k // 3).tolist()}
            for k in lengths]


def synthetic_pairs(n: int, max_length: int, rng: np.random.Generator) -> list[dict]:
    def ids(mean):
        k = int(np.clip(rng.lognormal(np.log(mean), 0.6), 1, max_length // 3))
        return rng.integers(3, 32000, k).tolist()

    return [{"prompt_ids": ids(max_length / 8), "chosen_ids": ids(max_length / 8), "rejected_ids": ids(max_length / 8)}
            for _ in range(n)]


def measure(iterator: BatchIterator, seconds: float) -> tuple[float, float, int]:
    """(rows/s, real tokens/s, steps) building batches for about `seconds`."""
    start, rows, tokens, steps = time.perf_counter(), 0, 0, 0
    while time.perf_counter() - start < seconds:
        batch = next(iterator)
        rows += len(batch["tokens"])
        tokens += int(np.count_nonzero(batch["segment_ids"]))
        steps += 1
    elapsed = time.perf_counter() - start
    return rows / elapsed, tokens / elapsed, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent building batches per mode")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    t = time.perf_counter()
    sft = synthetic_sft(args.examples, args.max_length, rng)
    print(f"made {len(sft)} synthetic SFT examples in {time.perf_counter() - t:.1f}s")
    # Millions of list items make every full GC pass slow (~1 s here); a trainer holding tokenized
    # data as lists should do the same once its data is loaded.
    gc.collect()
    gc.freeze()
    lengths = [len(ex["input_ids"]) for ex in sft]
    times = []
    for _ in range(3):
        t = time.perf_counter()
        bins = pack_bfd(lengths, args.max_length)
        times.append(time.perf_counter() - t)
    print(f"pack_bfd: {len(sft)} examples -> {len(bins)} rows of {args.max_length} in "
          f"{min(times):.2f}s (best of 3), efficiency {100 * bins_efficiency(lengths, bins, args.max_length):.1f}%")

    for packing in (True, False):
        t = time.perf_counter()
        it = BatchIterator(sft, "sft", batch_size=args.batch_size, max_length=args.max_length, packing=packing)
        setup = time.perf_counter() - t
        rows, tokens, steps = measure(it, args.seconds)
        print(f"sft {'packed  ' if packing else 'unpacked'}: {rows:9.0f} rows/s  {tokens / 1e6:6.2f}M tokens/s "
              f"({steps} batches of [{args.batch_size}, <= {args.max_length}]; epoch plan {setup:.2f}s)")

    pairs = synthetic_pairs(args.examples // 4, args.max_length, rng)
    it = BatchIterator(pairs, "dpo", batch_size=args.batch_size, max_length=args.max_length)
    rows, tokens, steps = measure(it, args.seconds)
    print(f"dpo           : {rows:9.0f} rows/s  {tokens / 1e6:6.2f}M tokens/s ({steps} batches of "
          f"{2 * args.batch_size} rows)")


if __name__ == "__main__":
    main()
