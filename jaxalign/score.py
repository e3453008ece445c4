"""`jaxalign score`: the summed log-prob of each row's completion given its prompt.

Used to build preference data and to precompute DPO reference log-probs. Rows are text
(`prompt`, `completion`: the prompt tokenized with the tokenizer's special tokens, the completion
without, no EOS added) or ids (`prompt_ids`, `completion_ids`, used as given).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign.errors import JaxalignError
from jaxalign.logprobs import sequence_logprobs
from jaxalign.sharding import batch_sharding, make_mesh, use_mesh


def completion_example(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """tokens / targets / loss_mask for one prompt+completion, targets masked to the completion."""
    ids = np.asarray(list(prompt_ids) + list(completion_ids), np.int32)
    if len(prompt_ids) == 0:
        raise JaxalignError("a prompt needs at least one token (the first completion token is predicted from it)")
    tokens, targets = ids[:-1], ids[1:]
    loss_mask = np.arange(1, len(ids)) >= len(prompt_ids)
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


def pad_examples(examples: Sequence[dict[str, np.ndarray]], length: int, rows: int,
                 pad_id: int = 0) -> dict[str, np.ndarray]:
    """Stack examples into [rows, length] arrays; padding has segment id 0 and loss mask 0."""
    batch = {
        "tokens": np.full((rows, length), pad_id, np.int32),
        "targets": np.full((rows, length), pad_id, np.int32),
        "loss_mask": np.zeros((rows, length), bool),
        "segment_ids": np.zeros((rows, length), np.int32),
        "positions": np.zeros((rows, length), np.int32),
    }
    for i, ex in enumerate(examples):
        n = len(ex["tokens"])
        for key in ("tokens", "targets", "loss_mask"):
            batch[key][i, :n] = ex[key]
        batch["segment_ids"][i, :n] = 1
        batch["positions"][i, :n] = np.arange(n)
    return batch


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def read_jsonl(path: str | pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise JaxalignError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxalignError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise JaxalignError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


def row_ids(row: dict[str, Any], tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one input row, text or ids."""
    if "prompt_ids" in row or "completion_ids" in row:
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


def make_score_fn(graphdef: nnx.GraphDef, chunk_size: int = 0):
    @jax.jit
    def score(state, batch):
        model = nnx.merge(graphdef, state)
        return sequence_logprobs(model, batch, chunk_size)

    return score


def score_rows(model, rows: Iterable[tuple[str, list[int], list[int]]], mesh, batch_size: int = 8,
               pad_to_multiple_of: int = 64, pad_id: int = 0, chunk_size: int = 0) -> list[tuple[float, int]]:
    """(summed log-prob, number of completion tokens) for each (where, prompt_ids, completion_ids)."""
    rows = list(rows)
    examples = []
    for where, prompt, completion in rows:
        if not completion:
            raise JaxalignError(f"{where}: the completion is empty (nothing to score)")
        examples.append(completion_example(prompt, completion))
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    rows_per_batch = round_up(max(batch_size, 1), data_parallel)
    graphdef, state = nnx.split(model)
    score = make_score_fn(graphdef, chunk_size)
    sharding = batch_sharding(mesh)
    results: list[tuple[float, int] | None] = [None] * len(examples)
    # Longest first, so each batch pads to similar lengths and few distinct shapes compile.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["tokens"]))
    with use_mesh(mesh):
        for start in range(0, len(order), rows_per_batch):
            idx = order[start:start + rows_per_batch]
            length = round_up(max(len(examples[i]["tokens"]) for i in idx), pad_to_multiple_of)
            host = pad_examples([examples[i] for i in idx], length, rows_per_batch, pad_id)
            batch = {k: jax.device_put(v, sharding) for k, v in host.items()}
            logp, count = jax.device_get(score(state, batch))
            for j, i in enumerate(idx):
                results[i] = (float(logp[j]), int(count[j]))
    return results


def run_score(model_path: str, data_path: str, out_path: str, batch_size: int = 8, tokenizer_path: str = "",
              mesh_sizes: dict | None = None, dtype: str = "float32") -> int:
    """The `jaxalign score` command; returns the number of rows written."""
    from jaxalign import model_io
    from jaxalign.tokenizer import load_tokenizer

    mesh = make_mesh(mesh_sizes or {"data": 1, "fsdp": -1, "tensor": 1})
    with use_mesh(mesh):
        model = model_io.load_model(model_path, mesh, dtype=dtype)
    tok_path = tokenizer_path or model_io.tokenizer_path(model_path)
    tokenizer = load_tokenizer(tok_path) if tok_path else None
    inputs = list(read_jsonl(data_path))
    rows = [(f"{data_path}:{i}", *row_ids(row, tokenizer, f"{data_path}:{i}")) for i, row in inputs]
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    results = score_rows(model, rows, mesh, batch_size, pad_id=pad_id)
    if jax.process_index() == 0:
        out = pathlib.Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for (_, row), (logp, count) in zip(inputs, results):
                f.write(json.dumps({**row, "logp": logp, "num_tokens": count}, ensure_ascii=False) + "\n")
    return len(inputs)
