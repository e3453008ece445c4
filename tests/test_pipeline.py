"""`jaxalign pipeline` end to end on a small version of the demo (configs/demo.yaml): SFT, the gate
failing then passing, the reward model, DPO, the base/SFT/DPO report judged by the reward model, the HF
export (loaded by transformers, greedy text equal to `jaxalign generate`), a re-run that skips
everything, `jaxalign eval` and `jaxalign pairs` (with the task's judge and with the reward model).

The small run is the demo with fewer rows and steps (`small_demo`), `pipeline.stages: [sft, rm, dpo]`.
The first run asks for a stricter gate than its SFT model reaches (eval.min_sft_skill 0.99), so it
stops with SFTGateError (exit code 2) before the reward model and DPO; the second run, with a gate the
small SFT run passes (0.7; the demo's own is 0.8), reuses the finished SFT run and its recorded skill and
goes on. Measured on the 2-core AMD EPYC machine with 8 virtual devices (deterministic for a given jax/XLA
build and processor; on a 2-core Intel Xeon machine the same SFT run reaches 79.7%, not 84%):

    base skill 0%; SFT skill 84%, style 30%; reward model held-out accuracy 94%;
    DPO skill 84%, style 100%, reward-judged win-rate over SFT 86% [75%, 92%] (LC 51%; the task's
    judge agrees on 89% of the pairs it decides)

The fault tests run a shorter pipeline ([sft, dpo], batches of 8), killed with -9 at each kind of
point and sent SIGTERM in each stage, against the same pipeline uninterrupted.

The pipeline runs in a subprocess (`python -m jaxalign.cli pipeline`, with the suite's environment,
tests/conftest.py, at full LLVM optimisation). Everything else runs in this process and compiles nothing that trains.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
from run_faults import logged_steps

from jaxalign import cli
from jaxalign.checkpoint import model_io
from jaxalign.config import load_config
from jaxalign.data.examples import encode_prompt
from jaxalign.errors import JaxalignError
from jaxalign.eval.tasks import demo
from jaxalign.eval.tasks.tokenizer_training import texts_from_jsonl, train_sentencepiece
from jaxalign.pipeline import SFTGateError, run_pipeline
from jaxalign.run import lifecycle

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "configs" / "demo.yaml")
SFT_STEPS, DPO_STEPS, RM_STEPS = 200, 60, 40  # the demo: 300, 100 (DPO on batches of 16, not 32), 60
N_SFT, N_PREF, N_EVAL = 3000, 1500, 64  # the demo: 8000, 3000, 256
STRICT_GATE = 0.99  # the first run's eval.min_sft_skill: the small SFT run misses it
# The second run's eval.min_sft_skill (configs/demo.yaml's is 0.8): below the 200-step SFT run's held-out skill
# on every machine measured (84% AMD EPYC, 79.7% Intel Xeon: the float rounding of each CPU's XLA kernels).
PASS_GATE = 0.7
# The pipeline trains for real (hundreds of steps): full LLVM optimisation pays for itself here, unlike in
# the compile-bound rest of the suite (tests/conftest.py).
PIPELINE_ENV = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("--xla_backend_optimization_level=0", "")}
METRICS = ("skill_accuracy", "nll", "perplexity", "style_rate", "reward_accuracy", "reward_margin")


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """cli.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _subprocess_cli(argv: list[str], timeout: float, log: pathlib.Path) -> subprocess.CompletedProcess:
    """`python -m jaxalign.cli ARGV`; its stderr is also kept in `log` (a failed test points at it). The
    runs share the session's persistent compilation cache (the gate's decoding program is the report's)."""
    proc = subprocess.run([sys.executable, "-m", "jaxalign.cli", *argv], cwd=ROOT, env=PIPELINE_ENV,
                          capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stderr)
    return proc


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> dict:
    """The demo's data (fewer rows) and its tokenizer, and the --set overrides of the small run."""
    tmp = tmp_path_factory.mktemp("pipeline")
    data = demo.write_demo_data(str(tmp / "data"), n_sft=N_SFT, n_pref=N_PREF, n_eval=N_EVAL, seed=0)
    texts = texts_from_jsonl([data["sft"], data["preference"]], ["prompt", "completion", "chosen", "rejected"])
    tokenizer = train_sentencepiece(texts, 400, str(tmp / "tokenizer"))
    root = tmp / "run"
    sets = [
        f"output_dir={root}", f"tokenizer.path={tokenizer}",
        f"eval.prompts={data['eval_prompts']}", f"eval.num_generations={N_EVAL}", "eval.kl_samples=16",
        f"sft.overrides.data.train={data['sft']}", f"sft.overrides.data.eval={data['sft_eval']}",
        f"sft.overrides.train.max_steps={SFT_STEPS}", "sft.overrides.train.eval_every=0",
        f"dpo.overrides.data.train={data['preference']}", f"dpo.overrides.data.eval={data['preference_eval']}",
        f"dpo.overrides.train.max_steps={DPO_STEPS}", "dpo.overrides.train.eval_every=0",
        "dpo.overrides.train.batch_size=16", "pipeline.stages=[sft, rm, dpo]", f"rm.overrides.train.max_steps={RM_STEPS}",
        f"eval.min_sft_skill={PASS_GATE}",
    ]
    return {"root": root, "data": data, "tokenizer": tokenizer, "sets": sets}


def _argv(sets: list[str]) -> list[str]:
    return ["pipeline", "--config", DEMO_CONFIG, *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def failed_gate(small_demo) -> dict:
    """The small run with a strict gate: SFT trains, misses eval.min_sft_skill, DPO never starts.

    What the tests check is recorded here, before `passed_run` goes on from the same run dir."""
    root, sets = small_demo["root"], [*small_demo["sets"], f"eval.min_sft_skill={STRICT_GATE}"]
    start = time.perf_counter()
    proc = _subprocess_cli(_argv(sets), timeout=400, log=root.parent / "failed_gate.log")
    result = {"proc": proc, "seconds": time.perf_counter() - start,
              "gate": json.loads((root / "gate.json").read_text()) if (root / "gate.json").is_file() else None,
              "listing": sorted(p.name for p in root.iterdir()), "root_state": lifecycle.state_of(root)}
    # The same failure in this process (the CLI's exit code and message are the subprocess's above): the
    # recorded skill is reused, nothing is measured again.
    start = time.perf_counter()
    try:
        run_pipeline(load_config(DEMO_CONFIG, sets))
        result["raised"] = None
    except SFTGateError as e:
        result["raised"] = e
    result["in_process_seconds"] = time.perf_counter() - start
    return result


@pytest.fixture(scope="module")
def passed_run(small_demo, failed_gate) -> dict:
    """The same run dir re-run with the passing gate: SFT skipped, gate passes, DPO, report, export."""
    root, sets = small_demo["root"], small_demo["sets"]
    start = time.perf_counter()
    proc = _subprocess_cli(_argv(sets), timeout=400, log=root.parent / "passed_run.log")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"pipeline failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    report = json.loads((root / "report" / "report.json").read_text())
    return {"root": root, "sets": sets, "proc": proc, "seconds": seconds, "report": report,
            "models": report["models"]}


def _start_cli(argv: list[str], log: pathlib.Path) -> subprocess.Popen:
    """`python -m jaxalign.cli ARGV` started in the background, its stderr going to `log`."""
    return subprocess.Popen([sys.executable, "-m", "jaxalign.cli", *argv], cwd=ROOT, env=PIPELINE_ENV,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)


def _logged_step(run: pathlib.Path) -> int:
    return max(logged_steps(run), default=0)


# ----------------------------------------------------------------------------- the gate


def test_gate_fails_below_min_sft_skill(small_demo, failed_gate):
    root = small_demo["root"]
    proc = failed_gate["proc"]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "jaxalign pipeline: error: SFT gate: held-out skill" in proc.stderr
    assert f"is below eval.min_sft_skill={STRICT_GATE:.1%}" in proc.stderr
    assert "Train SFT longer" in proc.stderr and "finished stages are skipped" in proc.stderr
    gate = failed_gate["gate"]
    assert gate["passed"] is False and gate["min_sft_skill"] == STRICT_GATE and gate["sft_skill"] < STRICT_GATE
    # Nothing after the gate ran.
    assert "sft" in failed_gate["listing"] and "gate.json" in failed_gate["listing"]
    assert not {"rm", "dpo", "report", "export"} & set(failed_gate["listing"])
    assert {"run.lock"} & set(failed_gate["listing"]) == set()  # released on the way out
    assert (root / "sft" / "summary.json").is_file() and lifecycle.state_of(root / "sft") == "finished"
    assert failed_gate["root_state"] == "failed"  # the pipeline's own status: stopped by an error

    error = failed_gate["raised"]
    assert isinstance(error, SFTGateError)
    message = str(error)
    assert f"held-out skill {gate['sft_skill']:.1%} is below eval.min_sft_skill={STRICT_GATE:.1%}" in message
    assert str(root / "sft") in message and str(root / "gate.json") in message
    # The re-run measured nothing: SFT skipped, the recorded skill reused.
    assert failed_gate["in_process_seconds"] < 60


# ----------------------------------------------------------------------------- the passing run


def test_pipeline_passes_gate_trains_dpo_and_reports(passed_run, failed_gate):
    root, report, m = passed_run["root"], passed_run["report"], passed_run["models"]
    print(f"\nsmall pipeline: SFT + failed gate {failed_gate['seconds']:.0f}s, then gate + DPO + report + export "
          f"{passed_run['seconds']:.0f}s (subprocesses, start-up included); metrics:")
    for name in ("base", "sft", "dpo"):
        print(f"  {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in m[name].items() if isinstance(v, float)))

    gate = json.loads((root / "gate.json").read_text())
    assert gate["passed"] is True and gate["min_sft_skill"] == PASS_GATE
    assert report["gate"]["passed"] is True and report["gate"]["sft_skill"] == gate["sft_skill"]
    # SFT was not trained again: the DPO run starts from the first run's SFT checkpoint.
    assert "SFT: finished run" in passed_run["proc"].stderr and "held-out skill recorded" in passed_run["proc"].stderr

    out = root / "report"
    for name in ("report.md", "report.json", "generations_base.jsonl", "generations_sft.jsonl",
                 "generations_dpo.jsonl"):
        assert (out / name).is_file(), name
    for name in ("stage_metrics.png", "training_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    for name in ("base", "sft", "dpo"):
        rows = _jsonl(out / f"generations_{name}.jsonl")
        assert len(rows) == N_EVAL and all("completion" in r and "prompt" in r for r in rows)
    # The CLI prints report.md.
    assert "# Stage comparison" in passed_run["proc"].stdout

    # report.json holds every metric of every model, the credits and the warnings.
    for name in ("base", "sft", "dpo"):
        for metric in METRICS:
            if name == "sft" and metric.startswith("reward_"):
                # Rewards are relative to the SFT model: the reference has none of its own.
                assert metric not in m[name]
                continue
            assert isinstance(m[name][metric], float), (name, metric)
    assert isinstance(m["dpo"]["win_rate_vs_sft"], float)
    assert m["dpo"]["judged"] == N_EVAL
    assert {c["metric"] for c in report["credits"]} == {*METRICS, "win_rate_vs_sft", "lc_win_rate_vs_sft"}
    # The judged win-rate's interval and the length-controlled rate; how far each model moved from SFT.
    dpo = m["dpo"]
    assert dpo["win_rate_ci_low"] < dpo["win_rate_vs_sft"] < dpo["win_rate_ci_high"]
    assert 0.0 <= dpo["lc_win_rate_vs_sft"] <= 1.0 and report["data"]["judge"] == f"reward:{root / 'rm'}"
    assert dpo["kl_vs_sft"] > 0 and m["base"]["kl_vs_sft"] > dpo["kl_vs_sft"]  # DPO stays near its reference
    assert all(m[name]["mean_gen_tokens"] > 0 for name in ("base", "sft", "dpo"))
    assert isinstance(report["warnings"], list)
    md = (out / "report.md").read_text()
    for metric in (*METRICS, "win_rate_vs_sft"):
        assert f"| {metric} |" in md
    assert "## SFT gate" in md and "passed" in md

    # What each stage must have done at this size (measured values in the module doc), with margin.
    assert m["base"]["skill_accuracy"] < 0.05 and m["sft"]["skill_accuracy"] >= PASS_GATE
    assert m["sft"]["nll"] < m["base"]["nll"] - 3.0
    assert m["dpo"]["style_rate"] > m["sft"]["style_rate"] + 0.3
    assert m["dpo"]["win_rate_vs_sft"] > 0.6
    assert m["dpo"]["skill_accuracy"] >= m["sft"]["skill_accuracy"] - 0.1
    assert m["dpo"]["reward_accuracy"] > 0.8 and m["dpo"]["reward_margin"] > 0
    credited = {c["metric"]: c["stage"] for c in report["credits"]}
    assert credited["skill_accuracy"] == "sft" and credited["nll"] == "sft"
    assert credited["style_rate"] == "dpo" and credited["win_rate_vs_sft"] == "dpo"
    assert credited["reward_accuracy"] == "dpo" and credited["reward_margin"] == "dpo"
    assert not [w for w in report["warnings"] if "no measurable win-rate" in w], report["warnings"]


def test_rerun_skips_finished_stages(passed_run):
    root = passed_run["root"]
    watched = [root / "base" / model_io.MODEL_FILE, root / "gate.json", root / "report" / "report.json",
               root / "report" / "report.md", root / "report" / "stage_metrics.png", root / "export" / "config.json",
               root / "export" / "model.safetensors"]
    for run in ("sft", "rm", "dpo"):
        watched += [root / run / "metrics.jsonl", root / run / "summary.json"]
        watched += sorted((root / run / "checkpoints").rglob("*"))
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in watched}
    start = time.perf_counter()
    code, out, err = _cli(_argv(passed_run["sets"]))
    seconds = time.perf_counter() - start
    assert code == 0, err
    print(f"\nre-run of the finished pipeline: {seconds:.1f}s")
    assert "# Stage comparison" in out
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in watched}
    assert after == before, [str(p) for p in watched if after[p] != before[p]]
    assert seconds < 30  # nothing trained, evaluated or exported again


# ----------------------------------------------------------------------------- the HF export


def test_export_loads_in_transformers_and_matches_jaxalign_generate(passed_run, small_demo):
    import torch
    import transformers

    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.eval.generate import SamplingParams, generate_text
    from jaxalign.run.build import model_options
    from jaxalign.runtime.sharding import make_mesh, merged_rules, use_mesh

    root = passed_run["root"]
    export = root / "export"
    rows = _jsonl(small_demo["data"]["eval_prompts"])
    prompts = [r["prompt"] for r in rows]

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    hf_model.eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    tok = load_tokenizer(str(model_io.tokenizer_path(root / "dpo")))
    # The export names the tokenizer's special ids, so transformers' generate stops at EOS by itself.
    assert hf_model.generation_config.eos_token_id == tok.eos_id == hf_tok.eos_token_id
    assert hf_model.config.bos_token_id == tok.bos_id

    # jaxalign's greedy generations of the DPO checkpoint, as `jaxalign eval` makes them.
    cfg = load_config(str(root / "config.yaml"))
    mesh, rules = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}), merged_rules(dict(cfg.mesh.rules))
    with use_mesh(mesh, rules):
        model = model_io.load_model(root / "dpo", mesh, rules, **model_options(cfg))
        expected = generate_text(model, tok, prompts, SamplingParams(cfg.eval.max_new_tokens), mesh=mesh,
                                 batch_size=cfg.eval.batch_size)
    assert expected == [r["completion"] for r in _jsonl(root / "report" / "generations_dpo.jsonl")]

    n = 8
    texts = []
    for prompt in prompts[:n]:
        ids = hf_tok(prompt)["input_ids"]
        assert ids == encode_prompt(tok, prompt), prompt  # same prompt ids as jaxalign's (BOS included)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                                    pad_token_id=hf_tok.eos_token_id)
        new = out[0, len(ids):].tolist()
        assert new[-1] == tok.eos_id or len(new) == cfg.eval.max_new_tokens
        texts.append(hf_tok.decode(new, skip_special_tokens=True))
    assert texts == expected[:n]
    # The DPO model answers politely, and mostly correctly.
    assert sum(demo.style_score(t) for t in texts) >= n - 2
    assert sum(demo.skill_correct(r, t) for r, t in zip(rows, texts)) >= n // 2


# ----------------------------------------------------------------------------- jaxalign eval / pairs


def test_eval_cli_writes_report_and_warns_when_dpo_is_sft(passed_run, tmp_path):
    root, pipeline = passed_run["root"], passed_run["models"]
    out = tmp_path / "eval"
    sft = str(root / "sft")
    code, stdout, err = _cli(["eval", "--config", str(root / "config.yaml"), "--models", f"sft={sft},dpo={sft}",
                              "--out", str(out), "--set", "eval.kl_samples=0"])
    assert code == 0, err
    for name in ("report.md", "report.json", "stage_metrics.png", "generations_sft.jsonl", "generations_dpo.jsonl"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    dpo = report["models"]["dpo"]
    assert dpo["wins"] == dpo["losses"] == 0 and dpo["ties"] == dpo["judged"] == N_EVAL
    assert dpo["win_rate_vs_sft"] == 0.5
    warnings = [w for w in report["warnings"] if "stage two adds no measurable win-rate" in w]
    assert warnings and "look into the preference data" in warnings[0]
    assert "warning: " in stdout and "stage two adds no measurable win-rate" in stdout
    assert "stage two adds no measurable win-rate" in (out / "report.md").read_text()
    # Same held-out data, same SFT model: the pipeline's numbers come back.
    for metric in ("skill_accuracy", "style_rate"):
        assert report["models"]["sft"][metric] == pytest.approx(pipeline["sft"][metric], abs=2 / N_EVAL)
    assert report["models"]["sft"]["nll"] == pytest.approx(pipeline["sft"]["nll"], rel=1e-3)


def test_pairs_cli_writes_pairs_the_judge_prefers(passed_run, small_demo, tmp_path):
    from jaxalign.data.tokenizer import load_tokenizer

    root = passed_run["root"]
    sft = str(root / "sft")
    prompts = tmp_path / "prompts.jsonl"
    rows = _jsonl(small_demo["data"]["eval_prompts"])[:16]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(str(model_io.tokenizer_path(sft)))

    out = tmp_path / "pairs.jsonl"
    code, stdout, err = _cli(["pairs", "--model", sft, "--prompts", str(prompts), "--judge", "demo",
                              "--num-samples", "4", "--out", str(out), "--max-new-tokens", "40", "--batch-size", "64"])
    assert code == 0, err
    pairs = _jsonl(out)
    skipped = len(rows) - len(pairs)
    assert f"{len(pairs)} pairs from {len(rows)} prompts ({skipped} skipped: all candidates tied)" in stdout
    assert len(pairs) >= 4  # samples at temperature 1 from a model that answers in both styles
    by_prompt = {r["prompt"]: r for r in rows}
    for pair in pairs:
        row = by_prompt[pair["prompt"]]
        assert pair["answer"] == row["answer"]  # the input row's fields are kept
        assert demo.judge_pair(row, pair["chosen"], pair["rejected"]) == 1, pair
        # Written as the training data writes completions (" Sure! ..."): prompt + text tokenizes to
        # the prompt's tokens followed by the sampled ones.
        assert pair["chosen"].startswith(" "), pair
        for text in (pair["chosen"], pair["rejected"]):
            prompt_ids = encode_prompt(tok, pair["prompt"])
            assert tok.encode(pair["prompt"] + text, add_special_tokens=True)[:len(prompt_ids)] == prompt_ids

    # Greedy decoding gives every prompt identical candidates: all tie, every prompt is skipped.
    out = tmp_path / "greedy.jsonl"
    code, stdout, err = _cli(["pairs", "--model", sft, "--prompts", str(prompts), "--judge", "demo",
                              "--num-samples", "2", "--temperature", "0", "--out", str(out),
                              "--max-new-tokens", "40", "--batch-size", "64"])
    assert code == 0, err
    assert _jsonl(out) == []
    assert f"0 pairs from {len(rows)} prompts ({len(rows)} skipped: all candidates tied)" in stdout


# ----------------------------------------------------------------------------- the reward-model stage


def test_the_reward_model_judges_the_report(passed_run, small_demo, tmp_path):
    root, report, err = passed_run["root"], passed_run["report"], passed_run["proc"].stderr
    assert "SFT: finished run" in err and "RM: training" in err
    assert lifecycle.state_of(root / "rm") == "finished"
    rm_cfg = load_config(str(root / "rm" / "config.yaml"))
    data = small_demo["data"]
    # Trained on DPO's training pairs from the SFT model, validated on DPO's held-out pairs (never trained on).
    assert rm_cfg.stage == "rm" and rm_cfg.data.train == data["preference"] and rm_cfg.data.eval == data["preference_eval"]
    assert rm_cfg.model.path == str(root / "sft")
    summary = json.loads((root / "rm" / "summary.json").read_text())
    print(f"\nreward model: held-out accuracy {summary['eval/accuracy']:.3f}, margin {summary['eval/margin']:.3f}")
    assert summary["eval/accuracy"] > 0.8
    assert report["data"]["judge"] == f"reward:{root / 'rm'}"
    dpo = report["models"]["dpo"]
    print(f"reward-judged win-rate of DPO over SFT {dpo['win_rate_vs_sft']:.3f} "
          f"[{dpo['win_rate_ci_low']:.3f}, {dpo['win_rate_ci_high']:.3f}], LC {dpo['lc_win_rate_vs_sft']:.3f}, "
          f"agreement with the task's judge {dpo['judge_agreement_with_task']:.3f}")
    assert dpo["judge_agreement_with_task"] > 0.7  # the reward judge agrees with the task's on most decided pairs
    assert dpo["win_rate_vs_sft"] > 0.6 and dpo["judged"] == N_EVAL
    assert "| judge_agreement_with_task |" in (root / "report" / "report.md").read_text()

    # On-policy pairs ranked by the reward model: each chosen reply scores above its rejected one.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in _jsonl(data["eval_prompts"])[:8]))
    out = tmp_path / "pairs.jsonl"
    code, _, err = _cli(["pairs", "--model", str(root / "sft"), "--prompts", str(prompts), "--judge",
                         f"reward:{root / 'rm'}", "--num-samples", "3", "--out", str(out), "--max-new-tokens", "40"])
    assert code == 0, err
    pairs = _jsonl(out)
    assert pairs
    rows = [{"prompt": p["prompt"], "completion": p[side]} for p in pairs for side in ("chosen", "rejected")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = _cli(["score", "--model", str(root / "rm"), "--data", str(tmp_path / "rows.jsonl"), "--out",
                         str(tmp_path / "scored.jsonl"), "--reward"])
    assert code == 0, err
    rewards = [r["reward"] for r in _jsonl(tmp_path / "scored.jsonl")]
    assert all(rewards[2 * i] > rewards[2 * i + 1] for i in range(len(pairs))), rewards


def test_reward_model_data_must_not_hold_the_held_out_pairs(small_demo):
    from jaxalign.pipeline import reward_model_sets

    data = small_demo["data"]
    cfg = load_config(DEMO_CONFIG, [*small_demo["sets"], f"rm.overrides.data.train={data['preference_eval']}"])
    with pytest.raises(JaxalignError, match="rm.overrides.data.train.*includes the held-out pairs"):
        reward_model_sets(cfg, [])


# ----------------------------------------------------------------------------- preemption and kill -9

# A shorter pipeline for the fault tests, on batches of 8: every re-run pays the start-up again (~8 s here).
SHORT_SFT, SHORT_DPO = 40, 20
# The suite kills once at two kinds of kill point, one per stage (an SFT checkpoint being written, DPO's
# best.json just naming a step: past the gate, before the report and the export), and sends a SIGTERM
# once in SFT and once in DPO; the campaign (JAXALIGN_KILL_CAMPAIGN=N, e.g. 20) interrupts N times at
# the first new point of any kind (gate.json just written, a half-written base/, report/ or export/,
# ...), or one time in three after a random delay, as
# `benchmarks/RESULTS.md` records it: slow end-to-end work, kept out of `make test`.
CAMPAIGN = int(os.environ.get("JAXALIGN_KILL_CAMPAIGN", "0"))
SUITE_KINDS = ("sft checkpoint being written", "dpo best.json naming step")
KILLS = CAMPAIGN or len(SUITE_KINDS)
INTERRUPTIONS = CAMPAIGN or KILLS + 2  # the suite: 2 kills and 2 SIGTERMs
SHORT = [f"sft.overrides.train.max_steps={SHORT_SFT}", f"dpo.overrides.train.max_steps={SHORT_DPO}",
         "train.eval_every=20", "train.log_every=5", "checkpoint.every_steps=20", "checkpoint.keep=2",
         "eval.min_sft_skill=0", "eval.num_generations=16", "eval.kl_samples=0", "train.batch_size=8",
         "dpo.overrides.train.batch_size=8", "pipeline.stages=[sft, dpo]"]


def _seeded() -> tuple[random.Random, int]:
    seed = random.randrange(2**32)
    return random.Random(seed), seed


@pytest.fixture(scope="module")
def short_reference(small_demo) -> dict:
    """The shorter pipeline, uninterrupted: what every interrupted one must end equal to."""
    root = small_demo["root"].parent / "short_ref"
    start = time.perf_counter()
    proc = _subprocess_cli(_argv([*small_demo["sets"], *SHORT, f"output_dir={root}"]), 400,
                           root.parent / "short_ref.log")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"root": root, "seconds": time.perf_counter() - start,
            "report": json.loads((root / "report" / "report.json").read_text())}


def _assert_equal_to_reference(root: pathlib.Path, ref: pathlib.Path) -> None:
    """Every stage finished and complete, nothing skipped: the report's metrics and the exported weights
    equal the uninterrupted run's, metrics.jsonl has one record per step, best.json a complete checkpoint."""
    for stage in ("", "sft", "dpo"):
        assert lifecycle.state_of(root / stage) == "finished", stage
    for name in ("base", "export"):
        assert lifecycle.is_complete(root / name), name
    got = json.loads((root / "report" / "report.json").read_text())
    want = json.loads((ref / "report" / "report.json").read_text())
    assert got["models"] == want["models"] and got["gate"]["sft_skill"] == want["gate"]["sft_skill"]
    assert (root / "export" / "model.safetensors").read_bytes() == (ref / "export" / "model.safetensors").read_bytes()
    for stage, steps in (("sft", SHORT_SFT), ("dpo", SHORT_DPO)):
        summary = json.loads((root / stage / "summary.json").read_text())
        assert summary["steps"] == summary["total_steps"] == steps and summary["state"] == "finished"
        logged = [json.loads(line)["step"] for line in (root / stage / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert logged == sorted(set(logged)) and logged[-1] == steps, stage
        best = json.loads((root / stage / model_io.BEST_FILE).read_text())
        assert (root / stage / "checkpoints" / str(best["step"]) / "params").is_dir()


def _kind(point: str) -> str:
    """A kill point without its step: "sft checkpoint 20 being written" -> "sft checkpoint being written"."""
    return " ".join(word for word in point.split() if not word.isdigit())


def _kill_points(root: pathlib.Path, preempt_at: dict[str, int]) -> set[str]:
    """What a kill can land in, as seen from outside: a checkpoint being written, each new best.json,
    gate.json, the base model, the report and the export half-written; and where a SIGTERM goes: a stage
    past its step `preempt_at[stage]`."""
    seen = {f"{stage} preempt point" for stage, at in preempt_at.items() if _logged_step(root / stage) >= at}
    for stage in ("sft", "dpo"):
        ckpts = root / stage / "checkpoints"
        if ckpts.is_dir():
            seen |= {f"{stage} checkpoint {p.name.split('.')[0]} being written" for p in ckpts.iterdir()
                     if "orbax-checkpoint-tmp" in p.name}
        with contextlib.suppress(OSError, json.JSONDecodeError):
            seen.add(f"{stage} best.json naming step {json.loads((root / stage / model_io.BEST_FILE).read_text())['step']}")
    for name, marker in (("base", "COMPLETE"), ("export", "COMPLETE"), ("report", "report.json")):
        if (root / name).is_dir() and not (root / name / marker).exists():
            seen.add(f"{name} half-written")
    if (root / "gate.json").is_file():
        seen.add("gate.json written")
    return seen


@pytest.fixture(scope="module")
def killed_run(small_demo, short_reference) -> dict:
    """The shorter pipeline interrupted again and again, re-run after each, then run to the end: kill -9 at
    two kinds of kill point (SUITE_KINDS), and a SIGTERM (a preemption) at a random logged step of SFT and
    of DPO. In the suite each interruption comes at the first new point of a suite kind not hit yet; in a campaign at the first
    new point or, one time in three, a kill -9 after a random 1-10 s (start-up, data, compilation,
    evaluation: wherever that lands)."""
    tmp = small_demo["root"].parent
    root = tmp / "killed"
    rng, seed = _seeded()
    # Past SFT's first checkpoint (20) and before DPO's (its last, 20): a resumed run reaches them anew.
    preempt_at = {"sft": rng.randrange(25, SHORT_SFT, 5), "dpo": rng.randrange(5, SHORT_DPO, 5)}
    argv = _argv([*small_demo["sets"], *SHORT, f"output_dir={root}"])
    kills, preempted, finished_early = [], [], False
    start = time.perf_counter()
    for k in range(INTERRUPTIONS):
        log = tmp / f"killed_{k}.log"
        before = _kill_points(root, preempt_at)
        delay = rng.uniform(1.0, 10.0) if CAMPAIGN and rng.random() < 1 / 3 else None
        hit_kinds = {_kind(w) for w in kills} | {f"{stage} preempt point" for stage, _, _ in preempted}
        proc = _start_cli(argv, log)
        t0, where = time.monotonic(), None
        while proc.poll() is None and where is None:
            if delay is not None:
                where = f"after {delay:.1f} s" if time.monotonic() - t0 >= delay else None
            else:
                new = sorted(_kill_points(root, preempt_at) - before)
                where = next((w for w in new if CAMPAIGN or (_kind(w) not in hit_kinds and (
                    _kind(w) in SUITE_KINDS or w.endswith("preempt point")))), None)
            if where is None:
                time.sleep(0.002)
            assert time.monotonic() - t0 < 400, "timed out"
        if where is not None and where.endswith("preempt point"):
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=300)
            assert code == lifecycle.EXIT_PREEMPTED, f"exit {code}:\n{log.read_text()[-4000:]}"
            states = (lifecycle.state_of(root / "sft"), lifecycle.state_of(root / "dpo"), (root / "gate.json").exists())
            preempted.append((where.split()[0], states, k))
            continue
        proc.kill()
        code = proc.wait(timeout=60)
        if code == 0:  # it finished before a kill point came: nothing left to kill
            finished_early = True
            break
        assert code == -signal.SIGKILL, f"exit {code}:\n{log.read_text()[-4000:]}"
        kills.append(where)
    print(f"\nkill -9 at (seed {seed}, {time.perf_counter() - start:.0f} s): {kills}; SIGTERM: {preempted}")
    last = _subprocess_cli(argv, 400, tmp / "killed_last.log")
    logs = [(tmp / f"killed_{k}.log").read_text() for k in range(len(kills) + len(preempted))] + [last.stderr]
    return {"root": root, "kills": kills, "preempted": preempted, "last": last, "logs": logs,
            "finished_early": finished_early}


def test_kill_minus_9_and_sigterm_anywhere_always_end_finished_and_equal(killed_run, short_reference):
    """However the runs were killed or preempted, the last re-run ends with every stage finished, nothing
    skipped or corrupt: the report's metrics and the exported weights equal the uninterrupted run's. A
    SIGTERM in SFT exits 75 with SFT `preempted`, no gate and no DPO; one in DPO exits 75 with SFT
    finished, the gate passed and DPO `preempted`; the next run resumes it."""
    run = killed_run
    assert run["last"].returncode == 0, run["last"].stderr[-4000:]
    assert len(run["kills"]) + len(run["preempted"]) == INTERRUPTIONS or run["finished_early"], run["kills"]
    assert len(run["kills"]) >= KILLS // 2, run["kills"]  # the chain has more kill points than that
    if not CAMPAIGN:  # one kill in each kind of point, on through DPO (a short window may pass unseen)
        assert len({_kind(w) for w in run["kills"]}) == len(run["kills"]), run["kills"]
        assert {_kind(w) for w in run["kills"]} == set(SUITE_KINDS), run["kills"]
        states = {stage: s for stage, s, _ in run["preempted"]}
        assert states == {"sft": ("preempted", None, False), "dpo": ("finished", "preempted", True)}, run["preempted"]
        after_dpo = next(k for stage, _, k in run["preempted"] if stage == "dpo") + 1
        assert "DPO: resuming the preempted run" in run["logs"][after_dpo]
    _assert_equal_to_reference(run["root"], short_reference["root"])


# ----------------------------------------------------------------------------- the other recipes

def _recipe(small_demo, short_reference, name: str, sets: list[str], copy: tuple[str, ...]) -> dict:
    """The shorter pipeline as recipe `sets`, in a new root holding copies of the short run's finished `copy`
    dirs (its base model, its SFT run), so only the new stage trains."""
    import shutil

    root = small_demo["root"].parent / name
    for d in copy:
        shutil.copytree(short_reference["root"] / d, root / d)
    proc = _subprocess_cli(_argv([*small_demo["sets"], *SHORT, f"output_dir={root}", *sets]), 400,
                           root.parent / f"{name}.log")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"root": root, "err": proc.stderr, "report": json.loads((root / "report" / "report.json").read_text())}


def test_kto_after_sft_recipe(small_demo, short_reference):
    """pipeline.stages [sft, kto]: the finished SFT run is skipped, KTO trains from it on each side of the
    pairs (dpo.overrides set it), and the report credits KTO against SFT on the held-out pairs."""
    run = _recipe(small_demo, short_reference, "kto_recipe", ["pipeline.stages=[sft, kto]",
                  "dpo.overrides.kto.undesirable_weight=1.5"], ("base", "sft"))
    root, report = run["root"], run["report"]
    assert "SFT: finished run" in run["err"] and "KTO: training" in run["err"]
    cfg = load_config(str(root / "kto" / "config.yaml"))
    assert cfg.stage == "kto" and cfg.dpo.init_from == str(root / "sft") and cfg.kto.undesirable_weight == 1.5
    assert lifecycle.state_of(root / "kto") == "finished" and lifecycle.is_complete(root / "export")
    assert list(report["models"]) == ["base", "sft", "kto"] and report["gate"]["passed"]
    assert any("kl" in r for r in _jsonl(root / "kto" / "metrics.jsonl"))
    kto = report["models"]["kto"]
    print(f"\nKTO after SFT: held-out reward accuracy {kto['reward_accuracy']:.3f}, style {kto['style_rate']:.3f}")
    assert kto["reward_accuracy"] > 0.5  # KTO raised the chosen replies' likelihood over SFT's more
    assert "KTO" in (root / "report" / "report.md").read_text()


def test_orpo_from_the_base_model_recipe(small_demo, short_reference):
    """pipeline.stages [orpo]: one stage from the base model, no SFT, no gate, no reference; the report
    compares base and ORPO, and ORPO's NLL term taught the held-out replies."""
    # The demo's DPO is RPO (an sft term) with a precomputed reference: ORPO has its own NLL and no reference.
    run = _recipe(small_demo, short_reference, "orpo_recipe", ["pipeline.stages=[orpo]", "dpo.loss=orpo",
                                                               "dpo.loss_weights=[]", "dpo.reference=auto"], ("base",))
    root, report = run["root"], run["report"]
    dirs = {p.name for p in root.iterdir() if p.is_dir()} - {"cache"}  # cache: the tokenized data
    assert dirs == {"base", "export", "orpo", "report"}
    assert not (root / "gate.json").exists() and report["gate"] is None
    cfg = load_config(str(root / "orpo" / "config.yaml"))
    from jaxalign.run.build import reference_kind

    assert cfg.stage == "dpo" and cfg.dpo.loss == "orpo" and reference_kind(cfg) == "none"
    assert cfg.dpo.init_from == str(root / "base")
    assert any("log_odds_ratio" in r for r in _jsonl(root / "orpo" / "metrics.jsonl"))
    base, orpo = report["models"]["base"], report["models"]["orpo"]
    assert list(report["models"]) == ["base", "orpo"] and "reward_accuracy" not in orpo
    print(f"\nORPO from base: NLL {base['nll']:.3f} -> {orpo['nll']:.3f}")
    assert orpo["nll"] < base["nll"] - 1.0
    assert any(c["metric"] == "nll" and c["stage"] == "orpo" for c in report["credits"])
