"""Cross-field and range checks on a type-checked config tree (plain nested dicts)."""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping
from typing import Any

from jaxalign.config.schema import (
    F_DIVERGENCE_LOSSES,
    LORA_TARGETS,
    PIPELINE_STAGES,
    PRECISIONS,
    PREFERENCE_STAGES,
    REFERENCE_FREE_LOSSES,
    SMOOTHED_LOSSES,
    SOURCE_KEYS,
    STAGE_ALIASES,
)
from jaxalign.errors import JaxalignError
from jaxalign.runtime.paths import is_remote
from jaxalign.runtime.sharding import MESH_AXES

log = logging.getLogger("jaxalign.config")

CHAT_TEMPLATES = ("llama2", "llama3", "chatml", "plain")


def coerce_sources(dotted: str, value: Any, where: str) -> tuple[Any, bool]:
    """data.train as (value, type ok): a str, a list of str, or a weighted mixture, a list of
    {path, weight, split, max_rows} mappings (weight > 0; split and max_rows default to data's)."""
    if isinstance(value, str):
        return value, True
    if not isinstance(value, (list, tuple)) or not any(isinstance(v, Mapping) for v in value):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return (list(value) if ok else value), ok
    out = []
    for i, entry in enumerate(value):
        key = f"config key '{dotted}[{i}]'"
        if not isinstance(entry, Mapping):
            raise JaxalignError(f"{key}: a weighted {dotted} gives every source as {{path: ..., weight: ...}}; "
                                f"got {entry!r}{where}")
        for k in entry:
            if k not in SOURCE_KEYS:
                close = difflib.get_close_matches(str(k), SOURCE_KEYS, 1, 0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise JaxalignError(f"{key}: unknown key '{k}'{hint} (a source has {', '.join(SOURCE_KEYS)}){where}")
        path, weight = entry.get("path"), entry.get("weight", 1.0)
        if isinstance(weight, str):  # YAML 1.1 reads 1e-1 as a string
            try:
                weight = float(weight)
            except ValueError:
                pass
        checks = [(isinstance(path, str) and path != "", "path", "must be a file, dir, glob or hub id"),
                  (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
                   and weight > 0, "weight", "must be a number > 0 (weights are relative: they need not sum to 1)"),
                  (isinstance(entry.get("split", ""), str), "split", "must be a str"),
                  (isinstance(entry.get("max_rows", 0), int) and not isinstance(entry.get("max_rows", 0), bool)
                   and entry.get("max_rows", 0) >= 0, "max_rows", "must be an int >= 0 (0 = all rows)")]
        for good, name, what in checks:
            if not good:
                raise JaxalignError(f"{key}: '{name}' {what}; got {entry.get(name)!r}{where}")
        out.append({**entry, "weight": float(weight)})
    return out, True


def cross_field_errors(c: dict) -> list[tuple[str, str]]:
    """Constraints between keys and on ranges: (dotted key, message) for every violation."""
    errors: list[tuple[str, str]] = []

    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            *parents, leaf = key.split(".")
            node = c
            for p in parents:
                node = node[p]
            errors.append((key, f"config key '{key}' {what}; got {node[leaf]!r}"))

    m, d, t, o = c["mesh"], c["data"], c["train"], c["optimizer"]
    for axis in MESH_AXES:
        need(m[axis] == -1 or m[axis] >= 1, f"mesh.{axis}",
             "must be >= 1, or -1 for all remaining devices")
    auto = [f"mesh.{a}" for a in MESH_AXES if m[a] == -1]
    if len(auto) > 1:
        errors.append((auto[-1], f"at most one mesh axis may be -1 (all remaining devices); "
                                 f"got -1 for {', '.join(auto)}: give the others explicit sizes"))
    for name, axes in m["rules"].items():
        axes_list = [axes] if isinstance(axes, str) else axes if isinstance(axes, list) else None
        if axes is not None and (axes_list is None
                                 or any(a not in MESH_AXES for a in axes_list)):
            errors.append(("mesh.rules", f"config key 'mesh.rules.{name}' must be a mesh axis "
                           f"({', '.join(MESH_AXES)}), a list of them or null; got {axes!r}"))

    tmpl = c["tokenizer"]["chat_template"]
    need(tmpl in ("",) + CHAT_TEMPLATES or tmpl.endswith(".jinja"), "tokenizer.chat_template",
         f"must be '', one of {', '.join(CHAT_TEMPLATES)}, or a path to a .jinja file")
    need(c["model"]["logits_chunk_size"] >= -1, "model.logits_chunk_size", "must be >= 0, or -1 (auto)")
    need(c["model"]["attention_block"] >= 128 and c["model"]["attention_block"] % 128 == 0, "model.attention_block",
         "must be a multiple of 128 (the TPU's lane width)")

    need(d["max_length"] >= 1, "data.max_length", "must be >= 1")
    need(1 <= d["max_prompt_length"] < d["max_length"], "data.max_prompt_length",
         f"must be >= 1 and < data.max_length ({d['max_length']})")
    need(0.0 <= d["eval_fraction"] < 1.0, "data.eval_fraction", "must be in [0, 1)")
    if d["eval"] and d["eval_fraction"] > 0:
        errors.append(("data.eval_fraction", "set either data.eval or data.eval_fraction, not both"))
    need(d["pad_to_multiple_of"] >= 1, "data.pad_to_multiple_of", "must be >= 1")
    need(d["max_rows"] >= 0, "data.max_rows", "must be >= 0 (0 = all rows)")
    need(d["shuffle_buffer"] >= 1, "data.shuffle_buffer", "must be >= 1")
    if d["streaming"]:  # what a stream cannot do (jaxalign/data/streaming.py)
        need(t["max_steps"] > 0, "train.max_steps", "must be set (> 0) with data.streaming: a stream's length "
             "is not known ahead")
        need(d["eval_fraction"] == 0, "data.eval_fraction", "must be 0 with data.streaming (nothing is held out "
             "of a stream): give the held-out rows as data.eval")
        need(isinstance(d["train"], str) or all(isinstance(e, str) for e in d["train"]), "data.train",
             "cannot be a weighted mixture with data.streaming")
        need(c["stage"] != "dpo" or c["dpo"]["reference"] != "precomputed", "dpo.reference",
             "cannot be 'precomputed' with data.streaming (it scores every pair before training): use 'model'")
    need(not is_remote(d["cache_dir"]), "data.cache_dir",
         "must be a local directory (datasets memory-maps the tokenized cache from local disk)")
    if c["stage"] == "kto":
        need(c["dpo"]["reference"] != "none", "dpo.reference", "cannot be none for stage kto: KTO's rewards and "
             "reference point are log-ratios to a reference (model, precomputed, or adapters_off with lora)")
        need(d["format"] in ("auto", "preference", "unpaired"), "data.format", "must be 'auto', 'unpaired' or "
             "'preference' for stage kto (it trains on labelled completions, or each side of a pair)")
        need(not d["streaming"], "data.streaming", "is not supported with stage kto yet: KTO's KL completions are "
             "drawn from the token store")
        need(isinstance(d["train"], str) or all(isinstance(e, str) for e in d["train"]), "data.train",
             "cannot be a weighted mixture with stage kto yet")
    elif c["stage"] in ("dpo", "rm"):
        need(d["format"] in ("auto", "preference"), "data.format",
             f"must be 'auto' or 'preference' for stage {c['stage']} (it trains on chosen/rejected pairs)")
    else:
        need(d["format"] != "preference" or d["sft_from_preference"], "data.format",
             "is 'preference' but stage is sft: set data.sft_from_preference=true "
             "to train on the chosen replies")

    need(t["max_steps"] == -1 or t["max_steps"] >= 1, "train.max_steps",
         "must be >= 1, or -1 to run train.epochs")
    need(t["epochs"] >= 1, "train.epochs", "must be >= 1")
    need(t["batch_size"] >= 1, "train.batch_size", "must be >= 1")
    need(t["micro_batch_size"] >= 0, "train.micro_batch_size", "must be >= 0 (0 = no accumulation)")
    if t["micro_batch_size"] > 0 and t["batch_size"] % t["micro_batch_size"]:
        errors.append(("train.micro_batch_size",
                       f"train.batch_size ({t['batch_size']}) must be divisible by "
                       f"train.micro_batch_size ({t['micro_batch_size']})"))
    for key in ("eval_every", "eval_batches", "seed", "max_nonfinite_skips"):
        need(t[key] >= 0, f"train.{key}", "must be >= 0")
    need(t["log_every"] >= 1, "train.log_every", "must be >= 1")

    need(o["lr"] >= 0, "optimizer.lr", "must be >= 0")
    need(o["warmup_steps"] >= 0, "optimizer.warmup_steps", "must be >= 0")
    need(0.0 <= o["warmup_ratio"] <= 1.0, "optimizer.warmup_ratio", "must be in [0, 1]")
    if o["warmup_steps"] > 0 and o["warmup_ratio"] > 0:
        errors.append(("optimizer.warmup_ratio",
                       "set either optimizer.warmup_steps or optimizer.warmup_ratio, not both"))
    need(0.0 <= o["min_lr_ratio"] <= 1.0, "optimizer.min_lr_ratio", "must be in [0, 1]")
    for key in ("b1", "b2"):
        need(0.0 <= o[key] < 1.0, f"optimizer.{key}", "must be in [0, 1)")
    need(o["eps"] > 0, "optimizer.eps", "must be > 0")
    need(o["weight_decay"] >= 0, "optimizer.weight_decay", "must be >= 0")
    need(o["max_grad_norm"] >= 0, "optimizer.max_grad_norm", "must be >= 0 (0 = no clipping)")

    k = c["checkpoint"]
    need(k["every_steps"] >= 0, "checkpoint.every_steps", "must be >= 0 (0 = only at the end)")
    need(k["keep"] >= 1, "checkpoint.keep", "must be >= 1")
    for metric, stage in (("eval_rewards_accuracy", "dpo"), ("eval_accuracy", "rm")):
        need(k["best_metric"] != metric or c["stage"] == stage, "checkpoint.best_metric",
             f"{metric} is a metric of stage {stage}; use 'auto' or 'eval_loss' for stage {c['stage']}")

    e, g = c["eval"], c["generate"]
    need(e["batch_size"] >= 1, "eval.batch_size", "must be >= 1")
    need(e["max_new_tokens"] >= 1, "eval.max_new_tokens", "must be >= 1")
    need(e["num_generations"] >= 0, "eval.num_generations", "must be >= 0")
    need(e["kl_samples"] >= 0, "eval.kl_samples", "must be >= 0 (0 = off)")
    try:
        parse_judge(e["judge"])
    except JaxalignError as err:
        errors.append(("eval.judge", str(err)))
    for field in ("{prompt}", "{first}", "{second}"):
        need(not e["judge_template"] or field in e["judge_template"], "eval.judge_template", f"must contain {field}")
    need(g["max_new_tokens"] >= 1, "generate.max_new_tokens", "must be >= 1")
    need(g["temperature"] >= 0, "generate.temperature", "must be >= 0 (0 = greedy)")
    need(g["top_k"] >= 0, "generate.top_k", "must be >= 0 (0 = off)")
    need(0.0 < g["top_p"] <= 1.0, "generate.top_p", "must be in (0, 1]")

    need(c["sft"]["z_loss"] >= 0, "sft.z_loss", "must be >= 0")
    need(c["pipeline"]["stages"] in PIPELINE_STAGES, "pipeline.stages",
         "must be one of " + ", ".join(f"[{', '.join(s)}]" for s in PIPELINE_STAGES))
    need(c["rm"]["center_rewards_coefficient"] >= 0, "rm.center_rewards_coefficient", "must be >= 0")
    need(not (c["stage"] == "rm" and c["lora"]["enabled"]), "lora.enabled",
         "is not supported for stage rm yet (the score head would have to train beside the adapters); "
         "train the reward model fully")
    errors += _lora_errors(c, need)
    _dpo_checks(c, need)
    return errors


def dpo_losses(p: dict) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(loss types, weights) of a `dpo:` section; the old `sft_weight` w appends an `sft` term of weight w."""
    types = [p["loss"]] if isinstance(p["loss"], str) else list(p["loss"])
    weights = list(p["loss_weights"]) or [1.0] * len(types)
    if p["sft_weight"] and "sft" not in types and len(weights) == len(types):
        types, weights = types + ["sft"], weights + [p["sft_weight"]]
    return tuple(types), tuple(weights)


def resolve_shorthands(tree: dict, sources: Mapping[str, str]) -> list[str]:
    """Resolve, in place, the keys that stand for others; returns the errors (`sources`: where each key was set).

    stage orpo (simpo) becomes stage dpo with dpo.loss orpo (simpo): the default loss is replaced, a list must
    hold it already. model.precision, when set, decides model.dtype and model.param_dtype (PRECISIONS); either
    set beside it to another dtype is an error."""
    errors, where = [], lambda key: f" (in {sources[key]})" if sources.get(key) else ""  # noqa: E731
    alias, loss = tree["stage"], tree["dpo"]["loss"]
    if alias in STAGE_ALIASES:
        loss = alias if loss == "sigmoid" else loss  # the default: what `stage: orpo` alone means
        if alias in ([loss] if isinstance(loss, str) else loss):
            tree["stage"], tree["dpo"]["loss"] = "dpo", loss
        else:
            errors.append(f"config key 'stage' is {alias}, which trains dpo.loss {alias}, but dpo.loss is {loss!r}: "
                          f"set stage dpo to train it, or add {alias} to dpo.loss{where('stage')}")
    m = tree["model"]
    for key, dtype in zip(("dtype", "param_dtype"), PRECISIONS.get(m["precision"], ())):
        if f"model.{key}" in sources and m[key] != dtype:
            errors.append(f"config key 'model.{key}' is {m[key]}{where('model.' + key)}, but model.precision "
                          f"{m['precision']} means {dtype}: set one of them (model.precision '' leaves the dtypes "
                          "to model.dtype and model.param_dtype)")
        m[key] = dtype
    return errors


def _dpo_checks(c: dict, need) -> None:
    p = c["dpo"]
    types = [p["loss"]] if isinstance(p["loss"], str) else p["loss"]
    need(p["beta"] > 0, "dpo.beta", "must be > 0")
    need(bool(types), "dpo.loss", "must name at least one loss")
    need(not p["loss_weights"] or len(p["loss_weights"]) == len(types), "dpo.loss_weights",
         f"must have one weight per dpo.loss entry ({len(types)}: {types}), or be [] for 1 each")
    need(0.0 <= p["label_smoothing"] < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
    need(p["sft_weight"] >= 0, "dpo.sft_weight", "must be >= 0")
    need(not (p["sft_weight"] and "sft" in types), "dpo.sft_weight",
         "is the old spelling of the sft term, which dpo.loss already lists: set its weight in dpo.loss_weights")
    need(0.0 <= p["ld_alpha"] <= 1.0, "dpo.ld_alpha", "must be in [0, 1] (1 = off)")
    need(p["discopop_tau"] > 0, "dpo.discopop_tau", "must be > 0")
    need("exo_pair" not in types or p["label_smoothing"] > 0, "dpo.label_smoothing",
         "must be > 0 for the exo_pair loss (its paper recommends 1e-3)")
    free = [t for t in types if t in REFERENCE_FREE_LOSSES]
    need(not free or p["reference"] in ("auto", "none"), "dpo.reference",
         f"must be none (or auto) for the {', '.join(free)} loss, which is defined without a reference model")
    need(not (p["use_weighting"] and "sft" in types and c["train"]["micro_batch_size"]), "dpo.use_weighting",
         "with an sft term needs the whole batch in one micro-batch (train.micro_batch_size 0): the term is the "
         "batch's NLL times its mean pair weight, which micro-batches cannot add up to")
    unweighted = [t for t in types if t in ("aot", "aot_unpaired", *REFERENCE_FREE_LOSSES)]
    need(not p["use_weighting"] or not unweighted, "dpo.use_weighting", f"does not apply to the {unweighted} loss: "
         "aot sorts pairs (per-pair weights would not follow them, as TRL refuses), simpo and orpo are not DPO's")
    need("orpo" not in types or "sft" not in types, "dpo.loss", "orpo includes ORPO's NLL term (of the prompt and "
         "chosen reply, as TRL's ORPOTrainer): drop sft from the list")
    off = [t for t in types if t not in F_DIVERGENCE_LOSSES]
    need(p["f_divergence_type"] == "reverse_kl" or not off, "dpo.f_divergence_type",
         f"{p['f_divergence_type']} applies to the losses {', '.join(F_DIVERGENCE_LOSSES)} only, not {off}: "
         "their reward difference does not cancel f-DPO's log Z(x) term")
    if c["stage"] != "dpo":
        return
    if p["sft_weight"]:
        log.warning("dpo.sft_weight is the old spelling: write dpo.loss: [%s, sft] with dpo.loss_weights: [1.0, %s]",
                    ", ".join(types), p["sft_weight"])
    unsmoothed = [t for t in types if t not in SMOOTHED_LOSSES and t != "sft"]
    if p["label_smoothing"] > 0 and unsmoothed:
        log.warning("dpo.label_smoothing is ignored by dpo.loss %s", ", ".join(unsmoothed))


def _lora_errors(c: dict, need) -> list[tuple[str, str]]:
    lo, p, errors = c["lora"], c["dpo"], []
    dpo_lora = (p["overrides"].get("lora") or {}).get("enabled", lo["enabled"])
    need(c["export"]["format"] != "peft" or dpo_lora, "export.format", "peft writes adapters: it needs the DPO "
         "stage to train them (lora.enabled=true, or dpo.overrides.lora.enabled)")
    if not lo["enabled"]:
        need(p["reference"] != "adapters_off", "dpo.reference", "needs lora.enabled=true (it is the base model "
             "without its adapters)")
        need(lo["quantize"] == "none", "lora.quantize", "quantises the frozen base under adapters: it needs "
             "lora.enabled=true")
        return errors
    need(lo["rank"] >= 1, "lora.rank", "must be >= 1")
    need(lo["alpha"] > 0, "lora.alpha", "must be > 0")
    need(0.0 <= lo["dropout"] < 1.0, "lora.dropout", "must be in [0, 1)")
    need(lo["quant_block_size"] >= 1, "lora.quant_block_size", "must be >= 1")
    need(lo["quantize"] == "nf4" or not lo["double_quant"], "lora.double_quant", "applies to lora.quantize=nf4 only")
    valid = [*LORA_TARGETS, *(t.split("_")[0] for t in LORA_TARGETS), "all-linear"]
    for name in lo["targets"]:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(("lora.targets", f"config key 'lora.targets' has unknown target {name!r}{hint}; valid: "
                           + ", ".join(valid)))
    need(bool(lo["targets"]), "lora.targets", "must name at least one projection (or all-linear)")
    preference = c["stage"] in PREFERENCE_STAGES
    starts_from = p["init_from"] if preference and p["init_from"] else c["model"]["path"]
    if not starts_from:
        key = "dpo.init_from" if preference else "model.path"
        errors.append((key, f"lora.enabled needs a base model to adapt: set {key} (a random model.config has "
                            "nothing to adapt)"))
    if preference:
        need(p["reference"] != "model", "dpo.reference", "is a second copy of the model, but with lora the "
             "reference is the base without the adapters: use 'auto' or 'adapters_off' (or 'precomputed')")
    return errors


JUDGE_KINDS = ("reward", "llm", "likelihood")


def parse_judge(spec: str, task_name: str = "") -> tuple[str, str]:
    """`eval.judge` as (kind, path): ("task", task name), ("reward" | "llm" | "likelihood", model path),
    or ("", "") when nothing judges. A bare path is the likelihood judge."""
    if spec in ("", "task"):
        return ("task", task_name) if task_name else ("", "")
    kind, sep, path = spec.partition(":")
    if sep and kind in JUDGE_KINDS and path:
        return kind, path
    if sep and len(kind) > 1 and "/" not in kind and not path.startswith("//"):  # a typo; gs://, C:\\ are paths
        raise JaxalignError(f"eval.judge {spec!r}: unknown judge kind {kind!r}; use reward:PATH, llm:PATH, "
                            "likelihood:PATH, a bare model PATH (likelihood) or '' (the task's judge)")
    return "likelihood", spec
