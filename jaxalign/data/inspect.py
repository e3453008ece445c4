"""`jaxalign data inspect`: what the tokenized data looks like before a run spends compute on it.

The report gives counts, length percentiles, what the tokenize stage truncated or dropped, how
full the batches will be (packing or padding efficiency), one decoded example with its trained
tokens wrapped in [[ ]], and for DPO the near-identical pairs, which teach the model little and
often signal a data bug.

A pair is *near-identical* when its chosen and rejected completions are more than
NEAR_IDENTICAL_RATIO similar, or differ in at most NEAR_IDENTICAL_TOKENS tokens while being at
least half similar (so two unrelated 2-token answers do not count). With M the number of tokens in
difflib's matching blocks of the two id lists (lengths a and b), the tokens that differ are
max(a, b) - M and the similarity ratio is 2M / (a + b).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxalign.data.batching import bucket_length, pair_lengths, shared_length
from jaxalign.data.packing import bins_efficiency, pack_bfd

NEAR_IDENTICAL_TOKENS = 3
NEAR_IDENTICAL_RATIO = 0.9
MAX_SHOWN_CHARS = 1500


def completion_difference(a: Sequence[int], b: Sequence[int]) -> tuple[int, float]:
    """(tokens that differ, similarity ratio) of two token id lists, as defined above."""
    if len(a) + len(b) == 0:
        return 0, 1.0
    matcher = difflib.SequenceMatcher(None, list(a), list(b), autojunk=False)
    matches = sum(block.size for block in matcher.get_matching_blocks())
    return max(len(a), len(b)) - matches, 2 * matches / (len(a) + len(b))


def is_near_identical(pair: Mapping) -> bool:
    a, b = list(pair["chosen_ids"]), list(pair["rejected_ids"])
    # quick_ratio() bounds the ratio (and so the matches) from above in linear time: most pairs are
    # far apart and skip the quadratic diff.
    bound = difflib.SequenceMatcher(None, a, b, autojunk=False).quick_ratio() if a or b else 1.0
    if bound < 0.5 or (bound <= NEAR_IDENTICAL_RATIO
                       and max(len(a), len(b)) - bound * (len(a) + len(b)) / 2 > NEAR_IDENTICAL_TOKENS):
        return False
    differ, ratio = completion_difference(a, b)
    return ratio > NEAR_IDENTICAL_RATIO or (differ <= NEAR_IDENTICAL_TOKENS and ratio >= 0.5)


def near_identical_pairs(pairs: Sequence[Mapping]) -> list[int]:
    """Indices of the near-identical pairs."""
    return [i for i, pair in enumerate(pairs) if is_near_identical(pair)]


def _percentiles(name: str, values: Sequence[int]) -> str:
    v = np.asarray(values)
    if v.size == 0:
        return f"  {name:<10} (none)"
    p50, p90, p99 = (int(np.percentile(v, q)) for q in (50, 90, 99))
    return f"  {name:<10} p50 {p50:>6}  p90 {p90:>6}  p99 {p99:>6}  max {int(v.max()):>6}  mean {v.mean():8.1f}"


def marked_text(tokenizer: Any, ids: Sequence[int], trained: Sequence[bool]) -> str:
    """Decoded ids with each run of trained tokens wrapped in [[ ]] (raw ids without a tokenizer).

    Runs are cut out of decoded prefixes, so SentencePiece's leading spaces survive; a run is
    decoded alone when a prefix does not decode to a prefix of the longer text.
    """
    ids, trained = list(ids), [bool(t) for t in trained]
    bounds = [0] + [i for i in range(1, len(ids)) if trained[i] != trained[i - 1]] + [len(ids)]
    parts, prev = [], ""
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        if tokenizer is None:
            piece = " ".join(map(str, ids[start:end]))
        else:
            text = tokenizer.decode(ids[:end], skip_special_tokens=False)
            piece = text[len(prev):] if text.startswith(prev) else tokenizer.decode(ids[start:end],
                                                                                   skip_special_tokens=False)
            prev = text
        parts.append(f"[[{piece}]]" if trained[start] else piece)
    out = ("" if tokenizer is not None else " ").join(parts)
    return out if len(out) <= MAX_SHOWN_CHARS else out[:MAX_SHOWN_CHARS] + f" … ({len(out)} chars)"


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines() or [""])


def _flatten(stats: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in stats.items():
        if isinstance(value, Mapping):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((prefix + str(key), value))
    return items


def _stats_lines(stats: Any, total: int) -> list[str]:
    """The tokenize stage's counters: a Mapping, or an object with `to_dict()` (DataStats)."""
    stats = stats.to_dict() if hasattr(stats, "to_dict") else stats
    lines = ["tokenize stage:"]
    if not stats:
        return lines + ["  (no stats)"]
    for key, value in _flatten(stats):
        flag = isinstance(value, int) and not isinstance(value, bool) and value and any(
            w in key for w in ("trunc", "drop", "skip", "empty", "bad", "not_prefix"))
        pct = f"  ({100 * value / max(total, 1):.1f}%)" if flag else ""
        text = str(value)
        lines.append(f"  {key:<28} {text if len(text) <= 100 else text[:100] + ' …'}{pct}")
    return lines


def _epoch_order(examples: Sequence[Mapping]) -> np.ndarray:
    """The examples of an epoch: a weighted mixture's draw (epoch 0, seed 0), else each example once."""
    if getattr(examples, "weighted", False):
        return examples.epoch_order(np.random.default_rng([0, 0]), True, 0)
    return np.arange(len(examples))


def _mixture_lines(mix: Any) -> list[str]:
    """Per source of a weighted mixture: its weight, size, tokens, share of an epoch and tokenize counts."""
    total = sum(p.weight for p in mix.parts)
    lines = [f"mixture: {len(mix.parts)} sources; an epoch draws {int(mix.counts.sum())} examples by weight "
             "(data.train weights, normalized):"]
    for p, c in zip(mix.parts, mix.counts):
        n, tokens = len(p.examples), int(np.asarray(p.examples.lengths()).sum())
        st = p.stats
        counts = (f"; rows kept {st.rows_out}/{st.rows_in}, truncated {st.truncated_prompt + st.truncated_completion}"
                  f", dropped {st.dropped}" if st is not None else "")
        lines.append(f"  {p.name}: weight {p.weight / total:.3f}, {n} examples ({tokens} tokens), {int(c)} per "
                     f"epoch = {int(c) / max(n, 1):.2f} passes{counts}")
    return lines


def _sft_report(examples: Sequence[Mapping], tokenizer: Any, cfg_data: Any) -> list[str]:
    max_length = int(cfg_data.get("max_length", 1024))
    multiple = int(cfg_data.get("pad_to_multiple_of", 64))
    if hasattr(examples, "trained_targets"):  # a token store: from its offsets, no example read
        lengths, trained = examples.lengths().tolist(), examples.trained_targets().tolist()
    else:
        lengths = [len(ex["input_ids"]) for ex in examples]
        trained = [int(np.count_nonzero(np.asarray(ex["loss_mask"], bool)[1:])) for ex in examples]
    lines = ["lengths (tokens):", _percentiles("sequence", lengths), _percentiles("trained", trained),
             f"trained tokens: {sum(trained)} of {sum(lengths)} ({100 * sum(trained) / max(sum(lengths), 1):.1f}%); "
             f"examples with no trained token: {sum(t == 0 for t in trained)}"]
    if cfg_data.get("packing", True):
        epoch = np.asarray(lengths)[_epoch_order(examples)].tolist()
        bins = pack_bfd(epoch, max_length)
        lines.append(f"packing: {len(epoch)} examples -> {len(bins)} rows of {max_length}; "
                     f"efficiency {100 * bins_efficiency(epoch, bins, max_length):.1f}% non-pad")
    else:
        padded = sum(bucket_length(n, multiple, max_length) for n in lengths)
        lines.append(f"padding (no packing): efficiency {100 * sum(lengths) / max(padded, 1):.1f}% non-pad "
                     f"with each row at its own bucket (multiple of {multiple}); batches pad to their longest row")
    if examples:
        ex = examples[0]
        lines += ["example 0 (trained targets in [[ ]]):",
                  _indent(marked_text(tokenizer, ex["input_ids"], ex["loss_mask"]))]
    return lines


def _dpo_report(pairs: Sequence[Mapping], tokenizer: Any, cfg_data: Any) -> list[str]:
    max_length = int(cfg_data.get("max_length", 1024))
    multiple = int(cfg_data.get("pad_to_multiple_of", 64))
    rows = [pair_lengths(p) for p in pairs]
    lines = ["lengths (tokens):",
             _percentiles("prompt", [len(p["prompt_ids"]) for p in pairs]),
             _percentiles("chosen", [len(p["chosen_ids"]) for p in pairs]),
             _percentiles("rejected", [len(p["rejected_ids"]) for p in pairs]),
             _percentiles("row", [max(r) for r in rows])]
    padded = sum(2 * bucket_length(max(r), multiple, max_length) for r in rows)
    lines.append(f"padding: efficiency {100 * sum(map(sum, rows)) / max(padded, 1):.1f}% non-pad with each pair at "
                 f"its own bucket (multiple of {multiple}); batches pad to their longest row")
    unshared = sum(2 * max(r) for r in rows)
    shared = sum(shared_length(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    lines.append(f"tokens a pair: {unshared / max(len(pairs), 1):.0f} in two rows (2 x (prompt + longer reply)), "
                 f"{shared / max(len(pairs), 1):.0f} with the prompt shared (dpo.share_prompt: "
                 f"{100 * shared / max(unshared, 1):.0f}%)")
    empty = sum(1 for p in pairs if not p["chosen_ids"] or not p["rejected_ids"])
    if empty:
        lines.append(f"pairs with an empty completion: {empty} (batching rejects them)")
    near = near_identical_pairs(pairs)
    lines.append(f"near-identical pairs (completions > {NEAR_IDENTICAL_RATIO} similar, or <= {NEAR_IDENTICAL_TOKENS} "
                 f"tokens differ and >= 0.5 similar): {len(near)} ({100 * len(near) / max(len(pairs), 1):.1f}%)")
    if near:
        p = pairs[near[0]]
        differ, ratio = completion_difference(p["chosen_ids"], p["rejected_ids"])
        lines += [f"  e.g. pair {near[0]}: {differ} tokens differ, similarity {ratio:.3f}",
                  "  chosen:", _indent(marked_text(tokenizer, p["chosen_ids"], [False] * len(p["chosen_ids"])), "    "),
                  "  rejected:",
                  _indent(marked_text(tokenizer, p["rejected_ids"], [False] * len(p["rejected_ids"])), "    ")]
    if pairs:
        p = pairs[0]
        lines.append("pair 0 (trained targets in [[ ]]):")
        for side in ("chosen", "rejected"):
            ids = list(p["prompt_ids"]) + list(p[f"{side}_ids"])
            mask = [False] * len(p["prompt_ids"]) + [True] * len(p[f"{side}_ids"])
            lines += [f"  {side}:", _indent(marked_text(tokenizer, ids, mask))]
    return lines


def inspect_data(examples: Sequence[Mapping], stats: Any, tokenizer: Any, stage: str,
                 cfg_data: Any) -> str:
    """The `jaxalign data inspect` report for tokenized `examples` of `stage` ("sft", or pairs: "dpo", "rm", "kto").

    `stats` are the tokenize stage's counters (rows read, truncated, dropped, ...: a Mapping, nested
    mappings flattened, or an object with `to_dict()`, like DataStats); `cfg_data` is
    the config's `data` section (max_length, packing, pad_to_multiple_of); `tokenizer` decodes
    (None shows raw ids).
    """
    paired = stage != "sft"
    unit = {"sft": "examples", "kto": "examples (each beside its KL completion, as a pair)"}.get(stage, "pairs")
    lines = [f"stage: {stage}", f"{unit}: {len(examples)}",
             *_stats_lines(stats, len(examples))]
    if getattr(examples, "weighted", False):
        lines += _mixture_lines(examples)
    lines += _dpo_report(examples, tokenizer, cfg_data) if paired else _sft_report(examples, tokenizer, cfg_data)
    return "\n".join(lines) + "\n"
