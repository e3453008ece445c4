"""DPO layouts side by side: padded, shared prompt, shared prompt + packed pairs; SFT of the same data; TRL.

    python benchmarks/dpo_layouts.py [--pairs 32] [--batch 4] [--max-length 512] [--shape cpu-60m] [--trl]

On the first PAIRS HH-RLHF harmless-base test pairs of ../shared/data (their real lengths; the Llama 2
tokenizer, the `plain` template, max_length), the benchmark model shape, fp32, AdamW, each in its own
process, the train loop's step (make_train_step + jit_train_step; a new batch shape compiles once):

  dpo padded / shared / packed   dpo.share_prompt false / true, data.packing false / true; a
                                 precomputed reference (scored before timing, not timed) and a live one;
                                 "head everywhere": the LM head at every position (batches without
                                 their `loss_index`), as before it was computed at the loss positions only
  sft                            SFT of the pairs' prompt + chosen sequences, packed (data.packing)
  trl                            TRL 1.16 DPOTrainer, fp32 (bf16=False), live reference, the same pairs
                                 (as text, tokenized by TRL with the same tokenizer), the same batch

Each jaxalign run goes over the pairs once (compiling every shape), then times a second pass over
the same batches (data.shuffle false); TRL's median step after 2 warm-up steps. Printed per run:
pairs (or sequences) per second, and the token positions computed per pair and how many were real.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HH = SHARED / "hh-rlhf-harmless-base-test.jsonl.gz"
TOKENIZER = SHARED / "llama2-tokenizer.model"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _config(args, stage: str, sets: list[str]):
    from bench.shapes import SHAPES

    from jaxalign.config import apply_overrides, default_config

    shape = SHAPES[args["shape"]]
    cfg = apply_overrides(default_config(), [
        f"stage={stage}", f"data.train={HH}", "data.format=preference", f"data.max_rows={args['pairs']}",
        f"data.max_length={args['max_length']}", f"data.max_prompt_length={args['max_length'] - 64}",
        "data.shuffle=false", "data.eval_fraction=0", f"train.batch_size={args['batch']}",
        f"tokenizer.path={TOKENIZER}", "tokenizer.chat_template=plain", f"data.cache_dir={args['cache']}",
        *sets])
    cfg.model.config = shape.hf_config()
    return cfg


def _jaxalign(args: dict, stage: str, sets: list[str], everywhere: bool = False) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxalign.data.batching import by_pair
    from jaxalign.data.iterator import make_iterator, to_global_arrays
    from jaxalign.data.pipeline import load_examples
    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.models import ModelConfig, init_model
    from jaxalign.run.build import build_train_state
    from jaxalign.runtime.sharding import make_mesh, use_mesh
    from jaxalign.train.step import batch_shardings, jit_train_step, reference_logps

    cfg = _config(args, stage, sets)
    examples = list(load_examples(cfg, load_tokenizer(str(TOKENIZER), "plain"), stage=stage)[0])
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    with use_mesh(mesh):
        model = init_model(ModelConfig.from_hf_dict(dict(cfg.model.config)), mesh, seed=0)
        graphdef, params = nnx.split(model)
        params = nnx.to_pure_dict(params)
        ref = jax.tree.map(jax.numpy.copy, params) if stage == "dpo" else None
        if stage == "dpo" and cfg.dpo.reference == "precomputed":  # scored once, not timed (the loop's rule)
            score = jax.jit(lambda p, b: (reference_logps(nnx.merge(graphdef, p), b), b.get("pair_index")))
            it = make_iterator(examples, cfg, train=False, mesh=mesh)
            for start, host in zip(range(0, len(examples), it.batch_size), it):
                halves = by_pair(*jax.device_get(score(ref, to_global_arrays(host, mesh))), it.batch_size)
                for k in range(min(it.batch_size, len(examples) - start)):
                    examples[start + k] = {**examples[start + k], "ref_chosen_logp": float(halves[0][k]),
                                           "ref_rejected_logp": float(halves[1][k])}
            ref = None
        setup = build_train_state(cfg, mesh, graphdef, params, total_steps=1000)
        state, compiled = setup.state, {}
        it = make_iterator(examples, cfg, mesh=mesh)
        steps = it.steps_per_epoch

        last: dict = {}

        def one_pass():
            nonlocal state
            positions = real = 0
            t = time.perf_counter()
            for _ in range(steps):
                host = next(it)
                if everywhere:  # the LM head at every position, as before `loss_index`
                    host.pop("loss_index", None)
                batch = to_global_arrays(host, mesh)
                key = tuple((k, v.shape) for k, v in sorted(batch.items()))
                if key not in compiled:
                    shards = batch_shardings({k: v.shape for k, v in batch.items()}, mesh)
                    compiled[key] = jit_train_step(setup.step, setup.shardings, shards,
                                                   None if ref is None else jax.tree.map(lambda x: x.sharding, ref))
                state, metrics = compiled[key](state, batch, ref)
                last["loss"] = float(metrics["loss"])  # blocks until the step is done
                positions += host["tokens"].size
                real += int(np.count_nonzero(host["segment_ids"]))
            return time.perf_counter() - t, positions, real

        one_pass()
        seconds, positions, real = one_pass()
    units = steps * cfg.train.batch_size if stage == "dpo" else len(examples)
    return {"seconds": seconds, "steps": steps, "units": units, "per_s": units / seconds,
            "positions_per_unit": positions / units, "real_per_unit": real / units, "shapes": len(compiled),
            "loss": last["loss"]}


def _trl(args: dict) -> dict:
    import datasets
    import torch
    import transformers
    from bench.shapes import SHAPES
    from trl import DPOConfig, DPOTrainer

    from jaxalign.data.preference import normalize_preference_row
    from jaxalign.data.sources import load_rows
    from jaxalign.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        load_tokenizer(str(TOKENIZER), "plain").save_pretrained(tmp)
        tok = transformers.AutoTokenizer.from_pretrained(tmp)
    tok.pad_token = tok.unk_token
    rows = load_rows(str(HH), max_rows=args["pairs"], cache_dir=args["cache"])
    texts = [normalize_preference_row(r) for r in rows]
    data = datasets.Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in texts])
    hf = SHAPES[args["shape"]].hf_config()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"}))
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args["batch"], max_steps=args["trl_steps"],
                        max_length=args["max_length"], bf16=False, fp16=False, report_to=[], save_strategy="no",
                        logging_steps=1000, use_cpu=True, dataloader_num_workers=0)
        ref = copy.deepcopy(model).eval()  # the live reference: a frozen copy of the starting weights
        DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=data, processing_class=tok,
                   callbacks=[Timer()]).train()
    step = statistics.median(times[2:])
    return {"step_s": step, "per_s": args["batch"] / step, "steps": len(times)}


RUNS = {
    "dpo padded, precomputed": ("dpo", ["dpo.share_prompt=false", "dpo.reference=precomputed"]),
    "dpo shared, precomputed": ("dpo", ["data.packing=false", "dpo.reference=precomputed"]),
    "dpo shared + packed, precomputed": ("dpo", ["data.packing=true", "dpo.reference=precomputed"]),
    "dpo padded, live": ("dpo", ["dpo.share_prompt=false", "dpo.reference=model"]),
    "dpo shared + packed, live": ("dpo", ["data.packing=true", "dpo.reference=model"]),
    "dpo shared + packed, live, head everywhere": ("dpo", ["data.packing=true", "dpo.reference=model"], True),
    "sft packed (prompt + chosen)": ("sft", ["data.sft_from_preference=true", "data.packing=true"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--shape", default="cpu-60m")
    p.add_argument("--trl", action="store_true", help="also run TRL's DPOTrainer (live reference)")
    p.add_argument("--trl-steps", type=int, default=8)
    p.add_argument("--only", default="", help="comma-separated run names (substrings) to measure")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    spec = {"pairs": args.pairs, "batch": args.batch, "max_length": args.max_length, "shape": args.shape,
            "trl_steps": args.trl_steps, "cache": str(ROOT / "runs" / "dpo_layouts" / "cache")}
    if args.child:
        name = json.loads(args.child)
        print(json.dumps(_trl(spec) if name == "trl" else _jaxalign(spec, *RUNS[name])))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {json.dumps(spec)}")
    names = [n for n in RUNS if not args.only or any(o in n for o in args.only.split(","))]
    results = {}
    for name in names + (["trl"] if args.trl else []):
        out = subprocess.run([sys.executable, __file__, "--pairs", str(args.pairs), "--batch", str(args.batch),
                              "--max-length", str(args.max_length), "--shape", args.shape, "--trl-steps",
                              str(args.trl_steps), "--child", json.dumps(name)],
                             capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print()
    for name, r in results.items():
        unit = "pairs" if name.startswith(("dpo", "trl")) else "sequences"
        extra = (f", {r['positions_per_unit']:.0f} positions / {r['real_per_unit']:.0f} real tokens per "
                 f"{unit[:-1]}, {r['shapes']} shapes") if "positions_per_unit" in r else ""
        print(f"{name:36s} {r['per_s']:7.3f} {unit}/s{extra}")
    base = results.get("dpo padded, precomputed")
    for name in ("dpo shared, precomputed", "dpo shared + packed, precomputed"):
        if base and name in results:
            print(f"{name} / padded: {results[name]['per_s'] / base['per_s']:.2f}x")
    sft = results.get("sft packed (prompt + chosen)")
    if sft and "dpo shared + packed, precomputed" in results:
        print(f"dpo shared + packed pairs/s / sft sequences/s: "
              f"{results['dpo shared + packed, precomputed']['per_s'] / sft['per_s']:.2f}")
        # Were every position to cost the same, the data would bound this ratio: SFT's real tokens per
        # sequence over a shared pair's (P + C) / (P + C + R + 1). DPO's LM head runs at its C + R loss
        # positions only; SFT's at every position of its rows.
        dpo = results["dpo shared + packed, precomputed"]
        print(f"  bound from real tokens: {sft['real_per_unit'] / dpo['real_per_unit']:.2f}; from positions: "
              f"{sft['positions_per_unit'] / dpo['positions_per_unit']:.2f}")
    live = results.get("dpo shared + packed, live")
    everywhere = results.get("dpo shared + packed, live, head everywhere")
    if live and everywhere:
        print(f"LM head at the loss positions / at every position: {live['per_s'] / everywhere['per_s']:.2f}x")
    if "trl" in results and live:
        print(f"jaxalign (shared + packed, live) / TRL pairs/s: {live['per_s'] / results['trl']['per_s']:.2f}x")


if __name__ == "__main__":
    main()
