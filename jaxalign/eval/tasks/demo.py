"""The bundled demo task: sort a few distinct digits, in a polite or a terse style.

    Human: Sort these digits: 7 2 9 4
    Assistant: Sure! The sorted digits are: 2 4 7 9. Happy to help!     <- preferred style
    Assistant: 2 4 7 9. Obviously.                                      <- dispreferred style

A tiny randomly initialised Llama learns the skill (sorting 3-6 distinct digits) in a few
hundred CPU steps, and both properties are checked by programs:

- skill: `skill_correct` parses the digits of a reply (either style) and compares them with the
  sorted digits of the prompt; any other digit in the reply makes it wrong.
- style: `style_score` is 1.0 for the polite shell ("Sure! ..." ... "Happy to help!"), else 0.0.
- `judge_pair(row, a, b)`: correctness first, then style; 1 (a wins), -1 (b wins), 0 (tie).

Data (`write_demo_data`):
- SFT rows mix the two styles about 50/50, always with correct answers. The mix depends on the
  prompt wording: the first two of six templates are answered politely 90% of the time, the
  other four 30% of the time. A greedy SFT model therefore answers politely on about a third of
  the prompts (the polite-leaning templates), which leaves DPO something to shift.
- Preference rows: chosen = correct + polite; rejected = correct + terse, or (WRONG_FRACTION of
  rows) polite with a wrong answer, so DPO cannot buy style with skill.
- Held-out rows (sft_eval, preference_eval, eval_prompts) draw their digit sequences from a
  separate pool (a hash of the sequence picks the pool), so no held-out prompt can appear in
  the training files whatever the seeds and sizes.

Prompts and completions are plain strings in the `plain` (Anthropic HH) layout: the prompt is
"\\n\\nHuman: {question}\\n\\nAssistant:" and the completion starts with a space, as the
`plain` chat template renders a conversation.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from typing import Any

from jaxalign.runtime.paths import as_path

NAME = "demo"
DIGITS = "0123456789"
MIN_LEN, MAX_LEN = 3, 6
WRONG_FRACTION = 0.25  # preference rows whose rejected reply is polite but wrong
HELD_OUT_MODULUS = 8  # a digit sequence is held out iff hash(sequence) % HELD_OUT_MODULUS == 0

# (template, probability of a polite reply in the SFT data); the mean over templates is 0.5.
TEMPLATES: tuple[tuple[str, float], ...] = (
    ("Sort these digits: {digits}", 0.9),
    ("Please put the digits {digits} in increasing order.", 0.9),
    ("Can you sort {digits} for me?", 0.3),
    ("Order from smallest to largest: {digits}", 0.3),
    ("sort {digits}", 0.3),
    ("What are the digits {digits} in sorted order?", 0.3),
)

POLITE = "Sure! The sorted digits are: {answer}. Happy to help!"
TERSE = "{answer}. Obviously."
_POLITE_START, _POLITE_END = "Sure!", "Happy to help!"

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


# ----------------------------------------------------------------------------- instances


def render_prompt(question: str) -> str:
    """The `plain`-template prompt for one user question, ending at the generation prompt."""
    return f"{HUMAN}{question}{ASSISTANT}"


def format_reply(answer: str, polite: bool) -> str:
    """The reply text (no leading space) in the polite or the terse style."""
    return (POLITE if polite else TERSE).format(answer=answer)


def _is_held_out(digits: str) -> bool:
    return int(hashlib.sha256(digits.encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def _instance(rng: random.Random, held_out: bool) -> dict[str, Any]:
    """A random digit sequence from the training or the held-out pool, and its prompt."""
    while True:
        digits = "".join(rng.sample(DIGITS, rng.randint(MIN_LEN, MAX_LEN)))
        if _is_held_out(digits) == held_out:
            break
    template = rng.randrange(len(TEMPLATES))
    question = TEMPLATES[template][0].format(digits=" ".join(digits))
    return {
        "prompt": render_prompt(question),
        "question": question,
        "digits": " ".join(digits),
        "answer": " ".join(sorted(digits)),
        "template": template,
    }


def _rng(seed: int, what: str, held_out: bool) -> random.Random:
    return random.Random(f"{NAME}/{what}/{'eval' if held_out else 'train'}/{seed}")


def _wrong_answer(rng: random.Random, digits: str) -> str:
    """A near miss: adjacent swap, a changed digit, a dropped digit, or the unsorted input."""
    correct = sorted(digits)
    while True:
        kind = rng.randrange(4)
        out = list(correct)
        if kind == 0:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        elif kind == 1:
            out[rng.randrange(len(out))] = rng.choice([d for d in DIGITS if d not in digits])
        elif kind == 2:
            del out[rng.randrange(len(out))]
        else:
            out = list(digits)
        if out != correct:
            return " ".join(out)


# ----------------------------------------------------------------------------- rows


def make_sft_rows(n: int, seed: int = 0, held_out: bool = False) -> list[dict[str, str]]:
    """`{"prompt", "completion"}` rows with correct answers, styles mixed per template (~50/50)."""
    rng = _rng(seed, "sft", held_out)
    rows = []
    for _ in range(n):
        inst = _instance(rng, held_out)
        polite = rng.random() < TEMPLATES[inst["template"]][1]
        rows.append({"prompt": inst["prompt"], "completion": " " + format_reply(inst["answer"], polite)})
    return rows


def make_preference_rows(n: int, seed: int = 0, held_out: bool = False) -> list[dict[str, str]]:
    """`{"prompt", "chosen", "rejected"}`: chosen polite + correct; rejected terse + correct, or
    (WRONG_FRACTION of rows) polite + wrong."""
    rng = _rng(seed, "preference", held_out)
    rows = []
    for _ in range(n):
        inst = _instance(rng, held_out)
        chosen = format_reply(inst["answer"], polite=True)
        if rng.random() < WRONG_FRACTION:
            rejected = format_reply(_wrong_answer(rng, inst["digits"].replace(" ", "")), polite=True)
        else:
            rejected = format_reply(inst["answer"], polite=False)
        rows.append({"prompt": inst["prompt"], "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def make_eval_prompts(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Held-out prompts: `prompt` (to generate from), `question`, `digits`, `answer`, `template`, `id`."""
    rng = _rng(seed, "eval_prompts", True)
    return [_instance(rng, True) | {"id": i} for i in range(n)]


# ----------------------------------------------------------------------------- judges

_HUMAN_TURN = re.compile(r"Human:(.*?)(?:\n\nAssistant:|$)", re.S)


def expected_answer(prompt_row: dict[str, Any] | str) -> str:
    """The sorted digits a prompt asks for: the row's `answer`, else parsed from its (last) question."""
    if isinstance(prompt_row, dict):
        if prompt_row.get("answer"):
            return prompt_row["answer"]
        text = prompt_row.get("question") or prompt_row["prompt"]
    else:
        text = prompt_row
    turns = _HUMAN_TURN.findall(text)
    question = turns[-1] if turns else text
    return " ".join(sorted(re.findall(r"\d", question)))


def parse_answer(completion: str) -> str:
    """The numbers a reply states, space-joined ("24" stays one number, so it never matches "2 4")."""
    return " ".join(re.findall(r"\d+", completion))


def skill_correct(prompt_row: dict[str, Any] | str, completion: str) -> bool:
    """The reply (either style) states exactly the sorted digits, in order, and no other number."""
    return parse_answer(completion) == expected_answer(prompt_row)


def style_score(completion: str) -> float:
    """1.0 for the preferred (polite) style: starts with "Sure!", ends with "Happy to help!"; else 0.0."""
    text = completion.strip()
    return 1.0 if text.startswith(_POLITE_START) and text.endswith(_POLITE_END) else 0.0


def judge_pair(prompt_row: dict[str, Any] | str, completion_a: str, completion_b: str) -> int:
    """1 if a beats b, -1 if b beats a, 0 for a tie: correctness first, then style."""
    ca, cb = skill_correct(prompt_row, completion_a), skill_correct(prompt_row, completion_b)
    if ca != cb:
        return 1 if ca else -1
    sa, sb = style_score(completion_a) >= 0.5, style_score(completion_b) >= 0.5
    if sa != sb:
        return 1 if sa else -1
    return 0


# ----------------------------------------------------------------------------- files


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with as_path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_demo_data(out_dir: str, n_sft: int = 4000, n_pref: int = 2000, n_eval: int = 200,
                    seed: int = 0) -> dict[str, str]:
    """Write sft.jsonl, sft_eval.jsonl, preference.jsonl, preference_eval.jsonl, eval_prompts.jsonl.

    The held-out files hold n_eval rows each. Returns {file stem: path}. Raises AssertionError if a
    held-out prompt appears in the training files (impossible by construction; checked anyway).
    """
    as_path(out_dir).mkdir(parents=True, exist_ok=True)
    files = {
        "sft": make_sft_rows(n_sft, seed),
        "sft_eval": make_sft_rows(n_eval, seed, held_out=True),
        "preference": make_preference_rows(n_pref, seed),
        "preference_eval": make_preference_rows(n_eval, seed, held_out=True),
        "eval_prompts": make_eval_prompts(n_eval, seed),
    }
    train_prompts = {r["prompt"] for r in files["sft"] + files["preference"]}
    leaked = [r["prompt"] for k in ("sft_eval", "preference_eval", "eval_prompts") for r in files[k]
              if r["prompt"] in train_prompts]
    assert not leaked, f"held-out prompts found in the training data: {leaked[:3]}"
    paths = {}
    for stem, rows in files.items():
        paths[stem] = os.path.join(out_dir, f"{stem}.jsonl")
        _write_jsonl(paths[stem], rows)
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Write the demo task's data files (sort digits, polite vs terse).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-sft", type=int, default=4000)
    p.add_argument("--n-pref", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for stem, path in write_demo_data(args.out, args.n_sft, args.n_pref, args.n_eval, args.seed).items():
        print(f"{stem}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
