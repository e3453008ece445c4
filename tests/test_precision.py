"""model.precision: the policy sets the compute and storage dtypes, and a bf16 run tracks the fp32 run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.config import load_config
from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, init_model
from jaxalign.run.build import model_options
from jaxalign.runtime.sharding import make_mesh, use_mesh
from jaxalign.train.optimizer import build_optimizer
from jaxalign.train.step import Objective, TrainState, batch_shardings, jit_train_step, make_train_step

CFG = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
STEPS = 50
# The largest |loss - fp32 loss| / fp32 loss over the 50 steps each policy may show. Measured (Intel Xeon
# VM): 0.38% with fp32 master weights; 20% with bf16 weights, which round the small late updates away (the
# loss lags, 1.84 against 1.54 at step 50): why the real configs train bf16-fp32-master.
TOLERANCE = {"bf16-fp32-master": 0.01, "bf16": 0.25}


def batches(n=4, rows=8, length=32):
    """A few fixed batches of a learnable pattern (each row counts up from a random start), cycled."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        start = rng.integers(1, CFG.vocab_size, (rows, 1))
        tokens = ((start + np.arange(length + 1)) % (CFG.vocab_size - 1) + 1).astype(np.int32)
        out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((rows, length), bool),
                    "segment_ids": np.ones((rows, length), np.int32),
                    "positions": np.broadcast_to(np.arange(length), (rows, length)).astype(np.int32)})
    return out


def train(precision: str) -> tuple[list[float], dict]:
    cfg = load_config(None, [f"model.precision={precision}", "optimizer.lr=3e-3", "optimizer.warmup_steps=0"])
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    data = batches()
    with use_mesh(mesh):
        model = init_model(CFG, mesh, seed=0, **model_options(cfg))
        graphdef, params = nnx.split(model)
        params = nnx.to_pure_dict(params)
        optimizer, schedule = build_optimizer(cfg.optimizer, total_steps=STEPS)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(optimizer.init)(params))
        step = jit_train_step(make_train_step(graphdef, Objective("sft"), optimizer, schedule),
                              jax.tree.map(lambda x: x.sharding, state),
                              batch_shardings({k: v.shape for k, v in data[0].items()}, mesh))
        losses = []
        for i in range(STEPS):
            state, metrics = step(state, data[i % len(data)], None)
            losses.append(float(metrics["loss"]))
        logits = nnx.merge(graphdef, state.params).logits(jnp.ones((1, 2, CFG.hidden_size), cfg.model.dtype))
    dtypes = {"params": {x.dtype for x in jax.tree.leaves(state.params)},
              "opt_state": {x.dtype for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)},
              "compute": jnp.dtype(cfg.model.dtype), "logits": logits.dtype}
    return losses, dtypes


@pytest.fixture(scope="module")
def fp32_run():
    return train("fp32")


@pytest.mark.parametrize("precision,weights,compute", [("bf16-fp32-master", jnp.float32, jnp.bfloat16),
                                                       ("bf16", jnp.bfloat16, jnp.bfloat16)])
def test_a_bf16_run_tracks_the_fp32_run(fp32_run, precision, weights, compute):
    """50 AdamW steps: the loss stays within TOLERANCE of fp32's at every step; weights and optimizer state are
    stored in the policy's dtype, compute runs in bf16, and the logits (so the loss) are fp32."""
    want, fp32_dtypes = fp32_run
    got, dtypes = train(precision)
    assert fp32_dtypes["params"] == {jnp.dtype(jnp.float32)} and fp32_dtypes["compute"] == jnp.float32
    assert dtypes["params"] == dtypes["opt_state"] == {jnp.dtype(weights)} and dtypes["compute"] == compute
    assert dtypes["logits"] == jnp.float32
    gap = np.abs(np.array(got) - np.array(want)) / np.array(want)
    print(f"\n{precision}: fp32 loss {want[0]:.3f} -> {want[-1]:.3f}, {precision} {got[0]:.3f} -> {got[-1]:.3f}, "
          f"largest relative gap {gap.max():.4f} (step {int(gap.argmax()) + 1})")
    assert want[-1] < 0.5 * want[0] and got[-1] < 0.5 * got[0]  # both learn: not two flat lines compared
    assert gap.max() <= TOLERANCE[precision]


def test_the_policy_sets_the_dtypes_and_refuses_a_contrary_one(tmp_path):
    cfg = load_config(None, ["model.precision=bf16-fp32-master"])
    assert (cfg.model.dtype, cfg.model.param_dtype) == ("bfloat16", "float32")
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  precision: bf16\n  dtype: float32\n")
    with pytest.raises(JaxalignError, match=rf"'model.dtype' is float32 \(in {path}\), but model.precision bf16 "
                                            "means bfloat16"):
        load_config(str(path))
    # a config saved with its policy reads back equal; a stage may change the policy in its overrides
    cfg = load_config(None, ["model.precision=bf16", "sft.overrides={model: {precision: fp32}}"])
    from jaxalign.config import stage_config

    assert stage_config(cfg, "sft").model.dtype == "float32" and cfg.model.dtype == "bfloat16"
