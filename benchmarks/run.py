"""Training-step benchmarks of jaxalign, side by side with PyTorch on the same machine.

    python benchmarks/run.py                         # cpu-60m on CPU: everything below (~15 min)
    python benchmarks/run.py --shape llama-3.2-1b    # on a GPU host (datasheet peak for MFU)
    python benchmarks/run.py --sections step,variants --steps-of sft --variant model.logits_chunk_size=512
    python benchmarks/run.py --sections step --steps-of sft --jaxalign-src /tmp/old   # another checkout
    make bench                                       # the default run, appended to RESULTS.md

Sections (--sections, comma-separated; default all):
  peak     dense fp32 matmul FLOP/s measured here (jnp.dot of 2048x2048, best of several); the CPU
           denominator of MFU. On GPU/TPU the datasheet peak of the device kind is used instead.
  step     jaxalign SFT step, DPO step with a precomputed reference and with a live reference model:
           the real code path (train.step.make_train_step + jit_train_step, as run/loop.py builds
           them), compile time, median step time after warm-up, tokens/s, pairs/s, MFU, peak memory.
  torch    the same shape, batch, length and dtype trained by transformers' LlamaForCausalLM +
           torch.optim.AdamW (one step = forward, backward, update).
  compile  compile time of the train step vs depth (4/8/16/32 layers of a narrow model), scanned
           layers and (up to 16 layers) an unrolled layer loop for contrast.
  data     host time per batch (iterator next + to_global_arrays) vs the step time, and tokenize +
           pack throughput on the real HH-RLHF file with the Llama 2 tokenizer.
  lora     LoRA (rank 16, every projection) and QLoRA (NF4 base) SFT and DPO steps, each in a round
           beside its full fine-tuning counterpart (SFT; DPO with a live reference): step time and
           XLA's per-device peak (weights, optimizer state, batch, temporaries) as ratios to full.
  variants extra SFT-step runs with config overrides (--variant KEY=VALUE[,KEY=VALUE]), to record
           what an optimization buys (before/after in one session).

Every measurement runs in its own subprocess (`--worker`), so peak RSS and compile time belong to
one configuration. Results go to a JSON file (--json) and a table is appended to
benchmarks/RESULTS.md (--results; --no-append to skip), with the machine, versions and load average.

Model FLOPs (the MFU numerator; `bench.shapes.model_flops`): 6·N per trained token, N = the parameters of
every matmul (attention q/k/v/o + SwiGLU MLP of each layer, plus the LM head, counted even when tied;
the input embedding is a lookup and norm scales do no matmuls, so neither is counted), plus causal
attention 12·L·(heads·head_dim)·T²·B / 2 (QKᵀ and PV, forward + backward, half of the T×T square).
A DPO step with a live reference adds the reference forward: 2·N per token + attention / 3.
The same formula is used for PyTorch, so the ratio of MFUs is the ratio of speeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
from typing import Any

from bench.host import QUIET, device_info, load_average, machine, wait_quiet
from bench.report import markdown
from bench.shapes import SHAPES, datasheet_peak, matmul_params, model_flops
from bench.workers import WORKERS

ROOT = pathlib.Path(__file__).resolve().parents[1]
JAXALIGN_SRC = ROOT  # --jaxalign-src: import jaxalign from another checkout (before/after comparisons)


def spawn(kind: str, spec: dict, env_extra: dict | None = None, timeout: float = 3600) -> dict:
    """Run one worker in a fresh process; its last stdout line is the JSON result."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(JAXALIGN_SRC), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    busy = wait_quiet()
    before = load_average()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {spec} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_1m"] = [round(before, 2), round(load_average()[0], 2)]
    if busy is not None:
        result["busy_before"] = round(busy, 3)
    return result


def parse_variant(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: expected KEY=VALUE[,KEY=VALUE]")
        out[key.strip()] = value.strip()
    return out


STEP_RUNS = (("sft", "sft", False), ("dpo_precomputed", "dpo", False), ("dpo_live", "dpo", True))


LORA_RUNS = (("lora_sft", "sft", "none"), ("lora_dpo", "dpo", "none"), ("qlora_sft", "sft", "nf4"),
             ("qlora_dpo", "dpo", "nf4"))


def lora_rounds(args, common: dict, summarize, log) -> dict[str, Any]:
    """Each adapter run back to back with full fine-tuning of its stage (DPO: a live reference copy), so
    both halves of a ratio see the same machine state; the median ratio over rounds is reported."""
    out: dict[str, Any] = {}
    if args.lora_variant:  # e.g. model.remat=full, for both halves of every round
        common = common | {"variant": parse_variant(args.lora_variant)}
        out["variant"] = args.lora_variant
    for name, stage, quantize in LORA_RUNS:
        if name not in args.lora_runs:
            continue
        ratios = []
        for i in range(args.rounds):
            log(f"{name} round {i + 1}/{args.rounds}: full {stage}, then {name} ...")
            full = summarize(spawn("jax_step", common | {"stage": stage, "live_reference": stage == "dpo"}),
                             stage, stage == "dpo")
            lora = summarize(spawn("jax_step", common | {"stage": stage, "lora": {"rank": 16, "quantize": quantize}}),
                             stage, stage == "dpo")
            ratios.append({"full_step_s": full["step_s"], "step_s": lora["step_s"],
                           "step_ratio": lora["step_s"] / full["step_s"],
                           "full_xla_peak_mb": full["xla_peak_mb"], "xla_peak_mb": lora["xla_peak_mb"],
                           "memory_ratio": lora["xla_peak_mb"] / full["xla_peak_mb"],
                           "full_rss_mb": full["peak_host_rss_mb"], "rss_mb": lora["peak_host_rss_mb"]})
            log(f"  {lora['step_s']:.3f} vs {full['step_s']:.3f} s/step ({ratios[-1]['step_ratio']:.2f}x), "
                f"XLA peak {lora['xla_peak_mb']:.0f} vs {full['xla_peak_mb']:.0f} MB")
        out[name] = {"rounds": ratios, "step_ratio": statistics.median(r["step_ratio"] for r in ratios),
                     "memory_ratio": statistics.median(r["memory_ratio"] for r in ratios)}
    return out


def run_all(args) -> dict[str, Any]:
    s = SHAPES[args.shape]
    if args.batch:
        s = dataclasses.replace(s, batch=args.batch)
    if args.seq:
        s = dataclasses.replace(s, seq=args.seq)
    shape = dataclasses.asdict(s)
    sections = set(args.sections.split(","))
    dev = device_info()
    results: dict[str, Any] = {"machine": machine(), "device": dev, "shape": shape,
                               "load_average_start": load_average(), "chunk_size": args.chunk_size,
                               "flops_convention": model_flops.__doc__.strip(),
                               "matmul_params": matmul_params(s)}

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    peak = datasheet_peak(dev["device_kind"], s.dtype) if dev["platform"] != "cpu" else None
    if "peak" in sections or (peak is None and sections & {"step", "torch", "variants"}):
        log("measuring the dense fp32 matmul peak ...")
        results["peak"] = spawn("peak", {"torch": "torch" in sections})
        log(f"  jax {results['peak']['jax_matmul_flops'] / 1e9:.1f} GFLOP/s")
    if peak is None:
        peak = results["peak"]["jax_matmul_flops"] if "peak" in results else None
        results["peak_source"] = "measured fp32 jnp.dot 2048² (best of 7)"
    else:
        results["peak_source"] = f"datasheet ({dev['device_kind']}, {s.dtype})"
    results["peak_flops"] = peak

    common = {"shape": shape, "steps": args.steps, "warmup": args.warmup, "chunk_size": args.chunk_size}

    def summarize(r: dict, stage: str, live: bool) -> dict:
        tokens = s.batch * s.seq
        flops = model_flops(s, live_reference=live)
        r["tokens_per_s"] = tokens / r["step_s"]
        r["sequences_per_s"] = s.batch / r["step_s"]
        if stage == "dpo":
            r["pairs_per_s"] = s.batch / 2 / r["step_s"]
        r["model_flops"] = flops
        r["achieved_flops"] = flops / r["step_s"]
        r["mfu"] = flops / r["step_s"] / peak if peak else None
        return r

    if "step" in sections:
        runs = results["step"] = {}
        for name, stage, live in STEP_RUNS:
            if name not in args.steps_of:
                continue
            log(f"jaxalign {name} step ...")
            runs[name] = summarize(spawn("jax_step", common | {"stage": stage, "live_reference": live}), stage, live)
            log(f"  {runs[name]['step_s']:.3f} s/step, compile {runs[name]['compile_s']:.1f} s, "
                f"MFU {100 * (runs[name]['mfu'] or 0):.1f}%")
        if len(runs) == len(STEP_RUNS):
            sft = runs["sft"]["sequences_per_s"]
            results["dpo_cost"] = {
                "precomputed_pairs_per_s_over_sft_seq_per_s": runs["dpo_precomputed"]["pairs_per_s"] / sft,
                "live_pairs_per_s_over_sft_seq_per_s": runs["dpo_live"]["pairs_per_s"] / sft}
    if "torch" in sections:
        # Rounds of (jaxalign SFT, PyTorch) back to back: other jobs and clock changes on a shared
        # machine move both halves of a round alike, so the median of the per-round ratios is steadier
        # than one ratio of two separate medians.
        rounds = results["torch_rounds"] = []
        for i in range(args.rounds):
            log(f"round {i + 1}/{args.rounds}: jaxalign SFT step, then PyTorch's ...")
            jax_sft = summarize(spawn("jax_step", common | {"stage": "sft"}), "sft", False)
            torch_sft = summarize(spawn("torch_step", {"shape": shape, "steps": args.steps,
                                                       "warmup": args.warmup}), "sft", False)
            rounds.append({"jax_step_s": jax_sft["step_s"], "torch_step_s": torch_sft["step_s"],
                           "ratio": torch_sft["step_s"] / jax_sft["step_s"]})
            log(f"  {jax_sft['step_s']:.3f} vs {torch_sft['step_s']:.3f} s/step: {rounds[-1]['ratio']:.2f}x")
        results["torch"] = torch_sft
        results["jax_over_torch_sft_tokens_per_s"] = statistics.median(r["ratio"] for r in rounds)
    if "lora" in sections:
        results["lora"] = lora_rounds(args, common, summarize, log)
    if "variants" in sections and args.variant:
        results["variants"] = []
        for text in args.variant:
            variant = parse_variant(text)
            log(f"variant {text} ...")
            r = summarize(spawn("jax_step", common | {"stage": "sft", "variant": variant}), "sft", False)
            r["variant"] = text
            results["variants"].append(r)
            log(f"  {r['step_s']:.3f} s/step, MFU {100 * (r['mfu'] or 0):.1f}%")
    if "compile" in sections:
        results["compile"] = []
        base = SHAPES["cpu-60m"]
        for layers in args.compile_layers:
            for scan in (True, False):
                if not scan and layers > args.unrolled_max_layers:
                    continue
                cs = dataclasses.replace(base, name=f"compile-{layers}", layers=layers, hidden=256, mlp=704,
                                         heads=4, kv_heads=4, batch=2, seq=128)
                log(f"compile {layers} layers, scan_layers={scan} ...")
                r = spawn("jax_step", {"shape": dataclasses.asdict(cs), "stage": "sft", "steps": 0,
                                       "variant": {"scan_layers": scan}})
                results["compile"].append({"layers": layers, "scan_layers": scan, "compile_s": r["compile_s"]})
                log(f"  {r['compile_s']:.1f} s")
    if "data" in sections:
        log("data ...")
        results["data"] = spawn("data", {"shape": shape, "tokenize": not args.no_tokenize})
        if "step" in results:
            results["data"]["sft_host_over_step"] = results["data"]["sft_host_batch_s"] / results["step"]["sft"]["step_s"]
            results["data"]["dpo_host_over_step"] = (results["data"]["dpo_host_batch_s"]
                                                     / results["step"]["dpo_precomputed"]["step_s"])
    results["load_average_end"] = load_average()
    return results

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        result = WORKERS[sys.argv[2]](json.loads(sys.argv[3]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu-60m", choices=sorted(SHAPES))
    parser.add_argument("--sections", default="peak,step,torch,lora,compile,data,variants")
    parser.add_argument("--steps-of", type=lambda t: t.split(","), default=[r[0] for r in STEP_RUNS],
                        help="which train steps the step section times (sft,dpo_precomputed,dpo_live)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="(jaxalign SFT, PyTorch) step pairs of the torch section; the median ratio is reported")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--batch", type=int, default=0, help="override the shape's batch rows")
    parser.add_argument("--seq", type=int, default=0, help="override the shape's sequence length")
    parser.add_argument("--chunk-size", type=int, default=0, help="model.logits_chunk_size of the main runs")
    parser.add_argument("--variant", action="append", default=[],
                        help="extra SFT run with overrides, e.g. model.logits_chunk_size=512 (repeatable)")
    parser.add_argument("--lora-runs", type=lambda t: t.split(","), default=[r[0] for r in LORA_RUNS],
                        help="which of the lora section's runs (comma-separated)")
    parser.add_argument("--lora-variant", default="", help="KEY=VALUE[,KEY=VALUE] for both halves of the lora runs")
    parser.add_argument("--compile-layers", type=lambda t: [int(x) for x in t.split(",")], default=[4, 8, 16, 32])
    parser.add_argument("--unrolled-max-layers", type=int, default=16)
    parser.add_argument("--no-tokenize", action="store_true", help="skip the HH tokenize throughput")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="BUSY",
                        help="before each measurement wait until at most this fraction of the cores is busy with "
                             "other jobs (e.g. 0.1; 0 = do not wait)")
    parser.add_argument("--wait-timeout", type=float, default=1800.0, help="longest wait per measurement (s)")
    parser.add_argument("--jaxalign-src", default="",
                        help="import jaxalign from this directory instead of this checkout (e.g. an unpacked "
                             "`git archive HEAD jaxalign`, for before/after numbers in one session)")
    parser.add_argument("--json", default="", help="result file (default benchmarks/results/<shape>-<date>.json)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-append", action="store_true", help="do not append the table to --results")
    args = parser.parse_args()
    QUIET.update(max_busy=args.wait_quiet, timeout=args.wait_timeout)
    if args.jaxalign_src:
        global JAXALIGN_SRC
        JAXALIGN_SRC = pathlib.Path(args.jaxalign_src).resolve()
        if not (JAXALIGN_SRC / "jaxalign" / "__init__.py").is_file():
            raise SystemExit(f"--jaxalign-src {args.jaxalign_src}: no jaxalign/ package there")
    results = run_all(args)
    if JAXALIGN_SRC != ROOT:
        results["jaxalign_src"] = str(JAXALIGN_SRC)
    path = pathlib.Path(args.json or ROOT / "benchmarks" / "results"
                        / f"{args.shape}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    table = markdown(results)
    print(table)
    if not args.no_append:
        with open(args.results, "a") as f:
            f.write("\n" + table)
    print(f"wrote {path}" + ("" if args.no_append else f" and appended to {args.results}"), file=sys.stderr)


if __name__ == "__main__":
    main()
