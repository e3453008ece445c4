"""Judges and win-rate statistics: the 95% interval, the length-controlled win-rate on verdicts with a
planted length effect, the LLM judge's both-orders rule on a model rigged to always answer "A", the
reward judge against transformers' scores, `eval.judge` parsing, and the report's new lines."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_runs import TINY_LLAMA

from jaxalign.config import load_config
from jaxalign.config.checks import parse_judge
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import JaxalignError
from jaxalign.eval import winrate
from jaxalign.eval.judges import CHOICES, ModelJudge, combine_orders
from jaxalign.eval.report import build_report, render_markdown
from jaxalign.models import ModelConfig, init_model
from jaxalign.runtime.sharding import make_mesh, use_mesh

ROWS = [{"prompt": f"\n\nHuman: Question number {i}?\n\nAssistant:"} for i in range(6)]
A = [" A short answer.", " Yes.", " No, never.", " Maybe later today.", " It depends on you.", " Sure."]
B = [" A much longer answer than the other one.", " No.", " Yes, always.", " Never.", " Ask me again.", " Fine."]


def test_wilson_interval_and_counts():
    low, high = winrate.wilson_interval(0.5, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)  # the textbook value
    s = winrate.win_rate([1, 1, 1, 0, -1])
    assert s["win_rate"] == pytest.approx(0.7) and (s["wins"], s["losses"], s["ties"], s["judged"]) == (3, 1, 1, 5)
    assert s["ci_low"] < 0.7 < s["ci_high"]
    assert winrate.wilson_interval(1.0, 10)[1] == pytest.approx(1.0) and winrate.wilson_interval(0.0, 10)[0] == 0.0


def test_length_controlled_win_rate_recovers_the_rate_at_equal_length():
    rng = np.random.default_rng(0)
    n, theta, phi = 4000, 0.3, 1.5
    d = rng.normal(60.0, 80.0, n)  # the model's replies are longer on average: a judge that likes length
    p = 1 / (1 + np.exp(-(theta + phi * np.tanh(d / d.std()))))
    verdicts = np.where(rng.random(n) < p, 1, -1)
    raw = winrate.win_rate(verdicts.tolist())["win_rate"]
    lc = winrate.length_controlled_win_rate(verdicts, d + 100.0, np.full(n, 100.0))
    unbiased = 1 / (1 + math.exp(-theta))
    assert raw > unbiased + 0.1  # the raw rate credits length
    assert lc == pytest.approx(unbiased, abs=0.03)
    # No length effect and equal lengths: the LC rate is the raw rate.
    v = [1, -1, 1, 1, 0, -1, 1, 1]
    assert winrate.length_controlled_win_rate(v, [5] * 8, [5] * 8) == pytest.approx(
        winrate.win_rate(v)["win_rate"], abs=1e-3)


def test_kl_per_token():
    assert winrate.kl_per_token([-1.0, -2.0], [-3.0, -2.5], [2, 3]) == pytest.approx((-3.0 + 5.5) / 5)


def test_combine_orders():
    assert combine_orders([1, 1, -1, 0], [1, -1, -1, 1]) == [1, 0, -1, 0]


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    return load_tokenizer(str(shared_data / "llama2-tokenizer.model"), "plain")


def _rigged_llm(tokenizer, prefer: str):
    """A causal LM whose next token after the judge's question is always `prefer` ("A" or "B"): its layers add
    nothing (wo = w_down = 0), so the last position holds the question's last token, and the LM head maps that
    token onto the preferred letter."""
    mesh = make_mesh({"fsdp": -1})
    cfg = ModelConfig.from_hf_dict({**TINY_LLAMA, "tie_word_embeddings": False})
    judge = ModelJudge("llm", "rigged", None, tokenizer, mesh, batch_size=4)
    question = judge.template.format(prompt="p", first="x", second="y")
    last = judge._question_ids(question)[-1]
    letter = judge._choice_id(question, CHOICES[0 if prefer == "A" else 1])
    with use_mesh(mesh):
        model = init_model(cfg, mesh, seed=0)
        params = jax.tree.map(np.array, jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
        params["layers"]["wo"] = np.zeros_like(params["layers"]["wo"])
        params["layers"]["w_down"] = np.zeros_like(params["layers"]["w_down"])
        h = params["embed"][last] / np.sqrt(np.mean(params["embed"][last] ** 2))
        params["lm_head"][:, letter] = 50.0 * h / np.linalg.norm(h)
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
        nnx.update(model, state)
    judge.model = model
    return judge


@pytest.mark.parametrize("prefer", ["A", "B"])
def test_llm_judge_that_always_answers_one_letter_ties_every_pair(tokenizer, prefer):
    judge = _rigged_llm(tokenizer, prefer)
    verdicts = judge(ROWS, A, B)
    assert verdicts == [0] * len(ROWS)
    stats = winrate.win_rate(verdicts)
    assert stats["win_rate"] == 0.5 and stats["ties"] == len(ROWS)


def test_reward_judge_prefers_the_higher_transformers_score(tokenizer, tmp_path):
    import torch
    import transformers

    from jaxalign.checkpoint import model_io
    from jaxalign.eval.score import row_ids

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, num_labels=1,
                                      pad_token_id=0)
    torch.manual_seed(1)
    hf = transformers.LlamaForSequenceClassification(hf_cfg)
    with torch.no_grad():
        hf.score.weight.normal_(0, 1.0)
    hf.save_pretrained(tmp_path / "rm")
    mesh = make_mesh({"fsdp": -1})
    with use_mesh(mesh):
        rm = model_io.load_model(tmp_path / "rm", mesh)
    verdicts = ModelJudge("reward", str(tmp_path / "rm"), rm, tokenizer, mesh, batch_size=4)(ROWS, A, B)
    scores = []
    for row, a, b in zip(ROWS, A, B):
        pair = []
        for text in (a, b):
            ids = sum(row_ids({"prompt": row["prompt"], "completion": text}, tokenizer, "row"), []) + [tokenizer.eos_id]
            with torch.no_grad():
                pair.append(float(hf(input_ids=torch.tensor([ids])).logits[0, 0]))
        scores.append(pair)
    assert verdicts == [int(np.sign(x - y)) for x, y in scores]
    assert len(set(verdicts)) > 1  # a random head still tells these apart both ways


def test_judge_spec_parsing_and_errors():
    assert parse_judge("", "demo") == ("task", "demo") and parse_judge("", "") == ("", "")
    assert parse_judge("reward:/m/rm") == ("reward", "/m/rm") and parse_judge("llm:gs://b/j") == ("llm", "gs://b/j")
    assert parse_judge("/models/judge") == ("likelihood", "/models/judge")
    assert parse_judge("gs://bucket/judge") == ("likelihood", "gs://bucket/judge")
    with pytest.raises(JaxalignError, match="unknown judge kind 'rewad'"):
        parse_judge("rewad:/m")
    with pytest.raises(JaxalignError, match="eval.judge.*unknown judge kind 'rewad'"):
        load_config(None, ["eval.judge=rewad:/m"])
    with pytest.raises(JaxalignError, match=r"eval.judge_template.*must contain \{second\}"):
        load_config(None, ["eval.judge_template=Pick {prompt} {first}"])


def test_report_shows_interval_lc_rate_length_warning_and_alignment_tax():
    models = {"sft": {"skill_accuracy": 0.9, "mean_gen_tokens": 12.0},
              "dpo": {"skill_accuracy": 0.85, "win_rate_vs_sft": 0.8, "win_rate_ci_low": 0.7, "win_rate_ci_high": 0.87,
                      "wins": 70, "losses": 10, "ties": 20, "judged": 100, "lc_win_rate_vs_sft": 0.6,
                      "mean_gen_tokens": 30.0, "kl_vs_sft": 0.25}}
    report = build_report(models)
    md = render_markdown(report)
    assert "| win_rate_vs_sft | — | 80.0% [70.0%, 87.0%], 20 ties | DPO |" in md
    assert "| lc_win_rate_vs_sft | — | 60.0% | DPO |" in md
    assert "| kl_vs_sft | — | 0.25 | — |" in md and "| mean_gen_tokens | 12 | 30 | — |" in md
    assert any("falls from 80.0% to 60.0% when lengths are controlled" in w for w in report["warnings"])
    assert "- skill_accuracy SFT 90.0% -> DPO 85.0% (-5.0 points; kept 94.4% of it); DPO's KL from SFT 0.25" in md
    assert "kl_vs_sft" not in {c["metric"] for c in report["credits"]}
    json.dumps(report)
