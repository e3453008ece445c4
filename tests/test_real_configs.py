"""configs/real/: every config validates, has the published architecture, and its train step lowers on an
abstract mesh the size of its target (no devices, no weights: jax.sharding.AbstractMesh + ShapeDtypeStructs
with the shardings the trainer would use). Its comment lines' verdicts for the other targets agree with
`jaxalign plan`'s estimate."""

from __future__ import annotations

import math
import pathlib
import re
import time

import pytest

from jaxalign.config import apply_overrides, load_config, validate
from jaxalign.models import ModelConfig
from jaxalign.plan import ACCELERATORS, build_abstract_step, parse_mesh, plan
from jaxalign.runtime.sharding import MESH_AXES, abstract_mesh

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "real"
MODELS = ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.1-70b", "qwen2.5-0.5b", "qwen2.5-7b", "mistral-7b")
# Parameter counts as published (model cards / transformers' num_parameters()).
PUBLISHED_PARAMS = {"llama3.2-1b": 1.24e9, "llama3.2-3b": 3.21e9, "llama3.1-8b": 8.03e9, "llama3.1-70b": 70.6e9,
                    "qwen2.5-0.5b": 0.494e9, "qwen2.5-7b": 7.62e9, "mistral-7b": 7.24e9}
# accelerator -> devices of the natural target named in each config's "Target:" line
TARGET_DEVICES = {"TPU v5e-8": ("v5e", 8), "TPU v5p-64": ("v5p", 32), "TPU v6e-256": ("v6e", 256),
                  "one host with 8x H100": ("h100", 8)}
PATHS = sorted(CONFIGS.glob("*.yaml"))


def test_one_sft_and_one_dpo_config_per_model():
    assert sorted(p.name for p in PATHS) == sorted(f"{m}-{s}.yaml" for m in MODELS for s in ("sft", "dpo"))


def natural_target(text: str) -> tuple[str, int]:
    line = next(line for line in text.splitlines() if line.startswith("# Target:"))
    return next(v for k, v in TARGET_DEVICES.items() if k in line)


def other_targets(text: str) -> list[tuple[str, dict, list[str], bool]]:
    """(accelerator, mesh, --set overrides, fits) of each "other target" comment line."""
    out = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"#   \S+\s+--accelerator (\S+) --mesh (\S+)(.*)", line)
        if m:
            verdict = lines[i + 1]
            assert "-> fits" in verdict or "-> does NOT fit" in verdict, verdict
            out.append((m.group(1), parse_mesh(m.group(2)), re.findall(r"--set (\S+)", m.group(3)),
                        "-> fits" in verdict))
    return out


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_config_validates_and_its_train_step_lowers_on_its_target(path):
    text = path.read_text()
    cfg = load_config(path)
    model = path.stem.rsplit("-", 1)[0]
    assert cfg.stage == path.stem.rsplit("-", 1)[1]
    mc = ModelConfig.from_hf_dict(dict(cfg.model.config))
    assert mc.num_params == pytest.approx(PUBLISHED_PARAMS[model], rel=0.005)
    assert cfg.model.path == f"ckpt/{model}"
    if cfg.stage == "dpo":
        assert cfg.dpo.init_from == f"runs/{model}-sft"

    accelerator, devices = natural_target(text)
    sizes = {k: cfg.mesh[k] for k in MESH_AXES}
    assert math.prod(sizes.values()) == devices, f"the mesh {sizes} is not the size of the target ({devices})"
    t0 = time.perf_counter()
    step = build_abstract_step(cfg, abstract_mesh(sizes, devices))
    lowered = step.lower(ACCELERATORS[accelerator].platform)
    text_ir = lowered.as_text()
    assert f"mhlo.num_partitions = {devices}" in text_ir
    # Parameters arrive sharded: the embedding is split over fsdp (the "embed" axis of [vocab, embed]).
    assert '"fsdp"' in text_ir
    # On TPU, model.attention auto is the splash kernel: its forward, dq and dkv Mosaic kernels (per layer body).
    platform = ACCELERATORS[accelerator].platform
    assert (text_ir.count("tpu_custom_call") >= 3) == (platform == "tpu" and cfg.model.attention == "auto")
    print(f"{path.stem}: lowered for {ACCELERATORS[accelerator].platform} on {devices} abstract devices "
          f"in {time.perf_counter() - t0:.1f}s")


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_other_targets_verdicts_agree_with_plan(path):
    """Each comment line's fits / does NOT fit is what `jaxalign plan` estimates for that mesh and --set."""
    text = path.read_text()
    cfg = load_config(path)
    targets = other_targets(text)
    assert {a for a, *_ in targets} | {natural_target(text)[0]} == {"h100", "v5e", "v5p", "v6e"}
    accelerator, _ = natural_target(text)
    natural = plan(cfg, accelerator=accelerator, suggest=False, lower=False)
    assert natural.fits, natural.report()
    for acc, mesh, sets, fits in targets:
        variant = validate(apply_overrides(cfg, sets)) if sets else cfg
        p = plan(variant, accelerator=acc, mesh=mesh, suggest=False, lower=False)
        assert p.fits == fits, (acc, mesh, sets, p.report())


# --- configs/real/lora/: LoRA and QLoRA SFT + DPO on one 80 GB GPU ----------------------------------

LORA_PATHS = sorted((CONFIGS / "lora").glob("*.yaml"))


def test_lora_configs_cover_both_models_both_stages():
    assert sorted(p.name for p in LORA_PATHS) == sorted(
        f"{m}-{v}-{s}.yaml" for m in ("llama3.1-8b", "qwen2.5-7b") for v in ("lora", "qlora") for s in ("sft", "dpo"))


@pytest.mark.parametrize("path", LORA_PATHS, ids=[p.stem for p in LORA_PATHS])
def test_lora_config_lowers_and_fits_one_gpu_as_its_header_says(path):
    """The architecture of the model's full config, the step lowered for CUDA on one device, and plan's
    estimate on one H100 is the header's figure and fits."""
    model, variant, stage = path.stem.rsplit("-", 2)
    cfg = load_config(path)
    full = load_config(CONFIGS / f"{model}-{stage}.yaml")
    assert dict(cfg.model.config) == dict(full.model.config) and cfg.stage == stage
    assert cfg.lora.enabled and cfg.lora.quantize == ("nf4" if variant == "qlora" else "none")
    if stage == "dpo":
        assert cfg.dpo.init_from == f"runs/{model}-{variant}-sft" and cfg.dpo.reference == "auto"
    step = build_abstract_step(cfg, abstract_mesh({k: cfg.mesh[k] for k in MESH_AXES}, 1))
    assert "mhlo.num_partitions = 1" in step.lower("cuda").as_text()
    p = plan(cfg, accelerator="h100", suggest=False, lower=False)
    assert p.fits and p.reference in (None, "adapters_off") and p.memory["reference"] == 0, p.report()
    stated = float(re.search(r"plan estimate ([\d.]+) of", path.read_text()).group(1))
    assert p.memory["peak"] / 2**30 == pytest.approx(stated, abs=0.01), p.report()
    if variant == "qlora":  # a 4-bit base: well under half the bf16 base of the LoRA config
        bf16 = plan(load_config(CONFIGS / "lora" / f"{model}-lora-{stage}.yaml"), accelerator="h100",
                    suggest=False, lower=False)
        assert p.memory["params"] < 0.4 * bf16.memory["params"]
