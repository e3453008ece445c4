"""The hand-written pieces of the step that exist for speed give the plain formulas' values and gradients:
blocked causal attention, the one-pass log-softmax statistics and the fused, chunked LM head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models.attention import attention_mask, xla_attention
from jaxalign.models.logprobs import fused_logit_stats, logit_stats
from jaxalign.runtime.sharding import make_mesh, use_mesh


def plain_attention(q, k, v, mask):
    """Textbook attention: repeat kv heads, softmax(QKᵀ/√d + mask) V, no blocks, no grouping."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("length,window", [(512, None), (384, 40)])
def test_blocked_causal_attention_equals_plain(length, window):
    """Packed rows (three documents, then padding) so segment masks cross the query-block edges."""
    key = jax.random.key(0)
    b, h, kv, d = 2, 4, 2, 16
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (b, length, n, d)) for i, n in enumerate((h, kv, kv)))
    col = np.arange(length)
    segments = np.stack([np.select([col < 100, col < 300, col < length - 20], [1, 2, 3], 0),
                         np.where(col < length // 2 + 7, 1, 0)]).astype(np.int32)
    mask = attention_mask(jnp.asarray(segments), jnp.asarray(segments), sliding_window=window)
    real = segments > 0

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(real[..., None, None], fn(q, k, v, mask), 0.0) ** 2)

    blocked = lambda q, k, v, m: xla_attention(q, k, v, m, causal=True)  # noqa: E731
    # jitted: op by op, the blocked loop dispatches (and compiles) hundreds of small programs
    np.testing.assert_allclose(np.asarray(jax.jit(blocked)(q, k, v, mask))[real],
                               np.asarray(jax.jit(plain_attention)(q, k, v, mask))[real], atol=2e-6)
    got = jax.jit(jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(lambda *a: loss(plain_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_logit_stats_equals_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (4, 9, 50)) * 20
    targets = jax.random.randint(jax.random.key(1), (4, 9), 0, 50)
    targets = targets.at[0, 0].set(jnp.argmax(logits[0, 0]))  # at least one correct prediction
    stats = logit_stats(logits, targets)
    log_probs = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(stats["logp"], jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0],
                               rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(stats["lse"], jax.nn.logsumexp(logits, -1), rtol=1e-6)
    np.testing.assert_array_equal(stats["correct"], (jnp.argmax(logits, -1) == targets).astype(jnp.float32))
    np.testing.assert_allclose(logit_stats(logits, targets, squares=True)["lss"],
                               jnp.log(jnp.sum(jax.nn.softmax(logits) ** 2, -1)), rtol=1e-5, atol=1e-5)
    assert stats["correct"][0, 0] == 1
    got = jax.grad(lambda x: jnp.sum(logit_stats(x, targets)["logp"] + 0.1 * logit_stats(x, targets)["lse"] ** 2))(
        logits)
    want = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1)
                                      + 0.1 * jax.nn.logsumexp(x, -1)[..., None] ** 2))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_fused_lm_head_equals_the_plain_one(dtype, tol):
    """fused_logit_stats (chunks of 8 over a length of 21, so the last chunk is padded) gives logit_stats of the
    whole [batch, length, vocab] logits: log-probs, logsumexp, hits and log Σp² (WPO), and the gradients of a loss of the
    log-probs and the logsumexp (z-loss) for the hidden states and the head, over 8 devices (rows sharded)."""
    b, length, e, v = 8, 21, 16, 300
    key = jax.random.key(0)
    hidden = jax.random.normal(key, (b, length, e)).astype(dtype)
    w = (jax.random.normal(jax.random.fold_in(key, 1), (e, v)) / 2).astype(dtype)
    targets = jax.random.randint(jax.random.fold_in(key, 2), (b, length), 0, v)
    targets = targets.at[0, 0].set(jnp.argmax(hidden[0, 0].astype(jnp.float32) @ w.astype(jnp.float32)))
    scale = jax.random.uniform(jax.random.fold_in(key, 3), (b, length))

    def plain(h, w):
        s = logit_stats(jnp.einsum("ble,ev->blv", h, w, preferred_element_type=jnp.float32), targets, squares=True)
        return s["logp"], s["lse"], s["correct"], s["lss"]

    def fused(h, w):
        return fused_logit_stats(h, w, targets, 8, True)

    def loss(fn, h, w):
        logp, lse, _, _ = fn(h, w)
        return jnp.sum(scale * logp) + 1e-2 * jnp.sum(lse ** 2)

    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    with use_mesh(mesh):
        hidden = jax.device_put(hidden, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        for got, want in zip(jax.jit(fused)(hidden, w), jax.jit(plain)(hidden, w)):
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
        assert jax.jit(fused)(hidden, w)[2][0, 0] == 1
        got = jax.jit(jax.grad(lambda h, w: loss(fused, h, w), argnums=(0, 1)))(hidden, w)
        want = jax.jit(jax.grad(lambda h, w: loss(plain, h, w), argnums=(0, 1)))(hidden, w)
    for g, ref in zip(got, want):
        assert g.dtype == ref.dtype == dtype
        scale_of = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32), rtol=tol,
                                   atol=tol * scale_of)


SPLASH_CFG = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("length,window", [(256, None), (200, None), (256, 48)], ids=["causal", "padded", "window"])
def test_splash_attention_equals_the_xla_path(length, window):
    """The model with model.attention splash (Pallas interpret mode here) against xla, on packed rows (three
    documents, then padding), GQA (4 query heads on 2 kv heads), a row length that is not a block multiple
    (200: padded inside), and a sliding window: log-probs of the real tokens and the gradients of every
    weight, over 8 devices (rows over data and fsdp, heads over tensor)."""
    from flax import nnx

    from jaxalign.models import ModelConfig, init_model
    from jaxalign.models.logprobs import token_stats

    cfg = ModelConfig(**SPLASH_CFG, sliding_window=window)
    col = np.arange(length)
    segments = np.stack([np.select([col < 70, col < 150, col < length - 20], [1, 2, 3], 0),
                         np.where(col < length // 2 + 7, 1, 0)] * 2).astype(np.int32)
    positions = np.stack([np.where(segments[r] > 0, col - np.searchsorted(segments[r], segments[r]), 0)
                          for r in range(4)]).astype(np.int32)
    tokens = np.random.default_rng(0).integers(1, 64, (4, length + 1)).astype(np.int32)
    real = segments > 0
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    results = {}
    with use_mesh(mesh):
        for impl in ("xla", "splash"):
            graphdef, params = nnx.split(init_model(cfg, mesh, seed=0, attention=impl, attention_block=128))

            def loss(p):
                model = nnx.merge(graphdef, p)
                hidden, _ = model.hidden_states(tokens[:, :-1], positions, segments)
                logp = token_stats(model, hidden, tokens[:, 1:], 0)["logp"]
                return jnp.sum(jnp.where(real, logp, 0.0)), logp

            (_, logp), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
            results[impl] = (np.asarray(logp)[real], jax.device_get(grads))
    np.testing.assert_allclose(results["splash"][0], results["xla"][0], rtol=1e-5, atol=1e-5)
    # atol from each gradient's own scale: fp32 sums in another order differ by ~1e-6 of it.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
                 results["splash"][1], results["xla"][1])
