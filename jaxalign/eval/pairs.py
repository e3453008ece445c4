"""`jaxalign pairs`: on-policy preference data from a model's own samples.

For each prompt, sample `num_samples` completions, rank them by the judge (a task's pairwise judge, or
any `eval.judge` spec: reward:PATH, llm:PATH, likelihood:PATH), round robin: a completion's score is its
wins minus losses against the others, and write the best as `chosen` and the worst as `rejected`.
Prompts whose candidates all tie are skipped and counted.

The written texts re-tokenize to the sampled tokens: for a plain-string prompt a completion is the
decoded prompt+completion minus the decoded prompt, so it keeps the leading space the sampled first
token carries ("Assistant:" + " Sure!"); a bare decode would drop it and DPO would train on
"Assistant:Sure!", tokens the model never sampled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import jax

from jaxalign.errors import JaxalignError
from jaxalign.eval.generate import SamplingParams, generate
from jaxalign.eval.score import read_jsonl
from jaxalign.runtime.paths import as_path
from jaxalign.runtime.sharding import make_mesh, use_mesh

log = logging.getLogger(__name__)


def round_robin(k: int) -> list[tuple[int, int]]:
    """Every pair (i, j), i < j, of k candidates."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def rank(verdicts: Sequence[int], k: int) -> list[int]:
    """Round-robin score (wins - losses) of each of k candidates, from the verdicts of `round_robin(k)`."""
    scores = [0] * k
    for (i, j), verdict in zip(round_robin(k), verdicts):
        scores[i] += verdict
        scores[j] -= verdict
    return scores


def best_and_worst(candidates: Sequence[str], verdicts: Sequence[int]) -> tuple[str, str] | None:
    """(chosen, rejected), or None when every candidate ties (a pair would teach nothing)."""
    scores = rank(verdicts, len(candidates))
    best, worst = max(range(len(scores)), key=scores.__getitem__), min(range(len(scores)), key=scores.__getitem__)
    if scores[best] == scores[worst] or candidates[best] == candidates[worst]:
        return None
    return candidates[best], candidates[worst]


def completion_text(tokenizer, prompt: str | list, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
    """The text of sampled `completion_ids` such that `prompt` + text tokenizes back to them (see the module doc)."""
    alone = tokenizer.decode(list(completion_ids), skip_special_tokens=True)
    if not isinstance(prompt, str):  # a chat template places the reply itself
        return alone
    before = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + list(completion_ids), skip_special_tokens=True)
    return full[len(before):] if full.startswith(before) else alone


def pairs_judge(spec: str, mesh, batch_size: int):
    """A registered task's judge (`--judge demo`), or the judge an eval.judge spec names (reward:PATH, ...)."""
    from jaxalign.checkpoint import model_io
    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.eval.judges import TaskJudge, build_judge
    from jaxalign.eval.tasks import TASKS, get_task

    if spec in TASKS:
        task = get_task(spec)
        if not hasattr(task, "judge_pair"):
            raise JaxalignError(f"task {spec!r} defines no pairwise judge (judge_pair)")
        return TaskJudge(task)
    if ":" not in spec:
        raise JaxalignError(f"--judge {spec!r}: not a registered task ({', '.join(sorted(TASKS))}) nor a judge "
                            "spec (reward:PATH, llm:PATH, likelihood:PATH)")
    return build_judge(spec, None, mesh=mesh, load=lambda path: model_io.load_model(path, mesh),
                       tokenizer_of=lambda path: load_tokenizer(str(model_io.tokenizer_path(path))),
                       batch_size=batch_size)


def run_pairs(model_path: str, prompts_path: str, out_path: str, params: SamplingParams, *, judge: str,
              num_samples: int = 4, batch_size: int = 32, tokenizer_path: str = "",
              chat_template: str = "") -> dict[str, int]:
    """Write pairs.jsonl; returns counts {"prompts", "pairs", "skipped_all_tied"}."""
    # Imported here, not at the top: model_io imports Orbax, whose absl logging installs a root handler
    # on import, and `jaxalign` (cli.main) builds its parser before it configures logging.
    from jaxalign.checkpoint import model_io
    from jaxalign.data.examples import encode_prompt
    from jaxalign.data.tokenizer import load_tokenizer

    if num_samples < 2:
        raise JaxalignError(f"--num-samples must be at least 2, got {num_samples}")
    rows = [row for _, row in read_jsonl(prompts_path)]
    for i, row in enumerate(rows):
        if "prompt" not in row:
            raise JaxalignError(f"{prompts_path}:{i + 1}: a row needs a 'prompt'")
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    judge_fn = pairs_judge(judge, mesh, batch_size)
    tokenizer = load_tokenizer(tokenizer_path or str(model_io.tokenizer_path(model_path)), chat_template)
    with use_mesh(mesh):
        model = model_io.load_model(model_path, mesh)
        # Each prompt repeated num_samples times: sampling keys depend on the position in the list,
        # so the copies draw different samples.
        prompts = [row["prompt"] for row in rows for _ in range(num_samples)]
        results = generate(model, tokenizer, prompts, params, mesh=mesh, batch_size=batch_size)
    prompt_ids = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    samples = [completion_text(tokenizer, prompts[k], prompt_ids[k // num_samples], r.completion_ids)
               for k, r in enumerate(results)]
    counts = {"prompts": len(rows), "pairs": 0, "skipped_all_tied": 0}
    out_rows: list[dict[str, Any]] = []
    # Every prompt's round robin, judged in one batched call.
    games = [(i, a, b) for i in range(len(rows)) for a, b in round_robin(num_samples)]
    verdicts = judge_fn([rows[i] for i, _, _ in games], [samples[i * num_samples + a] for i, a, _ in games],
                        [samples[i * num_samples + b] for i, _, b in games])
    per_prompt = len(games) // max(len(rows), 1)
    for i, row in enumerate(rows):
        pair = best_and_worst(samples[i * num_samples:(i + 1) * num_samples],
                              verdicts[i * per_prompt:(i + 1) * per_prompt])
        if pair is None:
            counts["skipped_all_tied"] += 1
            continue
        out_rows.append({**row, "chosen": pair[0], "rejected": pair[1]})
    counts["pairs"] = len(out_rows)
    if jax.process_index() == 0:
        out = as_path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows))
    log.info("pairs: %s", counts)
    return counts


def add_cli(sub, commands: dict) -> None:
    p = sub.add_parser("pairs", help="on-policy preference pairs: sample, judge, keep best and worst",
                       description="Sample --num-samples completions per prompt from the model, rank them with "
                                   "the judge, and write the best as `chosen` and the worst as `rejected`. Prompts "
                                   "where all candidates tie are skipped and counted.")
    p.add_argument("--model", required=True, help="the SFT model (HF dir, jaxalign checkpoint or run dir)")
    p.add_argument("--prompts", required=True, help="JSONL with a `prompt` per row (plus the task's fields)")
    p.add_argument("--judge", required=True, help="a registered task whose judge ranks completions (e.g. demo), or "
                   "reward:PATH (a reward model), llm:PATH, likelihood:PATH")
    p.add_argument("--out", required=True, help="output JSONL (prompt, chosen, rejected + the input fields)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tokenizer", default="", help="tokenizer (default: the model's own)")
    p.add_argument("--chat-template", default="", help="chat template override (llama2, llama3, chatml, plain)")

    def run(args) -> int:
        params = SamplingParams(args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        counts = run_pairs(args.model, args.prompts, args.out, params, judge=args.judge, num_samples=args.num_samples,
                           batch_size=args.batch_size, tokenizer_path=args.tokenizer,
                           chat_template=args.chat_template)
        print(f"{counts['pairs']} pairs from {counts['prompts']} prompts ({counts['skipped_all_tied']} skipped: all "
              f"candidates tied) -> {args.out}")
        return 0

    commands["pairs"] = run
