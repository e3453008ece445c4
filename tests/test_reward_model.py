"""The reward-model stage (`stage: rm`): a Llama decoder with a scalar score head, trained with the
Bradley-Terry loss on preference pairs.

Oracles: the loss and metrics by hand; TRL 1.16's RewardTrainer, trained side by side from the same HF
LlamaForSequenceClassification on the same real HH-RLHF pairs (Llama 2 tokenizer, a `margin` column,
center_rewards_coefficient), plain SGD in fp32: every step's loss, accuracy and margin equal; the trained
model exported to HF format scores rows as transformers' AutoModelForSequenceClassification does.
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from tiny_runs import TINY_LLAMA, read_metrics, short_hh_pairs, stand_in_tokenizer

from jaxalign import cli
from jaxalign.config import load_config
from jaxalign.data.pipeline import load_examples
from jaxalign.errors import JaxalignError
from jaxalign.eval.score import run_score
from jaxalign.export.hf import save_hf
from jaxalign.models import ModelConfig, init_model
from jaxalign.run.build import build_model_and_tokenizer, check_model_source, mesh_from_config
from jaxalign.run.loop import train
from jaxalign.runtime.sharding import make_mesh, use_mesh
from jaxalign.train.losses import reward_loss

STEPS, PAIRS, LR, CENTER = 4, 8, 2e-4, 0.01


def test_reward_loss_and_metrics_by_hand():
    rng = np.random.default_rng(0)
    b = 6
    chosen, rejected = rng.normal(size=b), rng.normal(size=b)
    margin = rng.uniform(0, 1, size=b)
    valid = np.array([1, 1, 1, 1, 0, 0], bool)  # the last two: an eval batch's padding pairs
    rewards = jnp.asarray(np.concatenate([chosen, rejected]), jnp.float32)
    loss, m = reward_loss(rewards, jnp.int32(4), margin=jnp.asarray(margin, jnp.float32), center_coefficient=0.1,
                          valid=jnp.asarray(valid))
    c, r, mg = chosen[:4], rejected[:4], margin[:4]
    hand = np.mean(np.log1p(np.exp(-(c - r - mg))) + 0.1 * (c + r) ** 2)
    np.testing.assert_allclose(float(loss), hand, rtol=1e-6)
    np.testing.assert_allclose(float(m["accuracy"]), np.mean(c > r), rtol=1e-6)
    np.testing.assert_allclose(float(m["margin"]), np.mean(c - r), rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/chosen"]), np.mean(c), rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/rejected"]), np.mean(r), rtol=1e-6)
    # Two micro-batches of 2 real pairs, each normalised by the whole batch's 4, sum to the batch's values.
    halves = [reward_loss(jnp.asarray(np.concatenate([chosen[s], rejected[s]]), jnp.float32), jnp.int32(4),
                          margin=jnp.asarray(margin[s], jnp.float32), center_coefficient=0.1)
              for s in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(sum(float(h[0]) for h in halves), hand, rtol=1e-6)


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    """A tiny random LlamaForSequenceClassification saved by transformers, HH pairs, and an rm config."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("rm")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, num_labels=1,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForSequenceClassification(hf_cfg)
    with torch.no_grad():  # a score head that already tells rows apart (transformers draws it with std 0.02)
        hf_model.score.weight.normal_(0, 1.0)
    hf_model.save_pretrained(root / "hf_rm")
    data = short_hh_pairs(shared_data, root / "pairs.jsonl", PAIRS,  # with a margin column, as TRL reads one
                          extra=lambda k: {"margin": round(0.25 * (k % 4), 2)})
    cfg = {"stage": "rm", "output_dir": str(root / "run"), "model": {"path": str(root / "hf_rm")},
           "tokenizer": {"path": str(shared_data / "llama2-tokenizer.model"), "chat_template": "plain"},
           "data": {"train": str(data), "max_length": 128, "max_prompt_length": 96, "cache_dir": str(root / "cache")},
           "train": {"batch_size": PAIRS, "max_steps": STEPS, "log_every": 1, "eval_every": 0},
           "optimizer": {"name": "sgd", "lr": LR, "b1": 0.0, "schedule": "constant", "max_grad_norm": 0.0},
           "checkpoint": {"every_steps": 0}, "rm": {"center_rewards_coefficient": CENTER}}
    (root / "rm.yaml").write_text(yaml.safe_dump(cfg))
    return root, load_config(root / "rm.yaml")


@pytest.fixture(scope="module")
def rm_run(setup):
    root, cfg = setup
    summary = train(cfg)
    return root, cfg, summary, read_metrics(root / "run")[0]


def _trl_log(root: pathlib.Path, cfg) -> list[dict]:
    """TRL's RewardTrainer on the same tokenized pairs (prompt + reply ids, EOS included) and margins."""
    import datasets
    import torch
    import transformers
    from trl import RewardConfig, RewardTrainer

    mesh, _ = mesh_from_config(cfg)
    _, tokenizer = check_model_source(cfg)
    examples = load_examples(cfg, tokenizer)[0]
    rows = [{"chosen_ids": e["prompt_ids"] + e["chosen_ids"], "rejected_ids": e["prompt_ids"] + e["rejected_ids"],
             "margin": e["margin"]} for e in examples]
    assert len(rows) == PAIRS and all(r["chosen_ids"][-1] == 2 for r in rows)  # EOS-terminated, as TRL adds it
    tok = stand_in_tokenizer()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(root / "hf_rm", dtype=torch.float32)
    args = RewardConfig(output_dir=str(root / "trl"), per_device_train_batch_size=PAIRS, max_steps=STEPS,
                        learning_rate=LR, lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0,
                        weight_decay=0.0, warmup_steps=0, bf16=False, fp16=False, logging_steps=1, report_to="none",
                        save_strategy="no", center_rewards_coefficient=CENTER, gradient_checkpointing=False,
                        use_cpu=True, seed=0, max_length=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tok)
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]


def test_rm_training_equals_trl_reward_trainer(setup, rm_run):
    root, cfg, summary, ours = rm_run
    assert summary["state"] == "finished" and summary["steps"] == STEPS
    theirs = _trl_log(root, cfg)
    assert len(theirs) == STEPS
    for step, t in enumerate(theirs, start=1):
        o = ours[step]
        np.testing.assert_allclose(o["loss"], t["loss"], rtol=2e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(o["margin"], t["margin"], rtol=2e-5, atol=1e-5, err_msg=f"step {step}")
        assert o["accuracy"] == pytest.approx(t["accuracy"], abs=1e-6), step
        np.testing.assert_allclose(o["rewards/chosen"] - o["rewards/rejected"], t["margin"], rtol=2e-5, atol=1e-5)
    assert ours[STEPS]["loss"] < ours[1]["loss"]  # it learns the pairs it sees
    assert "pairs_per_sec" in ours[1]


def test_exported_reward_model_scores_equal_transformers(setup, rm_run, tmp_path):
    import torch
    import transformers

    from jaxalign.checkpoint import model_io

    root, cfg, _, _ = rm_run
    mesh = make_mesh({"fsdp": -1})
    with use_mesh(mesh):
        model = model_io.load_model(root / "run", mesh)
        assert model.cfg.num_labels == 1 and not hasattr(model, "lm_head")
        save_hf(model, model.cfg, tmp_path / "export")
    hf_config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"] and hf_config["pad_token_id"] == 0

    rows = [{"prompt": "\n\nHuman: Is the sky blue?\n\nAssistant:", "completion": c}
            for c in (" Yes, on a clear day.", " No.", " I cannot help with that, but here is a long answer.")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = cli.main(["score", "--model", str(tmp_path / "export"), "--data", str(tmp_path / "rows.jsonl"),
                     "--out", str(tmp_path / "scored.jsonl"), "--reward",
                     "--tokenizer", cfg.tokenizer.path])
    assert code == 0
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    run_score(str(root / "run"), str(tmp_path / "rows.jsonl"), str(tmp_path / "run_scored.jsonl"), reward=True,
              tokenizer_path=cfg.tokenizer.path)
    from_run = [json.loads(line)["reward"] for line in (tmp_path / "run_scored.jsonl").read_text().splitlines()]

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", dtype=torch.float32)
    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.eval.score import row_ids

    tok = load_tokenizer(cfg.tokenizer.path)
    ids = [sum(row_ids(r, tok, "row"), []) + [tok.eos_id] for r in rows]  # text rows are scored with EOS
    width = max(map(len, ids)) + 3  # right-padded with pad_token_id, one batch
    batch = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    with torch.no_grad():
        expected = hf(input_ids=batch, attention_mask=(batch != 0).long()).logits[:, 0].numpy()
    np.testing.assert_allclose([r["reward"] for r in scored], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(from_run, expected, rtol=1e-4, atol=1e-4)
    assert len(set(np.round(expected, 4))) == 3


def test_reward_model_from_a_causal_lm_keeps_its_weights_and_draws_a_score_head(setup, tmp_path):
    _, cfg = setup
    mesh = make_mesh({"fsdp": -1})
    with use_mesh(mesh):
        lm = init_model(ModelConfig.from_hf_dict(dict(TINY_LLAMA)), mesh, seed=3)
        save_hf(lm, lm.cfg, tmp_path / "lm")
    rm_cfg = load_config(None, [f"{k}={v}" for k, v in (("stage", "rm"), ("model.path", tmp_path / "lm"),
                                                         ("tokenizer.path", cfg.tokenizer.path))])
    with use_mesh(mesh):
        model, _, _ = build_model_and_tokenizer(rm_cfg, mesh, None)
    assert model.cfg.num_labels == 1 and model.cfg.pad_token_id == 0 and not hasattr(model, "lm_head")
    np.testing.assert_array_equal(jax.device_get(model.layers["wq"].get_value()),
                                  jax.device_get(lm.layers["wq"].get_value()))
    score = np.asarray(jax.device_get(model.score.get_value()))
    assert score.shape == (TINY_LLAMA["hidden_size"], 1)
    assert 0.01 < score.std() < 0.04  # transformers' init: normal(0, initializer_range = 0.02)


def test_reward_model_errors(setup, tmp_path):
    root, cfg = setup
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Hi", "completion": " there"}) + "\n")
    with pytest.raises(JaxalignError, match="not a reward model"):
        mesh = make_mesh({"fsdp": -1})
        with use_mesh(mesh):
            lm = init_model(ModelConfig.from_hf_dict(dict(TINY_LLAMA)), mesh, seed=3)
            save_hf(lm, lm.cfg, tmp_path / "lm")
        run_score(str(tmp_path / "lm"), str(rows), str(tmp_path / "out.jsonl"), reward=True,
                  tokenizer_path=cfg.tokenizer.path)
    bad = tmp_path / "bad.jsonl"
    good = json.loads((root / "pairs.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "margin": "big"}) + "\n")
    with pytest.raises(JaxalignError, match=r"bad\.jsonl:2: 'margin' must be a finite number"):
        load_examples(load_config(root / "rm.yaml", [f"data.train={bad}"]), check_model_source(cfg)[1])
    with pytest.raises(JaxalignError, match="lora.enabled.*not supported for stage rm"):
        load_config(root / "rm.yaml", ["lora.enabled=true"])
    with pytest.raises(JaxalignError, match="eval_accuracy is a metric of stage rm"):
        load_config(root / "rm.yaml", ["stage=sft", "checkpoint.best_metric=eval_accuracy"])
    assert math.isfinite(ModelConfig.from_hf_dict({**TINY_LLAMA, "architectures": ["LlamaForSequenceClassification"],
                                                   "num_labels": 1}).num_params)
    with pytest.raises(JaxalignError, match="3 labels; only reward models"):
        ModelConfig.from_hf_dict({**TINY_LLAMA, "architectures": ["LlamaForSequenceClassification"], "num_labels": 3})
