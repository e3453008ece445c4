"""LoRA against PEFT: logits with non-zero adapters, merging, the adapter directory both ways, sharding.

The oracle is `peft` on `transformers` (CPU, fp32): its adapters (random A and B, PEFT's
`init_lora_weights=False`) are read into jaxalign's stacked layout and the logits compared.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from jaxalign.checkpoint import model_io
from jaxalign.errors import JaxalignError
from jaxalign.models import lora, peft as peft_io
from jaxalign.runtime.sharding import make_mesh, named_sharding, use_mesh

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
FAMILIES = {"llama": lambda: transformers.LlamaConfig(**SMALL),
            "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 12))


def _hf_model(name: str, path: pathlib.Path) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[name]())
    with torch.no_grad():  # non-trivial norms and biases (HF's 1 and 0 would hide layout bugs)
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


def _peft(base, targets=ALL, r=4, alpha=8.0, rslora=False) -> peft.PeftModel:
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                             init_lora_weights=False)  # random A and B: the adapters change the logits
    torch.manual_seed(1)
    return peft.get_peft_model(base, config).eval()


def _peft_tensors(model: peft.PeftModel) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh({"fsdp": 1}, jax.devices()[:1])


@pytest.mark.parametrize("family,targets,rslora", [("llama", ALL, False),
                                                   ("qwen2", ["q_proj", "v_proj", "down_proj"], True)])
def test_logits_with_adapters_equal_peft(tmp_path, mesh1, family, targets, rslora):
    base = _hf_model(family, tmp_path / "base")
    model = _peft(base, targets, rslora=rslora)
    want = _logits(model)
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=lora.resolve_targets(targets), rslora=rslora)
    with use_mesh(mesh1):
        ours = model_io.load_model(tmp_path / "base", mesh1)
        adapters = peft_io.from_peft_tensors(_peft_tensors(model), ours.cfg, spec)
        got = np.asarray(lora.Adapted(ours, jax.tree.map(jnp.asarray, adapters), spec)(jnp.asarray(TOKENS)))
        plain = np.asarray(ours(jnp.asarray(TOKENS)))
    assert np.abs(want - plain).max() > 1e-2, "the adapters must change the logits for the test to mean anything"
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_merge_equals_peft_merge_and_unload(tmp_path, mesh1):
    base = _hf_model("llama", tmp_path / "base")
    model = _peft(base)
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=lora.resolve_targets(["all-linear"]))
    with use_mesh(mesh1):
        ours = model_io.load_model(tmp_path / "base", mesh1)
        adapters = peft_io.from_peft_tensors(_peft_tensors(model), ours.cfg, spec)
        graphdef, state = nnx.split(ours)
        merged = lora.merge(nnx.to_pure_dict(state), jax.tree.map(jnp.asarray, adapters), spec.scale)
        nnx.replace_by_pure_dict(state, merged)
        got = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(TOKENS)))
    hf_merged = model.merge_and_unload()
    np.testing.assert_allclose(got, _logits(hf_merged), atol=1e-4, rtol=1e-4)
    q0 = hf_merged.model.layers[0].self_attn.q_proj.weight.detach().numpy()  # [out, in]
    np.testing.assert_allclose(np.asarray(merged["layers"]["wq"][0]).reshape(64, -1).T, q0, atol=1e-6)


def test_adapter_dir_round_trips_through_peft(tmp_path, mesh1):
    """Adapters written as a PEFT directory load in `peft.PeftModel.from_pretrained` with our logits, and
    read back unchanged."""
    _hf_model("qwen2", tmp_path / "base")
    spec = lora.LoraSpec(rank=4, alpha=16.0, targets=lora.resolve_targets(["q", "k", "v", "o", "down"]))
    with use_mesh(mesh1):
        ours = model_io.load_model(tmp_path / "base", mesh1)
        adapters = lora.init_adapters(ours.cfg, spec, jax.random.key(3))
        adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), adapters)
        got = np.asarray(lora.Adapted(ours, adapters, spec)(jnp.asarray(TOKENS)))
    peft_io.write_peft_dir(tmp_path / "adapter", jax.device_get(adapters), ours.cfg, spec, str(tmp_path / "base"))
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    np.testing.assert_allclose(_logits(loaded), got, atol=1e-4, rtol=1e-4)
    spec2, back, base_path = peft_io.read_peft_dir(tmp_path / "adapter", ours.cfg)
    assert spec2 == spec and base_path == str(tmp_path / "base")
    for name in adapters:
        for k in ("a", "b"):
            np.testing.assert_array_equal(back[name][k], np.asarray(adapters[name][k]))


def test_fresh_adapters_leave_the_model_unchanged(tmp_path, mesh1):
    _hf_model("llama", tmp_path / "base")
    spec = lora.LoraSpec(rank=8, alpha=16.0, targets=lora.resolve_targets(["all-linear"]), init="gaussian")
    with use_mesh(mesh1):
        ours = model_io.load_model(tmp_path / "base", mesh1)
        adapters = lora.init_adapters(ours.cfg, spec, jax.random.key(0))
        assert all(float(jnp.abs(ab["a"]).max()) > 0 and float(jnp.abs(ab["b"]).max()) == 0 for ab in adapters.values())
        np.testing.assert_array_equal(np.asarray(lora.Adapted(ours, adapters, spec)(jnp.asarray(TOKENS))),
                                      np.asarray(ours(jnp.asarray(TOKENS))))


def test_kaiming_init_matches_peft_bounds(tmp_path, mesh1):
    """PEFT's default A: kaiming_uniform_(a=sqrt(5)) on [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    base = _hf_model("llama", tmp_path / "base")
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj"], lora_dropout=0.0)
    peft_a = peft.get_peft_model(base, config).base_model.model.model.layers[0].self_attn.o_proj.lora_A["default"]
    spec = lora.LoraSpec(rank=8, alpha=16.0, targets=("wo",))
    with use_mesh(mesh1):
        ours = model_io.load_model(tmp_path / "base", mesh1)
        a = np.asarray(lora.init_adapters(ours.cfg, spec, jax.random.key(0))["wo"]["a"])
    bound = 1 / np.sqrt(64)  # o_proj's in_features: heads * head_dim
    assert np.abs(peft_a.weight.detach().numpy()).max() <= bound and np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.9 * bound and abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound


def test_sharded_adapters_equal_one_device(tmp_path, mesh1):
    """fsdp=4 x tensor=2: adapters placed by the rules table (A as its weight's input, B as its output)
    give the one-device logits."""
    _hf_model("llama", tmp_path / "base")
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=lora.resolve_targets(["all-linear"]))
    mesh8 = make_mesh({"fsdp": 4, "tensor": 2})
    results = []
    for mesh in (mesh1, mesh8):
        with use_mesh(mesh):
            ours = model_io.load_model(tmp_path / "base", mesh)
            adapters = lora.init_adapters(ours.cfg, spec, jax.random.key(3))
            adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), adapters)
            axes = lora.adapter_axes(ours.cfg, spec)
            placed = jax.tree.map(lambda x, names: jax.device_put(x, named_sharding(names, x.shape, mesh)), adapters,
                                  axes, is_leaf=lambda n: isinstance(n, tuple))
            if mesh is mesh8:
                assert placed["wq"]["b"].sharding.spec[2] == "tensor"  # B [L, r, heads, head_dim]: heads on tensor
                assert placed["wq"]["a"].sharding.spec[1] == "fsdp"  # A [L, embed, r]: embed on fsdp
            results.append(np.asarray(lora.Adapted(ours, placed, spec)(jnp.asarray(TOKENS))))
    np.testing.assert_allclose(results[1], results[0], atol=1e-5, rtol=1e-5)


def test_targets_are_checked_by_name():
    assert lora.resolve_targets(["all-linear"]) == ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    assert lora.resolve_targets(["v_proj", "q"]) == ("wq", "wv")
    with pytest.raises(JaxalignError, match="unknown target 'q_prj'.*did you mean 'q_proj'"):
        lora.resolve_targets(["q_prj"])
    with pytest.raises(JaxalignError, match="empty"):
        lora.resolve_targets([])


def test_dropout_is_inverted_dropout_drawn_from_the_key(tmp_path, mesh1):
    """PEFT's lora_dropout: each kept input scaled by 1/(1-p); the masks come from the key alone (a resumed
    step draws the same ones), and without a key (evaluation) there is none."""
    x = jnp.ones((4000,))
    y = np.asarray(lora.dropped(x, 0.25, jax.random.key(0)))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((y == 0).mean() - 0.25) < 0.03
    np.testing.assert_array_equal(lora.dropped(x, 0.25, None), x)
    _hf_model("llama", tmp_path / "base")
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=lora.resolve_targets(["all-linear"]), dropout=0.3)
    with use_mesh(mesh1):
        ours = model_io.load_model(tmp_path / "base", mesh1)
        adapters = jax.tree.map(lambda a: a + 0.05, lora.init_adapters(ours.cfg, spec, jax.random.key(3)))
        run = lambda key: np.asarray(lora.Adapted(ours, adapters, spec, key)(jnp.asarray(TOKENS)))  # noqa: E731
        np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
        assert np.abs(run(jax.random.key(1)) - run(jax.random.key(2))).max() > 1e-3
        assert np.abs(run(jax.random.key(1)) - run(None)).max() > 1e-3
