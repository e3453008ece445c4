"""The jit-compiled train step: accumulation equals one big batch; a sharded run equals one device."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign.config import default_config
from jaxalign.models import ModelConfig, abstract_model, init_model
from jaxalign.runtime.sharding import make_mesh, use_mesh
from jaxalign.train.optimizer import build_optimizer, decay_mask
from jaxalign.train.step import Objective, TrainState, batch_shardings, jit_train_step, make_train_step

CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def synthetic_batch(rows, length, seed=0, paired=False):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (rows, length + 1)).astype(np.int32)
    if paired:  # DPO: rejected rows share the chosen rows' prompts
        tokens[rows // 2:, :4] = tokens[:rows // 2, :4]
    lengths = rng.integers(length // 2, length + 1, rows)
    segment_ids = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = segment_ids.astype(bool) & (np.arange(length)[None] >= 3)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask,
            "segment_ids": segment_ids, "positions": np.broadcast_to(np.arange(length), (rows, length)).astype(np.int32)}


def build_step(mesh, objective, batch, accum=1, optimizer_name="adamw"):
    """(state, reference params or None, jitted step) as the loop builds them; call under `use_mesh(mesh)`."""
    opt_cfg = default_config().optimizer
    opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.name = 1e-2, 0.1, optimizer_name
    model = init_model(CFG, mesh, seed=0)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    optimizer, schedule = build_optimizer(opt_cfg, total_steps=10)
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                       opt_state=jax.jit(optimizer.init)(params))
    ref = jax.tree.map(jax.numpy.copy, params) if objective.stage == "dpo" else None
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jit_train_step(make_train_step(graphdef, objective, optimizer, schedule, accum), shardings,
                          batch_shardings({k: v.shape for k, v in batch.items()}, mesh),
                          None if ref is None else jax.tree.map(lambda x: x.sharding, ref))
    return state, ref, step


def run_steps(mesh_sizes, objective, batches, accum=1, devices=None, optimizer_name="adamw"):
    mesh = make_mesh(mesh_sizes, devices)
    with use_mesh(mesh):
        state, ref, step = build_step(mesh, objective, batches[0], accum, optimizer_name)
        losses, metrics = [], []
        for b in batches:
            state, m = step(state, b, ref)
            losses.append(float(m["loss"]))
            metrics.append(jax.device_get(m))
        return losses, metrics, jax.device_get(state.params)


SFT = Objective("sft")
DPO = Objective("dpo")


@pytest.mark.parametrize("objective,paired", [(SFT, False), (DPO, True)], ids=["sft", "dpo"])
def test_gradient_accumulation_equals_one_large_batch(objective, paired):
    batches = [synthetic_batch(8, 16, seed=s, paired=paired) for s in range(2)]
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    dev = jax.devices()[:1]
    # SGD: the update is linear in the gradient, so equal updates mean equal gradients (Adam's
    # division by sqrt(v) would blow fp32 summation-order noise in near-zero gradients up).
    losses1, _, params1 = run_steps(one, objective, batches, accum=1, devices=dev, optimizer_name="sgd")
    losses4, _, params4 = run_steps(one, objective, batches, accum=4 if not paired else 2, devices=dev,
                                    optimizer_name="sgd")
    np.testing.assert_allclose(losses1, losses4, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), params1, params4)


@pytest.mark.parametrize("objective,paired", [(SFT, False), (DPO, True)], ids=["sft", "dpo"])
def test_sharded_run_matches_one_device(objective, paired):
    batches = [synthetic_batch(8, 16, seed=0, paired=paired)] * 3  # one batch, so the loss must fall
    losses1, m1, _ = run_steps({"data": 1, "fsdp": 1, "tensor": 1}, objective, batches, devices=jax.devices()[:1])
    losses8, m8, _ = run_steps({"data": 1, "fsdp": 4, "tensor": 2}, objective, batches)
    np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
    assert losses1[-1] < losses1[0]  # it learns
    if objective.stage == "dpo":
        assert m1[0]["rewards/accuracies"] == 0.0 and abs(m1[0]["loss"] - np.log(2)) < 1e-6


@pytest.mark.parametrize("objective,paired", [(Objective("sft", z_loss=1e-2), False), (DPO, True)], ids=["sft", "dpo"])
def test_the_fused_lm_head_trains_as_the_whole_logits_do(objective, paired):
    """model.logits_chunk_size 8 (the fused head, chunks over a length of 20) against 0 (the whole logits), on a
    mesh sharding the head over fsdp and tensor: three SGD steps give the same losses, metrics and weights."""
    batches = [synthetic_batch(8, 20, seed=s, paired=paired) for s in range(3)]
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    whole = run_steps(mesh, dataclasses.replace(objective, chunk_size=0), batches, optimizer_name="sgd")
    fused = run_steps(mesh, dataclasses.replace(objective, chunk_size=8), batches, optimizer_name="sgd")
    np.testing.assert_allclose(fused[0], whole[0], rtol=1e-5)
    for got, want in zip(fused[1], whole[1]):
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), fused[2], whole[2])
    assert whole[0][-1] != whole[0][0]  # the weights moved (SFT's loss falls; DPO's starts at log 2)


def test_reference_params_unchanged_by_training():
    batches = [synthetic_batch(4, 16, seed=s, paired=True) for s in range(2)]
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    opt_cfg = default_config().optimizer
    with use_mesh(mesh):
        graphdef, params = nnx.split(init_model(CFG, mesh))
        params = nnx.to_pure_dict(params)
        ref = jax.tree.map(jax.numpy.copy, params)
        before = jax.device_get(ref)
        optimizer, schedule = build_optimizer(opt_cfg, 10)
        state = TrainState(jax.numpy.zeros((), jax.numpy.int32), params, jax.jit(optimizer.init)(params))
        step = jit_train_step(make_train_step(graphdef, DPO, optimizer, schedule),
                              jax.tree.map(lambda x: x.sharding, state),
                              batch_shardings({k: v.shape for k, v in batches[0].items()}, mesh),
                              jax.tree.map(lambda x: x.sharding, ref))
        for b in batches:
            state, _ = step(state, b, ref)
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(ref))
    assert not np.array_equal(before["embed"], jax.device_get(state.params["embed"]))


def test_nonfinite_step_is_skipped():
    batch = synthetic_batch(4, 8)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with use_mesh(mesh):
        graphdef, params = nnx.split(init_model(CFG, mesh))
        params = nnx.to_pure_dict(params)
        params["final_norm"] = params["final_norm"] * np.nan
        optimizer, schedule = build_optimizer(default_config().optimizer, 10)
        state = TrainState(jax.numpy.zeros((), jax.numpy.int32), params, jax.jit(optimizer.init)(params))
        new_state, m = jax.jit(make_train_step(graphdef, SFT, optimizer, schedule))(state, batch)
    assert int(m["nonfinite"]) == 1
    np.testing.assert_array_equal(jax.device_get(new_state.params["embed"]), jax.device_get(params["embed"]))


def test_weight_decay_mask_skips_norms_and_biases():
    _, state, _ = abstract_model(CFG.__class__(**{**CFG.__dict__, "qkv_bias": True}),
                                 make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    mask = decay_mask(nnx.to_pure_dict(state))
    assert mask["embed"] and mask["layers"]["wq"] and mask["lm_head"]
    assert not mask["final_norm"] and not mask["layers"]["attn_norm"] and not mask["layers"]["bq"]
    assert decay_mask(nnx.to_pure_dict(state), True)["final_norm"]


@pytest.mark.parametrize("objective,paired", [(SFT, False), (Objective("sft", chunk_size=8), False), (DPO, True)],
                         ids=["sft", "sft-fused-head", "dpo"])
def test_compiled_step_transposes_no_activation_gradient(objective, paired):
    """Every projection and the LM head (whole or fused) is one 2-d dot (models/dots.py), so XLA's CPU program
    (fp32, the default remat) holds no [features, tokens] array: the transposed copy of an activation (or its
    gradient) that a weight-gradient dot over two contracted axes (batch, length) was given, a strided write
    as large as the activation itself."""
    import re

    batch = synthetic_batch(8, 20, paired=paired)
    tokens = batch["tokens"].size
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with use_mesh(mesh):
        state, ref, step = build_step(mesh, objective, batch)
        text = step.lower(state, batch, ref).compile().as_text()
    c = CFG
    features = {c.hidden_size, c.intermediate_size, c.vocab_size, c.num_attention_heads * c.head_dim,
                c.num_key_value_heads * c.head_dim}
    transposed = [m.group(0) for m in re.finditer(r"%\S+ = f32\[(\d+),(\d+)\]", text)
                  if int(m.group(1)) in features and int(m.group(2)) == tokens]
    assert not transposed, transposed[:5]
