"""`jaxalign eval`: every model on the same held-out data, so each gain is credited to its stage.

Per model: held-out NLL / perplexity of reference responses; implicit-reward accuracy and margin on
held-out pairs relative to the SFT model; greedy generations on held-out prompts, checked by the
task's program (skill accuracy, style rate), their mean length, and judged pairwise against the SFT
model's by `eval.judge` (eval/judges.py): win-rate with its 95% interval and ties, and the
length-controlled win-rate; the KL from the SFT model on the model's own samples (eval.kl_samples).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from jaxalign.checkpoint import model_io
from jaxalign.config import stage_config
from jaxalign.data.examples import encode_prompt
from jaxalign.data.formats import detect_format
from jaxalign.data.pipeline import load_examples
from jaxalign.data.sources import load_rows
from jaxalign.data.tokenize import resolve_cache_dir, tokenize_dataset
from jaxalign.errors import JaxalignError
from jaxalign.eval import winrate
from jaxalign.eval.generate import SamplingParams, generate, generate_text
from jaxalign.eval.judges import TaskJudge, build_judge
from jaxalign.eval.report import build_report, write_report
from jaxalign.eval.score import read_jsonl, score_rows
from jaxalign.run.build import mesh_from_config, model_options, objective_from_config, run_tokenizer
from jaxalign.run.heldout import heldout_metrics
from jaxalign.runtime import paths
from jaxalign.runtime.sharding import use_mesh
from jaxalign.train.step import make_eval_step

log = logging.getLogger(__name__)

HELD_OUT = "heldout"  # eval.prompts: generate for the held-out pairs' prompts


@dataclasses.dataclass
class HeldOut:
    """The held-out data every model is evaluated on."""

    sft_examples: Sequence[dict]  # tokenized SFT examples: NLL of the reference responses
    pairs: Sequence[dict]  # tokenized preference pairs: implicit-reward accuracy
    prompts: list[dict]  # generation prompts, with the task's fields (e.g. the expected answer)


def _held_out_examples(path: str, stage_cfg, tokenizer, stage: str) -> Sequence[dict]:
    """Tokenized `path`, or (when '') the held-out split the stage validated on: its data.eval, or
    the seeded data.eval_fraction of its data.train."""
    if path:
        return tokenize_dataset(load_rows(path, stage_cfg.data.split), tokenizer, stage_cfg.data, stage,
                                loss_on=stage_cfg.sft.loss_on, cache_dir=resolve_cache_dir(stage_cfg), source=path)[0]
    if not stage_cfg.data.train or not (stage_cfg.data.eval or stage_cfg.data.eval_fraction):
        return []
    return load_examples(stage_cfg, tokenizer, stage=stage)[1]


def _unpaired(stage_cfg) -> bool:
    """Whether a KTO stage trains on unpaired rows (declared, or detected from its first source's columns)."""
    data = stage_cfg.data
    if stage_cfg.stage != "kto" or data.format not in ("auto", "unpaired"):
        return False
    source = data.eval or data.train
    first = source if isinstance(source, str) else source[0] if source else ""
    first = first.get("path", "") if isinstance(first, Mapping) else first
    return data.format == "unpaired" or (bool(first) and detect_format(
        load_rows(first, data.split, max_rows=1).column_names) == "unpaired")


def load_held_out(cfg, tokenizer) -> HeldOut:
    """eval.sft_data / eval.preference_data / eval.prompts; the data default to each stage's validation split."""
    # The preference stage's data (pipeline.stages' last, its dpo.overrides applied); KTO's unpaired rows give no pairs.
    sft_cfg, pref_cfg = stage_config(cfg, "sft"), stage_config(cfg, cfg.pipeline.stages[-1])
    sft_examples = _held_out_examples(cfg.eval.sft_data, sft_cfg, tokenizer, "sft")
    pairs = [] if not cfg.eval.preference_data and _unpaired(pref_cfg) else _held_out_examples(
        cfg.eval.preference_data, pref_cfg, tokenizer, "dpo")
    if cfg.eval.prompts == HELD_OUT:  # the held-out pairs' prompts, as tokenized (the judge reads them decoded)
        prompts = [{"prompt": tokenizer.decode(p["prompt_ids"], skip_special_tokens=True), "prompt_ids": p["prompt_ids"]}
                   for p in pairs]
    else:
        prompts = [row for _, row in read_jsonl(cfg.eval.prompts)] if cfg.eval.prompts else []
    if cfg.eval.num_generations:
        prompts = prompts[:cfg.eval.num_generations]
    if not (sft_examples or pairs or prompts):
        raise JaxalignError("nothing to evaluate on: set eval.prompts, eval.sft_data or eval.preference_data (or "
                            "data.eval in the stage overrides)")
    return HeldOut(sft_examples, pairs, prompts)


class Evaluator:
    """Evaluates models one at a time on one mesh; the SFT model's params are kept as the reference."""

    def __init__(self, cfg, tokenizer=None):
        self.cfg = cfg
        self.mesh, self.rules = mesh_from_config(cfg)
        self.tokenizer = tokenizer or run_tokenizer(cfg)
        self.held_out = load_held_out(cfg, self.tokenizer)
        self.task = _task(cfg.eval.task)
        self.pad_id = self.tokenizer.pad_id or 0
        # Greedy, so every stage is compared on deterministic outputs; only the stop strings come from `generate:`.
        self.sampling = SamplingParams(cfg.eval.max_new_tokens, stop=cfg.generate.stop)
        self._judge: Any = False  # built on first use: the SFT gate needs none

    @property
    def judge(self):
        """The judge `eval.judge` names (None: nothing judges), opened on first use."""
        if self._judge is False:
            cfg = self.cfg
            self._judge = build_judge(cfg.eval.judge, self.task, mesh=self.mesh, load=self.load,
                                      tokenizer_of=lambda path: run_tokenizer_of(path, cfg),
                                      batch_size=cfg.eval.batch_size, template=cfg.eval.judge_template)
        return self._judge

    @property
    def task_judge(self) -> TaskJudge | None:
        """The task's own judge when another one judges (their agreement is reported), else None."""
        has = hasattr(self.task, "judge_pair") and not isinstance(self.judge, TaskJudge)
        return TaskJudge(self.task) if has else None

    def load(self, path: str):
        with use_mesh(self.mesh, self.rules):
            return model_io.load_model(path, self.mesh, self.rules, **model_options(self.cfg))

    def _mean_metrics(self, model, examples: list[dict], stage: str, ref_params=None) -> dict[str, float]:
        # The stage's own objective, as training builds it (loss type, label smoothing, RPO weight, chunking).
        objective = objective_from_config(stage_config(self.cfg, stage))
        graphdef, params = nnx.split(model)
        return heldout_metrics(jax.jit(make_eval_step(graphdef, objective)), params, examples, self.cfg, self.mesh,
                               self.rules, stage=stage, ref_params=ref_params, pad_id=self.pad_id)

    def nll(self, model) -> dict[str, float]:
        if not self.held_out.sft_examples:
            return {}
        m = self._mean_metrics(model, self.held_out.sft_examples, "sft")
        return {"nll": m["nll"], "perplexity": math.exp(min(m["nll"], 80.0))}

    def rewards(self, model, ref_model) -> dict[str, float]:
        """Implicit rewards beta * (log pi - log pi_ref) relative to the SFT (reference) model."""
        if not self.held_out.pairs or ref_model is None:
            return {}
        ref_params = nnx.split(ref_model)[1]
        m = self._mean_metrics(model, self.held_out.pairs, "dpo", ref_params)
        return {"reward_accuracy": m["rewards/accuracies"], "reward_margin": m["rewards/margins"]}

    def generations(self, model) -> list[str]:
        if not self.held_out.prompts:
            return []
        with use_mesh(self.mesh, self.rules):
            return generate_text(model, self.tokenizer, [_prompt(r) for r in self.held_out.prompts], self.sampling,
                                 mesh=self.mesh, batch_size=self.cfg.eval.batch_size)

    def task_metrics(self, completions: Sequence[str]) -> dict[str, float]:
        if self.task is None or not completions:
            return {}
        rows = self.held_out.prompts
        out = {"skill_accuracy": sum(self.task.skill_correct(r, c) for r, c in zip(rows, completions)) / len(rows)}
        if hasattr(self.task, "style_score"):
            out["style_rate"] = sum(self.task.style_score(c) for c in completions) / len(rows)
        return out

    def win_rate(self, completions: Sequence[str], sft_completions: Sequence[str]) -> dict:
        """Each generation judged against the SFT model's on the same prompt: the win-rate (ties half) with its
        95% interval, the counts, and the length-controlled win-rate (lengths in characters)."""
        rows = self.held_out.prompts
        if not completions or not sft_completions or self.judge is None:
            return {}
        verdicts = self.judge(rows, completions, sft_completions)
        stats = winrate.win_rate(verdicts)
        out = {"win_rate_vs_sft": stats["win_rate"], "win_rate_ci_low": stats["ci_low"],
               "win_rate_ci_high": stats["ci_high"], **{k: stats[k] for k in ("wins", "losses", "ties", "judged")},
               "lc_win_rate_vs_sft": winrate.length_controlled_win_rate(
                   verdicts, [len(c) for c in completions], [len(c) for c in sft_completions])}
        if self.task_judge is not None:  # on the pairs the task's judge decides
            decided = [(v, t) for v, t in zip(verdicts, self.task_judge(rows, completions, sft_completions)) if t]
            if decided:
                out["judge_agreement_with_task"] = sum(v == t for v, t in decided) / len(decided)
        return out

    def generation_length(self, completions: Sequence[str]) -> dict[str, float]:
        if not completions:
            return {}
        return {"mean_gen_tokens": sum(len(self.tokenizer.encode(c)) for c in completions) / len(completions)}

    def kl_from_sft(self, model, sft_model) -> dict[str, float]:
        """KL(model || SFT) per token on eval.kl_samples of the model's own samples (temperature 1, no stop
        strings: a sample ends at EOS, which is scored too, or at eval.max_new_tokens)."""
        n = min(self.cfg.eval.kl_samples, len(self.held_out.prompts))
        if not n or sft_model is None:
            return {}
        rows = self.held_out.prompts[:n]
        params = SamplingParams(self.cfg.eval.max_new_tokens, temperature=1.0, seed=self.cfg.train.seed)
        with use_mesh(self.mesh, self.rules):
            samples = generate(model, self.tokenizer, [_prompt(r) for r in rows], params, mesh=self.mesh,
                               batch_size=self.cfg.eval.batch_size)
        entries = []
        for i, (row, sample) in enumerate(zip(rows, samples)):
            ids = sample.completion_ids + ([self.tokenizer.eos_id] if sample.finish_reason == "stop" else [])
            if ids:
                entries.append((f"sample {i}", list(row.get("prompt_ids") or encode_prompt(self.tokenizer, row["prompt"])),
                                ids))
        if not entries:
            return {}
        ours, sft = (score_rows(m, entries, self.mesh, self.cfg.eval.batch_size, pad_id=self.pad_id)
                     for m in (model, sft_model))
        return {"kl_vs_sft": winrate.kl_per_token([lp for lp, _ in ours], [lp for lp, _ in sft], [n for _, n in ours])}


def _prompt(row: dict):
    """What a held-out prompt row generates from: its token ids when it has them, else its prompt."""
    return list(row["prompt_ids"]) if row.get("prompt_ids") else row["prompt"]


def run_tokenizer_of(path: str, cfg):
    """A judge model's own tokenizer (its chat template from the model, not the run's override)."""
    from jaxalign.data.tokenizer import load_tokenizer

    return load_tokenizer(str(model_io.tokenizer_path(path)), "", cfg.model.trust_remote_code)


def _task(name: str):
    if not name:
        return None
    from jaxalign.eval.tasks import get_task

    return get_task(name)


def skill_of(cfg, model_path: str) -> float | None:
    """Held-out task accuracy of one model's greedy generations (the pipeline's SFT gate)."""
    ev = Evaluator(cfg)
    if ev.task is None or not ev.held_out.prompts:
        return None
    return ev.task_metrics(ev.generations(ev.load(model_path)))["skill_accuracy"]


def run_eval(cfg, models: Mapping[str, str], out_dir: paths.PathLike,
             curves: Mapping[str, paths.PathLike] | None = None,
             extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate `models` (name -> path; "sft" is the reference for rewards and win-rates) and write the report.

    `extras` are stored in report.json as they are (the pipeline adds its gate result)."""
    out = paths.as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = Evaluator(cfg)
    order = sorted(models, key=lambda name: name != "sft")  # the SFT model first: it is everyone's reference
    sft_model = ev.load(models["sft"]) if "sft" in models else None
    by_model: dict[str, dict[str, Any]] = {}
    completions: dict[str, list[str]] = {}
    for name in order:
        log.info("evaluating %s (%s)", name, models[name])
        model = sft_model if name == "sft" else ev.load(models[name])
        # Rewards are relative to the SFT model: it has none of its own.
        metrics = {**ev.nll(model), **(ev.rewards(model, sft_model) if name != "sft" else {})}
        completions[name] = ev.generations(model)
        metrics.update(ev.task_metrics(completions[name]))
        metrics.update(ev.generation_length(completions[name]))
        if name != "sft" and "sft" in completions:
            metrics.update(ev.win_rate(completions[name], completions["sft"]))
            metrics.update(ev.kl_from_sft(model, sft_model))
        by_model[name] = metrics
        _write_generations(out / f"generations_{name}.jsonl", ev.held_out.prompts, completions[name])
    names = [n for n in ("base", "sft", "dpo") if n in by_model] + [n for n in by_model if n not in ("base", "sft", "dpo")]
    report = build_report({n: by_model[n] for n in names}, {
        "title": cfg.run_name or paths.as_path(cfg.output_dir).name,
        "models_paths": {n: str(models[n]) for n in names},
        "data": {"prompts": len(ev.held_out.prompts), "sft_examples": len(ev.held_out.sft_examples),
                 "pairs": len(ev.held_out.pairs), "task": cfg.eval.task or None,
                 "judge": ev.judge.name if ev.judge is not None and ev.held_out.prompts else None},
        **(extras or {}),
    })
    if jax.process_index() == 0:
        write_report(out, report, curves)
    for warning in report["warnings"]:
        log.warning("%s", warning)
    return report


def _write_generations(path: paths.Path, rows: Sequence[dict], completions: Sequence[str]) -> None:
    if not completions or jax.process_index() != 0:
        return
    with path.open("w", encoding="utf-8") as f:
        for row, completion in zip(rows, completions):
            f.write(json.dumps({**row, "completion": completion}, ensure_ascii=False) + "\n")


def parse_models(spec: str) -> dict[str, str]:
    """"base=P0,sft=P1,dpo=P2" -> {"base": "P0", ...}."""
    models = {}
    for item in filter(None, spec.split(",")):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise JaxalignError(f"--models: expected NAME=PATH items separated by commas, got {item!r}")
        models[name.strip()] = path.strip()
    if not models:
        raise JaxalignError("--models: no models given")
    return models
