"""The model gives the same logits on every mesh layout, and weights sit where the rules say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, abstract_model, init_model
from jaxalign.runtime.sharding import (
    RULES,
    is_split,
    logical_to_spec,
    make_mesh,
    merged_rules,
    resolve_mesh_shape,
    use_mesh,
)

CFG = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)

# Each compared with the single-device run of the same weights and batch (the `reference` fixture).
LAYOUTS = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}


@pytest.fixture(scope="module")
def reference():
    """Host copy of a model's params and its single-device logits on a packed, padded batch."""
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with use_mesh(mesh):
        model = init_model(CFG, mesh, seed=3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (8, 16), dtype=np.int32)
    # Two packed sequences in some rows, padding (segment 0) at the end of others.
    segment_ids = np.ones((8, 16), np.int32)
    segment_ids[::2, 9:] = 2
    segment_ids[1::2, 13:] = 0
    positions = np.where(segment_ids == 2, np.arange(16) - 9, np.arange(16)).astype(np.int32)
    batch = (tokens, positions, segment_ids)
    logits = np.asarray(nnx.jit(lambda m, *b: m(*b))(model, *batch))
    return jax.device_get(nnx.state(model)), batch, logits


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_equal_on_every_mesh_layout(reference, layout):
    host_state, batch, expected = reference
    mesh = make_mesh(LAYOUTS[layout])
    with use_mesh(mesh):
        graphdef, _, shardings = abstract_model(CFG, mesh)
        state = jax.device_put(host_state, shardings)
        model = nnx.merge(graphdef, state)
        logits = nnx.jit(lambda m, *b: m(*b))(model, *batch)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=1e-5)


def test_large_weights_are_sharded_as_the_rules_say():
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    with use_mesh(mesh):
        model = init_model(CFG, mesh)
    assert model.layers["w_gate"].get_value().sharding.spec == P(None, "fsdp", "tensor")
    assert model.layers["wq"].get_value().sharding.spec == P(None, "fsdp", "tensor", None)
    assert model.layers["w_down"].get_value().sharding.spec == P(None, "tensor", "fsdp")
    assert model.embed.get_value().sharding.spec == P("tensor", "fsdp")
    assert model.lm_head.get_value().sharding.spec == P("fsdp", "tensor")
    # Created directly sharded: each device holds 1/8 of the MLP weight, not a full copy.
    w = model.layers["w_gate"].get_value()
    assert {s.data.shape for s in w.addressable_shards} == {(2, 16, 64)}


def test_rules_replicate_a_dimension_the_mesh_axis_does_not_divide():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    # 2 kv heads cannot be split 4 ways: kept whole rather than rejected.
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh) == P(None, "fsdp", None, None)
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh) == P(None, "fsdp", "tensor", None)
    # A mesh axis is used at most once per array.
    assert logical_to_spec(("batch", "embed"), (8, 64), mesh) == P("fsdp", None)


def test_rules_overrides_from_config():
    rules = merged_rules({"embed": ["fsdp", "tensor"], "mlp": None})
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    with use_mesh(mesh, rules):
        _, _, shardings = abstract_model(CFG, mesh, rules)
    assert shardings["layers"]["w_up"].get_value().spec == P(None, ("fsdp", "tensor"), None)
    with pytest.raises(JaxalignError, match="unknown logical axis 'embd'"):
        merged_rules({"embd": "fsdp"})
    with pytest.raises(JaxalignError, match="unknown mesh axis 'model'"):
        merged_rules({"embed": "model"})


def test_mesh_shapes():
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
    with pytest.raises(JaxalignError, match="at most one axis may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(JaxalignError, match="needs 16 devices, but 8 are available"):
        resolve_mesh_shape({"data": 4, "fsdp": 4, "tensor": 1}, 8)
    with pytest.raises(JaxalignError, match="cannot be split"):
        resolve_mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)


def test_state_shardings_cover_every_param():
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    _, state, shardings = abstract_model(CFG, mesh)
    assert jax.tree.structure(state) == jax.tree.structure(shardings)
    leaves = jax.tree.leaves(shardings)
    assert leaves and all(isinstance(s, jax.sharding.NamedSharding) for s in leaves)
    assert jnp.dtype(jax.tree.leaves(state)[0].dtype) == jnp.float32


@pytest.mark.parametrize("split", [None, "length", "head_dim"])
def test_flat_dot_equals_the_einsum_whatever_the_rules_split(split):
    """models/dots.flat_dot merges [batch, length] (and [heads, head_dim]) into one axis unless mesh.rules split
    the minor one, where it keeps them apart (tensordot): values and gradients equal the einsum's either way."""
    from jaxalign.models.dots import flat_dot

    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rules = dict(RULES, **({split: "tensor"} if split else {}))
    x = jax.random.normal(jax.random.key(0), (4, 16, 2, 8))  # [batch, length, heads, head_dim]
    w = jax.random.normal(jax.random.key(1), (2, 8, 6))  # [heads, head_dim, embed], as wo

    def loss(fn, x, w):
        return jnp.sum(jnp.sin(fn(x, w)))

    with use_mesh(mesh, rules):
        assert is_split(split) if split else not is_split("length")
        got = jax.jit(jax.value_and_grad(lambda x, w: loss(lambda a, b: flat_dot(a, b, 2), x, w), (0, 1)))(x, w)
    want = jax.value_and_grad(lambda x, w: loss(lambda a, b: jnp.einsum("bthd,hde->bte", a, b), x, w), (0, 1))(x, w)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
