"""The markdown table appended to benchmarks/RESULTS.md."""

from __future__ import annotations


def fmt(x, spec=".3g", missing="–"):
    return missing if x is None else format(x, spec)


def markdown(r: dict) -> str:
    m, s = r["machine"], r["shape"]
    v = m["versions"]
    la0, la1 = r["load_average_start"], r["load_average_end"]
    lines = [f"### {s['name']} on {r['device']['device_kind']} — {m['date']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({r['device']['platform']}, {r['device']['device_count']} "
             f"device); jax {v['jax']}, flax {v['flax']}, torch {v['torch']}, transformers {v['transformers']}; "
             f"load average (1/5/15 min) at start {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f}, at end "
             f"{la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f}." + (f" XLA_FLAGS=`{m['xla_flags']}`." if m["xla_flags"] else ""),
             f"Shape: {s['layers']} layers, hidden {s['hidden']}, MLP {s['mlp']}, {s['heads']}/{s['kv_heads']} heads, "
             f"vocab {s['vocab']}, batch {s['batch']} × {s['seq']}, {s['dtype']} (params {s['param_dtype']}), "
             f"remat {s['remat']} (PyTorch: gradient checkpointing "
             f"{'on' if s.get('torch_checkpointing') else 'off'}), logits_chunk_size {r['chunk_size']}; N (matmul params) = "
             f"{r['matmul_params'] / 1e6:.1f}M.",
             (f"jaxalign imported from `{r['jaxalign_src']}` (--jaxalign-src)." if r.get("jaxalign_src") else ""),
             f"Peak for MFU: {fmt(r.get('peak_flops', None) and r['peak_flops'] / 1e9, '.1f')} GFLOP/s "
             f"({r['peak_source']})"
             + (f"; torch.mm fp32 peak here {r['peak']['torch_matmul_flops'] / 1e9:.1f} GFLOP/s"
                if "torch_matmul_flops" in r.get("peak", {}) else "") + ".", ""]
    rows = []
    for name, res in (r.get("step") or {}).items():
        rows.append((f"jaxalign {name.replace('_', ' ')}", res))
    if "torch" in r:
        rows.append(("PyTorch SFT (LlamaForCausalLM + AdamW)", r["torch"]))
    for res in r.get("variants", []):
        rows.append((f"jaxalign sft, {res['variant']}", res))
    if rows:
        lines += ["| run | step (s) | CPU s/step | compile (s) | tokens/s | seq/s | pairs/s | GFLOP/s | MFU | "
                  "peak mem (MB) | load 1m before→after |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, res in rows:
            mem = res.get("peak_device_mb", res.get("peak_host_rss_mb"))
            load = res.get("load_1m")
            lines.append(f"| {label} | {res['step_s']:.3f} | {fmt(res.get('cpu_s'), '.2f')} | "
                         f"{fmt(res.get('compile_s'), '.1f')} | "
                         f"{res['tokens_per_s']:.0f} | {res['sequences_per_s']:.2f} | {fmt(res.get('pairs_per_s'), '.2f')} | "
                         f"{res['achieved_flops'] / 1e9:.1f} | {fmt(res['mfu'] and 100 * res['mfu'], '.1f')}% | "
                         f"{fmt(mem, '.0f')} | {f'{load[0]:.2f}→{load[1]:.2f}' if load else '–'} |")
        lines.append("")
    if "jax_over_torch_sft_tokens_per_s" in r:
        per_round = ", ".join(f"{x['ratio']:.2f}× ({x['jax_step_s']:.2f} s vs {x['torch_step_s']:.2f} s)"
                              for x in r.get("torch_rounds", []))
        lines.append(f"- jaxalign / PyTorch SFT tokens/s: **{r['jax_over_torch_sft_tokens_per_s']:.2f}×** (target ≥ 1.2×)"
                     + (f"; median of {len(r['torch_rounds'])} back-to-back rounds: {per_round}" if per_round else ""))
    if "step" in r:
        mfu = r["step"]["sft"]["mfu"]
        lines.append(f"- jaxalign SFT MFU: **{fmt(mfu and 100 * mfu, '.1f')}%** of the peak above (target ≥ 60% on CPU)")
    if "dpo_cost" in r:
        c = r["dpo_cost"]
        lines.append(f"- DPO pairs/s ÷ SFT sequences/s: precomputed reference **{c['precomputed_pairs_per_s_over_sft_seq_per_s']:.2f}** "
                     f"(target ≥ 0.45), live reference **{c['live_pairs_per_s_over_sft_seq_per_s']:.2f}** (target ≥ 0.35)")
    if "data" in r:
        d = r["data"]
        if "sft_host_over_step" in d:
            lines.append(f"- host time per batch (iterator next + to_global_arrays): SFT {1e3 * d['sft_host_batch_s']:.2f} ms "
                         f"= {100 * d['sft_host_over_step']:.2f}% of the step, DPO {1e3 * d['dpo_host_batch_s']:.2f} ms = "
                         f"{100 * d['dpo_host_over_step']:.2f}% (target < 10%)")
        else:
            lines.append(f"- host time per batch: SFT {1e3 * d['sft_host_batch_s']:.2f} ms, DPO {1e3 * d['dpo_host_batch_s']:.2f} ms")
        if "hh_rows" in d:
            lines.append(f"- HH-RLHF ({d['hh_rows']} rows, Llama 2 SentencePiece, fresh cache): tokenize "
                         f"{d['hh_tokenize_sft_rows_per_s']:.0f} rows/s (SFT, chosen), {d['hh_tokenize_dpo_rows_per_s']:.0f} "
                         f"rows/s (DPO pairs); pack + batch {d['hh_pack_examples_per_s']:.0f} examples/s into "
                         f"{d['hh_packed_rows']} rows ({100 * d['hh_pack_efficiency']:.1f}% full)")
    if r.get("lora"):
        lines += ["", "LoRA (rank 16, every projection) and QLoRA (NF4 base) beside full fine-tuning of the same stage "
                  "(DPO: a live reference copy), back to back per round; XLA peak = per-device arguments + outputs + "
                  "temporaries of the compiled step" + (f"; both with {r['lora']['variant']}" if "variant" in r["lora"]
                                                         else "") + ":", "",
                  "| run | step (s) | full step (s) | step ratio | XLA peak (MB) | full XLA peak (MB) | memory ratio | "
                  "host RSS (MB) vs full |", "|---|---|---|---|---|---|---|---|"]
        for name, res in r["lora"].items():
            if name == "variant":
                continue
            last = res["rounds"][-1]
            lines.append(f"| {name.replace('_', ' ')} | {last['step_s']:.3f} | {last['full_step_s']:.3f} | "
                         f"**{res['step_ratio']:.2f}×** | {last['xla_peak_mb']:.0f} | {last['full_xla_peak_mb']:.0f} | "
                         f"**{res['memory_ratio']:.2f}×** | {last['rss_mb']:.0f} vs {last['full_rss_mb']:.0f} |")
        lines.append("")
        lines.append("(step and memory ratios: medians over rounds; the other columns: the last round; goal for "
                     "LoRA DPO: step ≤ 0.75×, memory ≤ 0.5×)")
    if r.get("compile"):
        by = {}
        for c in r["compile"]:
            by.setdefault(c["layers"], {})[c["scan_layers"]] = c["compile_s"]
        lines += ["", "Compile time of the SFT train step (hidden 256, batch 2 × 128) vs depth:", "",
                  "| layers | scan_layers=true (s) | scan_layers=false (s) |", "|---|---|---|"]
        for layers, t in sorted(by.items()):
            lines.append(f"| {layers} | {fmt(t.get(True), '.1f')} | {fmt(t.get(False), '.1f')} |")
    return "\n".join(lines) + "\n"
