"""The token store: the examples of the per-row rules, exactly, however they were written; batches,
resume and warm starts from it; a killed writer leaves no store behind."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest

from jaxalign.config import default_config
from jaxalign.data import (
    load_rows,
    normalize_preference_row,
    normalize_sft_row,
    preference_to_sft,
    resolve_format,
    tokenize as tokenize_module,
)
from jaxalign.data.examples import Dropped, TokenizeSettings, tokenize_preference_example, tokenize_sft_example
from jaxalign.data.formats import BadRow
from jaxalign.data.iterator import BatchIterator
from jaxalign.data.pipeline import load_examples
from jaxalign.data.store import PAIR_COLUMNS, StoreWriter, TokenStore
from jaxalign.data.tokenize import tokenize_dataset
from jaxalign.data.tokenizer import char_spans_to_token_mask, load_tokenizer
from jaxalign.errors import JaxalignError

HH = "hh-rlhf-harmless-base-test.jsonl.gz"
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(shared_data):
    return str(shared_data / "llama2-tokenizer.model")


def data_cfg(**kw):
    data = default_config().data
    data.update({"max_length": 512, "max_prompt_length": 256, "on_bad_row": "skip", **kw})
    return data


def per_row(ds, tok, data, stage):
    """The oracle: each row through normalize + tokenize_*_example alone, kept rows in order."""
    settings = TokenizeSettings.from_config(data)
    fmt = resolve_format(ds.column_names, data["format"], stage, data["sft_from_preference"])
    out = []
    for row in ds:
        try:
            if fmt == "preference":
                pref = normalize_preference_row(row)
                out.append(tokenize_preference_example(pref, tok, settings)[0] if stage == "dpo" else
                           tokenize_sft_example(preference_to_sft(pref), tok, settings)[0])
            else:
                out.append(tokenize_sft_example(normalize_sft_row(row, fmt), tok, settings)[0])
        except (BadRow, Dropped):
            continue
    return out


def conversations(n, seed=0):
    """Multi-turn rows with a system message, some with non-ASCII text (the offsets' slow path)."""
    rng = np.random.default_rng(seed)
    words = "the model reads each token and writes héllo 日本語 naïve café 🤖 answers quickly".split()
    text = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(5)}]
        for _ in range(int(rng.integers(1, 4))):
            messages += [{"role": "user", "content": text(8)}, {"role": "assistant", "content": text(12)}]
        rows.append({"messages": messages})
    return rows


# ----------------------------------------------------------------------------- exactly the examples


def test_the_store_holds_the_per_row_examples_whoever_wrote_them(shared_data, model_file, tmp_path, monkeypatch):
    """HH transcripts (SFT from the chosen side, and pairs) and multi-turn conversations: the store's
    examples equal the per-row rules' outputs; two worker processes write the same store as one."""
    plain, llama2 = load_tokenizer(model_file, "plain"), load_tokenizer(model_file, "llama2")
    hh = load_rows(str(shared_data / HH), cache_dir=str(tmp_path / "hf")).select(range(300))
    chats = datasets.Dataset.from_list(conversations(300))
    monkeypatch.setattr(tokenize_module, "ROWS_PER_WORKER", 150)  # so small data is worth two workers
    cases = [(hh, plain, data_cfg(sft_from_preference=True), "sft", (1,)), (hh, plain, data_cfg(), "dpo", (1,)),
             (chats, llama2, data_cfg(max_length=96), "sft", (1, 2))]
    for k, (ds, tok, data, stage, worker_counts) in enumerate(cases):
        expected = per_row(ds, tok, data, stage)
        stores = []
        for workers in worker_counts:
            data["num_workers"] = workers
            store, stats = tokenize_dataset(ds, tok, data, stage, cache_dir=str(tmp_path / f"cache-{k}-{workers}"))
            assert stats.rows_out == len(store) == len(expected) and not stats.from_cache
            assert [store[i] for i in range(len(store))] == expected, (stage, workers)
            stores.append(store)
        assert len({s.content_hash for s in stores}) == 1
        np.testing.assert_array_equal(stores[0].lengths(),
                                      [[len(e["prompt_ids"]) + len(e[s]) for s in ("chosen_ids", "rejected_ids")]
                                       for e in expected] if stage == "dpo" else [len(e["input_ids"]) for e in expected])
        if stage == "sft":
            np.testing.assert_array_equal(stores[0].trained_targets(), [sum(e["loss_mask"][1:]) for e in expected])
    assert stats.truncated_completion > 0  # max_length=96 cut some conversations


def test_a_tokenizing_worker_imports_neither_datasets_nor_jax(model_file, tmp_path):
    """What a worker process loads (the rules and their tokenizer, as the pool sends them) keeps its
    start-up short: `datasets` and JAX each take seconds to import, and the pool's workers start one
    after another."""
    import multiprocessing

    from jaxalign.data.row_rules import RowRules

    rules = RowRules(load_tokenizer(model_file, "llama2"), TokenizeSettings(), "sft", "messages", "error", "x", False)
    code = ("import sys; from jaxalign.data.row_rules import init_worker, run_chunk; "
            "from multiprocessing.reduction import ForkingPickler; "
            "init_worker(ForkingPickler.loads(sys.stdin.buffer.read())); "
            "columns, stats = run_chunk((0, {'messages': [[{'role': 'user', 'content': 'Hi'}, "
            "{'role': 'assistant', 'content': 'Hello there'}]]})); "
            "print(stats.rows_out, sorted(m for m in ('datasets', 'jax', 'pandas') if m in sys.modules))")
    sent = bytes(multiprocessing.reduction.ForkingPickler.dumps(rules))
    out = subprocess.run([sys.executable, "-c", code], input=sent, capture_output=True, check=True, cwd=ROOT)
    assert out.stdout.decode().split() == ["1", "[]"], out.stdout + out.stderr


def test_vectorized_span_mask_is_the_overlap_rule():
    rng = np.random.default_rng(0)
    for _ in range(200):
        starts = np.sort(rng.integers(0, 60, 30))
        offsets = [(int(s), int(s + rng.integers(0, 4))) for s in starts]
        spans = sorted((int(a), int(a + rng.integers(1, 10))) for a in rng.integers(0, 60, 3))
        expected = [any(a <= s < b for a, b in spans) if s == e else any(s < b and a < e for a, b in spans)
                    for s, e in offsets]
        assert char_spans_to_token_mask(offsets, spans) == expected


def test_writer_checks_chunks_and_the_hash_ignores_chunking(tmp_path):
    rng = np.random.default_rng(1)
    pairs = [{c: rng.integers(3, 50, int(rng.integers(1, 9))).tolist() for c in PAIR_COLUMNS} for _ in range(40)]
    margins = rng.normal(size=40).astype(np.float32)
    hashes = []
    for chunk in (7, 40):
        with StoreWriter(str(tmp_path / f"s{chunk}"), PAIR_COLUMNS, ["margin"]) as w:
            for s in range(0, 40, chunk):
                part = pairs[s:s + chunk]
                w.add({c: (np.concatenate([p[c] for p in part]), [len(p[c]) for p in part]) for c in PAIR_COLUMNS}
                      | {"margin": margins[s:s + chunk]})
            store = w.finish({})
        assert [{k: v for k, v in store[i].items() if k != "margin"} for i in range(40)] == pairs
        assert store[-1]["margin"] == pytest.approx(float(margins[-1]))
        hashes.append(store.content_hash)
    assert hashes[0] == hashes[1]
    with StoreWriter(str(tmp_path / "bad"), PAIR_COLUMNS) as w, pytest.raises(JaxalignError, match="prompt_ids has 3"):
        w.add({c: ([1, 2, 3], [2]) for c in PAIR_COLUMNS})
    assert not any(p.name.startswith("bad") for p in tmp_path.iterdir())  # a failed writer leaves nothing
    with pytest.raises(JaxalignError, match="not a finished token store"):
        TokenStore(str(tmp_path))


# ----------------------------------------------------------------------------- batches, resume, warm start


@pytest.fixture(scope="module")
def hh_sft_store(shared_data, model_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    ds = load_rows(str(shared_data / HH), cache_dir=str(tmp / "hf"))
    return tokenize_dataset(ds, load_tokenizer(model_file, "plain"), data_cfg(sft_from_preference=True), "sft",
                            cache_dir=str(tmp / "cache"))[0]


@pytest.mark.parametrize("packing", [True, False])
def test_batches_and_resume_from_the_store_equal_those_from_lists(hh_sft_store, packing):
    options = {"stage": "sft", "batch_size": 8, "max_length": 512, "packing": packing, "seed": 5}
    from_lists = BatchIterator(list(hh_sft_store), **options)
    from_store = BatchIterator(hh_sft_store, **options)
    assert from_lists.steps_per_epoch == from_store.steps_per_epoch
    steps = from_store.steps_per_epoch
    for step in range(steps + 3):  # into the second epoch
        a, b = next(from_lists), next(from_store)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), step
    # Resume mid-epoch from a reopened store: the batches an uninterrupted iterator gives next.
    it = BatchIterator(hh_sft_store, **options)
    for _ in range(steps // 2):
        next(it)
    resumed = BatchIterator(TokenStore(hh_sft_store.path), **options)
    resumed.restore(json.loads(json.dumps(it.state())))
    for _ in range(3):
        a, b = next(it), next(resumed)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_warm_store_opens_without_reading_the_rows(shared_data, model_file, tmp_path, monkeypatch):
    cfg = default_config()
    cfg.data.update({"train": str(shared_data / HH), "eval_fraction": 0.1, "sft_from_preference": True,
                     "on_bad_row": "skip", "cache_dir": str(tmp_path / "cache")})
    tok = load_tokenizer(model_file, "plain")
    train, held_out, stats = load_examples(cfg, tok, stage="sft")
    assert not stats["train"].from_cache and len(train) + len(held_out) == stats["train"].rows_out + stats["eval"].rows_out

    def no_reading(*_a, **_k):
        raise AssertionError("rows were read although the store holds them")

    monkeypatch.setattr("jaxalign.data.pipeline.load_rows", no_reading)
    train2, held_out2, stats2 = load_examples(cfg, tok, stage="sft")
    assert stats2["train"].from_cache and stats2["eval"].from_cache
    assert (train2.content_hash, held_out2.content_hash) == (train.content_hash, held_out.content_hash)
    assert stats2["train"].to_dict() | {"from_cache": False} == stats["train"].to_dict()
    cfg.train.seed = 1  # another held-out split: not the stored one
    with pytest.raises(AssertionError, match="rows were read"):
        load_examples(cfg, tok, stage="sft")


# ----------------------------------------------------------------------------- a killed writer


KILLED = """
import sys
from jaxalign.config import default_config
from jaxalign.data import load_rows
from jaxalign.data.tokenize import tokenize_dataset
from jaxalign.data.tokenizer import load_tokenizer
data = default_config().data
data.update({"sft_from_preference": True, "on_bad_row": "skip", "num_workers": 1})
tokenize_dataset(load_rows(sys.argv[1], max_rows=600, cache_dir=sys.argv[3] + "/hf"), load_tokenizer(sys.argv[2], "plain"), data,
                 "sft", cache_dir=sys.argv[3])
"""


def test_kill_minus_9_while_writing_leaves_no_store_and_the_next_writer_cleans_up(shared_data, model_file, tmp_path):
    cache = tmp_path / "cache"
    argv = [sys.executable, "-c", KILLED, str(shared_data / HH), model_file, str(cache)]
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial = list((cache / "tokenized").glob("*.tmp-*/input_ids.bin")) if (cache / "tokenized").is_dir() else []
        if partial and partial[0].stat().st_size > 0:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the writer finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in (cache / "tokenized").iterdir())
    assert len(left) == 1 and ".tmp-" in left[0]  # a partial dir, never a store
    assert subprocess.run(argv, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}).returncode == 0
    stores = sorted(p.name for p in (cache / "tokenized").iterdir())
    assert len(stores) == 1 and ".tmp-" not in stores[0]  # the dead writer's dir was removed
    store = TokenStore(str(cache / "tokenized" / stores[0]))
    data = data_cfg(sft_from_preference=True, max_length=1024, max_prompt_length=512)
    ds = load_rows(str(shared_data / HH), max_rows=600, cache_dir=str(tmp_path / "hf2"))
    assert list(store) == per_row(ds, load_tokenizer(model_file, "plain"), data, "sft")


def test_sentencepiece_offsets_from_piece_lengths_equal_sentencepiece_own(model_file):
    """The ASCII fast path (offsets summed from piece lengths) against the offsets sentencepiece reports."""
    import random

    tok = load_tokenizer(model_file, "llama2")
    rng, alphabet = random.Random(0), "ab cd  efg\n\t.,!?XYZ0123 \x01~[]<>/_"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        ids, offsets = tok._encode_segment_with_offsets(text)
        proto = tok.sp.encode_as_proto(text)
        assert (ids, offsets.tolist()) == ([p.id for p in proto.pieces], [[p.begin, p.end] for p in proto.pieces]), \
            repr(text)
