"""`jaxalign pipeline`: SFT -> eval SFT -> gate -> DPO from the best SFT checkpoint -> eval base/SFT/DPO
-> report -> export the DPO model to Hugging Face format. Re-running skips finished stages.

Layout under output_dir: base/ (the starting model, when it is randomly initialised), sft/ and dpo/
(run dirs), gate.json, report/ (report.md, report.json, plots, generations), export/ (HF format).
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax

from jaxalign import model_io
from jaxalign.config import save_config, stage_config
from jaxalign.convert import save_hf
from jaxalign.errors import JaxalignError
from jaxalign.evaluate import run_eval, skill_of
from jaxalign.models import ModelConfig, init_model
from jaxalign.sharding import make_mesh, merged_rules, use_mesh
from jaxalign.train.loop import model_options, run_tokenizer, train

log = logging.getLogger(__name__)


class SFTGateError(JaxalignError):
    """The SFT model misses eval.min_sft_skill: DPO is not run."""


def _finished(run_dir: pathlib.Path) -> bool:
    return (run_dir / "summary.json").is_file()


def base_model_path(cfg, root: pathlib.Path) -> str:
    """model.path, or a checkpoint of the randomly initialised model.config written once to root/base."""
    if cfg.model.path:
        return cfg.model.path
    base = root / "base"
    if not (base / model_io.MODEL_FILE).is_file():
        mesh = make_mesh({k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")})
        rules = merged_rules(dict(cfg.mesh.rules))
        model_cfg = ModelConfig.from_hf_dict(dict(cfg.model.config), source="model.config")
        with use_mesh(mesh, rules):
            model = init_model(model_cfg, mesh, rules, seed=cfg.train.seed, **model_options(cfg))
            model_io.save_model_checkpoint(model, base, run_tokenizer(cfg), cfg.model.param_dtype)
    return str(base)


def run_stage(cfg, stage: str, run_dir: pathlib.Path, extra: list[str]) -> None:
    if _finished(run_dir):
        log.info("%s: finished run in %s, skipped", stage.upper(), run_dir)
        return
    stage_cfg = stage_config(cfg, stage, [f"output_dir={run_dir}", *extra])
    resume = (run_dir / "config.yaml").is_file()
    log.info("%s: %s %s", stage.upper(), "resuming" if resume else "training", run_dir)
    train(stage_cfg, resume=resume)


def gate(cfg, sft_dir: pathlib.Path, root: pathlib.Path) -> dict[str, Any]:
    """Stop before DPO when SFT misses eval.min_sft_skill: DPO will not rescue a model that cannot do the task."""
    skill = skill_of(cfg, str(sft_dir))
    result = {"sft_skill": skill, "min_sft_skill": cfg.eval.min_sft_skill,
              "passed": skill is None or skill >= cfg.eval.min_sft_skill}
    if jax.process_index() == 0:
        (root / "gate.json").write_text(json.dumps(result, indent=2))
    if skill is None:
        log.warning("SFT gate: no task or eval.prompts to measure skill with; DPO runs ungated")
    elif not result["passed"]:
        raise SFTGateError(
            f"SFT gate: held-out skill {skill:.1%} is below eval.min_sft_skill={cfg.eval.min_sft_skill:.1%}; "
            "DPO will not rescue a model that cannot do the task. Train SFT longer or on more/better data "
            f"(the SFT run is in {sft_dir}; see {root / 'gate.json'}), then re-run: finished stages are skipped")
    else:
        log.info("SFT gate passed: held-out skill %.1f%% >= %.1f%%", 100 * skill, 100 * cfg.eval.min_sft_skill)
    return result


def export(cfg, dpo_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    if (out / "config.json").is_file():
        log.info("export: %s exists, skipped", out)
        return out
    mesh = make_mesh({k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")})
    rules = merged_rules(dict(cfg.mesh.rules))
    with use_mesh(mesh, rules):
        model = model_io.load_model(dpo_dir, mesh, rules)
        save_hf(model, model.cfg, out, tokenizer=run_tokenizer(cfg), dtype=model_io.source_dtype(dpo_dir))
    return out


def run_pipeline(cfg) -> dict[str, Any]:
    root = pathlib.Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        save_config(cfg, root / "config.yaml")
    base = base_model_path(cfg, root)
    sft_dir, dpo_dir = root / "sft", root / "dpo"
    # The stages start from checkpoints, so the inline architecture (model.config) has served its purpose.
    run_stage(cfg, "sft", sft_dir, [f"model.path={base}", "model.config={}"])
    gate_result = gate(cfg, sft_dir, root)
    run_stage(cfg, "dpo", dpo_dir, [f"dpo.init_from={sft_dir}", "model.config={}"])
    report = run_eval(cfg, {"base": base, "sft": str(sft_dir), "dpo": str(dpo_dir)}, root / "report",
                      curves={"sft": sft_dir / "metrics.jsonl", "dpo": dpo_dir / "metrics.jsonl"})
    report["gate"] = gate_result
    exported = export(cfg, dpo_dir, root / "export")
    log.info("report: %s; exported DPO model: %s", root / "report" / "report.md", exported)
    return report
