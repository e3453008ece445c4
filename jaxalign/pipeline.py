"""`jaxalign pipeline`: SFT -> eval SFT -> gate -> [reward model] -> DPO from the best SFT checkpoint ->
eval base/SFT/DPO -> report -> export the DPO model to Hugging Face format. Re-running skips finished
stages and resumes unfinished ones. `pipeline.stages` picks the preference stage (its last: dpo, kto, orpo
or simpo, in a run dir of its name, set by dpo.overrides); [orpo] and [simpo] train it from the base model,
with no SFT stage and no gate, and the report compares base and it.

With `pipeline.stages: [sft, rm, dpo]` a reward model is trained from the SFT model on DPO's training
pairs (never on the held-out pairs the report measures), and judges the report's win-rates unless
`eval.judge` names another judge.

Layout under output_dir: run.lock and status.json of the pipeline itself, base/ (the starting model,
when it is randomly initialised), sft/, rm/ and dpo/ (run dirs), gate.json, report/ (report.md,
report.json, plots, generations), export/ (HF format).

What a re-run skips: a stage whose status.json says `finished` (a stage left `running` by a kill,
`preempted` or `failed` is resumed from its newest checkpoint); base/ and export/ when their COMPLETE
marker is there (a half-written one is written again); the gate's skill measurement and the report
when gate.json / report.json are newer than the runs they measured and were made with the same
settings (`eval_fingerprint`). A changed eval.min_sft_skill is applied to the recorded skill without
measuring it again.

A SIGTERM (or a first SIGINT) stops the stage that is training after its current step, with a
checkpoint; between stages it stops before the next one. Either way `Preempted` is raised (the CLI
exits 75) and a re-run goes on from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import jax

from jaxalign.checkpoint import model_io
from jaxalign.config import apply_overrides, config_to_dict, save_config, stage_config
from jaxalign.errors import JaxalignError
from jaxalign.eval.evaluate import run_eval, skill_of
from jaxalign.export.hf import export_run
from jaxalign.models import ModelConfig, init_model
from jaxalign.run import lifecycle
from jaxalign.run.build import mesh_from_config, model_options, run_tokenizer
from jaxalign.run.loop import train
from jaxalign.runtime import paths, run_lock
from jaxalign.runtime.distributed import agree
from jaxalign.runtime.preemption import PreemptionWatch
from jaxalign.runtime.sharding import use_mesh

log = logging.getLogger(__name__)


class SFTGateError(JaxalignError):
    """The SFT model misses eval.min_sft_skill: DPO is not run."""


def base_model_path(cfg, root: paths.Path) -> str:
    """model.path, or a checkpoint of the randomly initialised model.config written once to root/base."""
    if cfg.model.path:
        return cfg.model.path
    base = root / "base"
    if not lifecycle.is_complete(base):
        if jax.process_index() == 0:
            lifecycle.clear_incomplete(base, "the base model")
        mesh, rules = mesh_from_config(cfg)
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
        if jax.process_index() == 0:
            lifecycle.mark_complete(base)
    return str(base)


def run_stage(cfg, stage: str, run_dir: paths.Path, extra: list[str]) -> None:
    """Train `stage` in `run_dir` to the end (resuming an unfinished run); Preempted if it stopped early."""
    if lifecycle.is_finished(run_dir):
        log.info("%s: finished run in %s, skipped", stage.upper(), run_dir)
        return
    stage_cfg = stage_config(cfg, stage, [*extra, f"output_dir={run_dir}"])
    resume = (run_dir / "config.yaml").is_file()
    state = lifecycle.state_of(run_dir)
    log.info("%s: %s %s", stage.upper(), f"resuming the {state or 'unfinished'} run in" if resume else "training",
             run_dir)
    summary = train(stage_cfg, resume=resume)
    if summary["state"] != lifecycle.FINISHED:
        raise lifecycle.Preempted(
            f"{stage.upper()} stopped after step {summary['steps']} of {summary['total_steps']} (checkpoint in "
            f"{run_dir / 'checkpoints'}); nothing after it ran. Run the same command again to resume")


def reward_model_sets(cfg, sets: list[str]) -> list[str]:
    """The reward model trains on the preference stage's training pairs, split off as it splits them (same data,
    eval split and seed), unless rm.overrides names its own data; either way none of the held-out pairs the
    report measures may be among its training data."""
    dpo = stage_config(cfg, cfg.pipeline.stages[-1], sets)
    own = "train" in (cfg.rm.overrides.get("data") or {})
    data = stage_config(cfg, "rm", sets).data if own else dpo.data
    held_out = {str(p) for p in _paths(dpo.data.eval) + _paths(cfg.eval.preference_data)}
    overlap = sorted(held_out & {str(p) for p in _paths(data.train)})
    if overlap:
        where = "rm.overrides.data.train" if own else "the DPO stage's data.train"
        raise JaxalignError(f"the reward model's training data ({where}) includes the held-out pairs the report "
                            f"measures ({', '.join(overlap)}); train it on other pairs")
    if own:
        return []
    dump = lambda v: json.dumps(list(v) if not isinstance(v, str) else v)  # noqa: E731  (YAML reads JSON)
    return [f"data.train={dump(data.train)}", f"data.eval={dump(data.eval)}", f"data.eval_fraction={data.eval_fraction}",
            "data.sft_from_preference=false"]


def _paths(value) -> list[str]:
    return [value] if isinstance(value, str) and value else [v for v in value or () if v]


def eval_fingerprint(cfg, models: dict[str, str]) -> str:
    """A hash of everything an evaluation of `models` depends on: the resolved config (bar the gate's
    threshold and the run's name) and the model paths. A recorded result is reused only when it matches."""
    settings = config_to_dict(cfg)
    settings["eval"] = {k: v for k, v in settings["eval"].items() if k != "min_sft_skill"}
    settings.pop("export", None)  # how the DPO model is exported does not change what is measured
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
    record = _recorded(path, fingerprint, [sft_dir / lifecycle.STATUS_FILE])
    if record is not None:
        skill = record["sft_skill"]
        log.info("SFT gate: held-out skill recorded in %s, not measured again", path)
    else:
        skill = skill_of(cfg, str(sft_dir))
    result = {"sft_skill": skill, "min_sft_skill": cfg.eval.min_sft_skill,
              "passed": skill is None or skill >= cfg.eval.min_sft_skill, "fingerprint": fingerprint}
    if jax.process_index() == 0 and record != result:
        lifecycle.write_json_atomic(path, result)
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


def run_pipeline(cfg, sets: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The whole chain in cfg.output_dir; `sets` (the command's --set overrides) are applied to each stage
    after its {stage}.overrides, as `jaxalign train` applies them. Raises Preempted when stopped early."""
    root = paths.as_path(cfg.output_dir)
    lock = run_lock.acquire_for_job(root)  # the root's own lock: one pipeline per output dir
    try:
        with PreemptionWatch() as preempt:
            return _run_pipeline(cfg, list(sets), root, preempt)
    except lifecycle.Preempted as e:
        _set_state(root, lifecycle.PREEMPTED, str(e))
        raise
    except BaseException as e:
        _set_state(root, lifecycle.FAILED, str(e) or type(e).__name__)
        raise
    finally:
        if lock is not None:
            lock.release()


def _set_state(root: paths.Path, state: str, message: str = "") -> None:
    if jax.process_index() == 0 and root.is_dir():
        lifecycle.write_status(root, state, message=message[:2000])


def _run_pipeline(cfg, sets: list[str], root: paths.Path, preempt: PreemptionWatch) -> dict[str, Any]:
    def between_stages(next_step: str) -> None:
        if preempt.requested():
            raise lifecycle.Preempted(f"stopped by a signal before {next_step}; run the same command again to go on")

    def write_root() -> None:
        if jax.process_index() == 0:
            root.mkdir(parents=True, exist_ok=True)
            save_config(cfg, root / "config.yaml")
            lifecycle.write_status(root, lifecycle.RUNNING)

    agree("preparing the pipeline dir", write_root)
    base = base_model_path(cfg, root)
    final = cfg.pipeline.stages[-1]  # the preference stage: dpo, kto, orpo or simpo
    sft_dir, final_dir = root / "sft", root / final
    models, gate_result = {"base": base}, None
    # The stages start from checkpoints, so the inline architecture (model.config) has served its purpose.
    if "sft" in cfg.pipeline.stages:
        between_stages("SFT")
        run_stage(cfg, "sft", sft_dir, [*sets, f"model.path={base}", "model.config={}"])
        between_stages("the SFT gate")
        gate_result = gate(cfg, sft_dir, root)
        models["sft"] = str(sft_dir)
    rm_dir = root / "rm"
    if "rm" in cfg.pipeline.stages:
        between_stages("the reward model")
        run_stage(cfg, "rm", rm_dir, [*sets, *reward_model_sets(cfg, sets), f"model.path={sft_dir}", "model.config={}"])
        if not cfg.eval.judge:
            cfg = apply_overrides(cfg, [f"eval.judge=reward:{rm_dir}"])
    between_stages(final.upper())
    run_stage(cfg, final, final_dir, [*sets, f"dpo.init_from={models.get('sft', base)}", "model.config={}"])
    between_stages("the report")
    models[final] = str(final_dir)
    fingerprint = eval_fingerprint(cfg, models)
    runs = [root / name / lifecycle.STATUS_FILE for name in models if name != "base"]
    report = _recorded(root / "report" / "report.json", fingerprint,
                       [*runs, paths.as_path(base) / model_io.MODEL_FILE])
    if report is not None:
        log.info("report: %s is up to date, skipped", root / "report" / "report.json")
        report["gate"] = gate_result
    else:
        report = run_eval(cfg, models, root / "report",
                          curves={name: root / name / "metrics.jsonl" for name in models if name != "base"},
                          extras={"gate": gate_result, "fingerprint": fingerprint})
    between_stages("the export")
    exported = export_run(cfg, final_dir, root / "export")
    _set_state(root, lifecycle.FINISHED)
    log.info("report: %s; exported %s model: %s", root / "report" / "report.md", final.upper(), exported)
    return report
