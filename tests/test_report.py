"""The stage-comparison report: credits, the no-win-rate warning, and the files written."""

import json

import pytest

from jaxalign.eval.report import build_report, credit, win_rate_warning, write_report

MODELS = {
    "base": {"skill_accuracy": 0.0, "nll": 4.0, "style_rate": 0.1},
    "sft": {"skill_accuracy": 0.9, "nll": 1.0, "style_rate": 0.5},
    "dpo": {"skill_accuracy": 0.88, "nll": 1.1, "style_rate": 0.97, "reward_accuracy": 0.95,
            "win_rate_vs_sft": 0.8, "judged": 100, "wins": 60, "losses": 0},
}


def test_each_metric_is_credited_to_the_stage_that_moved_it():
    assert credit("skill_accuracy", MODELS).stage == "sft"
    assert credit("nll", MODELS).stage == "sft"  # lower is better: base->sft -3.0 is the gain
    assert credit("style_rate", MODELS).stage == "dpo"
    c = credit("reward_accuracy", MODELS)  # relative to SFT: credited for beating chance
    assert c.stage == "dpo" and c.deltas == {"dpo vs sft - 0.5": pytest.approx(0.45)}
    assert credit("win_rate_vs_sft", MODELS).stage == "dpo"
    assert credit("win_rate_vs_sft", {"dpo": {"win_rate_vs_sft": 0.5}}).stage is None
    flat = {"sft": {"skill_accuracy": 0.5}, "dpo": {"skill_accuracy": 0.5}}
    assert credit("skill_accuracy", flat).stage is None


def test_warning_when_dpo_adds_no_measurable_win_rate():
    assert win_rate_warning(0.8, 100, wins=60, losses=0) is None
    assert "no measurable win-rate" in win_rate_warning(0.52, 100, wins=26, losses=22)
    assert "tie SFT's on every prompt" in win_rate_warning(0.5, 100, wins=0, losses=0)
    assert "look into the preference data" in win_rate_warning(None, 0)


def test_report_files(tmp_path):
    runs = tmp_path / "metrics.jsonl"
    runs.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "loss": 2.0}, {"step": 1, "eval/loss": 2.1},
                                                       {"step": 2, "loss": 1.0}]))
    report = build_report(MODELS, {"title": "demo"})
    assert report["warnings"] == []
    files = write_report(tmp_path / "out", report, {"sft": runs})
    names = {f.name for f in files}
    assert {"report.json", "report.md", "stage_metrics.png", "training_curves.png"} <= names
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| skill_accuracy | 0.0% | 90.0% | 88.0% | SFT |" in md
    assert "| style_rate | 10.0% | 50.0% | 97.0% | DPO |" in md
    assert (tmp_path / "out" / "stage_metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["models"]["dpo"]["wins"] == 60
