"""Train a SentencePiece BPE tokenizer on text fields of JSONL files.

    python tools/train_tokenizer.py --input runs/demo/data/sft.jsonl --input runs/demo/data/preference.jsonl \
        --fields prompt,completion,chosen,rejected --vocab-size 320 --out runs/demo/tokenizer

Writes OUT/tokenizer.model (or OUT itself when it ends in .model); see
jaxalign.eval.tasks.tokenizer_training for the settings.
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxalign.errors import JaxalignError
from jaxalign.eval.tasks.tokenizer_training import texts_from_jsonl, train_sentencepiece


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True, help="JSONL file (repeatable)")
    p.add_argument("--fields", default="prompt,completion,chosen,rejected",
                   help="comma-separated string fields to train on (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=320, help="number of pieces (default: %(default)s)")
    p.add_argument("--out", required=True, help="output dir (gets tokenizer.model) or a path ending in .model")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        texts = texts_from_jsonl(args.input, [f for f in args.fields.split(",") if f])
        path = train_sentencepiece(texts, args.vocab_size, args.out)
    except JaxalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trained a {args.vocab_size}-piece tokenizer on {len(texts)} texts in "
          f"{time.perf_counter() - start:.1f}s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
