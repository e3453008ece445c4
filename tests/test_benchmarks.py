"""benchmarks/run.py: the FLOP count equals a hand count, and every worker runs on a toy shape.

Speed is never asserted here; `make bench` measures it.
"""

import math
import pathlib
import sys
import types

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """The benchmark suite's modules under one name (benchmarks/bench/, as run.py imports them)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench import host, measure, report, shapes, workers
    finally:
        sys.path.remove(str(BENCHMARKS))
    return types.SimpleNamespace(**{name: getattr(module, name) for module in (host, measure, report, shapes, workers)
                                    for name in dir(module) if not name.startswith("_")})


def test_model_flops_equals_hand_count(bench):
    s = bench.SHAPES["tiny"]  # 2 layers, hidden 64 (4 heads × 16), 2 kv heads, MLP 176, vocab 512, 4 × 64
    assert (s.layers, s.hidden, s.heads, s.kv_heads, s.mlp, s.vocab, s.batch, s.seq) == (
        2, 64, 4, 2, 176, 512, 4, 64)
    q_o = 2 * 64 * 64  # wq and wo: 64 × (4 × 16)
    k_v = 2 * 64 * 32  # wk and wv: 64 × (2 × 16)
    mlp = 3 * 64 * 176
    n = 2 * (q_o + k_v + mlp) + 64 * 512  # + LM head; the embedding lookup and norms are not counted
    assert bench.matmul_params(s) == n == 124_928
    tokens = 4 * 64
    attention = 12 * 2 * 64 * 64**2 * 4 / 2  # 12 · L · (H·d) · T² · B, halved by the causal mask
    assert bench.model_flops(s) == 6 * n * tokens + attention == 204_472_320
    live = 2 * n * tokens + 4 * 2 * 64 * 64**2 * 4 / 2  # the reference model's forward
    assert bench.model_flops(s, live_reference=True) == 204_472_320 + live
    # MFU is model FLOPs / (step time × peak): 1 s steps at a 0.5 GFLOP/s peak give 40.9%.
    assert math.isclose(bench.model_flops(s) / (1.0 * 0.5e9), 0.408944640)


@pytest.mark.parametrize("stage,live,lora", [("sft", False, None), ("dpo", True, None), ("dpo", False, "nf4")],
                         ids=["sft", "dpo-live", "qlora-dpo"])
def test_jax_step_worker_runs_on_tiny(bench, stage, live, lora):
    import dataclasses

    shape = dataclasses.asdict(bench.SHAPES["tiny"])
    spec = {"shape": shape, "stage": stage, "live_reference": live, "steps": 2, "warmup": 1, "devices": 1}
    r = bench.worker_jax_step(spec | ({"lora": {"rank": 4, "quantize": lora, "block": 16}} if lora else {}))
    assert r["compile_s"] > 0 and len(r["step_times"]) == 2 and r["step_s"] > 0
    assert math.isfinite(r["loss"]) and r["peak_host_rss_mb"] > 0 and r["xla_peak_mb"] > 0


def test_torch_worker_and_report_on_tiny(bench):
    import dataclasses

    s = bench.SHAPES["tiny"]
    shape = dataclasses.asdict(s)
    torch_r = bench.worker_torch_step({"shape": shape, "steps": 1, "warmup": 1})
    assert torch_r["step_s"] > 0
    data = bench.worker_data({"shape": shape, "tokenize": False, "examples": 400, "batches": 3, "devices": 1})
    assert data["sft_host_batch_s"] > 0 and data["dpo_host_batch_s"] > 0
    # The report renders from the workers' results with the ratios the issue asks for.
    step = {"step_s": 0.5, "compile_s": 1.0, "peak_host_rss_mb": 100.0}
    results = {"machine": bench.machine(), "device": {"platform": "cpu", "device_kind": "cpu", "device_count": 1},
               "shape": shape, "load_average_start": (0.5, 0.5, 0.5), "load_average_end": (0.5, 0.5, 0.5),
               "chunk_size": 0, "matmul_params": bench.matmul_params(s), "peak_flops": 1e9, "peak_source": "test",
               "step": {"sft": dict(step), "dpo_precomputed": dict(step, step_s=1.0),
                        "dpo_live": dict(step, step_s=1.25)},
               "torch": torch_r, "data": data}
    for name, live in (("sft", False), ("dpo_precomputed", False), ("dpo_live", True)):
        r = results["step"][name]
        flops = bench.model_flops(s, live_reference=live)
        r.update(tokens_per_s=s.batch * s.seq / r["step_s"], sequences_per_s=s.batch / r["step_s"],
                 achieved_flops=flops / r["step_s"], mfu=flops / r["step_s"] / 1e9)
        if name != "sft":
            r["pairs_per_s"] = s.batch / 2 / r["step_s"]
    torch_r.update(tokens_per_s=s.batch * s.seq / torch_r["step_s"], sequences_per_s=s.batch / torch_r["step_s"],
                   achieved_flops=1.0, mfu=None)
    results["dpo_cost"] = {"precomputed_pairs_per_s_over_sft_seq_per_s": 0.5,
                           "live_pairs_per_s_over_sft_seq_per_s": 0.4}
    results["jax_over_torch_sft_tokens_per_s"] = 1.5
    results["torch_rounds"] = [{"jax_step_s": 2.0, "torch_step_s": 3.0, "ratio": 1.5}]
    text = bench.markdown(results)
    assert "| jaxalign sft |" in text and "PyTorch SFT" in text and "1.50× (2.00 s vs 3.00 s)" in text and "0.40" in text
