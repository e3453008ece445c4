"""`jaxalign score`: the summed log-prob of each row's completion given its prompt, or (`--reward`, a reward
model) the score of prompt + completion.

Used to build preference data, to precompute DPO reference log-probs and to judge. Rows are text
(`prompt`, `completion`: the prompt tokenized with the tokenizer's special tokens, the completion
without, no EOS added) or ids (`prompt_ids`, `completion_ids`, used as given).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
from flax import nnx

from jaxalign.data.batching import completion_sequence, round_up
from jaxalign.data.packing import pack_rows
from jaxalign.data.sources import iter_jsonl
from jaxalign.errors import JaxalignError
from jaxalign.models.logprobs import sequence_logprobs
from jaxalign.runtime.paths import as_path
from jaxalign.runtime.sharding import batch_sharding, data_parallel_size, make_mesh, use_mesh

read_jsonl = iter_jsonl  # (1-based line number, row) per JSONL row; errors name file:line


def is_id_row(row: dict[str, Any]) -> bool:
    return "prompt_ids" in row or "completion_ids" in row


def row_ids(row: dict[str, Any], tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one input row, text or ids."""
    if is_id_row(row):
        ids = []
        for key in ("prompt_ids", "completion_ids"):
            value = row.get(key)
            if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                raise JaxalignError(f"{where}: '{key}' must be a list of token ids, got {value!r:.80}")
            ids.append(value)
        return ids[0], ids[1]
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), str):
            raise JaxalignError(f"{where}: expected string fields 'prompt' and 'completion' (or 'prompt_ids' and "
                                f"'completion_ids'); '{key}' is {'missing' if key not in row else type(row[key]).__name__}")
    if tokenizer is None:
        raise JaxalignError(f"{where}: text rows need a tokenizer (pass --tokenizer or use a model dir with one)")
    prompt = tokenizer.encode(row["prompt"], add_special_tokens=True)
    # Tokenize prompt+completion together when the split is clean, so the completion is tokenized
    # in context exactly as the model would see it; otherwise tokenize it on its own.
    full = tokenizer.encode(row["prompt"] + row["completion"], add_special_tokens=True)
    completion = full[len(prompt):] if full[:len(prompt)] == prompt else tokenizer.encode(row["completion"])
    return prompt, completion


def check_ids(prompt: Sequence[int], completion: Sequence[int], vocab_size: int | None, where: str) -> None:
    """Reject what cannot be scored: an empty prompt or completion, ids outside the model's vocab."""
    if not prompt:
        raise JaxalignError(f"{where}: the prompt is empty; a prompt needs at least one token (the first "
                            "completion token is predicted from it), e.g. the BOS token")
    if not completion:
        raise JaxalignError(f"{where}: the completion is empty (nothing to score)")
    if vocab_size is not None:
        bad = [t for t in (*prompt, *completion) if not 0 <= t < vocab_size]
        if bad:
            raise JaxalignError(f"{where}: token id {bad[0]} is out of range for the model's vocab of {vocab_size} "
                                f"(ids 0..{vocab_size - 1})")


def jit_per_row(graphdef: nnx.GraphDef, fn: Callable):
    """jit(state, batch) -> fn(model, batch): per-row outputs of a batch of padded rows."""
    return jax.jit(lambda state, batch: fn(nnx.merge(graphdef, state), batch))


def model_rewards(model, batch) -> jax.Array:
    """A reward model's score of each row."""
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    return model.rewards(hidden, batch["tokens"], batch["segment_ids"])


def apply_batched(model, sequences: Sequence[dict], fn: Callable, mesh, batch_size: int = 8,
                  pad_to_multiple_of: int = 64, pad_id: int = 0) -> list:
    """fn(model, batch)'s per-row outputs for each sequence ({"input_ids", "loss_mask"}), in input order:
    one sequence per padded row, batches sharded over the mesh's data-parallel axes."""
    rows_per_batch = round_up(max(batch_size, 1), data_parallel_size(mesh))
    graphdef, state = nnx.split(model)
    compiled = jit_per_row(graphdef, fn)
    sharding = batch_sharding(mesh)
    results: list = [None] * len(sequences)
    # Longest first, so each batch pads to similar lengths and few distinct shapes compile.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]["input_ids"]))
    with use_mesh(mesh):
        for start in range(0, len(order), rows_per_batch):
            idx = order[start:start + rows_per_batch]
            length = round_up(max(len(sequences[i]["input_ids"]) for i in idx), pad_to_multiple_of)
            host = pack_rows([[sequences[i]] for i in idx], length, pad_id, num_rows=rows_per_batch)
            out = jax.device_get(compiled(state, {k: jax.device_put(v, sharding) for k, v in host.items()}))
            for j, i in enumerate(idx):
                results[i] = jax.tree.map(lambda a: a[j], out)
    return results


def _sequences(rows: Iterable[tuple[str, list[int], list[int]]], vocab_size: int | None) -> list[dict]:
    out = []
    for where, prompt, completion in rows:
        check_ids(prompt, completion, vocab_size, where)
        out.append(completion_sequence(prompt, completion))
    return out


def score_rows(model, rows: Iterable[tuple[str, list[int], list[int]]], mesh, batch_size: int = 8,
               pad_to_multiple_of: int = 64, pad_id: int = 0, chunk_size: int = -1,
               vocab_size: int | None = None) -> list[tuple[float, int]]:
    """(summed log-prob, number of completion tokens) for each (where, prompt_ids, completion_ids)."""
    out = apply_batched(model, _sequences(rows, vocab_size), lambda m, b: sequence_logprobs(m, b, chunk_size), mesh,
                        batch_size, pad_to_multiple_of, pad_id)
    return [(float(logp), int(count)) for logp, count in out]


def reward_rows(model, rows: Iterable[tuple[str, list[int], list[int]]], mesh, batch_size: int = 8,
                pad_to_multiple_of: int = 64, vocab_size: int | None = None) -> list[float]:
    """A reward model's score of prompt + completion for each (where, prompt_ids, completion_ids); rows are
    padded with the model's own pad_token_id, as transformers expects them."""
    if not model.cfg.num_labels:
        raise JaxalignError("the model is a causal LM, not a reward model (no score head): train one with "
                            "stage: rm, or pass an HF *ForSequenceClassification directory")
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    return [float(r) for r in apply_batched(model, _sequences(rows, vocab_size), model_rewards, mesh, batch_size,
                                            pad_to_multiple_of, pad)]


def run_score(model_path: str, data_path: str, out_path: str, batch_size: int = 8, tokenizer_path: str = "",
              mesh_sizes: dict | None = None, dtype: str = "float32", reward: bool = False) -> int:
    """The `jaxalign score` command; returns the number of rows written. `reward`: the model is a reward model
    and each row gets its `reward`, not `logp` and `num_tokens`."""
    from jaxalign.checkpoint import model_io
    from jaxalign.data.tokenizer import load_tokenizer

    # Validate everything cheap (paths, rows, tokenization) before the model is loaded.
    model_dir = model_io.resolve_model_path(model_path)
    cfg = model_io.load_model_config(model_dir)
    inputs = list(read_jsonl(data_path))
    tokenizer = None
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    elif not all(is_id_row(row) for _, row in inputs):  # id rows need no tokenizer; text rows do
        try:
            own = model_io.tokenizer_path(model_dir)
        except JaxalignError:
            own = None  # the model has none: row_ids names the first text row and asks for --tokenizer
        tokenizer = load_tokenizer(str(own)) if own is not None else None
    rows = [(f"{data_path}:{i}", *row_ids(row, tokenizer, f"{data_path}:{i}")) for i, row in inputs]
    if reward:  # a text completion ends as the reward model's training rows did: with EOS (id rows: as given)
        rows = [(w, p, c if is_id_row(row) or (c and c[-1] == tokenizer.eos_id) else [*c, tokenizer.eos_id])
                for (w, p, c), (_, row) in zip(rows, inputs)]
    for where, prompt, completion in rows:
        check_ids(prompt, completion, cfg.vocab_size, where)
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    pad_id = pad_id if 0 <= pad_id < cfg.vocab_size else 0

    mesh = make_mesh(mesh_sizes or {"data": 1, "fsdp": -1, "tensor": 1})
    with use_mesh(mesh):
        model = model_io.load_model(model_dir, mesh, dtype=dtype)
    if reward:
        scored = [{"reward": r} for r in reward_rows(model, rows, mesh, batch_size, vocab_size=cfg.vocab_size)]
    else:
        scored = [{"logp": logp, "num_tokens": count}
                  for logp, count in score_rows(model, rows, mesh, batch_size, pad_id=pad_id, vocab_size=cfg.vocab_size)]
    if jax.process_index() == 0:
        out = as_path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for (_, row), values in zip(inputs, scored):
                f.write(json.dumps({**row, **values}, ensure_ascii=False) + "\n")
    return len(inputs)
