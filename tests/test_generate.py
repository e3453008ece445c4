"""KV-cache decoding: cache logits equal full forwards, greedy ids equal transformers', sampling
filters, EOS and stop strings, sharded == single device, and `run_generate` / the CLI end to end."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxalign.checkpoint import model_io
from jaxalign.config import load_config
from jaxalign.data.examples import encode_prompt
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import JaxalignError
from jaxalign.eval import generate
from jaxalign.eval.generate import (
    SamplingParams,
    generate_ids,
    generate_text,
    run_generate,
    sample_tokens,
    truncate_at_stop,
)
from jaxalign.runtime.sharding import make_mesh, use_mesh

SMALL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2_tied": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),  # + qkv biases
    "mistral_window": lambda: transformers.MistralConfig(**SMALL, sliding_window=4),
}
PROMPT_LENGTHS = (5, 12, 1, 30)
NEW = 10
GREEDY = SamplingParams(NEW, eos_ids=())  # no EOS: every row runs NEW tokens


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            scale = 0.5 if "embed" in name else 0.15
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else scale * noise)


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh({"fsdp": -1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh({"fsdp": -1})


@pytest.fixture(scope="module")
def family(tmp_path_factory, mesh1):
    """name -> (HF torch model, our model on one device, HF dir), built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(FAMILIES[name](), attn_implementation="eager")
            _randomize(hf, seed=len(cache) + 1)
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            with use_mesh(mesh1):
                ours = model_io.load_model(path, mesh1)
            cache[name] = (hf.eval(), ours, path)
        return cache[name]

    return get


def _prompts(seed: int = 0) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    return [rs.randint(3, SMALL["vocab_size"], n).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(hf, prompt: list[int], eos: int | None) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)[0, len(prompt):].tolist()
    return out[:-1] if eos is not None and out and out[-1] == eos else out  # ours exclude the EOS


# --- the cache itself ---------------------------------------------------------------------------

@functools.partial(nnx.jit, static_argnames="max_len")
def _cached_logits(model, batch, chunks, max_len):
    """Prefill `batch`, then feed each chunk of `chunks` through the cache; logits of every fed token."""
    cache = model.init_cache(batch["tokens"].shape[0], max_len)
    hidden, cache = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], cache)
    out = [model.logits(hidden)]
    pos = batch["positions"][:, -1:] + 1
    for chunk in chunks:
        step_pos = pos + jnp.arange(chunk.shape[1])
        hidden, cache = model.hidden_states(chunk, step_pos, jnp.ones(chunk.shape, jnp.int32), cache)
        out.append(model.logits(hidden))
        pos = step_pos[:, -1:] + 1
    return jnp.concatenate(out, axis=1), cache.index


@pytest.mark.parametrize("name", ["llama", "qwen2_tied", "mistral_window"])
def test_cache_logits_equal_full_forward(name, family, mesh1):
    """Left-padded prefill, then a 3-token chunk, then single tokens: every step's logits equal a
    full-sequence forward without cache or left padding (window 4 < length: the window is exercised)."""
    _, model, path = family(name)
    if name == "llama":  # the unscanned layer loop carries the cache too
        with use_mesh(mesh1):
            model = model_io.load_model(path, mesh1, scan_layers=False)
    prompts = _prompts(1)[:3]
    cont = np.random.RandomState(2).randint(3, SMALL["vocab_size"], (len(prompts), 5)).astype(np.int32)
    length = max(map(len, prompts)) + 2  # extra left padding on every row
    batch = generate.left_pad(prompts, len(prompts), length, 0)
    chunks = (cont[:, :3], cont[:, 3:4], cont[:, 4:5])
    # The reference: each row's whole sequence from column 0, right-padded, one non-cache forward.
    full = np.zeros((len(prompts), length + cont.shape[1]), np.int32)
    segments = np.zeros_like(full)
    for i, p in enumerate(prompts):
        full[i, :len(p) + cont.shape[1]] = p + cont[i].tolist()
        segments[i, :len(p) + cont.shape[1]] = 1
    with use_mesh(mesh1):
        got, index = jax.device_get(_cached_logits(model, batch, chunks, length + cont.shape[1]))
        want = np.asarray(nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, full, segments))
    assert index == length + cont.shape[1]
    for i, p in enumerate(prompts):
        n = len(p) + cont.shape[1]
        np.testing.assert_allclose(got[i, length - len(p):], want[i, :n], atol=1e-4, rtol=1e-4)


# --- greedy parity with transformers -------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen2_tied"])
def test_greedy_equals_transformers(name, family, mesh1):
    hf, model, _ = family(name)
    prompts = _prompts()
    ours = generate_ids(model, prompts, GREEDY, mesh=mesh1)
    assert ours == [_hf_greedy(hf, p, None) for p in prompts]
    assert all(len(o) == NEW for o in ours)
    # An EOS that some rows emit mid-way (and others never): each row stops at its own first one.
    eos = ours[0][4]
    with_eos = generate_ids(model, prompts, SamplingParams(NEW, eos_ids=[eos]), mesh=mesh1)
    assert with_eos == [_hf_greedy(hf, p, eos) for p in prompts]
    assert with_eos == [o[:o.index(eos)] if eos in o else o for o in ours]
    assert len(with_eos[0]) < 5


def test_batched_left_padding_matches_transformers_batched(family, mesh1):
    """transformers' own left-padded batch (attention_mask) gives the same ids."""
    hf, model, _ = family("llama")
    prompts = _prompts()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, width:].tolist()
    assert generate_ids(model, prompts, GREEDY, mesh=mesh1) == want


# --- sampling --------------------------------------------------------------------------------------

def test_sampling_filters_on_known_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = np.log(np.tile(probs, (4000, 1)))
    keys = jax.random.split(jax.random.key(0), 4000)

    def draw(temperature=1.0, top_k=0, top_p=1.0):
        return np.asarray(sample_tokens(logits, keys, np.float32(temperature), np.float32(top_p), greedy=False,
                                        top_k=top_k, use_top_p=top_p < 1))

    plain = np.bincount(draw(), minlength=4) / 4000
    np.testing.assert_allclose(plain, probs, atol=0.03)
    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 < 0.7: the second token is needed to reach 0.7
    assert set(draw(top_p=0.85)) == {0, 1, 2}
    assert set(draw(top_p=1e-6)) == {0}
    cold = np.bincount(draw(temperature=0.2), minlength=4) / 4000  # p^5, renormalised
    np.testing.assert_allclose(cold, probs ** 5 / (probs ** 5).sum(), atol=0.03)
    greedy = sample_tokens(logits[:2], keys[:2], 1.0, 1.0, greedy=True, top_k=0, use_top_p=False)
    assert greedy.tolist() == [0, 0]


def test_sampling_seeded_and_degenerate_filters_equal_greedy(family, mesh1):
    _, model, _ = family("llama")
    prompts = _prompts()
    def sample(**kw):
        return generate_ids(model, prompts, dataclasses.replace(GREEDY, **kw), mesh=mesh1)

    greedy = sample()
    hot = sample(temperature=2.0, seed=3)
    assert hot == sample(temperature=2.0, seed=3)
    assert hot != sample(temperature=2.0, seed=4)
    assert hot != greedy
    assert all(len(r) == NEW and all(0 <= t < SMALL["vocab_size"] for t in r) for r in hot)
    assert sample(temperature=1.0, top_k=1, seed=5) == greedy
    assert sample(temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_finished_rows_emit_pad_and_loop_exits_early(family, mesh1):
    _, model, _ = family("llama")
    prompts = _prompts()
    greedy = generate_ids(model, prompts, GREEDY, mesh=mesh1)
    eos = sorted({r[2] for r in greedy})  # every row emits an EOS at step 2 at the latest
    rows = generate.generate(model, None, prompts, SamplingParams(NEW, eos_ids=eos), pad_id=7, mesh=mesh1)
    assert all(r.finish_reason == "stop" and r.completion is None and len(r.completion_ids) <= 2 for r in rows)
    batch = {k: np.asarray(v) for k, v in generate.left_pad(prompts, 4, 64, 7).items()}
    batch["row_ids"] = np.arange(4, dtype=np.int32)
    graphdef, state = nnx.split(model)
    with use_mesh(mesh1):
        out, steps = generate._decode(graphdef, state, batch, np.uint32(0), np.float32(1), np.float32(1),
                                      np.asarray(eos, np.int32), np.int32(7), max_new_tokens=NEW, greedy=True,
                                      top_k=0, use_top_p=False)
    out = np.asarray(out)
    assert int(steps) <= 3  # stopped once every row was done, not after NEW steps
    for row, r in zip(out, rows):
        ids, n = r.completion_ids, len(r.completion_ids)
        assert row[:n].tolist() == ids and row[n] in eos and (row[n + 1:] == 7).all()


def test_arguments_are_checked(family):
    _, model, _ = family("llama")
    for bad, message in ((dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
                         (dict(temperature=-1.0), r"temperature must be >= 0 \(0 is greedy\)"),
                         (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_k=-2), "top_k must be >= 0")):
        with pytest.raises(JaxalignError, match=message):
            SamplingParams(**{"max_new_tokens": 2, **bad})
        with pytest.raises(JaxalignError, match=message):  # a replaced value is checked again
            dataclasses.replace(SamplingParams(2), **bad)
    params = SamplingParams(2, eos_ids=[2])
    with pytest.raises(JaxalignError, match="empty"):
        generate_ids(model, [[5], []], params)
    with pytest.raises(JaxalignError, match="out of range"):
        generate_ids(model, [[5, 999]], params)
    with pytest.raises(JaxalignError, match="need a tokenizer"):
        generate_ids(model, [[5]], SamplingParams(2, stop=["x"]))


def test_sampling_params_from_config():
    params = SamplingParams.from_config(load_config(None))
    assert params == SamplingParams(128)  # the generate: section's defaults
    cfg = load_config(None, ["generate.temperature=0.7", "generate.top_k=50", "generate.stop=[a, b]"])
    params = SamplingParams.from_config(cfg, seed=3)
    assert params == SamplingParams(128, temperature=0.7, top_k=50, seed=3, stop=("a", "b"))
    assert isinstance(params.stop, tuple) and hash(params) == hash(SamplingParams(128, 0.7, 50, 1.0, 3, ["a", "b"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 4


# --- sharding --------------------------------------------------------------------------------------

def test_sharded_8_devices_equals_1_device(family, mesh1, mesh8):
    _, model1, path = family("qwen2_tied")
    with use_mesh(mesh8):
        model8 = model_io.load_model(path, mesh8)
    prompts = _prompts()
    want = generate_ids(model1, prompts, GREEDY, mesh=mesh1, batch_size=3)
    assert generate_ids(model8, prompts, GREEDY, mesh=mesh8, batch_size=3) == want
    sampled = dataclasses.replace(GREEDY, temperature=1.5, top_k=20, top_p=0.9, seed=1)
    assert (generate_ids(model8, prompts, sampled, mesh=mesh8, batch_size=3)
            == generate_ids(model1, prompts, sampled, mesh=mesh1, batch_size=3))


# --- text, files, CLI --------------------------------------------------------------------------------

def test_truncate_at_stop():
    assert truncate_at_stop("a b\n\nHuman: c", ["\n\nHuman:", "b"]) == ("a ", True)
    assert truncate_at_stop("abc", ["x", ""]) == ("abc", False)
    assert truncate_at_stop("abc", []) == ("abc", False)


@pytest.fixture(scope="module")
def sp_model_dir(tmp_path_factory, shared_data):
    """A tiny random Llama with the Llama 2 vocab, saved with its SentencePiece tokenizer."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**SMALL, "vocab_size": 32000}))
    _randomize(hf, seed=9)
    path = tmp_path_factory.mktemp("sp_model")
    hf.save_pretrained(path)
    (path / "tokenizer.model").write_bytes((shared_data / "llama2-tokenizer.model").read_bytes())
    return path


def _write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_run_generate_end_to_end_via_cli(sp_model_dir, mesh8, tmp_path, capsys):
    rows = [
        {"prompt": "Hello there, how are", "id": 1},
        {"prompt": [{"role": "user", "content": "What is two plus two?"}], "id": 2},
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]},
    ]
    data, out = _write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "sub" / "out.jsonl"
    parser = argparse.ArgumentParser(prog="jaxalign")
    commands: dict = {}
    generate.add_cli(parser.add_subparsers(dest="command"), commands)
    args = parser.parse_args(["generate", "--model", str(sp_model_dir), "--prompts", str(data), "--out", str(out),
                              "--batch-size", "2", "--max-new-tokens", "6"])
    assert commands["generate"](args) == 0
    assert "generated 3 completions" in capsys.readouterr().out
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: g[k] for k in r} for g, r in zip(got, rows)] == rows  # input fields kept, order kept

    # The same ids as generate_ids on the prompts tokenized as training does (the messages row
    # without its assistant turn: the plain template's "...\n\nAssistant:" generation prompt).
    tok = load_tokenizer(str(sp_model_dir))
    prompts = [rows[0]["prompt"], rows[1]["prompt"], rows[2]["messages"][:1]]
    ids = [encode_prompt(tok, p) for p in prompts]
    assert ids[0][0] == tok.bos_id and tok.decode(ids[2]).endswith("Name a colour.\n\nAssistant:")
    with use_mesh(mesh8):
        model = model_io.load_model(sp_model_dir, mesh8)
    want = generate_ids(model, ids, SamplingParams(6, eos_ids=[2]), pad_id=tok.pad_id, mesh=mesh8, batch_size=2)
    assert [g["completion_ids"] for g in got] == want
    assert [g["completion"] for g in got] == [tok.decode(w) for w in want]
    texts = generate_text(model, tok, prompts, SamplingParams(6), mesh=mesh8, batch_size=2)
    assert texts == [g["completion"] for g in got]
    assert all(g["finish_reason"] == ("stop" if len(g["completion_ids"]) < 6 else "length") for g in got)

    # Stop strings cut the decoded text (not the ids); an explicit .model tokenizer works the same.
    stop = got[0]["completion"][2:4]
    params = SamplingParams(6, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop=[stop])
    n = run_generate(str(sp_model_dir), str(data), str(out), params, batch_size=2,
                     tokenizer_path=str(sp_model_dir / "tokenizer.model"))
    cut = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == 3 and cut[0]["completion"] == got[0]["completion"][:got[0]["completion"].index(stop)]
    assert cut[0]["finish_reason"] == "stop" and cut[0]["completion_ids"] == got[0]["completion_ids"]


def test_run_generate_errors_name_the_row(sp_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(JaxalignError, match=rf"{data}:2: expected a 'prompt'"):
        run_generate(str(sp_model_dir), str(data), str(tmp_path / "o.jsonl"), SamplingParams(2), batch_size=1)
    data = _write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(JaxalignError, match=rf"{data}:1: messages\[0\].role"):
        run_generate(str(sp_model_dir), str(data), str(tmp_path / "o.jsonl"), SamplingParams(2), batch_size=1)


def test_cli_help(capsys):
    parser = argparse.ArgumentParser(prog="jaxalign")
    generate.add_cli(parser.add_subparsers(dest="command"), {})
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--prompts", "--out", "--batch-size", "--max-new-tokens", "--temperature", "--top-k",
                 "--top-p", "--stop", "--seed", "--tokenizer", "--chat-template"):
        assert flag in out
