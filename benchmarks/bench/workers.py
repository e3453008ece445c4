"""The measurements, each run in a fresh process by run.py (`run.py --worker KIND SPEC`)."""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

from bench.measure import apply_variant, jax_memory, peak_rss_mb, synthetic_batch, timed_steps
from bench.shapes import Shape

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
LLAMA2_TOKENIZER = SHARED_DATA / "llama2-tokenizer.model"


def worker_peak(spec: dict) -> dict:
    """Dense fp32 matmul FLOP/s of XLA here: jnp.dot of n×n, `reps` chained per call, best of `trials`."""
    import jax
    import jax.numpy as jnp

    n, reps, trials = spec.get("n", 2048), spec.get("reps", 4), spec.get("trials", 7)

    @jax.jit
    def chain(a, b):
        for _ in range(reps):  # a data dependence so none is skipped; scaling keeps values bounded
            a = jnp.dot(a, b) * (1.0 / n)
        return a

    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.float32)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
    chain(a, b).block_until_ready()
    best = min(timed_steps(lambda: chain(a, b).block_until_ready(), 1, trials))
    out = {"jax_matmul_flops": 2 * n**3 * reps / best, "n": n}
    if spec.get("torch", True):
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        ta, tb = torch.randn(n, n), torch.randn(n, n)

        def torch_chain():
            x = ta
            for _ in range(reps):
                x = torch.mm(x, tb) * (1.0 / n)
            return x

        best_t = min(timed_steps(torch_chain, 1, trials))
        out["torch_matmul_flops"] = 2 * n**3 * reps / best_t
    return out


def build_jax_step(s: Shape, stage: str, live_reference: bool, chunk_size: int, options: dict,
                   num_devices: int = 0, lora: dict | None = None):
    """(compiled step, state, batch, ref_params, compile seconds) along the train loop's code path.

    The mesh is the loop's default (fsdp over all devices, or the first `num_devices`). `lora` ({"rank",
    "quantize"}): adapters on every projection of the frozen base (quantised or not); the step's third
    argument is then that base, which for DPO is also the reference (adapters off)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxalign.config import apply_overrides, default_config
    from jaxalign.models import ModelConfig, init_model
    from jaxalign.models.quant import quantize_base
    from jaxalign.run.build import build_train_state, init_lora_adapters, lora_spec, quant_spec
    from jaxalign.runtime.sharding import make_mesh, use_mesh
    from jaxalign.train.step import batch_shardings, jit_train_step

    cfg = ModelConfig.from_hf_dict(s.hf_config())
    # The defaults a run gets (AdamW, global-norm clipping, beta 0.1), for this stage and chunking.
    sets = [f"stage={stage}", f"model.logits_chunk_size={chunk_size}"]
    if lora:  # validation needs a base path; none is read here
        sets += ["lora.enabled=true", f"lora.rank={lora['rank']}", f"lora.alpha={2 * lora['rank']}",
                 f"lora.quantize={lora.get('quantize', 'none')}", f"lora.quant_block_size={lora.get('block', 64)}",
                 "model.path=unused"]
    run_cfg = apply_overrides(default_config(), sets)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:num_devices] if num_devices else None)
    with use_mesh(mesh):  # as the loop builds its state and step; the executable needs no context
        model = init_model(cfg, mesh, seed=0, **options)
        graphdef, params = nnx.split(model)
        params = nnx.to_pure_dict(params)
        del model
        if lora:
            spec = lora_spec(run_cfg)
            ref = quantize_base(params, cfg, quant_spec(run_cfg), mesh) if quant_spec(run_cfg) else params
            params = init_lora_adapters(cfg, spec, mesh, None, seed=0)
            live_reference = stage == "dpo"
        else:
            ref = jax.tree.map(jnp.copy, params) if live_reference else None
        state, state_shardings, train_step = build_train_state(run_cfg, mesh, graphdef, params, total_steps=1000)
        host = synthetic_batch(s, stage)
        if stage == "dpo" and live_reference:
            del host["ref_logps"]
        shards = batch_shardings({k: v.shape for k, v in host.items()}, mesh)
        batch = {k: jax.device_put(v, shards[k]) for k, v in host.items()}
        step = jit_train_step(train_step, state_shardings, shards,
                              None if ref is None else jax.tree.map(lambda x: x.sharding, ref))
        t = time.perf_counter()
        compiled = step.lower(state, batch, ref).compile()
        compile_s = time.perf_counter() - t
    return compiled, state, batch, ref, compile_s


def worker_jax_step(spec: dict) -> dict:
    import jax

    s = Shape(**spec["shape"])
    stage, live = spec["stage"], spec.get("live_reference", False)
    options = {"dtype": s.dtype, "param_dtype": s.param_dtype, "remat": s.remat, "attention": "auto",
               "scan_layers": True}
    options, chunk = apply_variant(options, spec.get("chunk_size", 0), spec.get("variant", {}))
    compiled, state, batch, ref, compile_s = build_jax_step(s, stage, live, chunk, options, spec.get("devices", 0),
                                                            spec.get("lora"))
    from jaxalign.plan.memory import compiled_memory

    xla = compiled_memory(compiled)  # per device: arguments (weights, state, batch) + outputs + temporaries
    out = {"compile_s": compile_s, "options": options, "chunk_size": chunk,
           "xla_peak_mb": xla["peak"] / 2**20 if xla else None}
    if spec.get("steps", 0) <= 0:
        return out | jax_memory()
    holder = {"state": state}

    def run_one():
        holder["state"], metrics = compiled(holder["state"], batch, ref)
        jax.block_until_ready((holder["state"], metrics))
        holder["loss"] = float(metrics["loss"])

    cpu: list[float] = []
    times = timed_steps(run_one, spec.get("warmup", 2), spec["steps"], cpu)
    return out | {"step_times": times, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
                  "loss": holder["loss"]} | jax_memory()


def worker_torch_step(spec: dict) -> dict:
    import torch
    import transformers

    s = Shape(**spec["shape"])
    torch.manual_seed(0)
    threads = spec.get("threads") or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[s.dtype]
    hf = s.hf_config()
    config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"},
                                      attn_implementation=spec.get("attn_implementation", "sdpa"))
    model = transformers.LlamaForCausalLM(config).to(device)
    if s.torch_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    host = synthetic_batch(s, "sft")
    tokens = torch.from_numpy(host["tokens"]).long().to(device)
    labels = torch.from_numpy(host["targets"]).long().to(device)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=tokens).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as jaxalign's default optimizer
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    cpu: list[float] = []
    times = timed_steps(step, spec.get("warmup", 2), spec["steps"], cpu)
    out = {"step_times": times, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu), "threads": threads,
           "peak_host_rss_mb": peak_rss_mb(), "attn_implementation": config._attn_implementation}
    if device == "cuda":
        out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def worker_data(spec: dict) -> dict:
    """Host time per batch (iterator next + to_global_arrays), and tokenize + pack throughput on HH."""
    import gc

    import jax
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from data_throughput import synthetic_pairs, synthetic_sft

    from jaxalign.data.iterator import BatchIterator, to_global_arrays
    from jaxalign.runtime.sharding import make_mesh

    s = Shape(**spec["shape"])
    n = spec.get("devices", 0)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:n] if n else None)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for stage in ("sft", "dpo"):
        if stage == "sft":
            examples = synthetic_sft(spec.get("examples", 20000), s.seq, rng)
            it = BatchIterator(examples, "sft", batch_size=s.batch, max_length=s.seq, packing=True, mesh=mesh)
        else:
            examples = synthetic_pairs(spec.get("examples", 20000) // 4, s.seq, rng)
            it = BatchIterator(examples, "dpo", batch_size=s.batch // 2, max_length=s.seq, mesh=mesh)
        gc.collect()

        def one():
            jax.block_until_ready(to_global_arrays(next(it), mesh))

        times = timed_steps(one, 3, spec.get("batches", 50))
        out[f"{stage}_host_batch_s"] = statistics.median(times)
    if spec.get("tokenize", True) and HH_FILE.is_file() and LLAMA2_TOKENIZER.is_file():
        out.update(tokenize_throughput(s.seq))
    return out


def tokenize_throughput(max_length: int) -> dict:
    """rows/s of jaxalign.data tokenize (fresh cache dir) for SFT (chosen) and DPO, then packing."""
    import numpy as np

    from jaxalign.config import default_config
    from jaxalign.data.iterator import BatchIterator
    from jaxalign.data.sources import load_rows
    from jaxalign.data.tokenize import tokenize_dataset
    from jaxalign.data.tokenizer import load_tokenizer

    out: dict[str, Any] = {}
    tok = load_tokenizer(str(LLAMA2_TOKENIZER), "plain")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rows = load_rows(str(HH_FILE), cache_dir=os.path.join(tmp, "hf"))
        out["hh_load_s"] = time.perf_counter() - t
        out["hh_rows"] = len(rows)
        data = default_config().data
        data.format, data.sft_from_preference, data.on_bad_row = "preference", True, "skip"
        data.max_length, data.max_prompt_length = max_length, min(384, max_length * 3 // 4)
        for stage in ("sft", "dpo"):
            t = time.perf_counter()
            examples, stats = tokenize_dataset(rows, tok, data, stage, cache_dir=os.path.join(tmp, f"cache-{stage}"))
            elapsed = time.perf_counter() - t
            out[f"hh_tokenize_{stage}_rows_per_s"] = len(rows) / elapsed
            out[f"hh_tokenize_{stage}_s"] = elapsed
            if stage == "sft":
                t = time.perf_counter()
                it = BatchIterator(examples, "sft", batch_size=8, max_length=max_length, packing=True, epochs=1)
                batches = list(it)  # one epoch; full batches only (the last partial one is dropped)
                elapsed = time.perf_counter() - t
                n_rows = sum(len(b["tokens"]) for b in batches)
                out["hh_pack_examples_per_s"] = len(examples) / elapsed
                out["hh_packed_rows"] = n_rows
                # Non-padding share of the rows built (real tokens / row capacity).
                out["hh_pack_efficiency"] = sum(int(np.sum(b["segment_ids"] > 0)) for b in batches) / (
                    n_rows * max_length)
    return out


WORKERS = {"peak": worker_peak, "jax_step": worker_jax_step, "torch_step": worker_torch_step,
           "data": worker_data}
