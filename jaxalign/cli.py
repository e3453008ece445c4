"""The `jaxalign` console script: one entry point, a subcommand per job, `--help` on each."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from jaxalign.errors import JaxalignError

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Command] = {}


def _score(args: argparse.Namespace) -> int:
    from jaxalign.score import run_score

    n = run_score(args.model, args.data, args.out, batch_size=args.batch_size, tokenizer_path=args.tokenizer,
                  dtype=args.dtype)
    print(f"scored {n} rows -> {args.out}")
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="summed log-prob of each row's completion given its prompt",
                       description="For each JSONL row (prompt/completion text, or prompt_ids/completion_ids), "
                                   "write the row plus `logp` (summed log-prob of the completion tokens) and "
                                   "`num_tokens`. Batched, jit-compiled, sharded over all devices.")
    p.add_argument("--model", required=True, help="HF model dir or jaxalign checkpoint dir")
    p.add_argument("--data", required=True, help="input JSONL")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--tokenizer", default="", help="tokenizer dir or .model (default: the model's own)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    _COMMANDS["score"] = _score


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalign", description="SFT then DPO for open-weight LLMs in JAX/Flax.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_score,):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except JaxalignError as e:
        print(f"jaxalign {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
