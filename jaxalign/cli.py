"""The `jaxalign` console script: one entry point, a subcommand per job, `--help` on each."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from jaxalign.errors import JaxalignError

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Command] = {}


def _score(args: argparse.Namespace) -> int:
    from jaxalign.eval.score import run_score

    n = run_score(args.model, args.data, args.out, batch_size=args.batch_size, tokenizer_path=args.tokenizer,
                  dtype=args.dtype, reward=args.reward)
    print(f"scored {n} rows -> {args.out}")
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="summed log-prob of each row's completion given its prompt (or its reward)",
                       description="For each JSONL row (prompt/completion text, or prompt_ids/completion_ids), "
                                   "write the row plus `logp` (summed log-prob of the completion tokens) and "
                                   "`num_tokens`; with --reward (a reward model) the row plus `reward`. Batched, "
                                   "jit-compiled, sharded over all devices.")
    p.add_argument("--model", required=True, help="HF model dir or jaxalign checkpoint dir")
    p.add_argument("--data", required=True, help="input JSONL")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--tokenizer", default="", help="tokenizer dir or .model (default: the model's own)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--reward", action="store_true", help="the model is a reward model (stage rm, or an HF "
                   "*ForSequenceClassification dir): write each row's `reward`")
    _COMMANDS["score"] = _score


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the run's YAML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set dpo.beta=0.2 (repeatable)")


def _train(args: argparse.Namespace) -> int:
    from jaxalign.config import load_stage_config
    from jaxalign.run.lifecycle import EXIT_PREEMPTED, PREEMPTED
    from jaxalign.run.loop import train

    summary = train(load_stage_config(args.config, args.set), resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return EXIT_PREEMPTED if summary["state"] == PREEMPTED else 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run one stage (SFT, DPO or a reward model, from the config's `stage`)",
                       description="Train one stage: the config's `stage`, with its `{stage}.overrides` applied "
                                   "(as `pipeline` runs it). The run dir (output_dir) receives config.yaml, "
                                   "status.json, metrics.jsonl, checkpoints/{step}/, best.json and summary.json. "
                                   "Exit status: 0 finished, 75 stopped early by SIGTERM/SIGINT (resumable: run "
                                   "again with --resume), 2 a bad config, data or run dir, 1 an unexpected error, "
                                   "130 aborted by a second SIGINT.")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    _COMMANDS["train"] = _train


def _data(args: argparse.Namespace) -> int:
    from jaxalign.config import load_stage_config
    from jaxalign.data.inspect import inspect_data
    from jaxalign.data.pipeline import load_examples
    from jaxalign.run.build import run_tokenizer

    cfg = load_stage_config(args.config, args.set, args.stage)
    if cfg.data.streaming:  # a stream has no counts ahead: inspect its rows as a token store holds them
        print("data.streaming: inspecting the rows as a token store (written to data.cache_dir) holds them; "
              "training streams them and packs greedily in stream order")
        cfg = load_stage_config(args.config, [*args.set, "data.streaming=false"], args.stage)
    tokenizer = run_tokenizer(cfg)
    train_examples, _, stats = load_examples(cfg, tokenizer)
    print(inspect_data(train_examples, flat_counts(stats["train"]), tokenizer, cfg.stage, cfg.data))
    return 0


def flat_counts(stats) -> dict[str, int]:
    """DataStats as name -> count, drops listed by reason."""
    counts = {k: v for k, v in stats.to_dict().items() if isinstance(v, int) and not isinstance(v, bool)}
    counts.update({f"dropped ({reason})": n for reason, n in stats.dropped_by_reason.items()})
    return counts


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="look at the data a config produces (`data inspect`)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    q = verbs.add_parser("inspect", help="counts, lengths, truncations, drops, packing efficiency, a marked example",
                         description="Tokenize the config's training data as the stage would and report on it: "
                                     "counts, length percentiles, truncation and drop counts, packing efficiency, "
                                     "near-identical pairs (DPO), and one decoded example with trained tokens "
                                     "marked [[like this]].")
    _add_config_args(q)
    q.add_argument("--stage", choices=["sft", "dpo", "kto"], default="", help="inspect as this stage, with its {stage}.overrides (default: the config's)")
    _COMMANDS["data"] = _data


def _eval(args: argparse.Namespace) -> int:
    from jaxalign.config import load_config
    from jaxalign.eval.evaluate import parse_models, run_eval

    cfg = load_config(args.config, args.set)
    out = args.out or f"{cfg.output_dir}/eval"
    report = run_eval(cfg, parse_models(args.models), out)
    print(f"report: {out}/report.md")
    for line in [c["line"] for c in report["credits"]] + [f"warning: {w}" for w in report["warnings"]]:
        print(line)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate several models on the same held-out data and compare the stages",
                       description="Run every model on the same held-out sets (NLL of reference responses, "
                                   "implicit-reward accuracy relative to the `sft` model, generations checked by "
                                   "eval.task and judged against the `sft` model's) and write report.md, "
                                   "report.json and PNG plots.")
    _add_config_args(p)
    p.add_argument("--models", required=True, help="NAME=PATH,... e.g. base=P0,sft=P1,dpo=P2 (sft is the reference)")
    p.add_argument("--out", default="", help="report dir (default: OUTPUT_DIR/eval)")
    _COMMANDS["eval"] = _eval


def _pipeline(args: argparse.Namespace) -> int:
    from jaxalign.config import load_config
    from jaxalign.pipeline import run_pipeline
    from jaxalign.run.lifecycle import EXIT_PREEMPTED, Preempted
    from jaxalign.runtime.paths import as_path

    cfg = load_config(args.config, args.set)
    try:
        run_pipeline(cfg, args.set)
    except Preempted as e:
        print(f"jaxalign pipeline: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    print((as_path(cfg.output_dir) / "report" / "report.md").read_text())
    return 0


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="SFT -> gate -> DPO -> eval base/SFT/DPO -> report -> HF export",
                       description="The whole job: SFT, evaluate it, stop if it misses eval.min_sft_skill, DPO from "
                                   "the best SFT checkpoint, evaluate base/SFT/DPO on the same held-out data, "
                                   "write the report and export the DPO model to Hugging Face format. Per-stage "
                                   "settings come from sft.overrides / dpo.overrides; finished stages are skipped "
                                   "on a re-run and unfinished ones resumed. Exit status: 0 finished, 75 stopped "
                                   "early by SIGTERM/SIGINT (resumable: run it again), 2 a bad config, data or run "
                                   "dir or a missed gate, 1 an unexpected error, 130 aborted by a second SIGINT.")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="accepted for symmetry with train: a pipeline always resumes its unfinished stages")
    _COMMANDS["pipeline"] = _pipeline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalign", description="SFT then DPO for open-weight LLMs in JAX/Flax.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_train, _add_eval, _add_pipeline, _add_data, _add_score):
        add(sub)
    from jaxalign.eval.generate import add_cli as add_generate
    from jaxalign.eval.pairs import add_cli as add_pairs
    from jaxalign.plan import add_cli as add_plan
    from jaxalign.runtime.distributed import add_distributed_args

    add_generate(sub, _COMMANDS)
    add_pairs(sub, _COMMANDS)
    add_plan(sub, _COMMANDS)
    add_distributed_args(sub.choices["train"], sub.choices["pipeline"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # force: importing Orbax/absl may already have configured the root logger.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Orbax logs every checkpoint step through absl at INFO; keep it for --verbose.
    logging.getLogger("absl").setLevel(logging.INFO if args.verbose else logging.ERROR)
    from jaxalign.run.lifecycle import EXIT_INTERRUPTED, EXIT_USAGE
    from jaxalign.runtime.preemption import PreemptionWatch

    try:
        from jaxalign.runtime.distributed import initialize_from_cli

        initialize_from_cli(args)
        if args.command in ("train", "pipeline"):  # a stop signal from here on is kept, never fatal mid-write
            with PreemptionWatch():
                return _COMMANDS[args.command](args)
        return _COMMANDS[args.command](args)
    except JaxalignError as e:
        print(f"jaxalign {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"jaxalign {args.command}: aborted: {e or 'interrupted'}; the last complete checkpoint is kept "
              "(continue with --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
