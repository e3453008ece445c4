"""`jaxalign eval`'s held-out metrics are built from the same objective as training (issue: the report's
held-out DPO loss of an IPO, hinge or robust run used to be a sigmoid loss)."""

import json

import jax
import pytest
from flax import nnx
from tiny_runs import TINY_LLAMA, hh_sft_config

from jaxalign.config import load_config, stage_config
from jaxalign.data.iterator import make_iterator, to_global_arrays
from jaxalign.eval.evaluate import Evaluator
from jaxalign.models import ModelConfig, init_model
from jaxalign.run.build import objective_from_config
from jaxalign.run.metrics import mean_over
from jaxalign.runtime.sharding import use_mesh
from jaxalign.train.step import make_eval_step


@pytest.fixture(scope="module")
def sets(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    cfg = hh_sft_config(shared_data, root / "run", root / "cache",
                        data={"max_rows": 48, "eval_fraction": 0.25, "max_length": 64, "max_prompt_length": 32},
                        eval={"batch_size": 8})
    return [f"{k}={json.dumps(v)}" for k, v in cfg.items()]


@pytest.fixture(scope="module")
def models(sets):
    """A policy and a reference that differ (two random inits), on the evaluator's mesh."""
    evaluator = Evaluator(load_config(None, sets))
    with use_mesh(evaluator.mesh, evaluator.rules):
        policy, ref = (init_model(ModelConfig.from_hf_dict(TINY_LLAMA), evaluator.mesh, evaluator.rules, seed=s)
                       for s in (1, 2))
    return policy, nnx.split(ref)[1]


# sigmoid and hinge differ from these only in the formula on the same log-ratios (tests/test_losses.py).
@pytest.mark.parametrize("loss, smoothing", [("ipo", 0.0), ("robust", 0.3)])
def test_held_out_dpo_loss_is_the_runs_own_loss(sets, models, loss, smoothing):
    cfg = load_config(None, [*sets, f"dpo.loss={loss}", f"dpo.label_smoothing={smoothing}", "dpo.sft_weight=0.5"])
    evaluator = Evaluator(cfg)
    pairs = evaluator.held_out.pairs
    assert pairs
    policy, ref_params = models
    got = evaluator._mean_metrics(policy, pairs, "dpo", ref_params)

    # What a DPO training run of this config computes on the same held-out batches.
    dpo_cfg = stage_config(cfg, "dpo")
    graphdef, params = nnx.split(policy)
    step = jax.jit(make_eval_step(graphdef, objective_from_config(dpo_cfg)))
    records = []
    with use_mesh(evaluator.mesh, evaluator.rules):
        for host in make_iterator(pairs, cfg, stage="dpo", train=False, mesh=evaluator.mesh, pad_id=evaluator.pad_id):
            records.append(jax.device_get(step(params, to_global_arrays(host, evaluator.mesh), ref_params)))
    want = mean_over(records, "num_pairs")
    # (The old Objective(stage, beta) dropped dpo.loss, label_smoothing and sft_weight: with sft_weight 0.5 its
    # loss differs for every loss type.)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_held_out_pair_prompts_generate_from_their_ids_and_kl_is_zero_against_itself(sets, models):
    from jaxalign.eval.generate import SamplingParams, generate_ids

    cfg = load_config(None, [*sets, "eval.prompts=heldout", "eval.num_generations=4", "eval.max_new_tokens=8",
                             "eval.kl_samples=4"])
    evaluator = Evaluator(cfg)
    rows, pairs = evaluator.held_out.prompts, evaluator.held_out.pairs
    assert len(rows) == 4 and [r["prompt_ids"] for r in rows] == [p["prompt_ids"] for p in pairs[:4]]
    assert rows[0]["prompt"].startswith("Human:") or "Human:" in rows[0]["prompt"]
    policy, ref_params = models
    with use_mesh(evaluator.mesh, evaluator.rules):
        ids = generate_ids(policy, [r["prompt_ids"] for r in rows], SamplingParams(8), mesh=evaluator.mesh)
    assert evaluator.generations(policy) == [evaluator.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    # The model against itself: every sampled log-ratio is exactly 0; against another model it is not.
    assert evaluator.kl_from_sft(policy, policy) == {"kl_vs_sft": 0.0}
    graphdef = nnx.split(policy)[0]
    assert evaluator.kl_from_sft(policy, nnx.merge(graphdef, ref_params))["kl_vs_sft"] != 0.0
