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
    """(1-based line number, row) for each non-blank line of a JSON Lines file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise JaxalignError(f"data file not found: {path}")
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JaxalignError(f"{path}:{i}: invalid UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxalignError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise JaxalignError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


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


def make_score_fn(graphdef: nnx.GraphDef, chunk_size: int = 0):
    @jax.jit
    def score(state, batch):
        model = nnx.merge(graphdef, state)
        return sequence_logprobs(model, batch, chunk_size)

    return score


def score_rows(model, rows: Iterable[tuple[str, list[int], list[int]]], mesh, batch_size: int = 8,
               pad_to_multiple_of: int = 64, pad_id: int = 0, chunk_size: int = 0,
               vocab_size: int | None = None) -> list[tuple[float, int]]:
    """(summed log-prob, number of completion tokens) for each (where, prompt_ids, completion_ids)."""
    rows = list(rows)
    examples = []
    for where, prompt, completion in rows:
        check_ids(prompt, completion, vocab_size, where)
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
    for where, prompt, completion in rows:
        check_ids(prompt, completion, cfg.vocab_size, where)
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    pad_id = pad_id if 0 <= pad_id < cfg.vocab_size else 0

    mesh = make_mesh(mesh_sizes or {"data": 1, "fsdp": -1, "tensor": 1})
    with use_mesh(mesh):
        model = model_io.load_model(model_dir, mesh, dtype=dtype)
    results = score_rows(model, rows, mesh, batch_size, pad_id=pad_id, vocab_size=cfg.vocab_size)
    if jax.process_index() == 0:
        out = pathlib.Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for (_, row), (logp, count) in zip(inputs, results):
                f.write(json.dumps({**row, "logp": logp, "num_tokens": count}, ensure_ascii=False) + "\n")
    return len(inputs)
