"""QLoRA in the loop: SFT on an NF4 base (double-quantised scales) trains and loads merged on the
dequantised base, resumes bitwise after kill -9, and DPO's reference (adapters off, or precomputed)
is the quantised base. The bitsandbytes and peft oracles are in test_qlora.py."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from run_faults import sigkill_past_checkpoint
from test_lora_train import LORA, _config, _pure, lora_base
from tiny_runs import read_metrics

from jaxalign.checkpoint import model_io
from jaxalign.config import load_config
from jaxalign.models import lora, quant
from jaxalign.run.loop import Trainer
from jaxalign.runtime.sharding import use_mesh

# NF4 base with double-quantised scales (blocks of 32: the tiny model's hidden size).
QLORA = {**LORA, "quantize": "nf4", "quant_block_size": 32, "double_quant": True}
QLORA_STEPS = 16


@pytest.fixture(scope="module")
def base(shared_data, tmp_path_factory):
    return lora_base(shared_data, tmp_path_factory.mktemp("qlora_train"))


def _qlora_cfg(cfg: dict) -> dict:
    return {**cfg, "lora": QLORA, "train": {**cfg["train"], "max_steps": QLORA_STEPS, "eval_every": 8},
            "data": {**cfg["data"], "max_length": 64, "max_prompt_length": 32}}


@pytest.fixture(scope="module")
def qlora_sft_run(base):
    root, cfg = base
    trainer = Trainer(_config(root, "qsft", _qlora_cfg(cfg)))
    trainer.train()
    return trainer


def test_qlora_sft_trains_on_the_quantised_base_and_loads_merged(base, qlora_sft_run):
    trainer = qlora_sft_run
    frozen = trainer.frozen_params["layers"]
    assert all(isinstance(frozen[n], quant.Quantized) for n in quant.QUANTIZED)
    assert frozen["wq"].codes.dtype == jnp.uint8 and frozen["wq"].codes.shape[1] == 32 // 2  # two codes a byte
    assert frozen["wq"].scale.qvalue.dtype == jnp.int8
    train, _ = read_metrics(trainer.run)
    assert train[QLORA_STEPS]["loss"] < train[1]["loss"] - 0.02
    meta = json.loads((trainer.run / "model" / model_io.MODEL_FILE).read_text())
    assert meta["lora"]["quantize"] == {"kind": "nf4", "block_size": 32, "double": True, "param_dtype": "float32"}
    # The run loads as the model its adapters were trained as: the dequantised base plus A B.
    mesh = trainer.mesh
    with use_mesh(mesh):
        got = _pure(model_io.load_model(trainer.run, mesh))
    want = jax.device_get(lora.merge(quant.dequantized(trainer.frozen_params), trainer.state.params,
                                     trainer.lora.scale))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_qlora_resume_after_sigkill_is_bitwise(base, qlora_sft_run):
    """`jaxalign train` (QLoRA) SIGKILLed past its step-4 checkpoint: the resumed run logs the
    uninterrupted run's losses and gradient norms step for step."""
    root, cfg = base
    path = root / "qkilled.yaml"
    run = root / "qkilled"
    path.write_text(yaml.safe_dump({**_qlora_cfg(cfg), "output_dir": str(run)}))
    killed_at = sigkill_past_checkpoint(path, run, step=4, logged=6)
    assert killed_at < QLORA_STEPS, "the run finished before it was killed"
    trainer = Trainer(load_config(path), resume=True)
    assert 4 <= int(trainer.state.step) < killed_at
    trainer.train()
    want, _ = read_metrics(qlora_sft_run.run)
    got, _ = read_metrics(run)
    assert sorted(got) == list(range(1, QLORA_STEPS + 1))
    for step in got:
        assert (got[step]["loss"], got[step]["grad_norm"]) == (want[step]["loss"], want[step]["grad_norm"]), step


@pytest.mark.parametrize("reference", ["adapters_off", "precomputed"])
def test_qlora_dpo_reference_is_the_quantised_base(base, reference):
    """QLoRA DPO from the base: the reference (live with adapters off, or scored once up front) is the
    quantised base the policy sits on, so step 1 has loss ln 2 and rewards 0."""
    root, cfg = base
    dpo = {**cfg, "stage": "dpo", "lora": QLORA,
           "data": {**cfg["data"], "max_rows": 16, "eval_fraction": 0.0, "eval": cfg["data"]["train"], "max_length": 64,
                    "max_prompt_length": 32},
           "train": {**cfg["train"], "max_steps": 1, "eval_every": 0},
           "dpo": {"init_from": str(root / "base"), "beta": 0.5, "reference": reference}}
    trainer = Trainer(_config(root, f"qdpo_{reference}", dpo))
    assert trainer.ref_params is None and isinstance(trainer.frozen_params["layers"]["w_up"], quant.Quantized)
    trainer.train()
    train, _ = read_metrics(trainer.run)
    assert train[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert train[1][key] == pytest.approx(0, abs=1e-5), key
