"""The LM head + log-softmax of a large vocabulary, forward and backward: memory and time of each way to run it.

    python benchmarks/lm_head.py [--batch 4] [--length 2048] [--embed 2048] [--vocab 128256] [--chunk 256]
                                 [--run] [--only fused,...]

Three ways, each the gradient of sum(logp) + 1e-4 * sum(lse^2) for the hidden states and the head, in its
own process:

  whole       logit_stats of the whole [batch, length, vocab] fp32 logits, autodiff (model.logits_chunk_size 0)
  checkpoint  chunks of `chunk` positions under jax.checkpoint + lax.map, autodiff (the chunked path before
              the fused one: autodiff's backward of the map keeps each chunk's residuals)
  fused       models.logprobs.fused_logit_stats: chunks inside one custom VJP (the chunked path now)

Printed per way: XLA's buffer assignment of the compiled program (temporaries, and arguments + outputs), and
with --run the step time and the process's peak RSS (VmHWM) after running it twice.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
WAYS = ("whole", "checkpoint", "fused")


def _loss(way: str, chunk: int):
    import jax
    import jax.numpy as jnp

    from jaxalign.models.logprobs import fused_logit_stats, logit_stats

    def checkpointed(h, w, t):  # autodiff through checkpointed chunks
        n = h.shape[1] // chunk
        hs = h.reshape(h.shape[0], n, chunk, -1).swapaxes(0, 1)
        ts = t.reshape(t.shape[0], n, chunk).swapaxes(0, 1)
        one = jax.checkpoint(lambda x: logit_stats(jnp.einsum("bce,ev->bcv", x[0], w,
                                                              preferred_element_type=jnp.float32), x[1]))
        out = jax.lax.map(one, (hs, ts))
        return out["logp"], out["lse"]

    def stats(h, w, t):
        if way == "whole":
            s = logit_stats(jnp.einsum("ble,ev->blv", h, w, preferred_element_type=jnp.float32), t)
            return s["logp"], s["lse"]
        if way == "checkpoint":
            return checkpointed(h, w, t)
        return fused_logit_stats(h, w, t, chunk)[:2]

    def loss(h, w, t):
        logp, lse = stats(h, w, t)
        return jnp.sum(logp) + 1e-4 * jnp.sum(lse ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _worker(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    h = jax.random.normal(key, (args.batch, args.length, args.embed), jnp.float32)
    w = jax.random.normal(jax.random.fold_in(key, 1), (args.embed, args.vocab), jnp.float32) * 0.02
    t = jax.random.randint(jax.random.fold_in(key, 2), (args.batch, args.length), 0, args.vocab)
    fn = _loss(args.worker, args.chunk)
    compiled = fn.lower(h, w, t).compile()
    mem = compiled.memory_analysis()
    out = {"way": args.worker, "temp_gb": mem.temp_size_in_bytes / 2**30,
           "args_and_outputs_gb": (mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**30}
    if args.run:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            jax.block_until_ready(compiled(h, w, t))
            times.append(time.perf_counter() - start)
        out["step_s"] = min(times)
        out["peak_rss_gb"] = _vm_hwm_gb()
    return out


def _vm_hwm_gb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--embed", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--run", action="store_true", help="also run each way twice: step time and peak RSS")
    p.add_argument("--only", default=",".join(WAYS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; batch {args.batch} x "
          f"length {args.length}, embed {args.embed}, vocab {args.vocab}, chunk {args.chunk}, fp32")
    print(f"whole logits alone: {args.batch * args.length * args.vocab * 4 / 2**30:.2f} GiB")
    for way in args.only.split(","):
        argv = [sys.executable, __file__, "--worker", way, *(a for k in ("batch", "length", "embed", "vocab", "chunk")
                                                            for a in (f"--{k}", str(getattr(args, k))))]
        proc = subprocess.run(argv + (["--run"] if args.run else []), capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
        if proc.returncode:
            print(f"{way}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        run = f", step {r['step_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GiB" if "step_s" in r else ""
        print(f"{way:11s} XLA temporaries {r['temp_gb']:6.2f} GiB, arguments + outputs {r['args_and_outputs_gb']:.2f} "
              f"GiB{run}", flush=True)


if __name__ == "__main__":
    main()
