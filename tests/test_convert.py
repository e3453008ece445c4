"""HF <-> jaxalign conversion: logits parity with transformers, bit-exact round trips, resharding, errors."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from jaxalign.checkpoint import model_io
from jaxalign.errors import JaxalignError
from jaxalign.export.hf import save_hf
from jaxalign.models import hf as convert
from jaxalign.models.params import PARAMS, param_shapes, params_of
from jaxalign.runtime.sharding import make_mesh, use_mesh

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (HF config, dtype the checkpoint is saved in)
FAMILIES = {
    "llama3_tied": (lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
                    torch.float32),
    "llama_bias": (lambda: transformers.LlamaConfig(**SMALL, attention_bias=True), torch.float32),
    "mistral_window": (lambda: transformers.MistralConfig(**SMALL, sliding_window=4), torch.float32),
    "qwen2_tied": (lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True), torch.float32),
    "llama_bias_bf16": (lambda: transformers.LlamaConfig(**SMALL, attention_bias=True), torch.bfloat16),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial norms and biases too (HF initialises them to 1 and 0, which would hide layout bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """name -> directory of a tiny random HF model, built on first use and shared by the module."""
    cache: dict[str, pathlib.Path] = {}

    def get(name: str) -> pathlib.Path:
        if name not in cache:
            make_config, dtype = FAMILIES[name]
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(make_config())
            _randomize(model, seed=len(cache) + 1)
            path = tmp_path_factory.mktemp(name)
            model.to(dtype).save_pretrained(path)
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh({"fsdp": -1})


@pytest.fixture(scope="module")
def mesh4x2():
    return make_mesh({"fsdp": 4, "tensor": 2})


def _tokens(batch=2, length=10, seed=0):
    return np.random.RandomState(seed).randint(0, SMALL["vocab_size"], (batch, length)).astype(np.int32)


@nnx.jit
def _logits(model, tokens, segment_ids):
    return model(tokens, segment_ids=segment_ids)


def _our_logits(model, mesh, tokens, segment_ids=None):
    segment_ids = np.ones_like(tokens) if segment_ids is None else segment_ids
    with use_mesh(mesh):
        return np.asarray(_logits(model, tokens, segment_ids))


def _hf_logits(path, tokens, attention_mask=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=mask).logits.numpy()


def _hf_tensors(path) -> dict[str, np.ndarray]:
    return dict(convert.iter_hf_tensors(path))


def _params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# --- parity with transformers -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama3_tied", "llama_bias", "mistral_window", "qwen2_tied"])
def test_logits_match_transformers(family, hf_dir, mesh4x2):
    path = hf_dir(family)
    model = model_io.load_model(path, mesh4x2)
    tokens = _tokens(length=10)  # longer than mistral's sliding window of 4
    np.testing.assert_allclose(_our_logits(model, mesh4x2, tokens), _hf_logits(path, tokens), atol=1e-4, rtol=0)

    # Right-padded batch: our segment id 0 marks padding, HF's attention_mask 0 does.
    lengths = np.array([10, 6])
    valid = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    ours = _our_logits(model, mesh4x2, tokens, segment_ids=valid)
    ref = _hf_logits(path, tokens, attention_mask=valid)
    np.testing.assert_allclose(ours[valid == 1], ref[valid == 1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama3_tied", "mistral_window"])
def test_long_sequences_match_transformers(family, hf_dir, mesh4x2):
    """256 positions: the xla attention path splits causal self-attention into query blocks that skip
    the masked keys (models/attention.py); blocks, sliding window and rope must still give HF's logits."""
    path = hf_dir(family)
    model = model_io.load_model(path, mesh4x2)
    tokens = _tokens(length=SMALL["max_position_embeddings"], seed=1)
    np.testing.assert_allclose(_our_logits(model, mesh4x2, tokens), _hf_logits(path, tokens), atol=1e-4, rtol=0)


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama3_tied", "llama_bias_bf16"])
def test_hf_to_jaxalign_to_hf_is_bit_exact(family, hf_dir, mesh8, tmp_path):
    src = hf_dir(family)
    model = model_io.load_model(src, mesh8)
    ckpt = model_io.save_model_checkpoint(model, tmp_path / "ckpt", source_dtype=model_io.source_dtype(src))
    assert model_io.detect_model_format(ckpt) == "jaxalign"
    assert model_io.load_model_config(ckpt) == model_io.load_model_config(src)

    restored = model_io.load_model(ckpt, mesh8)
    out = tmp_path / "hf"
    save_hf(restored, restored.cfg, out, dtype=model_io.source_dtype(ckpt))

    want, got = _hf_tensors(src), _hf_tensors(out)
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert np.array_equal(got[name], array), name
    assert model_io.load_model_config(out) == model_io.load_model_config(src)
    assert json.loads((out / "config.json").read_text())["dtype"] == model_io.source_dtype(src)

    tokens = _tokens(seed=1)
    np.testing.assert_array_equal(_hf_logits(out, tokens), _hf_logits(src, tokens))


def test_sharded_safetensors_read_back(hf_dir, mesh8, tmp_path):
    src = hf_dir("llama_bias")
    model = model_io.load_model(src, mesh8)
    out = tmp_path / "sharded"
    written = save_hf(model, model.cfg, out, max_shard_bytes=40_000)

    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / convert.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert set(written) >= set(shards)
    assert sorted(index["weight_map"]) == sorted(_hf_tensors(src))

    reloaded = model_io.load_model(out, mesh8)
    jax.tree.map(np.testing.assert_array_equal, _params(reloaded), _params(model))


def test_checkpoint_restores_onto_another_mesh(hf_dir, mesh8, mesh4x2, tmp_path):
    src = hf_dir("llama_bias")
    model = model_io.load_model(src, mesh8)
    ckpt = model_io.save_model_checkpoint(model, tmp_path / "ckpt")

    moved = model_io.load_model(ckpt, mesh4x2)
    assert moved.layers["wq"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    jax.tree.map(np.testing.assert_array_equal, _params(moved), _params(model))
    tokens = _tokens(seed=2)
    np.testing.assert_allclose(_our_logits(moved, mesh4x2, tokens), _our_logits(model, mesh8, tokens),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama3_tied", "llama_bias", "qwen2_tied"])
def test_table_covers_every_model_param(family, hf_dir, mesh8):
    from jaxalign.models import abstract_model

    cfg = model_io.load_model_config(hf_dir(family))
    _, abstract, _ = abstract_model(cfg, mesh8)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))[0]
    ours = {tuple(k.key for k in path): leaf.shape for path, leaf in flat}
    assert param_shapes(cfg) == ours
    assert sorted(e.path for e in params_of(cfg)) == sorted(ours)


# per-layer shapes: wq [E, H, D] and bk [KV, D] merge their out axes, wo [H, D, E] its in axes
@pytest.mark.parametrize("param,shape", [("wq", (8, 4, 6)), ("bk", (2, 6)), ("wo", (4, 6, 8)), ("lm_head", (8, 10))])
def test_block_reads_match_full_reads(param, shape):
    """A device's block read from the file equals the same block of the whole tensor, any slicing."""
    entry = next(p for p in PARAMS if p.name == param)
    full = np.arange(np.prod(shape), dtype=np.float32).reshape(entry.hf_shape(shape))

    class Reader:
        def read(self, name, index):
            return full[index]

    rng = np.random.RandomState(len(param))
    for _ in range(20):
        index = []
        for n in shape:
            a = rng.randint(0, n)
            index.append(slice(a, rng.randint(a + 1, n + 1)))
        got = convert._read_param_block(Reader(), entry, "t", shape, tuple(index))
        np.testing.assert_array_equal(got, entry.from_hf(full, shape)[tuple(index)])
        np.testing.assert_array_equal(entry.to_hf(entry.from_hf(full, shape)), full)


def test_param_dtype_casts_on_load(hf_dir, mesh8):
    model = model_io.load_model(hf_dir("llama_bias"), mesh8, param_dtype="bfloat16")
    assert model.layers["wq"].get_value().dtype == jax.numpy.bfloat16
    assert model_io.source_dtype(hf_dir("llama_bias_bf16")) == "bfloat16"


# --- errors -----------------------------------------------------------------------------------

def _copy_with_tensors(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    shutil.copytree(src, dst)
    tensors = _hf_tensors(src)
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_error_missing_dir(tmp_path, mesh8):
    with pytest.raises(JaxalignError, match="does not exist"):
        model_io.load_model(tmp_path / "nope", mesh8)


def test_error_neither_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(JaxalignError, match=r"neither a Hugging Face.*jaxalign_model\.json.*notes\.txt"):
        model_io.detect_model_format(tmp_path)


def test_error_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(JaxalignError, match="'gpt2' is not supported.*llama, mistral, qwen2"):
        model_io.load_model_config(tmp_path)


def test_error_no_safetensors(hf_dir, tmp_path, mesh8):
    shutil.copy(hf_dir("llama_bias") / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(JaxalignError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        model_io.load_model(tmp_path, mesh8)


def test_error_tensor_problems_are_named(hf_dir, tmp_path, mesh8):
    src = hf_dir("llama_bias")
    name = "model.layers.1.mlp.up_proj.weight"

    def reshape(t):
        t[name] = np.zeros((100, 64), np.float32)

    with pytest.raises(JaxalignError, match=rf"{name} has shape \[100, 64\], expected \[128, 64\]"):
        model_io.load_model(_copy_with_tensors(src, tmp_path / "shape", reshape), mesh8)
    with pytest.raises(JaxalignError, match=rf"tensor {name} missing"):
        model_io.load_model(_copy_with_tensors(src, tmp_path / "missing", lambda t: t.pop(name)), mesh8)

    def extra(t):
        t["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)

    with pytest.raises(JaxalignError, match=r"unexpected tensors model\.layers\.0\.mlp\.extra\.weight"):
        model_io.load_model(_copy_with_tensors(src, tmp_path / "extra", extra), mesh8)


def test_tool_error_exits_2_without_traceback(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_tool", REPO / "tools" / "convert_jaxalign_to_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


# --- the tools, end to end --------------------------------------------------------------------

def _save_tiny_tokenizer(directory: pathlib.Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(directory)


def test_tools_end_to_end(hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir("llama_bias_bf16"), src)
    _save_tiny_tokenizer(src)
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    env = dict(os.environ)
    run = lambda *args: subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                                       text=True, timeout=300)

    to_ckpt = run("tools/convert_hf_to_jaxalign.py", "--hf-dir", src, "--out", ckpt)
    assert to_ckpt.returncode == 0, to_ckpt.stderr
    assert "wrote" in to_ckpt.stdout and (ckpt / "tokenizer" / "tokenizer.json").is_file()
    to_hf = run("tools/convert_jaxalign_to_hf.py", "--ckpt", ckpt, "--out", out)
    assert to_hf.returncode == 0, to_hf.stderr
    assert "model.safetensors" in to_hf.stdout

    want, got = _hf_tensors(src), _hf_tensors(out)
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w1 w2")["input_ids"][-2:] == [4, 5]
