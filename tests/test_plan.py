"""`jaxalign plan`: the per-device memory estimate against XLA's memory analysis of the compiled step (tiny
models on the 8 local CPU devices), the FLOPs formula, suggestions that make a config fit, and the CLI."""

from __future__ import annotations

import json

import pytest

from jaxalign.cli import main as cli_main
from jaxalign.config import apply_overrides, load_config, validate
from jaxalign.errors import JaxalignError
from jaxalign.plan import ACCELERATORS, GiB, matmul_params, parse_mesh, plan

TINY = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
BASE = [f"model.config={json.dumps(TINY)}", "data.max_length=256", "data.max_prompt_length=128",
        "train.batch_size=16", "mesh.fsdp=4", "mesh.tensor=2"]
# The estimate is within this factor of XLA's peak (arguments + outputs - aliased + temporaries), float32.
# (bfloat16 is not compared on CPU: XLA's CPU backend computes bf16 dots in f32, so its buffers are f32.)
FACTOR = 1.5


@pytest.mark.parametrize("sets", [
    [],                                                                     # SFT, remat minimal (the default)
    ["model.remat=none"],                                                   # SFT, remat none
    ["model.remat=full", "train.micro_batch_size=8"],                       # SFT, remat full, accumulation
    ["stage=dpo", "dpo.reference=model", "train.batch_size=8", "model.remat=dots"],  # DPO, live reference
], ids=["sft-minimal", "sft-none", "sft-full-micro", "dpo-reference-dots"])
def test_estimate_is_within_a_factor_of_the_compiled_memory(sets):
    cfg = load_config(None, BASE + sets)
    p = plan(cfg, accelerator="cpu", suggest=False)
    assert p.compiled is not None, "the 8-device mesh fits on the local CPU devices: the step is compiled"
    ratio = p.peak / p.compiled["peak"]
    print(f"{sets}: estimate {p.peak / 2**20:.1f} MiB, XLA {p.compiled['peak'] / 2**20:.1f} MiB, ratio {ratio:.2f}")
    assert 1 / FACTOR <= ratio <= FACTOR, p.report()
    # Parameters and optimizer state are exact: XLA's arguments hold exactly them (+ the batch, step).
    rows_per_device = p.rows // 4  # the batch is split over data x fsdp = 4, replicated over tensor
    batch_bytes = rows_per_device * 256 * (4 * 4 + 1)  # tokens, targets, positions, segment_ids int32; mask bool
    args = p.memory["params"] + p.memory["opt_state"] + p.memory["reference"] + batch_bytes + 4  # + the step
    assert p.compiled["argument"] == args


def test_flops_and_step_time_follow_the_written_formulas():
    cfg = load_config("configs/real/llama3.1-8b-dpo.yaml")
    p = plan(cfg, accelerator="v5p", suggest=False, lower=False)
    mc = p.model_cfg
    # q, k, v, o (32 heads, 8 kv heads, head dim 128), gate/up/down, and the LM head; the input
    # embedding is a lookup, norms are not matmuls
    e, m = 4096, 14336
    n = 32 * (2 * e * 32 * 128 + 2 * e * 8 * 128 + 3 * e * m) + e * 128256
    assert matmul_params(mc) == n and abs(n - 7.50e9) < 0.01e9
    tokens = 2 * 64 * 1024
    attention = 12 * 32 * 32 * 128 * 1024 * tokens / 2  # causal: half of the T x T scores
    reference = 2 * n * tokens + attention / 3
    assert p.flops["policy"] == 6 * n * tokens and p.flops["attention"] == attention
    assert p.flops["total"] == pytest.approx(6 * n * tokens + attention + reference)
    assert p.step_seconds == pytest.approx(p.flops["total"] / (32 * 459e12 * 0.4))
    assert p.fits and p.memory["reference"] == p.memory["params"]
    # a reference-free objective (SimPO) holds and runs no reference
    free = plan(load_config("configs/real/llama3.1-8b-dpo.yaml", ["dpo.loss=simpo", "dpo.reference=none"]),
                accelerator="v5p", suggest=False, lower=False)
    assert free.reference == "none" and free.memory["reference"] == 0
    assert free.flops["total"] == pytest.approx(6 * n * tokens + attention)
    # fp32 AdamW state is twice the fp32 parameters, each sharded 32 ways
    assert p.memory["opt_state"] == pytest.approx(2 * p.memory["params"], rel=1e-3)
    assert p.memory["params"] == pytest.approx(mc.num_params * 4 / 32, rel=0.01)


def test_a_config_that_does_not_fit_gets_a_suggestion_that_does():
    cfg = load_config("configs/real/llama3.2-1b-sft.yaml", ["train.micro_batch_size=0", "model.remat=none"])
    p = plan(cfg, accelerator="v5e", lower=False)
    assert not p.fits
    fitting = [s for s in p.suggestions if s.endswith("(fits)")]
    assert fitting, p.report()
    sets = [part.split()[0] for part in fitting[0].split(":")[0].split("--set ")[1:]]
    fixed = plan(validate(apply_overrides(cfg, sets)), accelerator="v5e", suggest=False, lower=False)
    assert fixed.fits, (sets, fixed.report())


def test_more_devices_when_no_change_is_enough():
    # Without a model.path there is no base for LoRA to adapt, so no single change makes it fit.
    cfg = load_config("configs/real/llama3.1-70b-sft.yaml", ['model.path=""'])
    p = plan(cfg, accelerator="h100", mesh={"data": 1, "fsdp": 8, "tensor": 1}, lower=False)
    assert not p.fits
    assert any("more devices" in s for s in p.suggestions), p.report()
    line = next(s for s in p.suggestions if s.strip().startswith("fits on"))
    devices = int(line.split()[2])
    assert devices >= 16  # 70B with fp32 AdamW needs 1.1 TB: more than 8 x 80 GB


def test_lora_is_suggested_and_plans_adapters_only():
    """LoRA on the 70B SFT config: the frozen base counted once, gradients and optimizer state for the
    adapters only (rank 16 on all seven projections of 80 layers), and with it the run fits 8 x H100."""
    cfg = load_config("configs/real/llama3.1-70b-sft.yaml")
    p = plan(cfg, accelerator="h100", mesh={"data": 1, "fsdp": 8, "tensor": 1}, lower=False)
    lora = next(s for s in p.suggestions if "lora.enabled=true" in s)
    assert lora.endswith("(fits)"), p.report()
    sets = ["lora.enabled=true", "lora.rank=16", "lora.alpha=32"]
    q = plan(validate(apply_overrides(cfg, sets)), accelerator="h100", mesh={"data": 1, "fsdp": 8, "tensor": 1},
             suggest=False, lower=False)
    e, kv, m, layers, r = 8192, 8 * 128, 28672, 80, 16
    adapters = layers * r * ((e + e) * 2 + (e + kv) * 2 + (e + m) * 3)  # A [in, r] + B [r, out] per projection
    # fp32. Each adapter shards as its weight's axes: fsdp takes "embed", which is A's input for q, k, v,
    # gate, up and B's output for o, down; the rest (B of q/k/v/gate/up, A of o/down) has only heads or
    # mlp axes, which go to the tensor axis (size 1 here), and is replicated.
    sharded = layers * r * 7 * e
    assert q.memory["grads"] == (sharded / 8 + (adapters - sharded)) * 4
    assert q.memory["opt_state"] == pytest.approx(2 * q.memory["grads"], rel=1e-3)
    assert q.memory["params"] == pytest.approx(p.memory["params"] + q.memory["grads"], rel=1e-6)
    assert q.fits and q.memory["reference"] == 0


def test_cli_prints_the_report(capsys):
    assert cli_main(["plan", "--config", "configs/real/qwen2.5-0.5b-sft.yaml", "--accelerator", "v6e",
                     "--mesh", "fsdp=64,tensor=4"]) == 0
    out = capsys.readouterr().out
    assert "on 256 x v6e" in out and "mesh         data=1 fsdp=64 tensor=4" in out
    for word in ("parameters", "optimizer state", "activations", "peak", "-> fits", "6 * N * tokens",
                 "predicted step time at 40% MFU", "lowered for tpu on an abstract mesh"):
        assert word in out, word


def test_bad_arguments_are_clear_errors():
    with pytest.raises(JaxalignError, match="AXIS=SIZE"):
        parse_mesh("fsdp:8")
    with pytest.raises(JaxalignError, match="unknown accelerator"):
        plan(load_config(None, BASE), accelerator="tpu9")
    with pytest.raises(JaxalignError, match="cannot be split over the 64 data-parallel devices"):
        plan(load_config(None, BASE), accelerator="v5p", mesh={"fsdp": 64, "tensor": 1}, lower=False)
    assert set(ACCELERATORS) == {"v5p", "v5e", "v6e", "h100", "h200", "a100", "cpu"}
    assert ACCELERATORS["v5p"].hbm_bytes == 95 * GiB


def test_qlora_is_suggested_and_saves_the_projections_bytes():
    """A LoRA config that does not fit one v6e chip: `plan` offers lora.quantize=nf4, and the saving is the
    projections' bf16 bytes less NF4's 4 bits and fp32 scale per 64 (6.98 B weights of Llama-3.1-8B)."""
    cfg = load_config("configs/real/lora/llama3.1-8b-lora-sft.yaml")
    p = plan(cfg, accelerator="v6e", mesh={"data": 1, "fsdp": 1, "tensor": 1}, lower=False)
    assert not p.fits and any("--set lora.quantize=nf4" in s for s in p.suggestions), p.suggestions
    q = plan(validate(apply_overrides(cfg, ["lora.quantize=nf4"])), accelerator="v6e",
             mesh={"data": 1, "fsdp": 1, "tensor": 1}, suggest=False, lower=False)
    e, kv, m, layers = 4096, 8 * 128, 14336, 32
    projections = layers * (2 * e * e + 2 * e * kv + 3 * e * m)
    assert p.memory["params"] - q.memory["params"] == projections * 2 - projections // 2 - projections // 64 * 4
    assert p.memory["peak"] - q.memory["peak"] == p.memory["params"] - q.memory["params"]
