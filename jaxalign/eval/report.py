"""The stage-comparison report: per-model metrics in, report.md / report.json / PNG plots out.

Each metric is credited to the stage that moved it (base -> SFT, or SFT -> the preference stage: DPO, or
KTO, ORPO, SimPO; base -> it when there is no SFT model), and a warning is raised when the preference stage
adds no measurable win-rate over SFT.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jaxalign.runtime import paths

# name -> (higher is better, what it measures). Only metrics named here are credited.
METRICS: dict[str, tuple[bool, str]] = {
    "skill_accuracy": (True, "held-out task accuracy of greedy generations (checked by the task's program)"),
    "nll": (False, "held-out token-mean NLL of the reference responses"),
    "perplexity": (False, "exp(nll)"),
    "style_rate": (True, "fraction of generations in the preferred style (checked by the task's program)"),
    "reward_accuracy": (True, "held-out pairs with implicit reward chosen > rejected (relative to SFT)"),
    "reward_margin": (True, "mean implicit reward margin chosen - rejected on held-out pairs (relative to SFT)"),
    "win_rate_vs_sft": (True, "judged wins over the SFT model's generations (ties count half), with its 95% "
                        "interval"),
    "lc_win_rate_vs_sft": (True, "the win-rate at equal lengths: the verdicts regressed on the length difference "
                           "(AlpacaEval 2's length-controlled win-rate)"),
}
# Shown beside the metrics but credited to no stage: they describe how far a stage moved, not a gain.
INFO_METRICS: dict[str, str] = {
    "mean_gen_tokens": "mean length of the greedy generations, in tokens",
    "kl_vs_sft": "KL(model || SFT) per token, estimated on the model's own samples",
    "judge_agreement_with_task": "the judge's verdicts equal to the task's programmatic judge's, on the pairs "
                                 "the task's judge decides",
}
# Metrics measured against the SFT model itself, with what "no preference learnt" reads as: the SFT
# model has no value of its own (it is the reference), and DPO is credited for beating the baseline.
RELATIVE_TO_SFT = {"win_rate_vs_sft": 0.5, "lc_win_rate_vs_sft": 0.5, "reward_accuracy": 0.5, "reward_margin": 0.0}


@dataclasses.dataclass
class Credit:
    metric: str
    stage: str | None  # the stage that moved the metric most in its good direction; None = neither
    deltas: dict[str, float]  # "base->sft": change, "sft->dpo": change

    def line(self) -> str:
        moves = ", ".join(f"{k} {v:+.4g}" for k, v in self.deltas.items())
        who = f"credited to {self.stage.upper()}" if self.stage else "no stage improved it"
        return f"{self.metric}: {who} ({moves})"


def preference_model(by_model: Mapping[str, Any]) -> str:
    """The name of the preference stage's model: dpo, else the first that is not base or sft (kto, orpo, ...)."""
    return "dpo" if "dpo" in by_model else next((n for n in by_model if n not in ("base", "sft")), "dpo")


def stage_transitions(by_model: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(before, after) of each stage among base -> sft -> the preference stage that the models have."""
    chain = [n for n in ("base", "sft", preference_model(by_model)) if n in by_model]
    return list(zip(chain, chain[1:]))


def credit(metric: str, by_model: Mapping[str, Mapping[str, float]], min_delta: float = 1e-3) -> Credit:
    """Which stage moved `metric` most in its good direction (changes below `min_delta` don't count)."""
    higher_is_better = METRICS[metric][0]
    final = preference_model(by_model)
    if metric in RELATIVE_TO_SFT:
        value, baseline = by_model.get(final, {}).get(metric), RELATIVE_TO_SFT[metric]
        if not _number(value):
            return Credit(metric, None, {})
        gain = value - baseline
        return Credit(metric, final if gain > min_delta else None, {f"{final} vs sft - {baseline:g}": gain})
    deltas: dict[str, float] = {}
    for before, after in stage_transitions(by_model):
        a, b = by_model.get(before, {}).get(metric), by_model.get(after, {}).get(metric)
        if _number(a) and _number(b):
            deltas[f"{before}->{after}"] = b - a
    gains = {k: (v if higher_is_better else -v) for k, v in deltas.items()}
    best = max(gains, key=gains.get, default=None)
    stage = best.split("->")[1] if best is not None and gains[best] > min_delta else None
    return Credit(metric, stage, deltas)


def win_rate_warning(win_rate: float | None, n: int, wins: int = 0, losses: int = 0) -> str | None:
    """A warning when DPO's win-rate over SFT is not measurably above a coin flip.

    "Measurably" = the lower end of a 95% Wilson interval on wins / (wins + losses) is above 0.5;
    ties say nothing about which model is preferred.
    """
    if win_rate is None or n == 0:
        return "no win-rate of DPO over SFT could be measured; look into the preference data and the judge"
    decided = wins + losses
    if decided == 0:
        return ("DPO's generations tie SFT's on every prompt: stage two adds no measurable win-rate; look into "
                "the preference data")
    p, z = wins / decided, 1.96
    low = (p + z * z / (2 * decided) - z * math.sqrt(p * (1 - p) / decided + z * z / (4 * decided ** 2))) / (
        1 + z * z / decided)
    if low <= 0.5:
        return (f"stage two adds no measurable win-rate over SFT (win-rate {win_rate:.1%}, {wins} wins / "
                f"{losses} losses of {n}, 95% lower bound {low:.1%} on decided pairs); look into the "
                "preference data")
    return None


def build_report(by_model: Mapping[str, Mapping[str, Any]], extras: Mapping[str, Any] | None = None) -> dict:
    """report.json's content: metrics by model, credits, warnings."""
    extras = dict(extras or {})
    credits = [credit(m, by_model) for m in METRICS if any(_number(v.get(m)) for v in by_model.values())]
    warnings = list(extras.pop("warnings", []))
    final = preference_model(by_model)
    dpo = by_model.get(final, {})
    if final in by_model and "sft" in by_model:
        warning = win_rate_warning(dpo.get("win_rate_vs_sft"), int(dpo.get("judged", 0)), int(dpo.get("wins", 0)),
                                   int(dpo.get("losses", 0)))
        if warning:
            warnings.append(warning)
        raw, lc = dpo.get("win_rate_vs_sft"), dpo.get("lc_win_rate_vs_sft")
        if _number(raw) and _number(lc) and raw - lc > 0.05:
            warnings.append(f"{final.upper()}'s win-rate over SFT falls from {raw:.1%} to {lc:.1%} when lengths are "
                            "controlled: part of the gain is longer replies (DPO's known length exploitation)")
    return {"models": {k: dict(v) for k, v in by_model.items()},
            "credits": [dataclasses.asdict(c) | {"line": c.line()} for c in credits],
            "warnings": warnings, **extras}


def _shown(report: Mapping[str, Any]) -> list[str]:
    """The metrics and descriptive figures any model has, in table order."""
    return [m for m in (*METRICS, *INFO_METRICS) if any(_number(v.get(m)) for v in report["models"].values())]


def render_markdown(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    models = list(report["models"])
    shown = _shown(report)
    lines = ["# Stage comparison", ""]
    if report.get("title"):
        lines += [str(report["title"]), ""]
    lines += ["| metric | " + " | ".join(models) + " | credited to |", "|---|" + "---|" * (len(models) + 1)]
    by_metric = {c["metric"]: c for c in report["credits"]}
    for m in shown:
        cells = [_cell(m, report["models"][k]) for k in models]
        stage = by_metric.get(m, {}).get("stage")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {stage.upper() if stage else '—'} |")
    lines += ["", "## Credits", ""] + [f"- {c['line']}" for c in report["credits"]]
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in report["warnings"]] or ["- none"])
    gate = report.get("gate")
    if gate and _number(gate.get("sft_skill")):
        lines += ["", "## SFT gate", "", f"- held-out skill of the SFT model {gate['sft_skill']:.1%} vs "
                  f"eval.min_sft_skill {gate['min_sft_skill']:.1%}: {'passed' if gate['passed'] else 'FAILED'}"]
    lines += _alignment_tax(report["models"])
    lines += ["", "## Metrics", ""] + [f"- `{m}`: {METRICS[m][1]} ({'higher' if METRICS[m][0] else 'lower'} is "
                                       "better)" if m in METRICS else f"- `{m}`: {INFO_METRICS[m]}" for m in shown]
    for key, title in (("data", "Held-out data"), ("models_paths", "Models")):
        if report.get(key):
            lines += ["", f"## {title}", "", "```", json.dumps(report[key], indent=2), "```"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{pathlib.Path(p).stem}]({pathlib.Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _alignment_tax(by_model: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The skill SFT installed and DPO (the preference stage) kept (the alignment tax is what it lost), and how
    far it moved."""
    name = preference_model(by_model).upper()
    sft, dpo = by_model.get("sft", {}), by_model.get(name.lower(), {})
    a, b = sft.get("skill_accuracy"), dpo.get("skill_accuracy")
    if not (_number(a) and _number(b)):
        return []
    kept = f"kept {b / a:.1%} of it" if a > 0 else "SFT had none to keep"
    line = f"- skill_accuracy SFT {a:.1%} -> {name} {b:.1%} ({100 * (b - a):+.1f} points; {kept})"
    if _number(dpo.get("kl_vs_sft")):
        line += f"; {name}'s KL from SFT {dpo['kl_vs_sft']:.4g} nats/token"
    return ["", "## Alignment tax", "", line]


def _cell(metric: str, values: Mapping[str, Any]) -> str:
    text = _fmt(metric, values.get(metric))
    low, high = values.get("win_rate_ci_low"), values.get("win_rate_ci_high")
    if metric == "win_rate_vs_sft" and _number(low) and _number(high):
        text += f" [{low:.1%}, {high:.1%}]"
        if values.get("ties"):
            text += f", {values['ties']} ties"
    return text


def write_report(out_dir: paths.PathLike, report: Mapping[str, Any],
                 curves: Mapping[str, paths.PathLike] | None = None) -> list[paths.Path]:
    """report.json, report.md and the PNG plots in `out_dir`; returns the files written."""
    out = paths.as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_metric_bars(report, out / "stage_metrics.png")
    if curves:
        plots += plot_training_curves(curves, out / "training_curves.png")
    paths.write_text_atomic(out / "report.md", render_markdown(report, [str(p) for p in plots]))
    # Last, and atomically: a report.json is the mark of a complete report (the pipeline reuses it).
    paths.write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=_jsonable))
    return [out / "report.json", out / "report.md", *plots]


def plot_metric_bars(report: Mapping[str, Any], path: paths.Path) -> list[paths.Path]:
    plt = _pyplot()
    models = list(report["models"])
    shown = _shown(report)
    if plt is None or not shown:
        return []
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        values = [report["models"][k].get(metric) for k in models]
        # NaN draws no bar: a metric a model was not measured on must not read as 0.
        bars = [v if _number(v) else math.nan for v in values]
        errors = None
        if metric == "win_rate_vs_sft":  # the 95% interval as error bars
            errors = [[v - m.get("win_rate_ci_low", v) if _number(v) else 0 for v, m in
                       zip(bars, report["models"].values())],
                      [m.get("win_rate_ci_high", v) - v if _number(v) else 0 for v, m in
                       zip(bars, report["models"].values())]]
        ax.bar(models, bars, yerr=errors, capsize=4, color=["#999999", "#4c72b0", "#dd8452"][:len(models)])
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return [path]


def plot_training_curves(curves: Mapping[str, paths.PathLike], path: paths.Path) -> list[paths.Path]:
    """Training and eval loss of each stage's run, from its metrics.jsonl."""
    plt = _pyplot()
    runs = {name: _read_metrics(p) for name, p in curves.items() if paths.as_path(p).is_file()}
    if plt is None or not runs:
        return []
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.2), squeeze=False)
    for ax, (name, records) in zip(axes[0], runs.items()):
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        if name not in ("sft", "rm"):  # a preference stage
            acc = [(r["step"], r["eval/rewards/accuracies"]) for r in records if "eval/rewards/accuracies" in r]
            if acc:
                ax.plot(*zip(*acc), "s--", label="eval reward accuracy")
        ax.set_title(f"{name.upper()} run", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return [path]


def _save_png(fig, path: paths.Path) -> None:
    with path.open("wb") as f:  # a file object, so the path may be a URL
        fig.savefig(f, format="png", dpi=100)


def _read_metrics(path: paths.PathLike) -> list[dict]:
    return [json.loads(line) for line in paths.as_path(path).read_text().splitlines() if line.strip()]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (the `plots` extra)
        return None
    return plt


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


RATES = ("skill_accuracy", "style_rate", "reward_accuracy", "win_rate_vs_sft", "lc_win_rate_vs_sft",
         "judge_agreement_with_task")


def _fmt(metric: str, x: Any) -> str:
    if not _number(x):
        return "—"
    return f"{x:.1%}" if metric in RATES else f"{x:.4g}"


def _jsonable(x: Any) -> Any:
    return str(x)
