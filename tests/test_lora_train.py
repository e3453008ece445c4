"""LoRA in the training loop: SFT and DPO on real HH rows with the Llama 2 tokenizer, on a tiny saved
base model, 8 virtual CPU devices.

What is checked: only the adapters train (the base and its bytes on disk are untouched, the optimizer
state covers the adapters only, checkpoints hold adapters only); a LoRA run dir loads as the base with
the adapters merged; DPO's reference is the base with the adapters off (step 1: loss ln 2, rewards 0,
no second model); DPO from a LoRA SFT run trains fresh adapters on the merged SFT model; a stop and
--resume is bitwise the uninterrupted run; fsdp x tensor sharding gives the one-device losses.
"""

import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from tiny_runs import TINY_LLAMA, hh_sft_config, read_metrics, train_until

from jaxalign.checkpoint import lora_io, model_io
from jaxalign.checkpoint.store import saved_tensors
from jaxalign.config import load_config
from jaxalign.errors import JaxalignError
from jaxalign.export.hf import save_hf
from jaxalign.models import ModelConfig, init_model, lora
from jaxalign.run.loop import Trainer
from jaxalign.runtime.sharding import make_mesh, use_mesh

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8
LORA = {"enabled": True, "rank": 4, "alpha": 8.0, "targets": ["all-linear"]}


@pytest.fixture(scope="module")
def base(shared_data, tmp_path_factory):
    return lora_base(shared_data, tmp_path_factory.mktemp("lora_train"))


def lora_base(shared_data: pathlib.Path, root: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """A tiny random base model saved in HF format and the LoRA SFT config every test derives from."""
    mesh = make_mesh({"fsdp": -1})
    with use_mesh(mesh):
        model = init_model(ModelConfig.from_hf_dict(dict(TINY_LLAMA)), mesh, seed=7)
        save_hf(model, model.cfg, root / "base")
    cfg = hh_sft_config(shared_data, root / "sft", root / "cache",
                        data={"max_rows": 200, "eval_fraction": 0.1, "max_length": 128, "max_prompt_length": 64},
                        train={"batch_size": 8, "max_steps": STEPS, "eval_every": 4, "log_every": 1},
                        eval={"batch_size": 16}, optimizer={"lr": 5e-2, "warmup_steps": 1},
                        checkpoint={"every_steps": 4, "keep": 2})
    cfg["model"] = {"path": str(root / "base")}
    cfg["lora"] = dict(LORA)
    return root, cfg


def _config(root: pathlib.Path, name: str, cfg: dict, sets=()):
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(root / name)}))
    return load_config(path, list(sets))


def _pure(model) -> dict:
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def sft_run(base):
    root, cfg = base
    fingerprint = lora_io.model_fingerprint(root / "base")
    trainer = Trainer(_config(root, "sft", cfg))
    base_before = jax.device_get(trainer.frozen_params)
    trainer.train()
    return trainer, base_before, fingerprint


def test_lora_sft_trains_only_the_adapters(base, sft_run):
    root, _ = base
    trainer, base_before, fingerprint = sft_run
    train, evals = read_metrics(trainer.run)
    assert sorted(train) == list(range(1, STEPS + 1)) and len(evals) == 2
    # A random tiny base (near-uniform logits through its tied 0.02-scale embedding) moves slowly.
    assert train[STEPS]["loss"] < train[1]["loss"] - 0.02, (train[1]["loss"], train[STEPS]["loss"])
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
    # The state holds adapters (and their Adam moments) only; the base is untouched in memory and on disk.
    assert set(trainer.state.params) == set(lora.TARGETS.values())
    mu = trainer.state.opt_state[1][0].mu  # clip, then adamw's ScaleByAdamState
    assert jax.tree.structure(mu) == jax.tree.structure(trainer.state.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen_params), base_before)
    assert lora_io.model_fingerprint(root / "base") == fingerprint
    # B moved away from 0: the adapters learned something.
    assert all(float(np.abs(np.asarray(ab["b"])).max()) > 0 for ab in trainer.state.params.values())


def test_lora_run_loads_as_the_merged_model(base, sft_run):
    root, _ = base
    trainer, base_before, _ = sft_run
    mesh = make_mesh({"fsdp": -1})
    with use_mesh(mesh):
        loaded = _pure(model_io.load_model(trainer.run, mesh))
        want = jax.device_get(lora.merge(base_before, jax.device_get(trainer.state.params), 2.0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), loaded, want)
    saved = saved_tensors(model_io.resolve_model_path(trainer.run) / "params")
    assert set(saved) == set(lora.TARGETS.values()), saved  # adapters only: no base weight is saved again


def test_peft_export_loads_in_peft_and_back(base, sft_run, tmp_path):
    """`convert_jaxalign_to_hf.py --peft` writes the run's adapters as a PEFT directory: transformers + peft
    on the HF base give the logits of the run loaded (merged) here, and the directory reads back as a
    model path."""
    import importlib.util

    import peft
    import torch
    import transformers

    root, _ = base
    run = sft_run[0].run
    spec = importlib.util.spec_from_file_location("convert", REPO / "tools" / "convert_jaxalign_to_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--ckpt", str(run), "--out", str(tmp_path / "adapter"), "--peft"]) == 0
    tokens = np.random.default_rng(0).integers(0, 32000, size=(2, 16))
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(root / "base"),
                                        tmp_path / "adapter").eval()
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    mesh = make_mesh({"fsdp": -1})
    with use_mesh(mesh):
        for path in (run, tmp_path / "adapter"):
            got = np.asarray(model_io.load_model(path, mesh)(jax.numpy.asarray(tokens)))
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert model_io.detect_model_format(tmp_path / "adapter") == "peft"


def test_a_changed_base_is_refused(base, sft_run, tmp_path):
    root, _ = base
    trainer, _, _ = sft_run
    moved = tmp_path / "run"
    shutil.copytree(trainer.run, moved)
    meta_file = moved / "model" / model_io.MODEL_FILE
    meta = json.loads(meta_file.read_text())
    meta["lora"]["base_fingerprint"] = "0" * 16
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(JaxalignError, match="whose weights have changed"):
        model_io.load_model(moved, make_mesh({"fsdp": -1}))


@pytest.fixture(scope="module")
def lora_dpo_run(base, sft_run):
    """DPO with fresh adapters from the LoRA SFT run."""
    root, cfg = base
    sft_trainer = sft_run[0]
    dpo = {**cfg, "stage": "dpo",
           "data": {**cfg["data"], "max_rows": 48, "eval_fraction": 0.0, "eval": cfg["data"]["train"]},
           "train": {**cfg["train"], "max_steps": 6, "eval_every": 3},
           "optimizer": {"lr": 1e-2, "warmup_steps": 1},
           "dpo": {"init_from": str(sft_trainer.run), "beta": 0.5}}
    trainer = Trainer(_config(root, "dpo", dpo))
    merged_sft = _pure(model_io.load_model(sft_trainer.run, trainer.mesh))
    frozen_before = jax.device_get(trainer.frozen_params)
    trainer.train()
    return trainer, merged_sft, frozen_before


def test_lora_dpo_reference_is_the_base_with_adapters_off(lora_dpo_run):
    """DPO from the LoRA SFT run: the SFT adapters are merged into the starting model, fresh adapters train,
    the reference is that model with the adapters off (no copy): step 1 has loss ln 2 and rewards 0."""
    trainer, merged_sft, frozen_before = lora_dpo_run
    assert trainer.reference == "adapters_off" and trainer.ref_params is None
    jax.tree.map(np.testing.assert_array_equal, frozen_before, merged_sft)
    train, evals = read_metrics(trainer.run)
    # Equal up to fp32 rounding (the two forwards fuse differently): beta * |logp - ref| of ~100-token sums;
    # the loss is ln 2 - margin / 2 to first order, so it is held to the same rounding.
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert train[1][key] == pytest.approx(0, abs=1e-5), key
    assert train[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # Evaluated on the trained pairs: DPO in the loop optimises the preference objective.
    assert evals[-1]["eval/rewards/accuracies"] > 0.5 and evals[-1]["eval/loss"] < math.log(2), evals


def test_stop_and_resume_is_bitwise_the_uninterrupted_run(base, sft_run):
    root, cfg = base
    config = _config(root, "sft_stopped", cfg)
    summary = train_until(Trainer(config), 3)
    assert summary["state"] == "preempted"
    Trainer(config, resume=True).train()
    want, _ = read_metrics(sft_run[0].run)
    got, _ = read_metrics(root / "sft_stopped")
    assert [got[s]["loss"] for s in range(1, STEPS + 1)] == [want[s]["loss"] for s in range(1, STEPS + 1)]


def test_sharded_lora_equals_one_device(base, sft_run):
    """fsdp=4 x tensor=2 gives the losses of fsdp=8 (the shared run) to fp32 rounding."""
    root, cfg = base
    Trainer(_config(root, "sft_tp", {**cfg, "mesh": {"data": 1, "fsdp": 4, "tensor": 2}})).train()
    want, _ = read_metrics(sft_run[0].run)
    got, _ = read_metrics(root / "sft_tp")
    np.testing.assert_allclose([got[s]["loss"] for s in got], [want[s]["loss"] for s in want], rtol=1e-4)


def test_lora_config_errors_name_the_key(base):
    root, cfg = base
    with pytest.raises(JaxalignError, match="lora.targets.*'q_prj'.*did you mean 'q_proj'"):
        _config(root, "bad1", {**cfg, "lora": {**LORA, "targets": ["q_prj"]}})
    with pytest.raises(JaxalignError, match="model.path"):
        _config(root, "bad2", {**cfg, "model": {"config": dict(TINY_LLAMA)}})
    with pytest.raises(JaxalignError, match="dpo.reference.*adapters_off"):
        _config(root, "bad3", {**cfg, "stage": "dpo", "dpo": {"reference": "model"}})
    with pytest.raises(JaxalignError, match="export.format.*lora.enabled"):
        _config(root, "bad5", {**cfg, "lora": {"enabled": False}, "export": {"format": "peft"}})
    with pytest.raises(JaxalignError, match="dpo.reference.*lora.enabled"):
        _config(root, "bad4", {**cfg, "lora": {"enabled": False}, "stage": "dpo",
                               "dpo": {"reference": "adapters_off"}})


def test_pipeline_peft_export_of_a_dpo_run(base, lora_dpo_run, tmp_path):
    """export.format=peft on DPO from a LoRA SFT run: out/base is the merged SFT model in HF format, out the
    DPO adapters on it; transformers + peft give the logits of the DPO run loaded (merged) here."""
    import peft
    import torch
    import transformers

    from jaxalign.export.hf import export_run
    from jaxalign.run import lifecycle

    root, cfg = base
    trainer = lora_dpo_run[0]
    out = export_run(_config(root, "export_cfg", cfg, ["export.format=peft"]), trainer.run, tmp_path / "export")
    assert lifecycle.is_complete(out) and (out / "adapter_config.json").is_file()
    tokens = np.random.default_rng(1).integers(0, 32000, size=(2, 16))
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out / "base"), out).eval()
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    with use_mesh(trainer.mesh):
        got = np.asarray(model_io.load_model(trainer.run, trainer.mesh)(jax.numpy.asarray(tokens)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # Asked again in the other format, the export is written again, not skipped.
    export_run(_config(root, "export_cfg", cfg), trainer.run, out)
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / lifecycle.COMPLETE_FILE).read_text())["format"] == "merged"
