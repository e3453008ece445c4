"""Streaming training data (`data.streaming`, jaxalign/data/streaming.py): the stream's examples are the
token store's for the same rows, packed greedily in stream order; its shuffle buffer is a seeded
permutation that a replay repeats; a resume (in the iterator, and of a preempted training run) goes on
with exactly the batches of the uninterrupted run; what a stream cannot do is a config error."""

import json

import numpy as np
import pytest
from tiny_runs import hh_sft_config, read_metrics, train_until

from jaxalign.config import load_config
from jaxalign.data.iterator import make_iterator
from jaxalign.data.pipeline import load_examples
from jaxalign.data.streaming import Stream, StreamIterator, shuffled
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import JaxalignError

HH = "hh-rlhf-harmless-base-test.jsonl.gz"


def test_the_shuffle_buffer_is_a_seeded_permutation_within_its_window():
    out = list(shuffled(iter(range(1000)), 50, np.random.default_rng(7)))
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    # a row leaves at most `size` - 1 places before it came in: the buffer holds `size` rows
    assert all(row <= k + 49 for k, row in enumerate(out))
    assert out == list(shuffled(iter(range(1000)), 50, np.random.default_rng(7)))
    assert list(shuffled(iter(range(10)), 1, np.random.default_rng(0))) == list(range(10))


def config(shared_data, tmp_path, stage="sft", share_prompt=False, **data):
    cfg = hh_sft_config(shared_data, tmp_path / "run", tmp_path / "cache",
                        data={"max_rows": 48, "max_length": 256, "max_prompt_length": 128, **data},
                        train={"batch_size": 4, "max_steps": 6}, dpo={"share_prompt": share_prompt})
    cfg["stage"] = stage
    if stage == "dpo":
        cfg["data"]["sft_from_preference"] = False
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(str(shared_data / "llama2-tokenizer.model"), chat_template="plain")


def batch_examples(batch, paired):
    """The examples of a batch as token lists: each segment of each row (padded pairs: each row; shared-prompt
    pairs: prompt + chosen of each, then prompt + rejected of each, in batch order)."""
    out = []
    if "branch_ids" in batch:
        seqs = {}
        for r, slot in zip(*np.nonzero(batch["pair_index"] >= 0)):
            tokens, branch = (batch[k][r][batch["segment_ids"][r] == slot + 1] for k in ("tokens", "branch_ids"))
            seqs[batch["pair_index"][r, slot]] = [tokens[branch == 0].tolist() + tokens[branch == b].tolist()
                                                  for b in (1, 2)]
        return [seqs[k][side] for side in (0, 1) for k in sorted(seqs)]
    for r in range(len(batch["tokens"])):
        if paired:
            n = int(batch["loss_mask"][r].nonzero()[0].max()) + 2
            out.append(batch["tokens"][r][:n].tolist())
            continue
        for seg in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
            out.append(batch["tokens"][r][batch["segment_ids"][r] == seg].tolist())
    return out


@pytest.mark.parametrize("stage,packing,share", [("sft", True, False), ("sft", False, False), ("dpo", False, False),
                                                 ("dpo", True, True)])
def test_the_stream_gives_the_stores_examples_packed_greedily_in_order(shared_data, tmp_path, tok, stage, packing,
                                                                      share):
    stored = config(shared_data, tmp_path, stage, share, packing=packing, shuffle=False)
    store, _, _ = load_examples(stored, tok)
    streamed = config(shared_data, tmp_path, stage, share, packing=packing, shuffle=False, streaming=True)
    stream, _, _ = load_examples(streamed, tok)
    assert isinstance(stream, Stream)
    it = make_iterator(stream, streamed, pad_id=tok.pad_id)
    batches = [next(it) for _ in range(6)]
    got = [ex for b in batches for ex in batch_examples(b, stage != "sft")]
    # the oracle: the store's examples in file order, again from the start at the epoch's end
    if stage == "sft":
        want = [ex["input_ids"] for ex in store]
    else:
        pairs = list(store) * 3  # a batch's rows: the chosen sides of its pairs, then the rejected
        want = [p["prompt_ids"] + p[side] for k in range(0, len(pairs), 4) for side in ("chosen_ids", "rejected_ids")
                for p in pairs[k:k + 4]]
    assert got == (want * 3)[:len(got)] and len(got) >= 24
    if packing and stage == "sft":  # greedy: a row closes when the next example would not fit, and at the epoch's end
        rows, used = [[]], 0
        for epoch in range(3):
            for ex in store:
                n = len(ex["input_ids"])
                if used and used + n > 256:
                    rows, used = rows + [[]], 0
                rows[-1].append(n)
                used += n
            rows, used = rows + [[]], 0
        got_rows = [[int((b["segment_ids"][r] == s).sum()) for s in sorted(set(b["segment_ids"][r].tolist()) - {0})]
                    for b in batches for r in range(4)]
        assert got_rows == rows[:24]


def test_a_streamed_shared_prompt_batch_splits_like_the_stores_over_eight_devices(shared_data, tmp_path, tok):
    """2 pairs a step over 8 data-parallel devices: one pair a row, rounded up to 8 rows, as the store's
    iterator lays them out (2 pairs padded would be 4 rows, which 8 devices cannot split)."""
    from jaxalign.runtime.sharding import make_mesh

    mesh = make_mesh({"data": 8})
    cfgs = [config(shared_data, tmp_path, "dpo", True, packing=False, shuffle=False, streaming=s) for s in (False, True)]
    for cfg in cfgs:
        cfg.train.batch_size = 2
    its = [make_iterator(load_examples(cfg, tok)[0], cfg, pad_id=tok.pad_id, mesh=mesh) for cfg in cfgs]
    stored, streamed = (next(it) for it in its)
    assert stored["tokens"].shape[0] == streamed["tokens"].shape[0] == 8
    assert stored.keys() == streamed.keys()
    assert all((stored[k] == streamed[k]).all() for k in stored)


@pytest.mark.parametrize("packing", [True, False])
def test_a_restored_position_goes_on_with_the_same_batches(shared_data, tmp_path, tok, packing):
    cfg = config(shared_data, tmp_path, packing=packing, streaming=True, shuffle_buffer=16)
    stream, _, _ = load_examples(cfg, tok)
    make = lambda: make_iterator(stream, cfg, pad_id=tok.pad_id)  # noqa: E731
    it = make()
    batches, states = [], []
    for _ in range(30):  # more than an epoch of 48 rows: the position crosses into the next
        batches.append(next(it))
        states.append(json.loads(json.dumps(it.state())))
    assert {s["epoch"] for s in states} >= {0, 1}
    for k in (0, 7, len(batches) - 5):
        resumed = make()
        resumed.restore(states[k])
        for want in batches[k + 1:k + 5]:
            got = next(resumed)
            assert all(np.array_equal(got[key], want[key]) for key in want)
    changed = config(shared_data, tmp_path, packing=packing, streaming=True, shuffle_buffer=8)
    with pytest.raises(JaxalignError, match="shuffle_buffer: 16 -> 8"):
        make_iterator(stream, changed, pad_id=tok.pad_id).restore(states[3])
    assert isinstance(it, StreamIterator) and it.stats.rows_in >= 48


def test_a_preempted_streaming_run_resumes_at_the_next_batch(shared_data, tmp_path):
    """A streaming run preempted after step 2 checkpoints its stream position; the resumed run's iterator
    draws exactly the third batch a fresh stream draws (what a step-for-step equal resume needs: the
    loop's resume from a checkpointed position, step for step, is test_reliability.py's)."""
    from jaxalign.run.loop import Trainer

    cfg = hh_sft_config(shared_data, tmp_path / "run", tmp_path / "cache",
                        data={"max_rows": 64, "max_length": 128, "max_prompt_length": 64, "streaming": True,
                              "shuffle_buffer": 8, "eval_fraction": 0.0},
                        train={"batch_size": 8, "max_steps": 4, "eval_every": 0, "log_every": 1},
                        optimizer={"lr": 3e-3, "warmup_steps": 1}, checkpoint={"every_steps": 0, "keep": 2})
    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])
    summary = train_until(Trainer(config), 2)
    assert summary["state"] == "preempted" and summary["stopped_at"] == 2
    assert sorted(read_metrics(tmp_path / "run")[0]) == [1, 2]
    resumed = Trainer(config, resume=True)
    assert int(resumed.state.step) == 2 and resumed.train_iter.state()["position"] > 0
    fresh = make_iterator(resumed.train_examples, config)
    want = [next(fresh) for _ in range(3)][-1]
    got = next(resumed.train_iter)
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("sets,message", [
    (["train.max_steps=-1"], "'train.max_steps' must be set"),
    (["data.eval_fraction=0.1"], "'data.eval_fraction' must be 0 with data.streaming"),
    (["data.train=[{path: a.jsonl, weight: 1}]"], "'data.train' cannot be a weighted mixture"),
    (["stage=dpo", "dpo.reference=precomputed"], "'dpo.reference' cannot be 'precomputed'"),
])
def test_what_a_stream_cannot_do_is_a_config_error(sets, message):
    with pytest.raises(JaxalignError, match=message):
        load_config(None, ["data.streaming=true", "train.max_steps=10", "data.train=a.jsonl", *sets])


def test_data_inspect_on_a_streaming_config_reports_the_rows_as_stored(shared_data, tmp_path, capsys):
    from jaxalign import cli

    sets = [f"output_dir={tmp_path / 'run'}", f"data.train={shared_data / HH}", "data.max_rows=48",
            "data.format=preference", "data.sft_from_preference=true", "data.streaming=true", "train.max_steps=5",
            f"tokenizer.path={shared_data / 'llama2-tokenizer.model'}", "tokenizer.chat_template=plain"]
    config = tmp_path / "c.yaml"
    config.write_text("stage: sft\n")
    assert cli.main(["data", "inspect", "--config", str(config), *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data.streaming: inspecting the rows as a token store") and "examples: 48" in out
