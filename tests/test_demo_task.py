"""The bundled demo task (jaxalign.eval.tasks.demo): judges, data properties, and its tokenizer."""

import importlib.util
import json
import pathlib
import re
import time

import pytest

from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import JaxalignError
from jaxalign.eval.tasks import TASKS, demo, get_task
from jaxalign.eval.tasks.tokenizer_training import texts_from_jsonl, train_sentencepiece

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW = {"prompt": demo.render_prompt("Sort these digits: 7 2 9 4"), "answer": "2 4 7 9"}
POLITE_OK = " Sure! The sorted digits are: 2 4 7 9. Happy to help!"
TERSE_OK = " 2 4 7 9. Obviously."
POLITE_WRONG = " Sure! The sorted digits are: 2 7 4 9. Happy to help!"
TERSE_WRONG = " 2 4 9. Obviously."


def _digits(prompt: str) -> str:
    return "".join(re.findall(r"\d", prompt))


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_data")
    demo.write_demo_data(str(out), n_sft=2000, n_pref=1000, n_eval=200, seed=3)
    return out


# ----------------------------------------------------------------------------- judges


def test_registry():
    assert TASKS["demo"] is demo and get_task("demo") is demo
    for fn in ("make_sft_rows", "make_preference_rows", "make_eval_prompts", "skill_correct", "style_score",
               "judge_pair"):
        assert callable(getattr(get_task("demo"), fn))
    with pytest.raises(JaxalignError, match="unknown task 'nope'.*demo"):
        get_task("nope")


def test_skill_correct_both_styles_and_wrong_answers():
    assert demo.skill_correct(ROW, POLITE_OK) and demo.skill_correct(ROW, TERSE_OK)
    assert demo.skill_correct(ROW, "2 4 7 9")
    for wrong in (POLITE_WRONG, TERSE_WRONG, " 2 4 7 9 9. Obviously.", " 24 7 9. Obviously.", "", " Sure!",
                  " 7 2 9 4. Obviously.", " 2 4 7 9. Happy to help! 1"):
        assert not demo.skill_correct(ROW, wrong), wrong
    # Without an `answer` field the expected answer comes from the prompt's question.
    assert demo.skill_correct({"prompt": ROW["prompt"]}, TERSE_OK)
    assert demo.skill_correct(ROW["prompt"], POLITE_OK)
    assert demo.expected_answer(demo.render_prompt("Can you sort 5 0 3 for me?")) == "0 3 5"


def test_style_score():
    assert demo.style_score(POLITE_OK) == demo.style_score(POLITE_WRONG) == 1.0
    assert demo.style_score(TERSE_OK) == demo.style_score(TERSE_WRONG) == 0.0
    assert demo.style_score(" Sure! The sorted digits are: 2 4 7 9.") == 0.0  # no sign-off
    assert demo.style_score("") == 0.0


@pytest.mark.parametrize("a, b, expected", [
    (POLITE_OK, TERSE_OK, 1),        # both correct: style decides
    (TERSE_OK, POLITE_OK, -1),
    (TERSE_OK, POLITE_WRONG, 1),     # correctness beats style
    (POLITE_WRONG, TERSE_OK, -1),
    (POLITE_OK, POLITE_OK, 0),       # ties
    (TERSE_OK, TERSE_OK, 0),
    (POLITE_WRONG, POLITE_WRONG, 0),
    (POLITE_WRONG, TERSE_WRONG, 1),  # both wrong: style decides
])
def test_judge_pair(a, b, expected):
    assert demo.judge_pair(ROW, a, b) == expected
    assert demo.judge_pair(ROW, b, a) == -expected


# ----------------------------------------------------------------------------- data


def test_rows_are_deterministic_and_use_the_plain_layout():
    assert demo.make_sft_rows(20, seed=1) == demo.make_sft_rows(20, seed=1) != demo.make_sft_rows(20, seed=2)
    for row in demo.make_sft_rows(50, seed=0):
        assert row["prompt"].startswith("\n\nHuman: ") and row["prompt"].endswith("\n\nAssistant:")
        assert row["completion"].startswith(" ") and not row["completion"].startswith("  ")


def test_sft_rows_correct_with_mixed_styles(data_dir):
    rows = _jsonl(data_dir / "sft.jsonl")
    assert len(rows) == 2000 and set(rows[0]) == {"prompt", "completion"}
    assert all(demo.skill_correct(r, r["completion"]) for r in rows)
    polite = [demo.style_score(r["completion"]) for r in rows]
    assert 0.45 < sum(polite) / len(rows) < 0.55
    # The mix depends on the wording: greedy decoding after SFT gives both styles.
    by_template = {}
    for r, p in zip(rows, polite):
        t = next(i for i, (tpl, _) in enumerate(demo.TEMPLATES) if r["prompt"] == demo.render_prompt(
            tpl.format(digits=" ".join(_digits(r["prompt"])))))
        by_template.setdefault(t, []).append(p)
    for t, scores in by_template.items():
        assert abs(sum(scores) / len(scores) - demo.TEMPLATES[t][1]) < 0.12, t
    lengths = {len(_digits(r["prompt"])) for r in rows}
    assert lengths == set(range(demo.MIN_LEN, demo.MAX_LEN + 1))
    assert all(len(set(_digits(r["prompt"]))) == len(_digits(r["prompt"])) for r in rows)  # distinct digits


def test_preference_rows(data_dir):
    rows = _jsonl(data_dir / "preference.jsonl")
    assert len(rows) == 1000 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    wrong = 0
    for r in rows:
        assert demo.skill_correct(r, r["chosen"]) and demo.style_score(r["chosen"]) == 1.0
        assert demo.judge_pair(r, r["chosen"], r["rejected"]) == 1
        if demo.skill_correct(r, r["rejected"]):
            assert demo.style_score(r["rejected"]) == 0.0  # correct but terse
        else:
            assert demo.style_score(r["rejected"]) == 1.0  # polite but wrong
            wrong += 1
    assert abs(wrong / len(rows) - demo.WRONG_FRACTION) < 0.05


def test_eval_prompts_are_held_out(data_dir):
    train = _jsonl(data_dir / "sft.jsonl") + _jsonl(data_dir / "preference.jsonl")
    train_digits = {_digits(r["prompt"]) for r in train}
    evals = _jsonl(data_dir / "eval_prompts.jsonl")
    assert len(evals) == 200 and [r["id"] for r in evals] == list(range(200))
    for name in ("eval_prompts", "sft_eval", "preference_eval"):
        for r in _jsonl(data_dir / f"{name}.jsonl"):
            assert _digits(r["prompt"]) not in train_digits, (name, r["prompt"])  # not even reworded
    for r in evals:
        assert r["prompt"] == demo.render_prompt(r["question"])
        assert r["answer"] == " ".join(sorted(r["digits"].split()))
        assert demo.skill_correct(r, demo.format_reply(r["answer"], polite=False))
    assert len({r["template"] for r in evals}) == len(demo.TEMPLATES)
    assert {p.name for p in data_dir.iterdir()} == {
        "sft.jsonl", "sft_eval.jsonl", "preference.jsonl", "preference_eval.jsonl", "eval_prompts.jsonl"}


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_trains_fast_and_round_trips(data_dir, tmp_path):
    texts = texts_from_jsonl([data_dir / "sft.jsonl", data_dir / "preference.jsonl"],
                             ["prompt", "completion", "chosen", "rejected"])
    start = time.perf_counter()
    path = train_sentencepiece(texts, 400, str(tmp_path / "tok"))
    assert time.perf_counter() - start < 10
    assert path == str(tmp_path / "tok" / "tokenizer.model")
    tok = load_tokenizer(path)
    assert tok.vocab_size == 400
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in texts[:300] + ["héllo 🤖 ok", "  two  spaces\t", "\n\nHuman: 123 + 45\n\nAssistant: 168"]:
        assert tok.decode(tok.encode(text)) == text
    # Whole words are single pieces; digits are split.
    assert len(tok.encode(" Sure! The sorted digits are: 1 23. Happy to help!")) <= 18
    assert all(len(tok.sp.id_to_piece(i).strip("▁")) <= 1 for i in tok.encode(" 1 23 456")
               if any(c.isdigit() for c in tok.sp.id_to_piece(i)))
    # The prompt's tokens are a prefix of prompt + completion (the data pipeline relies on it).
    for r in _jsonl(data_dir / "sft.jsonl")[:100]:
        p = tok.encode(r["prompt"], add_special_tokens=True)
        assert tok.encode(r["prompt"] + r["completion"], add_special_tokens=True)[: len(p)] == p
    tok.save_pretrained(str(tmp_path / "hf"))  # the exporter supports BPE + identity normalization
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_train_tokenizer_cli(data_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("train_tokenizer", ROOT / "tools" / "train_tokenizer.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "demo.model"
    assert cli.main(["--input", str(data_dir / "preference.jsonl"), "--fields", "prompt,chosen,rejected",
                     "--vocab-size", "350", "--out", str(out)]) == 0
    assert load_tokenizer(str(out)).vocab_size == 350
    # Too few pieces for the 256 byte pieces + specials + characters: a clear error, exit code 1.
    assert cli.main(["--input", str(data_dir / "preference.jsonl"), "--vocab-size", "100",
                     "--out", str(tmp_path / "bad")]) == 1
