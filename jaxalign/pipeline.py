"""`jaxalign pipeline`: SFT -> eval SFT -> gate -> DPO from the best SFT checkpoint -> eval base/SFT/DPO
-> report -> export the DPO model to Hugging Face format. Re-running skips finished stages.

Layout under output_dir: base/ (the starting model, when it is randomly initialised), sft/ and dpo/
(run dirs), gate.json, report/ (report.md, report.json, plots, generations), export/ (HF format).

What a re-run skips: a stage whose run dir holds summary.json; the gate's skill measurement and the
report when gate.json / report.json are newer than the runs they measured and were made with the same
settings (`eval_fingerprint`); the export when export/config.json exists. A changed
eval.min_sft_skill is applied to the recorded skill without measuring it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

import jax

from jaxalign import model_io, paths
from jaxalign.config import config_to_dict, save_config, stage_config
from jaxalign.convert import save_hf
from jaxalign.errors import JaxalignError
from jaxalign.evaluate import run_eval, skill_of
from jaxalign.models import ModelConfig, init_model
from jaxalign.sharding import make_mesh, merged_rules, use_mesh
from jaxalign.train.loop import model_options, run_tokenizer, train

log = logging.getLogger(__name__)


class SFTGateError(JaxalignError):
    """The SFT model misses eval.min_sft_skill: DPO is not run."""


def _finished(run_dir: paths.Path) -> bool:
    return (run_dir / "summary.json").is_file()


def base_model_path(cfg, root: paths.Path) -> str:
    """model.path, or a checkpoint of the randomly initialised model.config written once to root/base."""
    if cfg.model.path:
        return cfg.model.path
    base = root / "base"
    if not (base / model_io.MODEL_FILE).is_file():
        mesh = make_mesh({k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")})
        rules = merged_rules(dict(cfg.mesh.rules))
        tokenizer = run_tokenizer(cfg)
        hf = dict(cfg.model.config)
        # A model made here has no pretrained special ids: take the run tokenizer's, so that every
        # checkpoint and the HF export (config.json, generation_config.json) stop at its EOS.
        for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
            if hf.get(key) is None:
                hf[key] = value
        model_cfg = ModelConfig.from_hf_dict(hf, source="model.config")
        with use_mesh(mesh, rules):
            model = init_model(model_cfg, mesh, rules, seed=cfg.train.seed, **model_options(cfg))
            model_io.save_model_checkpoint(model, base, tokenizer, cfg.model.param_dtype)
    return str(base)


def run_stage(cfg, stage: str, run_dir: paths.Path, extra: list[str]) -> None:
    if _finished(run_dir):
        log.info("%s: finished run in %s, skipped", stage.upper(), run_dir)
        return
    stage_cfg = stage_config(cfg, stage, [f"output_dir={run_dir}", *extra])
    resume = (run_dir / "config.yaml").is_file()
    log.info("%s: %s %s", stage.upper(), "resuming" if resume else "training", run_dir)
    train(stage_cfg, resume=resume)


def eval_fingerprint(cfg, models: dict[str, str]) -> str:
    """A hash of everything an evaluation of `models` depends on: the resolved config (bar the gate's
    threshold and the run's name) and the model paths. A recorded result is reused only when it matches."""
    settings = config_to_dict(cfg)
    settings["eval"] = {k: v for k, v in settings["eval"].items() if k != "min_sft_skill"}
    settings.pop("run_name", None)
    text = json.dumps({"config": settings, "models": models}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _recorded(path: paths.Path, fingerprint: str, measured: list[paths.Path]) -> dict[str, Any] | None:
    """The JSON in `path` if it was written with `fingerprint` after every run in `measured` finished."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    newest_run = max((paths.mtime(p) for p in measured if p.is_file()), default=0.0)
    if record.get("fingerprint") != fingerprint or paths.mtime(path) < newest_run:
        return None
    return record


def gate(cfg, sft_dir: paths.Path, root: paths.Path) -> dict[str, Any]:
    """Stop before DPO when SFT misses eval.min_sft_skill: DPO will not rescue a model that cannot do the task.

    The skill measured for this SFT run is recorded in gate.json and reused by a re-run with the same
    eval settings; the threshold is always the current config's."""
    fingerprint = eval_fingerprint(cfg, {"sft": str(sft_dir)})
    path = root / "gate.json"
    record = _recorded(path, fingerprint, [sft_dir / "summary.json"])
    if record is not None:
        skill = record["sft_skill"]
        log.info("SFT gate: held-out skill recorded in %s, not measured again", path)
    else:
        skill = skill_of(cfg, str(sft_dir))
    result = {"sft_skill": skill, "min_sft_skill": cfg.eval.min_sft_skill,
              "passed": skill is None or skill >= cfg.eval.min_sft_skill, "fingerprint": fingerprint}
    if jax.process_index() == 0 and record != result:
        path.write_text(json.dumps(result, indent=2))
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


def export_config(model_cfg: ModelConfig, tokenizer) -> ModelConfig:
    """The model config to export: its EOS ids joined with the tokenizer's EOS (the ids `jaxalign generate`
    stops at), and the tokenizer's BOS when the model names none, so transformers' `generate` stops where
    jaxalign's does."""
    eos = sorted(set(model_cfg.eos_token_ids) | {tokenizer.eos_id})
    return dataclasses.replace(
        model_cfg, eos_token_id=eos[0] if len(eos) == 1 else tuple(eos),
        bos_token_id=tokenizer.bos_id if model_cfg.bos_token_id is None else model_cfg.bos_token_id)


def export(cfg, dpo_dir: paths.Path, out: paths.Path) -> paths.Path:
    if (out / "config.json").is_file():
        log.info("export: %s exists, skipped", out)
        return out
    mesh = make_mesh({k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")})
    rules = merged_rules(dict(cfg.mesh.rules))
    tokenizer = run_tokenizer(cfg)
    with use_mesh(mesh, rules):
        model = model_io.load_model(dpo_dir, mesh, rules)
        save_hf(model, export_config(model.cfg, tokenizer), out, tokenizer=tokenizer,
                dtype=model_io.source_dtype(dpo_dir))
    return out


def run_pipeline(cfg) -> dict[str, Any]:
    root = paths.as_path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        save_config(cfg, root / "config.yaml")
    base = base_model_path(cfg, root)
    sft_dir, dpo_dir = root / "sft", root / "dpo"
    # The stages start from checkpoints, so the inline architecture (model.config) has served its purpose.
    run_stage(cfg, "sft", sft_dir, [f"model.path={base}", "model.config={}"])
    gate_result = gate(cfg, sft_dir, root)
    run_stage(cfg, "dpo", dpo_dir, [f"dpo.init_from={sft_dir}", "model.config={}"])
    models = {"base": base, "sft": str(sft_dir), "dpo": str(dpo_dir)}
    fingerprint = eval_fingerprint(cfg, models)
    report = _recorded(root / "report" / "report.json", fingerprint,
                       [sft_dir / "summary.json", dpo_dir / "summary.json", paths.as_path(base) / model_io.MODEL_FILE])
    if report is not None:
        log.info("report: %s is up to date, skipped", root / "report" / "report.json")
        report["gate"] = gate_result
    else:
        report = run_eval(cfg, models, root / "report",
                          curves={"sft": sft_dir / "metrics.jsonl", "dpo": dpo_dir / "metrics.jsonl"},
                          extras={"gate": gate_result, "fingerprint": fingerprint})
    exported = export(cfg, dpo_dir, root / "export")
    log.info("report: %s; exported DPO model: %s", root / "report" / "report.md", exported)
    return report
