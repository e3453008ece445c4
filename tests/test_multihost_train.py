"""Multi-host training: 2 processes x 4 CPU devices (jax.distributed over localhost, gloo) run SFT then
DPO (from the SFT run; stopped after step 2 and resumed from its checkpoint) and log the same per-step
losses and eval metrics as 1 process x 8 devices (this pytest process, uninterrupted) on the same mesh.

The two workers are this file run as a script (`python tests/test_multihost_train.py worker ...`); they
join through the JAXALIGN_* environment that `jaxalign.runtime.distributed` reads, as `launch/gpu.sh` sets it.
They share the run dirs and the tokenized-data cache (one filesystem, like a pod's shared storage): process 0
writes the token store, process 1 opens it without tokenizing.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from local_processes import free_port, start_workers, wait_workers, xla_flags
from tiny_runs import hh_sft_config, train_until  # stdlib only: the workers set their environment before jax loads

THIS = pathlib.Path(__file__).resolve()
REPO = THIS.parents[1]
STEPS, STOP_AT = 4, 2


def stage_configs(root: pathlib.Path, shared_data: pathlib.Path, cache: pathlib.Path) -> dict[str, dict]:
    sft = hh_sft_config(
        shared_data, root / "sft", cache,
        # every axis spans both processes' devices in some way: data x fsdp x tensor = 2 x 2 x 2
        mesh={"data": 2, "fsdp": 2, "tensor": 2},
        data={"max_rows": 96, "eval_fraction": 0.1, "max_length": 128, "max_prompt_length": 64},
        train={"batch_size": 8, "max_steps": STEPS, "eval_every": 0, "log_every": 1},
        eval={"batch_size": 8},
        optimizer={"lr": 3e-3, "warmup_steps": 1},
        checkpoint={"every_steps": 2, "keep": 2},
    )
    dpo = json.loads(json.dumps(sft))
    dpo.update(stage="dpo", output_dir=str(root / "dpo"))
    dpo["data"].update(sft_from_preference=False)
    dpo["optimizer"]["lr"] = 1e-3
    dpo["dpo"] = {"init_from": str(root / "sft"), "reference": "precomputed", "beta": 0.1}
    return {"sft": sft, "dpo": dpo}


def run_stages(root: pathlib.Path, shared_data: pathlib.Path, cache: pathlib.Path,
               interrupt: tuple[str, ...] = ()) -> dict[str, dict]:
    """SFT then DPO (the stages in `interrupt` stopped after STOP_AT and resumed from their checkpoint):
    {stage: {"losses": {step: loss} from process 0's metrics.jsonl, "eval": final eval metrics}}."""
    import jax

    from jaxalign.config import load_config
    from jaxalign.run.loop import Trainer

    out = {}
    for stage, cfg in stage_configs(root, shared_data, cache).items():
        config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])
        trainer = Trainer(config)
        if stage in interrupt:
            first = train_until(trainer, STOP_AT)
            assert first["stopped_at"] == STOP_AT, first
            trainer = Trainer(config, resume=True)
            assert int(trainer.state.step) == STOP_AT
        summary = trainer.train()
        run = pathlib.Path(cfg["output_dir"])
        losses, tokens, evals = {}, {}, {}
        if jax.process_index() == 0:  # the file process 0 wrote: one record per step (asserted)
            for line in (run / "metrics.jsonl").read_text().splitlines():
                record = json.loads(line)
                if "loss" in record:
                    assert record["step"] not in losses, f"{stage}: step {record['step']} logged twice"
                    losses[record["step"]] = record["loss"]
                    tokens[record["step"]] = record["tokens"]
        evals = {k: v for k, v in summary.items() if k.startswith("eval/")}
        out[stage] = {"losses": losses, "tokens": tokens, "eval": evals, "steps": summary["steps"],
                      "from_cache": trainer.data_stats["train"].from_cache}
    return out


def worker(process_id: int, port: int, root: str, shared_data: str) -> None:
    os.environ.update({"JAXALIGN_COORDINATOR": f"localhost:{port}", "JAXALIGN_NUM_PROCESSES": "2",
                       "JAXALIGN_PROCESS_ID": str(process_id)})
    import jax

    from jaxalign.runtime.distributed import initialize_from_args_or_env

    assert initialize_from_args_or_env()
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    root_path = pathlib.Path(root)
    # Each process's own compilation cache: the resumed trainer reuses the first one's programs.
    jax.config.update("jax_compilation_cache_dir", str(root_path / f"xla-cache-{process_id}"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    result = run_stages(root_path / "runs", pathlib.Path(shared_data), root_path / "cache", interrupt=("dpo",))
    (root_path / f"result-{process_id}.json").write_text(json.dumps(result))
    jax.distributed.shutdown()


def test_two_processes_train_sft_and_dpo_like_one(tmp_path, shared_data):
    import jax
    import pytest

    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    for name in ("JAXALIGN_COORDINATOR", "JAXALIGN_NUM_PROCESSES", "JAXALIGN_PROCESS_ID"):
        env.pop(name, None)
    port = free_port()
    t0 = time.perf_counter()
    procs = start_workers(THIS, [["worker", i, port, tmp_path / "multi", shared_data] for i in range(2)], env, REPO)
    # The single-process reference runs meanwhile, here: 1 process x 8 devices, same mesh.
    assert jax.process_count() == 1 and jax.device_count() == 8
    ref = run_stages(tmp_path / "single" / "runs", shared_data, tmp_path / "single" / "cache")
    wait_workers(procs, timeout=240)
    elapsed = time.perf_counter() - t0
    got = [json.loads((tmp_path / "multi" / f"result-{i}.json").read_text()) for i in range(2)]

    for stage in ("sft", "dpo"):
        assert "eval/loss" in ref[stage]["eval"], ref[stage]
        want = {int(k): v for k, v in ref[stage]["losses"].items()}
        assert sorted(want) == list(range(1, STEPS + 1)), ref[stage]
        losses = {int(k): v for k, v in got[0][stage]["losses"].items()}
        assert sorted(losses) == sorted(want), (stage, losses)
        for step in want:
            assert abs(losses[step] - want[step]) <= 1e-5, (stage, step, losses[step], want[step])
        # Tokens counted over the global batch, not process 0's rows only.
        tokens = {int(k): v for k, v in got[0][stage]["tokens"].items()}
        assert tokens == ref[stage]["tokens"] and min(tokens.values()) > 0, (stage, tokens, ref[stage]["tokens"])
        for g in got:  # every process computed the same global eval metrics
            assert g[stage]["steps"] == STEPS
            for key, value in ref[stage]["eval"].items():
                # summed log-probs (~ -400) differ in float32 rounding only: relative 1e-6
                assert g[stage]["eval"][key] == pytest.approx(value, rel=1e-6, abs=1e-5), (stage, key)
    # One token store per stage, written by process 0 and opened by process 1.
    assert [g["sft"]["from_cache"] for g in got] == [False, True], got
    assert len(list((tmp_path / "multi" / "cache" / "tokenized").glob("sft-*/meta.json"))) == 2  # train, held out
    # Shared files written once, by process 0; both stages' checkpoints restorable as models.
    runs = tmp_path / "multi" / "runs"
    for stage in ("sft", "dpo"):
        assert (runs / stage / "config.yaml").is_file() and (runs / stage / "summary.json").is_file()
        assert sorted(int(p.name) for p in (runs / stage / "checkpoints").iterdir() if p.name.isdigit())[-1] == STEPS
    print(f"2x4 processes + 1x8 reference: {elapsed:.1f}s")


# --- processes that disagree ---------------------------------------------------------------------------

def data_worker(process_id: int, port: int, root: str, shared_data: str) -> None:
    """One "host" of a 2-process job, in its own dir: a relative data.train names its own local file."""
    os.environ.update({"JAXALIGN_COORDINATOR": f"localhost:{port}", "JAXALIGN_NUM_PROCESSES": "2",
                       "JAXALIGN_PROCESS_ID": str(process_id)})
    root_path = pathlib.Path(root)
    os.chdir(root_path / f"host-{process_id}")
    import jax

    from jaxalign.config import load_config
    from jaxalign.errors import JaxalignError
    from jaxalign.run.loop import Trainer
    from jaxalign.runtime.distributed import initialize_from_args_or_env

    assert initialize_from_args_or_env()
    results = {}
    for case, data in (("different", "data.jsonl"), ("unreadable", "bad.jsonl")):
        cfg = hh_sft_config(pathlib.Path(shared_data), root_path / "runs" / case, pathlib.Path("cache"),
                            data={"max_rows": 40, "eval_fraction": 0.1, "max_length": 64, "max_prompt_length": 32},
                            train={"batch_size": 8, "max_steps": 2, "eval_every": 0})
        cfg["data"]["train"] = data
        config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])
        try:
            Trainer(config)
            results[case] = "started"
        except JaxalignError as e:
            results[case] = str(e)
    (root_path / f"result-{process_id}.json").write_text(json.dumps(results))
    jax.distributed.shutdown()


def test_processes_that_disagree_on_the_data_all_stop_with_one_message(tmp_path, shared_data):
    """Each process reads its own copy of data.train (a host's local disk). When the copies differ, every
    process stops before any training collective with the same message naming the data fingerprint of
    each; when one process cannot read its copy, every process stops with that process's error."""
    import gzip

    with gzip.open(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as f:
        rows = [next(f) for _ in range(41)]
    for i in range(2):
        host = tmp_path / f"host-{i}"
        host.mkdir()
        (host / "data.jsonl").write_text("".join(rows[i:i + 40]))  # another first row on process 1
        (host / "bad.jsonl").write_text("".join(rows[:40]) if i == 0 else "{not json\n")
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    for name in ("JAXALIGN_COORDINATOR", "JAXALIGN_NUM_PROCESSES", "JAXALIGN_PROCESS_ID"):
        env.pop(name, None)
    port = free_port()
    procs = start_workers(THIS, [["data_worker", i, port, tmp_path, shared_data] for i in range(2)], env, REPO)
    wait_workers(procs, timeout=180)
    got = [json.loads((tmp_path / f"result-{i}.json").read_text()) for i in range(2)]
    assert got[0] == got[1], got  # one message on every process
    different, unreadable = got[0]["different"], got[0]["unreadable"]
    assert different.startswith("loading the data: the processes disagree on the data fingerprint (process 0: "), different
    assert "every process must see the same config, data files and checkpoints" in different
    assert unreadable.startswith("loading the data failed on process 1 of 2: bad.jsonl:1: malformed JSON"), unreadable
    for case in ("different", "unreadable"):  # nothing written into the run dir, and its lock released
        run = tmp_path / "runs" / case
        assert not (run / "config.yaml").exists() and not (run / "run.lock").exists(), case


# --- where the process group comes from (no processes started) ---------------------------------------

def test_process_group_from_flags_environment_and_slurm():
    import pytest

    from jaxalign.errors import JaxalignError
    from jaxalign.runtime.distributed import ProcessGroup, first_slurm_host, resolve_process_group

    assert resolve_process_group(environ={}) is None  # one process: nothing to join
    assert resolve_process_group("h:1", 1, 0, environ={}) is None
    assert resolve_process_group("h:1234", 4, 3, environ={"JAXALIGN_PROCESS_ID": "0"}) == \
        ProcessGroup("flags", "h:1234", 4, 3)  # flags win over the environment
    env = {"JAXALIGN_COORDINATOR": "10.0.0.2:8476", "JAXALIGN_NUM_PROCESSES": "2", "JAXALIGN_PROCESS_ID": "1"}
    assert resolve_process_group(environ=env) == ProcessGroup("environment", "10.0.0.2:8476", 2, 1)
    slurm = {"SLURM_JOB_ID": "4097", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_NODES": "4",
             "SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_LOCALID": "0"}
    group = resolve_process_group(environ=slurm)
    assert group == ProcessGroup("SLURM", "gpu007:61441", 4, 3, None)  # one task per node: all its GPUs
    group = resolve_process_group(environ={**slurm, "SLURM_NTASKS": "16", "SLURM_LOCALID": "2"})
    assert group.local_device_ids == (2,)  # 4 tasks per node: one GPU each
    assert resolve_process_group(environ={**slurm, "SLURM_NTASKS": "1"}) is None
    assert first_slurm_host("node[001,007-015],host2") == "node001" and first_slurm_host("a1,b2") == "a1"
    with pytest.raises(JaxalignError, match="missing --process-id"):
        resolve_process_group("h:1", 2, None, environ={})
    with pytest.raises(JaxalignError, match="HOST:PORT"):
        resolve_process_group("h", 2, 0, environ={})
    with pytest.raises(JaxalignError, match="not in 0..1"):
        resolve_process_group("h:1", 2, 2, environ={})
    with pytest.raises(JaxalignError, match="must be integers"):
        resolve_process_group(environ={**env, "JAXALIGN_NUM_PROCESSES": "two"})


def test_cli_flags():
    import argparse

    from jaxalign.runtime.distributed import add_distributed_args

    parser = argparse.ArgumentParser()
    add_distributed_args(parser)
    args = parser.parse_args(["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("h:1", 2, 1)
    args = parser.parse_args([])
    assert (args.coordinator, args.num_processes, args.process_id) == (None, None, None)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in ("worker", "data_worker"):
    {"worker": worker, "data_worker": data_worker}[sys.argv[1]](int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                                                 sys.argv[5])
