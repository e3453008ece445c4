"""The training loop end to end on real data: Anthropic HH (shared test split), the Llama 2 tokenizer
and a tiny random Llama (hidden 32, 2 layers, tied 32,000-token embeddings), on 8 virtual CPU devices.

One SFT run (module fixture, fsdp=8) is shared: the DPO tests start from it, the resume and re-mesh
tests compare against its per-step losses, the retention test reads its checkpoints.
"""

import json
import math
import pathlib
import shutil
import time

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from tiny_runs import TINY_LLAMA, hh_sft_config, read_metrics, train_until

from jaxalign import cli
from jaxalign.checkpoint import model_io
from jaxalign.checkpoint.store import RunCheckpointer
from jaxalign.config import load_config
from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, init_model
from jaxalign.run.loop import Trainer
from jaxalign.runtime.sharding import make_mesh, use_mesh

SFT_STEPS = 30


@pytest.fixture(scope="module")
def base(shared_data, tmp_path_factory):
    """The SFT config every test derives from (as a plain dict), in a module-wide tmp dir."""
    root = tmp_path_factory.mktemp("train_loop")
    cfg = hh_sft_config(
        shared_data, root / "sft", root / "cache",  # the cache is shared, so every run tokenizes once
        data={"max_rows": 400, "eval_fraction": 0.15, "max_length": 128, "max_prompt_length": 64},
        train={"batch_size": 8, "max_steps": SFT_STEPS, "eval_every": 10, "log_every": 1},
        eval={"batch_size": 16},
        optimizer={"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.01},
        checkpoint={"every_steps": 10, "keep": 2},
    )
    return root, cfg


def write_config(root: pathlib.Path, name: str, base_cfg: dict, sets=()) -> tuple[pathlib.Path, object]:
    """root/name.yaml holding `base_cfg` with `sets` applied; returns (path, loaded config)."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base_cfg))
    return path, load_config(path, list(sets))


def step_dirs(run: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def sft_run(base):
    """The uninterrupted SFT run: fsdp=8, 30 steps, eval and checkpoint every 10, keep 2."""
    root, cfg = base
    _, config = write_config(root, "sft", cfg)
    summary = Trainer(config).train()
    return pathlib.Path(cfg["output_dir"]), summary


# --- SFT: learning, metrics, retention --------------------------------------------------------------

def test_sft_eval_loss_falls_and_metrics_are_logged(sft_run):
    run, summary = sft_run
    train, evals = read_metrics(run)
    assert sorted(train) == list(range(1, SFT_STEPS + 1))
    for record in train.values():
        for key in ("loss", "mean_token_accuracy", "tokens_per_sec", "grad_norm", "lr"):
            assert math.isfinite(record[key]), (key, record)
    assert abs(train[1]["loss"] - math.log(32000)) < 0.1  # a random model starts at ln(vocab)
    assert train[1]["lr"] == 0.0 and train[6]["lr"] == pytest.approx(3e-3)  # warmup, then the peak
    assert [r["step"] for r in evals] == [10, 20, 30]
    first, last = evals[0]["eval/loss"], evals[-1]["eval/loss"]
    assert last < first - 0.2, f"held-out SFT loss did not fall: {first} -> {last}"
    assert summary["eval/loss"] == last and summary["steps"] == SFT_STEPS
    assert (run / "config.yaml").is_file() and (run / "model" / model_io.MODEL_FILE).is_file()


def test_logged_model_flops_follow_the_hand_count(sft_run):
    """model_flops_per_sec / tokens_per_sec share one interval, so their ratio times the logged tokens is the
    step's model FLOPs: 6·N·tokens + 12·L·H·D·T²·B/2 of the padded batch (8 rows of 64 or 128 tokens)."""
    run, _ = sft_run
    train, _ = read_metrics(run)
    e, m, layers, heads, kv, d, vocab = 32, 64, 2, 4, 2, 8, 32000
    n = layers * (2 * e * heads * d + 2 * e * kv * d + 3 * e * m) + e * vocab  # the tied embedding is the head

    def hand(rows, length):
        return 6 * n * rows * length + 12 * layers * heads * d * length * length * rows / 2

    for step, record in train.items():
        flops = record["model_flops_per_sec"] / record["tokens_per_sec"] * record["tokens"]
        assert any(flops == pytest.approx(hand(8, t), rel=1e-9) for t in (64, 128)), (step, flops)


def test_checkpoint_retention_and_best(sft_run):
    """keep=2 newest plus the best by eval loss; best.json names it; a run dir resolves to it."""
    run, summary = sft_run
    _, evals = read_metrics(run)
    best_step = min(evals, key=lambda r: r["eval/loss"])["step"]
    best = json.loads((run / model_io.BEST_FILE).read_text())
    assert best == {"step": best_step, "metric": "eval/loss",
                    "value": pytest.approx(min(r["eval/loss"] for r in evals))}
    assert step_dirs(run) == sorted({20, 30, best_step})
    assert model_io.resolve_model_path(run) == run / "checkpoints" / str(best_step)
    assert summary["best_checkpoint"] == str(run / "checkpoints" / str(best_step))
    assert not [p for p in (run / "checkpoints").iterdir() if "tmp" in p.name]


def test_retention_keeps_best_apart_from_latest_and_ties_go_to_the_later_step(tmp_path):
    """Checkpointer retention with a non-monotone metric: the best survives outside the newest K,
    and a tie is broken as Orbax's BestN breaks it (the later step), which best_step() must agree with."""
    params = {"w": np.arange(4, dtype=np.float32)}
    accuracies = {1: 0.5, 2: 0.75, 3: 0.75, 4: 0.25, 5: 0.5}
    ckpt = RunCheckpointer(tmp_path / "acc", keep=2, best_metric="eval/rewards/accuracies", best_mode="max",
                           async_save=False)
    for step, value in accuracies.items():
        ckpt.save(step, params, {"count": np.int32(step)}, {"step_meta": step},
                  {"eval/rewards/accuracies": value})
    assert ckpt.all_steps() == [3, 4, 5] and ckpt.best_step() == 3 and ckpt.metric(3) == 0.75
    ckpt.close()

    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 1.0, 5: 4.0, 6: 5.0, 7: 6.0}
    ckpt = RunCheckpointer(tmp_path / "loss", keep=1, best_metric="eval/loss", best_mode="min", async_save=False)
    for step, value in losses.items():
        ckpt.save(step, params, {"count": np.int32(step)}, {}, {"eval/loss": value} if step != 6 else None)
    assert ckpt.all_steps() == [4, 7] and ckpt.best_step() == 4
    ckpt.close()


# --- resume -----------------------------------------------------------------------------------------

# kill -9 past a complete checkpoint, then a resume equal to the uninterrupted run step for step: in
# test_qlora_train.py (the same loop over a quantised base) and test_reliability.py (killed during an
# async save); the whole chain, in test_pipeline.py's kill chain.


def test_checkpoint_restores_onto_another_mesh(base, sft_run, tmp_path):
    """Saved under fsdp=8: restored under fsdp=4 x tensor=2 the weights are bit-identical and the logits
    match; training resumed on that mesh continues with the uninterrupted run's losses."""
    root, cfg = base
    run_ref, _ = sft_run
    mesh8 = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    mesh42 = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    tokens = np.random.default_rng(0).integers(3, 32000, (8, 32)).astype(np.int32)
    logits, params = [], []
    for mesh in (mesh8, mesh42):
        with use_mesh(mesh):
            model = model_io.load_model(run_ref, mesh)
            assert {tuple(x.sharding.mesh.shape.values()) for x in jax.tree.leaves(nnx.state(model))} == {
                tuple(mesh.shape.values())}
            params.append(jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
            logits.append(np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)))
    jax.tree.map(np.testing.assert_array_equal, params[0], params[1])
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-5)

    # The run as if it had stopped after its step-20 checkpoint, then resumed on the other mesh.
    run = tmp_path / "remesh"
    shutil.copytree(run_ref, run)
    shutil.rmtree(run / "checkpoints" / "30")  # best.json still names step 30: stale, as after a kill
    assert json.loads((run / model_io.BEST_FILE).read_text())["step"] == 30
    _, config = write_config(root, "remesh", {**cfg, "output_dir": str(run)},
                             ["mesh.fsdp=4", "mesh.tensor=2"])
    trainer = Trainer(config, resume=True)
    assert int(trainer.state.step) == 20 and dict(trainer.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert json.loads((run / model_io.BEST_FILE).read_text())["step"] == 20  # re-derived from what is kept
    assert model_io.resolve_model_path(run) == run / "checkpoints" / "20"
    trainer.train()
    ref, _ = read_metrics(run_ref)
    got, _ = read_metrics(run)
    assert sorted(got) == list(range(1, SFT_STEPS + 1))
    np.testing.assert_allclose([got[s]["loss"] for s in range(21, SFT_STEPS + 1)],
                               [ref[s]["loss"] for s in range(21, SFT_STEPS + 1)], rtol=1e-5)


# --- DPO after SFT ------------------------------------------------------------------------------------

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "loss", "grad_norm", "lr", "pairs_per_sec")


def dpo_config(base, sft_run, name, reference, sets=()):
    """DPO from the SFT run over the first 48 HH pairs, evaluated on those same pairs.

    Not a held-out evaluation: it checks that DPO in the loop optimises the preference objective
    (rewards/accuracies over the trained pairs climbs from 0.0 at policy = reference to well above
    chance). On held-out HH pairs this ~1M-parameter model stays at chance within a test's budget
    (0.44-0.53 after 40 steps at lr 5e-3, beta 0.5: there is too little signal to generalise from).
    """
    root, cfg = base
    run_sft, _ = sft_run
    cfg = {**cfg, "stage": "dpo", "output_dir": str(root / name),
           "data": {**cfg["data"], "max_rows": 48, "eval_fraction": 0.0, "eval": cfg["data"]["train"]},
           "train": {**cfg["train"], "max_steps": 12, "eval_every": 6},
           "optimizer": {"lr": 5e-3, "warmup_steps": 2},
           "checkpoint": {"every_steps": 6, "keep": 1},
           "dpo": {"init_from": str(run_sft), "reference": reference, "beta": 0.5}}
    return write_config(root, name, cfg, sets)[1]


@pytest.fixture(scope="module")
def dpo_model_run(base, sft_run):
    config = dpo_config(base, sft_run, "dpo_model", "model")
    trainer = Trainer(config)
    ref_before = jax.device_get(trainer.ref_params)
    trainer.train()
    return trainer, ref_before


def test_dpo_learns_preferences_with_trl_metrics(dpo_model_run):
    trainer, _ = dpo_model_run
    train, evals = read_metrics(trainer.run)
    assert sorted(train) == list(range(1, 13))
    for record in train.values():
        for key in DPO_METRICS:
            assert math.isfinite(record[key]), (key, record)
    # Policy == reference at step 1: TRL's sigmoid loss is ln 2 and the strict accuracy 0. The reference
    # log-probs come from the scoring program (other batch shapes, so other fp32 summation orders): equal
    # to ~1e-7 relative, which on summed log-probs of ~100 tokens is a few 1e-6 of loss or margin.
    assert train[1]["loss"] == pytest.approx(math.log(2), abs=1e-5) and train[1]["rewards/accuracies"] == 0.0
    assert train[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for record in train.values():
        assert record["rewards/margins"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"],
                                                          abs=1e-4)
    assert [r["step"] for r in evals] == [6, 12]
    accuracies = [r["eval/rewards/accuracies"] for r in evals]
    assert accuracies[-1] > 0.5 and accuracies[-1] >= accuracies[0], accuracies
    assert evals[-1]["eval/loss"] < math.log(2) and evals[-1]["eval/rewards/margins"] > 0
    # Best by eval rewards/accuracies (DPO's default), kept and named by best.json.
    best = json.loads((trainer.run / model_io.BEST_FILE).read_text())
    assert best["metric"] == "eval/rewards/accuracies" and best["value"] == max(accuracies)
    assert best["step"] in step_dirs(trainer.run)
    assert model_io.resolve_model_path(trainer.run) == trainer.run / "checkpoints" / str(best["step"])


def test_dpo_reference_params_are_untouched(dpo_model_run, sft_run):
    trainer, ref_before = dpo_model_run
    ref_after = jax.device_get(trainer.ref_params)
    jax.tree.map(np.testing.assert_array_equal, ref_before, ref_after)
    # ... and are the SFT run's best checkpoint, while the policy moved away from it.
    with use_mesh(trainer.mesh, trainer.rules):
        sft = model_io.load_model(sft_run[0], trainer.mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.to_pure_dict(nnx.state(sft, nnx.Param))),
                 ref_after)
    policy = jax.device_get(trainer.state.params)
    assert not np.array_equal(policy["embed"], ref_after["embed"])


def test_dpo_precomputed_reference_matches_model_reference(base, sft_run, dpo_model_run, tmp_path):
    """`dpo.reference: precomputed` scores every pair once before training; its first steps match the
    live-reference run's (same data order, same schedule) to float32 summation noise."""
    config = dpo_config(base, sft_run, "dpo_precomputed", "precomputed")
    trainer = Trainer(config)
    assert trainer.ref_params is None
    assert all("ref_chosen_logp" in ex for ex in [*trainer.train_examples, *trainer.eval_examples])
    summary = train_until(trainer, 4)
    assert summary["stopped_at"] == 4 and step_dirs(trainer.run) == [4]
    got, _ = read_metrics(trainer.run)
    ref, _ = read_metrics(dpo_model_run[0].run)
    assert sorted(got) == [1, 2, 3, 4]
    assert got[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for step in got:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-4), (step, key)

    # The loop's best.json agrees with retention when eval accuracies tie (the later step wins, as in
    # Orbax's BestN): this trainer's checkpoints, redirected to a scratch dir, with made-up metrics.
    trainer.run, trainer.best = tmp_path, None
    trainer.ckpt = RunCheckpointer(tmp_path / "checkpoints", keep=1, best_metric="eval/rewards/accuracies",
                                   best_mode="max", async_save=False)
    for step, accuracy in enumerate([0.5, 0.75, 0.75, 0.25], start=1):
        trainer.save(step, {"eval/rewards/accuracies": accuracy, "eval/loss": 0.6})
    assert trainer.ckpt.all_steps() == [3, 4] and trainer.ckpt.best_step() == 3
    assert json.loads((tmp_path / model_io.BEST_FILE).read_text())["step"] == 3
    trainer.ckpt.close()


def test_dpo_in_two_padded_rows_a_pair_matches_the_shared_prompt_run(base, sft_run, dpo_model_run):
    """`dpo.share_prompt: false` (chosen and rejected as two padded rows) against the default run (the
    prompt shared, pairs packed): the same pairs each step, so the same loss and metrics to float32
    summation noise, from more token positions."""
    config = dpo_config(base, sft_run, "dpo_padded", "model", sets=["dpo.share_prompt=false"])
    trainer = Trainer(config)
    assert train_until(trainer, 3)["stopped_at"] == 3
    got, _ = read_metrics(trainer.run)
    ref, _ = read_metrics(dpo_model_run[0].run)
    for step in (1, 2, 3):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-4), (step, key)


# --- bad input ----------------------------------------------------------------------------------------

def test_dpo_precomputed_reference_without_a_held_out_set(base, sft_run):
    """No data.eval and no eval_fraction: the train pairs alone are scored, and set-up goes on."""
    config = dpo_config(base, sft_run, "dpo_precomputed_no_eval", "precomputed", sets=['data.eval=""'])
    trainer = Trainer(config)
    try:
        assert trainer.eval_examples == [] and trainer.train_examples
        assert all("ref_chosen_logp" in ex and "ref_rejected_logp" in ex for ex in trainer.train_examples)
    finally:
        trainer.release_lock()


def test_existing_run_dir_needs_resume_or_overwrite(base, sft_run, capsys):
    root, cfg = base
    run, _ = sft_run
    path, _ = write_config(root, "again", cfg)
    before = sorted(p.name for p in run.iterdir())
    t0 = time.perf_counter()
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert cli.main(["train", "--config", str(path), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 10
    assert sorted(p.name for p in run.iterdir()) == before


def test_config_errors_exit_before_any_work(base, capsys):
    root, cfg = base
    path, _ = write_config(root, "typo", {**cfg, "output_dir": str(root / "typo_run")})
    t0 = time.perf_counter()
    assert cli.main(["train", "--config", str(path), "--set", "train.bacth_size=4"]) == 2
    err = capsys.readouterr().err
    assert "train.bacth_size" in err and "train.batch_size" in err  # names the key and suggests the fix
    assert cli.main(["train", "--config", str(path), "--set", "dpo.loss=sigmod"]) == 2
    assert "dpo.loss" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 10
    assert not (root / "typo_run").exists()


def test_missing_init_from_is_a_clear_error(base):
    root, cfg = base
    _, config = write_config(root, "noinit", {**cfg, "stage": "dpo", "output_dir": str(root / "noinit_run"),
                                              "dpo": {"init_from": str(root / "no_such_run")}})
    with pytest.raises(JaxalignError, match=r"dpo\.init_from=.*no_such_run.*does not exist"):
        Trainer(config)
    assert not (root / "noinit_run").exists()  # nothing written, so a corrected rerun needs no --overwrite


def test_init_from_another_architecture_is_a_clear_error(base, sft_run):
    root, cfg = base
    run, _ = sft_run
    dpo = {**cfg, "stage": "dpo", "output_dir": str(root / "arch_run"), "dpo": {"init_from": str(run)}}
    _, config = write_config(root, "arch", dpo, ["model.config.hidden_size=64"])
    with pytest.raises(JaxalignError, match=r"another architecture than model\.config.*hidden_size: "
                                            r"model\.config has 64, dpo\.init_from has 32"):
        Trainer(config)
    assert not (root / "arch_run").exists()

    # A model whose vocabulary is smaller than the tokenizer's (ids past it would have no embedding).
    small = ModelConfig.from_hf_dict({**TINY_LLAMA, "vocab_size": 1000})
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    with use_mesh(mesh):
        model_io.save_model_checkpoint(init_model(small, mesh), root / "small_vocab")
    _, config = write_config(root, "vocab", {**dpo, "dpo": {"init_from": str(root / "small_vocab")}},
                             ["model.config=null"])
    with pytest.raises(JaxalignError, match=r"tokenizer .* has 32000 tokens but the model's vocab_size "
                                            r"\(dpo\.init_from=.*small_vocab.*\) is 1000"):
        Trainer(config)
    assert not (root / "arch_run").exists()
