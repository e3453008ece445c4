"""Packing, padded SFT / DPO batches, the resumable iterator, global arrays and `data inspect`."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign.config import default_config
from jaxalign.data.batching import bucket_length, dpo_batch, sft_batch
from jaxalign.data.inspect import completion_difference, inspect_data, is_near_identical, marked_text
from jaxalign.data.iterator import BatchIterator, host_rows, make_iterator, to_global_arrays
from jaxalign.data.packing import BATCH_KEYS, bins_efficiency, pack_bfd, pack_rows, packing_efficiency
from jaxalign.data.prefetch import Prefetcher
from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, init_model
from jaxalign.models.logprobs import token_logprobs
from jaxalign.runtime.sharding import batch_sharding, make_mesh, use_mesh

VOCAB = 64


def sft_examples(n, rng, low=2, high=40):
    """Synthetic tokenizer-stage SFT examples: a prompt part (untrained) then a trained part."""
    out = []
    for _ in range(n):
        length = int(rng.integers(low, high + 1))
        prompt = int(rng.integers(1, length + 1))
        out.append({"input_ids": rng.integers(3, VOCAB, length).tolist(),
                    "loss_mask": [i >= prompt for i in range(length)]})
    return out


def dpo_pairs(n, rng):
    return [{"prompt_ids": rng.integers(3, VOCAB, int(rng.integers(1, 20))).tolist(),
             "chosen_ids": rng.integers(3, VOCAB, int(rng.integers(1, 30))).tolist(),
             "rejected_ids": rng.integers(3, VOCAB, int(rng.integers(1, 30))).tolist()} for _ in range(n)]


# --- best-fit decreasing --------------------------------------------------------------------


@pytest.mark.parametrize("lengths, capacity, optimal", [
    ([5, 5, 5, 5], 10, 2),
    ([7, 3, 6, 4, 5, 5], 10, 3),
    ([6, 5, 4, 3, 2], 10, 2),
    ([9, 8, 2, 1], 10, 2),
    ([4, 4, 4, 3, 3, 2], 10, 2),
    ([10, 10, 1], 10, 3),
    ([], 10, 0),
])
def test_bfd_packs_hand_cases_optimally(lengths, capacity, optimal):
    bins = pack_bfd(lengths, capacity)
    assert len(bins) == optimal
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def test_bfd_prefers_the_tightest_bin():
    # After 6 and 5 open two bins (room 4 and 5), the 4 must go where it fills the bin exactly.
    assert pack_bfd([6, 5, 4], 10) == [[0, 2], [1]]


def test_bfd_never_loses_a_token_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 5000)
    bins = pack_bfd(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(int(lengths[b].sum()) for b in bins) <= 512
    assert bins == pack_bfd(lengths, 512)


def test_bfd_rejects_an_item_longer_than_a_row():
    with pytest.raises(JaxalignError, match="item 1 of length 513"):
        pack_bfd([10, 513], 512)


def test_packing_efficiency_on_a_realistic_length_distribution():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(150), 0.6, 20_000), 50, 500).astype(int)
    bins = pack_bfd(lengths, 512)
    assert bins_efficiency(lengths, bins, 512) >= 0.95
    examples = [{"input_ids": [3] * int(n), "loss_mask": [True] * int(n)} for n in lengths[:2000]]
    batch = pack_rows([[examples[i] for i in b] for b in pack_bfd(lengths[:2000], 512)], 512)
    assert packing_efficiency(batch) >= 0.95


# --- row layout -----------------------------------------------------------------------------


def test_pack_rows_layout_by_hand():
    a = {"input_ids": [1, 2, 3], "loss_mask": [False, True, True]}
    b = {"input_ids": [4, 5], "loss_mask": [False, True]}
    batch = pack_rows([[a, b], [b]], 6, pad_id=0, num_rows=3)
    assert set(batch) == set(BATCH_KEYS)
    np.testing.assert_array_equal(batch["tokens"][0], [1, 2, 3, 4, 5, 0])
    np.testing.assert_array_equal(batch["targets"][0], [2, 3, 0, 5, 0, 0])
    # The last token of each sequence predicts nothing: 3 is never trained to predict 4.
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(batch["segment_ids"][1], [1, 1, 0, 0, 0, 0])
    assert not batch["segment_ids"][2].any() and not batch["loss_mask"][2].any()
    with pytest.raises(JaxalignError, match="exceed the row length 4"):
        pack_rows([[a, b]], 4)


CFG = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def test_packed_logprobs_equal_each_example_alone():
    """Per-example summed log-probs from packed rows equal those of each example in its own row:
    segments never attend to each other and positions restart at 0."""
    rng = np.random.default_rng(1)
    examples = sft_examples(12, rng, low=3, high=30)
    capacity = 48
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with use_mesh(mesh):
        model = init_model(CFG, mesh, seed=0)
        graphdef, state = nnx.split(model)

        @jax.jit
        def logp(state, batch):
            m = nnx.merge(graphdef, state)
            hidden, _ = m.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
            return token_logprobs(m, hidden, batch["targets"])

        bins = pack_bfd([len(ex["input_ids"]) for ex in examples], capacity)
        assert any(len(b) >= 3 for b in bins)
        packed = pack_rows([[examples[i] for i in b] for b in bins], capacity)
        alone = sft_batch(examples, capacity)
        packed_logp = np.asarray(logp(state, packed))
        alone_logp = np.asarray(logp(state, alone))

    alone_sums = np.where(alone["loss_mask"], alone_logp, 0).sum(-1)
    packed_sums = np.zeros(len(examples))
    for r, b in enumerate(bins):
        for k, i in enumerate(b, start=1):
            in_segment = (packed["segment_ids"][r] == k) & packed["loss_mask"][r]
            packed_sums[i] = packed_logp[r][in_segment].sum()
            assert in_segment.sum() == alone["loss_mask"][i].sum()
    assert np.all(alone_sums < 0)
    np.testing.assert_allclose(packed_sums, alone_sums, atol=1e-5, rtol=0)


# --- DPO batches ----------------------------------------------------------------------------


def test_dpo_batch_layout():
    pairs = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8, 9]},
             {"prompt_ids": [10], "chosen_ids": [11, 12, 13], "rejected_ids": [14]}]
    batch = dpo_batch(pairs, 8)
    assert batch["tokens"].shape == (4, 8)
    np.testing.assert_array_equal(batch["tokens"][0], [1, 2, 3, 4, 5, 0, 0, 0])  # chosen of pair 0
    np.testing.assert_array_equal(batch["tokens"][1], [10, 11, 12, 13, 0, 0, 0, 0])  # chosen of pair 1
    np.testing.assert_array_equal(batch["tokens"][2], [1, 2, 3, 6, 7, 8, 9, 0])  # rejected of pair 0
    np.testing.assert_array_equal(batch["tokens"][3], [10, 14, 0, 0, 0, 0, 0, 0])  # rejected of pair 1
    # Trained: exactly the predictions of completion tokens (targets), never prompt or padding.
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["targets"][0][batch["loss_mask"][0]], [4, 5])
    np.testing.assert_array_equal(batch["targets"][2][batch["loss_mask"][2]], [6, 7, 8, 9])
    np.testing.assert_array_equal(batch["targets"][3][batch["loss_mask"][3]], [14])
    np.testing.assert_array_equal(batch["segment_ids"][2], [1] * 7 + [0])


def test_dpo_rejects_empty_completions_and_prompts():
    with pytest.raises(JaxalignError, match="empty rejected completion"):
        dpo_batch([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": []}], 8)
    with pytest.raises(JaxalignError, match="example 1: empty prompt"):
        BatchIterator([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]},
                       {"prompt_ids": [], "chosen_ids": [2], "rejected_ids": [3]}], "dpo", batch_size=1, max_length=8)


def test_dpo_iterator_pairs_masks_and_bucketed_lengths():
    rng = np.random.default_rng(2)
    pairs = dpo_pairs(50, rng)
    it = BatchIterator(pairs, "dpo", batch_size=4, max_length=50, pad_to_multiple_of=16, seed=3)
    lengths = set()
    for _ in range(it.steps_per_epoch):
        batch = next(it)
        b = 4
        assert batch["tokens"].shape[0] == 2 * b
        lengths.add(batch["tokens"].shape[1])
        assert batch["loss_mask"].sum(-1).min() > 0  # never an all-zero mask
        for i in range(b):
            c, r = batch["tokens"][i], batch["tokens"][b + i]
            start = int(np.argmax(batch["loss_mask"][i]))  # first trained target: the last prompt token
            # Same prompt in both rows of a pair, up to where the completions start.
            np.testing.assert_array_equal(c[:start + 1], r[:start + 1])
            assert int(np.argmax(batch["loss_mask"][b + i])) == start
    assert lengths <= {16, 32, 48, 50} and len(lengths) > 1
    assert bucket_length(49, 16, 50) == 50 and bucket_length(17, 16, 50) == 32 and bucket_length(60, 16, 50) == 60


# --- the iterator ---------------------------------------------------------------------------


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("stage, packing", [("sft", True), ("sft", False), ("dpo", False)])
def test_resume_gives_exactly_the_batches_of_an_uninterrupted_run(stage, packing):
    rng = np.random.default_rng(4)
    examples = sft_examples(60, rng) if stage == "sft" else dpo_pairs(30, rng)
    kwargs = dict(batch_size=4, max_length=64, pad_to_multiple_of=16, packing=packing, seed=7)
    it = BatchIterator(examples, stage, **kwargs)
    per_epoch = it.steps_per_epoch
    k = per_epoch - 1  # the continuation crosses an epoch boundary
    for _ in range(k):
        next(it)
    saved = json.loads(json.dumps(it.state()))
    expected = [next(it) for _ in range(per_epoch + 2)]

    fresh = BatchIterator(examples, stage, **kwargs)
    fresh.restore(saved)
    for want in expected:
        _assert_batches_equal(next(fresh), want)
    assert fresh.state() == it.state() and it.state()["epoch"] >= 1


def test_prefetched_positions_resume_at_the_next_trained_batch():
    """The loop draws batch i+1 while step i runs; step i's checkpoint stores batch i's position, so a
    resume from it yields batch i+1 again, also across an epoch boundary (which marks epoch_done)."""
    rng = np.random.default_rng(5)
    examples = sft_examples(60, rng)
    kwargs = dict(batch_size=4, max_length=64, pad_to_multiple_of=16, seed=7)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    feed = Prefetcher(BatchIterator(examples, "sft", mesh=mesh, **kwargs), mesh)
    per_epoch = feed.iterator.steps_per_epoch
    drawn = []
    for _ in range(per_epoch + 2):
        drawn.append(feed.take())
        feed.prefetch()  # as the loop does after dispatching a step
    assert [d.position.epoch_done for d in drawn] == [i == per_epoch - 1 for i in range(per_epoch + 2)]
    assert [d.position.batch_index for d in drawn[per_epoch - 1:per_epoch + 1]] == [per_epoch - 1, 0]
    for i in (0, per_epoch - 1):
        fresh = BatchIterator(examples, "sft", **kwargs)
        fresh.restore(json.loads(json.dumps(drawn[i].position.state)))
        _assert_batches_equal(next(fresh), drawn[i + 1].host)
        np.testing.assert_array_equal(np.asarray(drawn[i + 1].arrays["tokens"]), drawn[i + 1].host["tokens"])


def test_restore_refuses_changed_settings():
    examples = sft_examples(40, np.random.default_rng(0))
    state = BatchIterator(examples, "sft", batch_size=4, max_length=64).state()
    other = BatchIterator(examples, "sft", batch_size=2, max_length=64)
    with pytest.raises(JaxalignError, match="batch_size: 4 -> 2"):
        other.restore(state)
    with pytest.raises(JaxalignError, match="num_examples"):
        BatchIterator(examples[:30], "sft", batch_size=4, max_length=64).restore(state)


def test_epoch_order_depends_on_seed_and_epoch_only():
    examples = sft_examples(40, np.random.default_rng(0))
    kwargs = dict(batch_size=4, max_length=64, packing=False)
    a, b = BatchIterator(examples, "sft", seed=1, **kwargs), BatchIterator(examples, "sft", seed=1, **kwargs)
    assert a._plan(0) == b._plan(0) and a._plan(3) == b._plan(3)
    assert a._plan(0) != a._plan(1)
    assert a._plan(0) != BatchIterator(examples, "sft", seed=2, **kwargs)._plan(0)


def test_one_eval_pass_covers_every_example_once():
    examples = sft_examples(37, np.random.default_rng(5))
    it = BatchIterator(examples, "sft", batch_size=4, max_length=64, shuffle=False, epochs=1, drop_remainder=False)
    batches = list(it)
    seen = sorted(tuple(b["tokens"][r][b["segment_ids"][r] == k]) for b in batches for r in range(4)
                  for k in range(1, b["segment_ids"][r].max() + 1))
    assert seen == sorted(tuple(ex["input_ids"]) for ex in examples)
    assert all(b["tokens"].shape == (4, 64) for b in batches)
    trained = sum(int(b["loss_mask"].sum()) for b in batches)
    assert trained == sum(sum(ex["loss_mask"][1:]) for ex in examples)


def test_iterator_rejects_overlong_examples_and_too_little_data():
    examples = sft_examples(10, np.random.default_rng(0), low=5, high=10)
    examples[3] = {"input_ids": [3] * 70, "loss_mask": [True] * 70}
    with pytest.raises(JaxalignError, match="example 3 has 70 tokens, more than data.max_length=64"):
        BatchIterator(examples, "sft", batch_size=2, max_length=64)
    with pytest.raises(JaxalignError, match="fewer than one batch"):
        BatchIterator(examples[:3], "sft", batch_size=8, max_length=64)


def test_make_iterator_from_config():
    cfg = default_config()
    cfg.data.max_length = 64
    cfg.train.batch_size = 4
    examples = sft_examples(40, np.random.default_rng(0))
    batch = next(make_iterator(examples, cfg))
    assert batch["tokens"].shape == (4, 64)
    eval_it = make_iterator(examples, cfg, train=False)
    assert not eval_it.shuffle and eval_it.epochs == 1 and eval_it.batch_size == cfg.eval.batch_size


# --- global arrays --------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_to_global_arrays_single_process(sizes):
    mesh = make_mesh(sizes)
    np.testing.assert_array_equal(host_rows(mesh, 16), np.arange(16))
    examples = dpo_pairs(20, np.random.default_rng(0))
    host = next(BatchIterator(examples, "dpo", batch_size=8, max_length=64, mesh=mesh))
    batch = to_global_arrays(host, mesh)
    for key, value in batch.items():
        assert value.sharding == batch_sharding(mesh, 2)
        np.testing.assert_array_equal(np.asarray(value), host[key])
    with pytest.raises(JaxalignError, match="cannot be split over"):
        host_rows(mesh, 6 if sizes["fsdp"] == 8 else 2)


# --- data inspect ---------------------------------------------------------------------------


class CharTokenizer:
    """Decodes id i to chr(ord('a') + i % 26)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_marked_text_wraps_trained_runs():
    assert marked_text(CharTokenizer(), [0, 1, 2, 3, 4], [0, 0, 1, 1, 0]) == "ab[[cd]]e"
    assert marked_text(None, [5, 6, 7], [0, 1, 1]) == "5 [[6 7]]"


def test_near_identical_definition():
    base = list(range(100))
    assert is_near_identical({"chosen_ids": base, "rejected_ids": base[:97]})  # 3 tokens differ
    assert is_near_identical({"chosen_ids": [1, 2], "rejected_ids": [1, 3]})  # 1 differs, ratio 0.5
    assert not is_near_identical({"chosen_ids": [1, 2], "rejected_ids": [3, 4]})  # nothing shared
    assert not is_near_identical({"chosen_ids": base, "rejected_ids": base[:50]})
    assert is_near_identical({"chosen_ids": base, "rejected_ids": base[:92] + [7] * 8})  # ratio 0.92
    assert completion_difference([1, 2, 3, 4], [1, 9, 3, 4]) == (1, 0.75)


def test_inspect_reports_sft_and_dpo():
    cfg = default_config().data
    cfg.max_length = 64
    examples = sft_examples(50, np.random.default_rng(0))
    report = inspect_data(examples, {"rows": 55, "truncated": 2, "dropped_empty_mask": 5}, CharTokenizer(), "sft", cfg)
    assert "examples: 50" in report and "p99" in report and "truncated" in report and "[[" in report
    assert "packing: 50 examples ->" in report and "% non-pad" in report

    pairs = dpo_pairs(20, np.random.default_rng(1))
    pairs[7]["rejected_ids"] = list(pairs[7]["chosen_ids"]) + [5]
    stats = {"rows_in": 21, "dropped_by_reason": {"empty_completion": 1}, "first_drop": {"empty_completion": "f:3"}}
    report = inspect_data(pairs, stats, CharTokenizer(), "dpo", cfg)
    assert "dropped_by_reason.empty_completion 1  (5.0%)" in report and "first_drop.empty_completion" in report
    assert "pairs: 20" in report and "near-identical pairs" in report and "e.g. pair 7" in report
