"""Shared-prompt DPO (dpo.share_prompt, with or without data.packing): each reply's log-probs equal the
padded layout's, for the policy and the reference, and so do the loss, the metrics and the update,
however the pairs are packed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.config import default_config
from jaxalign.data.batching import dpo_batch, shared_batch, shared_length
from jaxalign.data.iterator import BatchIterator
from jaxalign.models import ModelConfig, init_model
from jaxalign.models.attention import attention_mask
from jaxalign.models.lora import Adapted, LoraSpec, init_adapters
from jaxalign.runtime.sharding import make_mesh, use_mesh
from jaxalign.train.dpo import PreferenceLoss
from jaxalign.train.optimizer import build_optimizer
from jaxalign.train.step import (
    Objective,
    TrainState,
    batch_shardings,
    jit_train_step,
    ld_token_weights,
    make_train_step,
    reference_logps,
    sequence_logps,
)

CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def random_pairs(n, seed=0, prompt=(2, 14), reply=(1, 9)):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(1, CFG.vocab_size, rng.integers(lo, hi)).tolist()  # noqa: E731
    return [{"prompt_ids": ids(*prompt), "chosen_ids": ids(*reply), "rejected_ids": ids(*reply)} for _ in range(n)]


def padded(pairs):
    length = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    return dpo_batch(pairs, length)


def shared(pairs, rows_of_pairs, length=None, slots=None):
    """The shared layout with pairs laid in rows as `rows_of_pairs` (lists of indices) says."""
    sizes = [shared_length(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
    length = length or max(sum(sizes[i] for i in row) for row in rows_of_pairs)
    slots = slots or max(len(row) for row in rows_of_pairs)
    return shared_batch([[(i, pairs[i]) for i in row] for row in rows_of_pairs], length, slots)


def in_batch_order(values, batch, n):
    """[2N] slot values of a shared batch -> [2, n] by the batch's pair index."""
    index = np.asarray(batch["pair_index"]).reshape(-1)
    halves = np.asarray(values).reshape(2, -1)
    out = np.zeros((2, n))
    out[:, index[index >= 0]] = halves[:, index >= 0]
    return out


def test_the_branch_rule_by_hand():
    """Prompt p0 p1, chosen c0, rejected r0: p0 | p1 c0 | p1 r0, then another pair's q0."""
    seg = jnp.array([[1, 1, 1, 1, 1, 2]])
    branch = jnp.array([[0, 1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 2, 1, 2, 0]])
    mask = np.asarray(attention_mask(seg, seg, 0, None, branch, pos))[0].astype(int)
    expected = [[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],  # the chosen branch: the prompt and itself
                [1, 1, 1, 0, 0, 0],
                [1, 0, 0, 1, 0, 0],  # the rejected branch: the prompt and itself, never the chosen reply
                [1, 0, 0, 1, 1, 0],
                [0, 0, 0, 0, 0, 1]]  # another pair: nothing of the first
    np.testing.assert_array_equal(mask, expected)
    # the window counts positions: r0 is 2 positions after p0 (4 rows)
    assert np.asarray(attention_mask(seg, seg, 0, 3, branch, pos))[0, 4, 0]
    assert not np.asarray(attention_mask(seg, seg, 0, 2, branch, pos))[0, 4, 0]


@pytest.mark.parametrize("sliding_window", [None, 6], ids=["full", "sliding_window"])
def test_each_reply_scores_as_in_the_padded_layout(sliding_window):
    """Summed completion log-probs of every chosen and rejected reply, fp32: the padded layout's, to 1e-5,
    unpacked, packed several pairs a row, and through LoRA adapters (the policy) and without (the reference)."""
    cfg = dataclasses.replace(CFG, sliding_window=sliding_window)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    pairs = random_pairs(7, seed=1)
    with use_mesh(mesh):
        model = init_model(cfg, mesh, seed=0)
        spec = LoraSpec(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))
        adapters = init_adapters(cfg, spec, jax.random.key(3))
        adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), adapters)
        for policy in (model, Adapted(model, adapters, spec, None)):
            want, want_tokens = (np.asarray(x).reshape(2, -1) for x in sequence_logps(policy, padded(pairs)))
            for layout in ([[i] for i in range(7)], [[0, 1, 2], [3, 4], [5, 6]], [[6, 0], [1, 5, 2, 4], [3]]):
                batch = shared(pairs, layout)
                got, tokens = sequence_logps(policy, batch)
                np.testing.assert_allclose(in_batch_order(got, batch, 7), want, rtol=1e-5, atol=1e-5)
                np.testing.assert_array_equal(in_batch_order(tokens, batch, 7), want_tokens)
        np.testing.assert_allclose(in_batch_order(reference_logps(model, batch), batch, 7),
                                   np.asarray(reference_logps(model, padded(pairs))).reshape(2, -1), rtol=1e-5,
                                   atol=1e-5)


RPO = PreferenceLoss(loss_types=("sigmoid", "sft"), loss_weights=(1.0, 0.3), beta=0.2)
# LD-DPO's token weights and a loss that sorts pairs across the batch (empty slots must not take places).
LD_AOT = PreferenceLoss(loss_types=("sigmoid", "sft", "aot"), loss_weights=(1.0, 0.3, 0.5), beta=0.2,
                        label_smoothing=0.1, ld_alpha=0.4)


def one_step(batch, reference: str, accum=1, mesh_sizes=None, loss=RPO):
    """(metrics, updated params) of one plain-SGD DPO step on `batch` from the same start."""
    opt_cfg = default_config().optimizer
    opt_cfg.name, opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.warmup_steps = "sgd", 0.5, 0.0, 0
    mesh = make_mesh(mesh_sizes or {"data": 1, "fsdp": 1, "tensor": 1},
                     None if mesh_sizes else jax.devices()[:1])
    with use_mesh(mesh):
        model = init_model(CFG, mesh, seed=0)
        graphdef, params = nnx.split(model)
        params = nnx.to_pure_dict(params)
        optimizer, schedule = build_optimizer(opt_cfg, total_steps=10)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(optimizer.init)(params))
        # a reference that differs from the policy, so the log-ratios are not all 0
        ref = jax.tree.map(lambda x: x * 1.01, params)
        if reference == "precomputed":
            logps = np.asarray(reference_logps(nnx.merge(graphdef, ref), batch, ld_alpha=loss.ld_alpha))
            batch = dict(batch, ref_logps=(np.moveaxis(logps.reshape(2, *batch["pair_index"].shape), 0, -1)
                                           if "branch_ids" in batch else logps))
            ref = None
        step = jit_train_step(make_train_step(graphdef, Objective("dpo", dpo=loss), optimizer,
                                              schedule, accum),
                              jax.tree.map(lambda x: x.sharding, state),
                              batch_shardings({k: np.shape(v) for k, v in batch.items()}, mesh),
                              None if ref is None else jax.tree.map(lambda x: x.sharding, ref))
        state, metrics = step(state, batch, ref)
        return jax.device_get(metrics), jax.device_get(state.params)


@pytest.mark.parametrize("reference,loss", [("model", RPO), ("precomputed", RPO), ("precomputed", LD_AOT)],
                         ids=["model", "precomputed", "ld_aot_precomputed"])
def test_the_update_does_not_depend_on_the_layout(reference, loss):
    """Loss, TRL's metrics and the SGD update of 6 pairs: padded, shared one pair a row, and packed two
    different ways (and over 2 micro-batches) all give the same values."""
    pairs = random_pairs(6, seed=2)
    want, want_params = one_step(padded(pairs), reference, loss=loss)
    for batch, accum in ((shared(pairs, [[i] for i in range(6)]), 1),
                         (shared(pairs, [[0, 1, 2], [3, 4, 5]], slots=6), 1),
                         (shared(pairs, [[5], [0, 4], [1, 2, 3], []], length=64), 2)):
        # aot sorts the pairs of each micro-batch (as TRL sorts each device's): one micro-batch here
        got, params = one_step(batch, reference, 1 if "aot" in loss.loss_types else accum, loss=loss)
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected", "nll_loss", "num_pairs", "num_chosen_tokens"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, want_params)
    assert want["rewards/margins"] != 0


def test_the_iterator_gives_every_pair_once_per_step_in_rows_the_mesh_divides():
    """batch_size pairs per step, each in exactly one slot; rows are a multiple of the data-parallel devices
    (8) times the step's micro-batches, padded with empty ones."""
    pairs = random_pairs(40, seed=3)
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    for packing, micro in ((False, 1), (True, 1), (True, 2)):
        it = BatchIterator(pairs, "dpo", batch_size=10, max_length=64, pad_to_multiple_of=16, packing=packing,
                           share_prompt=True, mesh=mesh, seed=5, micro_batches=micro)
        seen = []
        for _ in range(it.steps_per_epoch):
            units = it._plan(it.epoch)[it.step]
            batch = next(it)
            index = batch["pair_index"].reshape(-1)
            assert sorted(index[index >= 0]) == list(range(10))
            assert batch["tokens"].shape[0] % (8 * micro) == 0 and batch["tokens"].shape[1] % 16 == 0
            if not packing:
                assert batch["tokens"].shape[0] == 16 and batch["pair_index"].shape == (16, 1)
            seen += [units[k] for k in index[index >= 0]]
            # each slot's tokens are its pair's: prompt (without its last token), then both branches
            for r, s in zip(*np.nonzero(batch["pair_index"] >= 0)):
                pair = pairs[units[batch["pair_index"][r, s]]]
                row = batch["tokens"][r][batch["segment_ids"][r] == s + 1]
                p = pair["prompt_ids"]
                assert row.tolist() == p[:-1] + p[-1:] + pair["chosen_ids"] + p[-1:] + pair["rejected_ids"]
        assert sorted(seen) == list(range(40))


def test_ld_dpo_weights_the_longer_replys_extra_tokens_in_both_layouts():
    """LD-DPO (ld_alpha a): a pair with a 3-token chosen and a 1-token rejected reply weighs the chosen
    reply's tokens 1, a, a and the rejected one's 1; the next pair (2 and 4 tokens) 1, 1 and 1, 1, a, a."""
    pairs = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]},
             {"prompt_ids": [11], "chosen_ids": [12, 13], "rejected_ids": [14, 15, 16, 17]}]
    a = 0.25
    want = [[1, a, a], [1, 1], [1], [1, 1, a, a]]  # chosen of each pair, then rejected of each
    batch = padded(pairs)
    w = np.asarray(ld_token_weights(batch, a))
    assert [w[r][batch["loss_mask"][r] > 0].tolist() for r in range(4)] == want
    batch = shared(pairs, [[1, 0]])  # both pairs in one row, the second first
    w, mask = np.asarray(ld_token_weights(batch, a))[0], batch["loss_mask"][0] > 0
    got = {(int(seg), int(br)): w[mask & (batch["segment_ids"][0] == seg) & (batch["branch_ids"][0] == br)].tolist()
           for seg in (1, 2) for br in (1, 2)}
    # segment 1 holds pair 1, segment 2 pair 0
    assert [got[2, 1], got[1, 1], got[2, 2], got[1, 2]] == want


@pytest.mark.parametrize("share_prompt,packing", [(False, False), (True, False), (True, True)],
                         ids=["padded", "shared", "packed"])
def test_log_probs_at_the_loss_positions_equal_those_of_every_position(share_prompt, packing):
    """The iterator's `loss_index` (the LM head at the loss positions only) covers every loss position, and the
    sequences' log-probs and their gradient equal those computed at every position, sharded over 8 devices."""
    pairs = random_pairs(16, seed=6)
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    it = BatchIterator(pairs, "dpo", batch_size=8, max_length=64, pad_to_multiple_of=8, packing=packing,
                       share_prompt=share_prompt, mesh=mesh, seed=1)
    with use_mesh(mesh):
        graphdef, params = nnx.split(init_model(CFG, mesh, seed=0))
        for _ in range(it.steps_per_epoch):
            batch = next(it)
            index, mask = batch["loss_index"], batch["loss_mask"].astype(bool)
            assert index.shape[1] % 8 == 0 and index.shape[1] < mask.shape[1]
            for r in range(mask.shape[0]):
                assert index[r, :mask[r].sum()].tolist() == np.flatnonzero(mask[r]).tolist()
            full = {k: v for k, v in batch.items() if k != "loss_index"}

            def summed(p, b):
                logps = sequence_logps(nnx.merge(graphdef, p), b)[0]
                return jnp.sum(logps * jnp.linspace(0.5, 1.5, logps.shape[0])), logps

            (_, got), grads = jax.jit(jax.value_and_grad(summed, has_aux=True))(params, batch)
            (_, want), want_grads = jax.jit(jax.value_and_grad(summed, has_aux=True))(params, full)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, want_grads)


def test_loss_index_widths_are_few_per_row_length():
    """Widths are the pad multiple times 1, 2, 3, 4, 6, 8, 12, ...: the least fitting the fullest row, capped at
    the row length, so a row length meets a few compiled widths rather than one per multiple."""
    from jaxalign.data.batching import loss_width

    got = [loss_width([c, 3], 64, 1024) for c in (0, 1, 64, 65, 129, 192, 193, 257, 385, 513, 800, 1000)]
    assert got == [64, 64, 64, 128, 192, 192, 256, 384, 512, 768, 1024, 1024]
    assert loss_width([300], 64, 320) == 320 and len({loss_width([c], 64, 2048) for c in range(1, 2049)}) == 10
