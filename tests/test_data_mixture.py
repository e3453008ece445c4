"""Weighted data mixtures (`data.train: [{path, weight}, ...]`, jaxalign/data/mixture.py): exact
per-epoch counts by weight, deterministic and resumable draws, one store per source (a new weight
re-tokenizes nothing), per-source stats in `data inspect`, and config errors that name the key."""

import collections
import json

import numpy as np
import pytest

from jaxalign import cli
from jaxalign.config import default_config, load_config
from jaxalign.data.iterator import BatchIterator
from jaxalign.data.mixture import Mixture, Part, epoch_counts
from jaxalign.data.pipeline import load_examples
from jaxalign.data.store import SFT_COLUMNS, StoreWriter
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import JaxalignError


def store(path, source, n, rng):
    """An SFT store whose example r of `source` is input_ids [source, r, ...] (2-9 tokens)."""
    lengths = rng.integers(2, 10, n)
    ids = np.concatenate([[source, r] + [7] * (k - 2) for r, k in enumerate(lengths)])
    with StoreWriter(str(path), SFT_COLUMNS) as w:
        w.add({"input_ids": (ids, lengths), "loss_mask": (np.ones(ids.size, bool), lengths)})
        return w.finish({})


@pytest.fixture
def mixture(tmp_path):
    rng = np.random.default_rng(0)
    sizes, weights = (50, 7, 20), (0.5, 0.3, 0.2)  # source 1 is upsampled, 0 and 2 subsampled
    return Mixture([Part(f"s{k}", store(tmp_path / f"s{k}", k, n, rng), w)
                    for k, (n, w) in enumerate(zip(sizes, weights))])


@pytest.mark.parametrize("weights,total", [((1, 1, 1), 10), ((0.7, 0.2, 0.1), 1001), ((3, 1e-3), 5), ((2,), 9)])
def test_epoch_counts_add_up_and_stay_within_one_of_the_weight(weights, total):
    counts = epoch_counts(weights, total)
    quota = np.asarray(weights) / sum(weights) * total
    assert counts.sum() == total and np.all(np.abs(counts - quota) < 1)
    assert epoch_counts((1, 1, 1), 10).tolist() == [4, 3, 3]  # ties: the earlier source


def _sources(mix, order):
    return collections.Counter(int(mix[int(i)]["input_ids"][0]) for i in order)


def test_an_epoch_draws_each_source_by_weight_anew_each_epoch(mixture):
    n = len(mixture)  # 77: an epoch is the sources' total size
    assert mixture.counts.tolist() == epoch_counts((0.5, 0.3, 0.2), n).tolist() == [39, 23, 15]
    orders = [mixture.epoch_order(np.random.default_rng([3, e]), True) for e in range(2)]
    for order in orders:
        assert len(order) == n and _sources(mixture, order) == {0: 39, 1: 23, 2: 15}
        rows = collections.Counter((int(mixture[int(i)]["input_ids"][0]), int(mixture[int(i)]["input_ids"][1]))
                                   for i in order)
        assert max(c for (s, _), c in rows.items() if s != 1) == 1  # subsampled: no example twice
        assert sorted({c for (s, _), c in rows.items() if s == 1}) == [3, 4]  # 23 of 7: 3 passes and 2 more
    assert orders[0].tolist() != orders[1].tolist()
    assert orders[0].tolist() == mixture.epoch_order(np.random.default_rng([3, 0]), True).tolist()
    in_order = mixture.epoch_order(np.random.default_rng(0), False)  # unshuffled: each source cycled in order
    assert in_order.tolist() == [*range(39), *np.resize(np.arange(50, 57), 23), *range(57, 72)]
    # ... each epoch going on where the last stopped: a down-weighted source reaches its later rows
    second = mixture.epoch_order(np.random.default_rng(0), False, epoch=1)
    assert second[:39].tolist() == [*range(39, 50), *range(28)] and second[-15:].tolist() == [*range(72, 77), *range(57, 67)]


def test_one_pass_scores_each_example_once_for_the_precomputed_reference(mixture):
    """The eval iterator (a precomputed DPO reference is scored through it) visits the mixture's examples
    once each, in order, not the weighted draw: the scores then belong to the examples they are set on."""
    it = BatchIterator(mixture, "sft", batch_size=4, max_length=16, packing=False, shuffle=False, epochs=1,
                       drop_remainder=False)
    firsts = [(int(r[0]), int(r[1])) for b in it for r, m in zip(b["tokens"], b["segment_ids"]) if m[0]]
    assert firsts == [(int(mixture[i]["input_ids"][0]), int(mixture[i]["input_ids"][1])) for i in range(len(mixture))]


def test_the_iterator_trains_on_the_mixture_and_resumes_it_exactly(mixture):
    make = lambda: BatchIterator(mixture, "sft", batch_size=4, max_length=16, packing=False, seed=5)  # noqa: E731
    it = make()
    steps = it.steps_per_epoch
    batches = [next(it) for _ in range(steps + 3)]  # into the second epoch
    first_ids = [int(r[0]) for b in batches[:steps] for r in b["tokens"]]
    drawn = collections.Counter(first_ids)
    # the epoch's draw, less the short last batch dropped (77 = 19 * 4 + 1)
    assert steps == 19 and all(drawn[k] <= c for k, c in enumerate(mixture.counts)) and sum(drawn.values()) == 76
    resumed = make()
    it2 = make()
    for _ in range(steps - 2):
        next(it2)
    resumed.restore(json.loads(json.dumps(it2.state())))
    for want in batches[steps - 2:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    state = it2.state()
    assert state["mixture"] == [["s0", 0.5, 39], ["s1", 0.3, 23], ["s2", 0.2, 15]]
    reweighted = Mixture([Part(p.name, p.examples, w) for p, w in zip(mixture.parts, (0.2, 0.3, 0.5))])
    with pytest.raises(JaxalignError, match="mixture"):
        BatchIterator(reweighted, "sft", batch_size=4, max_length=16, packing=False, seed=5).restore(state)


def test_with_scalars_splits_the_values_by_source_and_the_hash_follows_the_weights(mixture):
    values = np.arange(len(mixture), dtype=np.float32)
    scored = mixture.with_scalars(ref_chosen_logp=values)
    assert [scored[i]["ref_chosen_logp"] for i in (0, 49, 50, 56, 57, 76)] == [0, 49, 50, 56, 57, 76]
    assert scored.counts.tolist() == mixture.counts.tolist()
    reweighted = Mixture([Part(p.name, p.examples, w) for p, w in zip(mixture.parts, (1, 1, 1))])
    assert reweighted.content_hash != mixture.content_hash
    assert Mixture(mixture.parts).content_hash == mixture.content_hash


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_weighted_config_tokenizes_each_source_once_and_inspect_reports_each(shared_data, tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [{"prompt": f"Count to {i}.", "completion": " " + " ".join(map(str, range(i)))}
                                      for i in range(1, 41)])
    b = _write(tmp_path / "b.jsonl", [{"prompt": f"Say hi {i} times.", "completion": " hi" * i} for i in range(1, 13)])
    sets = [f"data.train=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1, max_rows: 10}}]",
            "data.eval_fraction=0.2", f"data.cache_dir={tmp_path / 'cache'}", "data.max_length=64",
            "data.max_prompt_length=32", f"tokenizer.path={shared_data / 'llama2-tokenizer.model'}",
            "tokenizer.chat_template=plain", f"output_dir={tmp_path / 'run'}"]
    cfg = load_config(None, sets)
    tok = load_tokenizer(cfg.tokenizer.path, chat_template="plain")
    train, held_out, stats = load_examples(cfg, tok)
    assert [(p.name, len(p.examples), p.weight) for p in train.parts] == [(a, 32, 3.0), (b, 8, 1.0)]
    assert train.counts.tolist() == [30, 10] and len(held_out) == 8 + 2
    assert stats[f"train:{a}"].rows_in == 32 and stats[f"train:{b}"].rows_in == 8 and stats["train"].rows_in == 40
    reweighted = load_config(None, [*sets, f"data.train=[{{path: {a}, weight: 1}}, {{path: {b}, weight: 1, max_rows: 10}}]"])
    train2, _, stats2 = load_examples(reweighted, tok)
    assert all(s.from_cache for s in stats2.values()) and train2.counts.tolist() == [20, 20]
    assert [p.examples.path for p in train2.parts] == [p.examples.path for p in train.parts]

    config = tmp_path / "mix.yaml"
    config.write_text("stage: sft\n")
    assert cli.main(["data", "inspect", "--config", str(config), *[x for s in sets for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    tokens = [int(np.asarray(p.examples.lengths()).sum()) for p in train.parts]
    assert "mixture: 2 sources; an epoch draws 40 examples" in out
    assert f"{a}: weight 0.750, 32 examples ({tokens[0]} tokens), 30 per epoch = 0.94 passes; rows kept 32/32" in out
    assert f"{b}: weight 0.250, 8 examples ({tokens[1]} tokens), 10 per epoch = 1.25 passes; rows kept 8/8" in out


@pytest.mark.parametrize("entry,message", [
    ("{path: a.jsonl, wieght: 2}", "data.train[0]': unknown key 'wieght'; did you mean 'weight'?"),
    ("{path: a.jsonl, weight: 0}", "data.train[0]': 'weight' must be a number > 0"),
    ("{weight: 1}", "data.train[0]': 'path' must be a file"),
    ("{path: a.jsonl, max_rows: -1}", "'max_rows' must be an int >= 0"),
])
def test_a_bad_source_entry_names_the_entry_and_the_key(entry, message):
    with pytest.raises(JaxalignError, match=message.replace("[", r"\[").replace("?", r"\?")):
        load_config(None, [f"data.train=[{entry}]"])
    with pytest.raises(JaxalignError, match="every source as"):
        load_config(None, ["data.train=[a.jsonl, {path: b.jsonl, weight: 1}]"])
    cfg = load_config(None, ["data.train=[{path: a.jsonl, weight: 1e-1}]", "data.split=test"])
    assert list(cfg.data.train) == [{"path": "a.jsonl", "weight": 0.1}] and default_config().data.train == ""


def test_planned_epochs_of_a_packed_mixture_count_each_epochs_own_draw(mixture):
    """Each epoch packs another draw into its own number of rows: `train.epochs` plans the steps epoch by
    epoch, so training ends where the last planned epoch does."""
    it = BatchIterator(mixture, "sft", batch_size=2, max_length=12, seed=0)  # training: endless, drawn
    planned = it.steps_in_epochs(4)
    per_epoch = [0] * 5
    while it.epoch < 4 or it.step == 0:
        next(it)
        per_epoch[it.epoch] += 1
    assert planned == sum(per_epoch[:4]) and len(set(per_epoch[:4])) > 1, per_epoch
