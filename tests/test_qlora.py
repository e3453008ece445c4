"""QLoRA's quantised base against bitsandbytes: the NF4 table, block scales and codes, dequantised
weights, and the logits of a quantised model with adapters against transformers + peft on the weights
bitsandbytes dequantises (CPU, fp32)."""

from __future__ import annotations

import bitsandbytes.functional as bnb
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_lora import ALL, TOKENS, _hf_model, _logits, _peft, _peft_tensors

from jaxalign.checkpoint import model_io
from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, lora, peft as peft_io, quant
from jaxalign.models.params import BY_NAME
from jaxalign.runtime.sharding import make_mesh, use_mesh

CFG = ModelConfig(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def _weight(name: str, seed: int = 0) -> np.ndarray:
    """A stacked [L, ...] weight with a few outliers (absmax must be per block, not per tensor)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(BY_NAME[name].full_shape(CFG)).astype(np.float32) * 0.02
    w.reshape(-1)[rng.integers(0, w.size, 16)] *= 40
    return w


def _bnb_nf4(w_layer: np.ndarray, p, block: int):
    """bitsandbytes on the torch layout [out, in]: (codes [out, in], absmax [out, in/block], dequantised)."""
    t = torch.from_numpy(p.to_hf(w_layer))
    packed, state = bnb.quantize_4bit(t, blocksize=block, quant_type="nf4", compress_statistics=False)
    flat = packed.numpy().reshape(-1)
    codes = np.stack([flat >> 4, flat & 15], -1).reshape(t.shape)  # two codes a byte, high nibble first
    return codes, state.absmax.numpy().reshape(t.shape[0], -1), bnb.dequantize_4bit(packed, state).numpy()


def test_nf4_levels_are_qloras():
    """The 16 levels codes 0..15 stand for are bitsandbytes' NF4 table (the paper's Appendix E)."""
    packed = (jnp.arange(0, 16, 2, dtype=jnp.uint8) << 4 | jnp.arange(1, 16, 2, dtype=jnp.uint8)).reshape(1, 8, 1)
    levels = quant.Quantized(packed, jnp.ones((1, 1, 1)), "nf4", (16, 1)).dense(jnp.float32)
    np.testing.assert_array_equal(np.asarray(levels).reshape(-1), bnb.get_4bit_type("nf4", device="cpu").numpy())


@pytest.mark.parametrize("name,block", [("wq", 64), ("wo", 64), ("w_down", 64), ("w_up", 32)])
def test_nf4_codes_and_block_scales_equal_bitsandbytes(name, block):
    p, w = BY_NAME[name], _weight(name)
    q = quant.quantize_weight(jnp.asarray(w), p, CFG, quant.QuantSpec("nf4", block))
    dense = np.asarray(q.dense(jnp.float32))
    for layer in range(CFG.num_hidden_layers):
        codes, absmax, want = _bnb_nf4(w[layer], p, block)
        np.testing.assert_array_equal(np.asarray(q.indices()[layer]).astype(np.int32).T, codes)
        np.testing.assert_array_equal(np.asarray(q.scale[layer]).T, absmax)
        np.testing.assert_array_equal(p.to_hf(dense[layer]), want)


def test_double_quantised_scales_stay_close():
    """int8 scales (min-max per output feature): each absmax within one int8 step, and the
    dequantised weight within one NF4 step of bitsandbytes' single-quantised one."""
    p, w = BY_NAME["w_gate"], _weight("w_gate")
    single = quant.quantize_weight(jnp.asarray(w), p, CFG, quant.QuantSpec("nf4", 32))
    double = quant.quantize_weight(jnp.asarray(w), p, CFG, quant.QuantSpec("nf4", 32, double=True))
    assert double.scale.qvalue.dtype == jnp.int8 and double.scale.qvalue.shape == single.scale.shape
    s1, s2 = np.asarray(single.scale), np.asarray(quant.qwix.dequantize(double.scale))
    # qwix's min-max range takes in 0, so one int8 step is max / 255 (the scales are positive): half a
    # step of rounding, and up to half a step more from the rounded zero point.
    step = s1.max(axis=1, keepdims=True) / 255
    assert np.all(np.abs(s2 - s1) <= step * 1.001 + 1e-12)
    gap = np.abs(np.asarray(double.dense(jnp.float32)) - np.asarray(single.dense(jnp.float32)))
    assert gap.max() <= 0.3 * s1.max()  # NF4's widest gap between levels is 0.30 of the scale


def test_int8_is_per_output_feature_absmax():
    """int8: one scale per output feature, absmax / 127.5 (qwix's symmetric bound), error <= half a step."""
    p, w = BY_NAME["wq"], _weight("wq")
    q = quant.quantize_weight(jnp.asarray(w), p, CFG, quant.QuantSpec("int8"))
    flat = w.reshape(CFG.num_hidden_layers, CFG.hidden_size, -1)
    scale = np.abs(flat).max(axis=1, keepdims=True) / 127.5
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
    err = np.abs(np.asarray(q.dense(jnp.float32)).reshape(flat.shape) - flat)
    assert np.all(err <= scale / 2 * 1.0001 + 1e-9)
    assert q.codes.dtype == jnp.int8


def test_block_size_must_tile_the_inputs():
    with pytest.raises(JaxalignError, match="quant_block_size=48 does not divide"):
        quant.check_block_size(CFG, quant.QuantSpec("nf4", 48))


def test_qlora_logits_equal_peft_on_the_bitsandbytes_base(tmp_path):
    """NF4 base + random adapters: jaxalign's logits equal peft's on the HF model whose projections were
    replaced by bitsandbytes' dequantised NF4 weights; a sharded (fsdp=4 x tensor=2) base agrees too."""
    base = _hf_model("llama", tmp_path / "base")
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.endswith(tuple(ALL)) and isinstance(module, torch.nn.Linear):
                packed, state = bnb.quantize_4bit(module.weight.data, blocksize=64, quant_type="nf4")
                module.weight.copy_(bnb.dequantize_4bit(packed, state))
    model = _peft(base, ALL)
    want = _logits(model)
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=lora.resolve_targets(ALL))
    qspec = quant.QuantSpec("nf4", 64)
    for mesh in (make_mesh({"fsdp": 1}, jax.devices()[:1]), make_mesh({"fsdp": 4, "tensor": 2})):
        with use_mesh(mesh):
            ours = model_io.load_model(tmp_path / "base", mesh)
            graphdef, state = nnx.split(ours)
            frozen = quant.quantize_base(nnx.to_pure_dict(state), ours.cfg, qspec, mesh)
            adapters = jax.tree.map(jnp.asarray, peft_io.from_peft_tensors(_peft_tensors(model), ours.cfg, spec))
            fn = jax.jit(lambda f, a, t: lora.Adapted(nnx.merge(graphdef, f), a, spec)(t))
            got = np.asarray(fn(frozen, adapters, jnp.asarray(TOKENS)))
        assert isinstance(frozen["layers"]["wq"], quant.Quantized)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
