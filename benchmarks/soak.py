"""Soak: a long tiny run that checkpoints and evaluates often; do memory, threads or file descriptors leak?

    python benchmarks/soak.py [--steps 1000] [--every 50] [--warmup 200] [--out /tmp/jaxalign-soak]

SFT of the tiny random Llama (hidden 32, 2 layers, the Llama 2 tokenizer's 32,000-token vocabulary) on
real HH rows (../shared/data), batch 8 x 64 tokens, checkpoint (async, keep 2) and evaluation every
`--every` steps, for `--steps` steps, then a second, short run in the same process. At every checkpoint
step it samples the process's resident memory (VmRSS), OS threads and open file descriptors
(/proc/self), and prints the table and a verdict: RSS growth from the end of the warm-up (compilation,
first checkpoint and evaluation) to the end under 5%; no growing number of threads or fds after the
warm-up (compared as the mean over the second half of the samples minus the first half); and none
more after the second run than after the first (nothing left behind per run).
Writes OUT/soak.json. Linux only. Not part of the test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import time

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_LLAMA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": True}


def proc_status() -> dict[str, float]:
    """RSS (MiB), OS threads and open fds of this process."""
    status = pathlib.Path("/proc/self/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split(":", 1)[1].split() for line in status}
    return {"rss_mib": int(fields["VmRSS"][0]) / 1024, "threads": int(fields["Threads"][0]),
            "fds": len(os.listdir("/proc/self/fd"))}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in pathlib.Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    import jax

    return (f"{cpu}, {os.cpu_count()} CPUs visible, {mem:.0f} GiB RAM; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, jax {jax.__version__} on {jax.devices()[0].platform} "
            f"x{jax.device_count()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50, help="checkpoint and evaluate every N steps")
    parser.add_argument("--warmup", type=int, default=200, help="steps before the RSS baseline is taken")
    parser.add_argument("--out", default="/tmp/jaxalign-soak", help="run dir parent (replaced)")
    args = parser.parse_args()

    import yaml

    from jaxalign.config import load_config
    from jaxalign.run.loop import Trainer

    out = pathlib.Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = {
        "stage": "sft", "output_dir": str(out / "run"), "model": {"config": TINY_LLAMA},
        "tokenizer": {"path": str(DATA / "llama2-tokenizer.model"), "chat_template": "plain"},
        "data": {"train": str(DATA / "hh-rlhf-harmless-base-test.jsonl.gz"), "format": "preference",
                 "sft_from_preference": True, "max_rows": 600, "eval_fraction": 0.1, "max_length": 64,
                 "max_prompt_length": 32, "pad_to_multiple_of": 64, "on_bad_row": "skip"},
        "train": {"batch_size": 8, "max_steps": args.steps, "eval_every": args.every, "eval_batches": 2,
                  "log_every": 10},
        "eval": {"batch_size": 8},
        "optimizer": {"lr": 1e-3, "warmup_steps": 20},
        "checkpoint": {"every_steps": args.every, "keep": 2, "save_at_epoch_end": False},
    }
    (out / "soak.yaml").write_text(yaml.safe_dump(cfg))
    second = {**cfg, "output_dir": str(out / "second"), "train": {**cfg["train"], "max_steps": 2 * args.every}}
    (out / "second.yaml").write_text(yaml.safe_dump(second))
    before = proc_status()
    trainer = Trainer(load_config(out / "soak.yaml"))
    after_init = proc_status()

    samples: list[dict] = []
    log_train = trainer.log_train
    t0 = time.perf_counter()

    def sampled_log_train(step, *a, **k):  # called by the loop every log_every steps, on the main thread
        record = log_train(step, *a, **k)
        if step % args.every == 0:
            samples.append({"step": step, "seconds": round(time.perf_counter() - t0, 1), **proc_status(),
                            "loss": round(record["loss"], 4)})
            s = samples[-1]
            print(f"step {step:5d}  {s['seconds']:7.1f}s  rss {s['rss_mib']:7.1f} MiB  threads {s['threads']:3d}  "
                  f"fds {s['fds']:3d}  loss {s['loss']:.4f}", flush=True)
        return record

    trainer.log_train = sampled_log_train
    summary = trainer.train()
    seconds = time.perf_counter() - t0
    after = proc_status()  # checkpointer closed, lock released
    del trainer
    Trainer(load_config(out / "second.yaml")).train()
    after_second = proc_status()

    base = next(s for s in samples if s["step"] >= args.warmup)
    last = samples[-1]
    growth = (last["rss_mib"] - base["rss_mib"]) / base["rss_mib"] * 100
    peak_threads = max(s["threads"] for s in samples)
    result = {
        "machine": machine(), "steps": args.steps, "every": args.every, "warmup": args.warmup,
        "seconds": round(seconds, 1), "steps_per_sec": round(args.steps / seconds, 2),
        "checkpoints_written": len(samples), "final_eval_loss": summary.get("eval/loss"),
        "before_init": before, "after_init": after_init, "after_run": after, "after_second_run": after_second,
        "threads_at_warmup": base["threads"], "threads_at_end": last["threads"], "fds_at_warmup": base["fds"],
        "fds_at_end": last["fds"], "rss_at_warmup_mib": base["rss_mib"], "rss_at_end_mib": last["rss_mib"],
        "rss_growth_pct": round(growth, 2),
        "max_rss_mib": max(s["rss_mib"] for s in samples), "threads_during_run_max": peak_threads,
        "samples": samples,
    }
    ok_rss = growth < 5
    # Threads / fds: XLA's, Orbax's and TensorStore's pools start in the warm-up, and their workers come and go
    # with the async saves (+-2 between samples). A leak grows with every checkpoint and evaluation: compare the
    # two halves after the warm-up (20 checkpoints would add 10 threads per leaked one), and the process after a
    # second run with after the first (nothing left behind per run).
    late = [s for s in samples if s["step"] > base["step"]]
    half = len(late) // 2
    mean = lambda xs, key: sum(x[key] for x in xs) / max(len(xs), 1)  # noqa: E731
    result["threads_trend_per_half"] = round(mean(late[half:], "threads") - mean(late[:half], "threads"), 2)
    result["fds_trend_per_half"] = round(mean(late[half:], "fds") - mean(late[:half], "fds"), 2)
    ok_threads = result["threads_trend_per_half"] < 1 and after_second["threads"] <= after["threads"]
    ok_fds = result["fds_trend_per_half"] < 1 and after["fds"] <= after_init["fds"] and \
        after_second["fds"] <= after["fds"]
    result["verdict"] = {"rss_growth_under_5pct": ok_rss, "threads_stable": ok_threads, "fds_stable": ok_fds}
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0 if ok_rss and ok_threads and ok_fds else 1


if __name__ == "__main__":
    sys.exit(main())
