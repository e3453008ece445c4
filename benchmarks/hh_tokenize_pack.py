"""Tokenize-and-pack throughput (rows/s) on the real HH-RLHF file with the Llama 2 tokenizer.

    python benchmarks/hh_tokenize_pack.py [--repeat 3]

Tokenizes the 2,312 rows for SFT (chosen transcripts, `plain` template) with the cache off (a fresh
cache dir each time), then packs them best-fit-decreasing into rows of 512; prints rows/s of each
part and of both together (best of --repeat).
"""

import argparse
import os
import pathlib
import platform
import tempfile
import time

from jaxalign.config import load_config
from jaxalign.data.packing import bins_efficiency, pack_bfd
from jaxalign.data.sources import load_rows
from jaxalign.data.tokenize import tokenize_dataset
from jaxalign.data.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    os.chdir(ROOT)
    # the config reads the hub; these are the local copies of the same two files
    cfg = load_config("configs/hh_tiny.yaml", ["data.train=../shared/data/hh-rlhf-harmless-base-test.jsonl.gz",
                                               "tokenizer.path=../shared/data/llama2-tokenizer.model"])
    tok = load_tokenizer(cfg.tokenizer.path, cfg.tokenizer.chat_template)
    rows = load_rows(cfg.data.train)
    best_tok = best_pack = float("inf")
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            examples, stats = tokenize_dataset(rows, tok, cfg.data, "sft", cache_dir=cache)
            t1 = time.perf_counter()
            lengths = examples.lengths()
            bins = pack_bfd(lengths, cfg.data.max_length)
            t2 = time.perf_counter()
        best_tok, best_pack = min(best_tok, t1 - t0), min(best_pack, t2 - t1)
    n = len(rows)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"rows: {n} in, {stats.rows_out} kept; packed into {len(bins)} rows of {cfg.data.max_length} "
          f"({100 * bins_efficiency(lengths, bins, cfg.data.max_length):.1f}% non-pad)")
    print(f"tokenize: {n / best_tok:,.0f} rows/s; pack: {n / best_pack:,.0f} rows/s; "
          f"tokenize+pack: {n / (best_tok + best_pack):,.0f} rows/s (best of {args.repeat})")


if __name__ == "__main__":
    main()
