"""`jaxalign generate`: batched, jit-compiled sampling from a model over its KV cache.

Every caller goes through `generate` with one `SamplingParams`; `generate_ids`/`generate_text` are views.

How one batch is decoded:
- Prompts are left-padded to a common length rounded up to a multiple of 64, so every row's next
  token is written at the same cache index. Padding has segment id 0 (never attended to) and each
  row's real tokens have positions 0, 1, ...; rows per batch are fixed (rounded up to the mesh's
  data-parallel size, the last batch filled with dummy rows), so a run compiles one program per
  prompt-length bucket, never one per token.
- One prefill over the prompts fills the cache; then a `jax.lax.while_loop` of single-token steps
  samples until every row has emitted an EOS id or `max_new_tokens` tokens were generated. A row
  that finished keeps emitting `pad_id` (discarded) while the others go on.
- Sampling, in transformers' order: temperature, then top-k, then top-p (nucleus: the smallest
  set of most likely tokens whose probability reaches top_p). temperature 0 is greedy (argmax,
  top_k/top_p ignored). Randomness is `jax.random` keyed by (seed, the prompt's index in the
  list, step): a seed gives the same samples whatever the batch size or mesh.
- Returned ids are the new tokens only, the EOS that ended a row *excluded*.

Stop strings (`stop`) are applied to the decoded text after generation: the completion is cut
before the first occurrence of any of them. They do not end decoding early, and `completion_ids`
stay the ids of the whole generation (up to EOS).

Prompts are tokenized as training tokenizes them (`jaxalign.data.examples.encode_prompt`): message
lists through the chat template with its generation prompt, plain strings with BOS; id lists as given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign.data.batching import round_up
from jaxalign.errors import JaxalignError
from jaxalign.runtime.paths import as_path
from jaxalign.runtime.sharding import RULES, batch_sharding, constrain, data_parallel_size, make_mesh, use_mesh

log = logging.getLogger(__name__)

PAD_TO_MULTIPLE_OF = 64


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop; checked when built.

    temperature 0 is greedy (top_k / top_p ignored); top_k 0 and top_p 1 disable those filters.
    stop: strings the decoded completion is cut before (text prompts only). eos_ids: ids that end a
    row; None means the model config's eos ids plus the tokenizer's EOS, () means none.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    eos_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Lists from flags or YAML become tuples, so the value stays immutable and hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.eos_ids is not None:
            object.__setattr__(self, "eos_ids", tuple(int(t) for t in self.eos_ids))
        if self.max_new_tokens < 1:
            raise JaxalignError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise JaxalignError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise JaxalignError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise JaxalignError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_config(cls, cfg, **overrides: Any) -> SamplingParams:
        """From a run config's `generate:` section; `overrides` win (the section has no seed: pass one here)."""
        g = cfg["generate"]
        fields = dict(max_new_tokens=int(g["max_new_tokens"]), temperature=float(g["temperature"]),
                      top_k=int(g["top_k"]), top_p=float(g["top_p"]), stop=tuple(g["stop"]))
        return cls(**{**fields, **overrides})


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  greedy: bool, top_k: int, use_top_p: bool) -> jax.Array:
    """Next token ids [batch] from fp32 logits [batch, vocab]; `keys` one PRNG key per row."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        ordered = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = before < top_p  # the most likely token always stays
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ----------------------------------------------------------------------------- one batch on device


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p"))
def _decode(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], seed: jax.Array,
            temperature: jax.Array, top_p: jax.Array, eos_ids: jax.Array, pad_id: jax.Array, *,
            max_new_tokens: int, greedy: bool, top_k: int, use_top_p: bool) -> tuple[jax.Array, jax.Array]:
    """(tokens [batch, max_new_tokens] with each row's EOS kept and pad after it, steps run)."""
    model = nnx.merge(graphdef, state)
    tokens = batch["tokens"]
    rows, prompt_len = tokens.shape
    row_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(batch["row_ids"])

    def pick(hidden: jax.Array, step: jax.Array) -> jax.Array:
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        return sample_tokens(model.logits(hidden), keys, temperature, top_p, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p)

    cache = model.init_cache(rows, prompt_len + max_new_tokens)
    kv_names = ("layers", "batch", "length", "act_kv_heads", None)
    cache = cache._replace(k=constrain(cache.k, kv_names), v=constrain(cache.v, kv_names),
                           segment_ids=constrain(cache.segment_ids, ("batch", "length")))
    hidden, cache = model.hidden_states(tokens, batch["positions"], batch["segment_ids"], cache)
    first = pick(hidden[:, -1], jnp.int32(0))  # left padding: the last column is every row's last token
    out = jnp.full((rows, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    carry = (jnp.int32(1), first, batch["positions"][:, -1] + 1, jnp.isin(first, eos_ids), out, cache)

    def cond(c):
        step, _, _, done, _, _ = c
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(c):
        step, last, pos, done, out, cache = c
        hidden, cache = model.hidden_states(last[:, None], pos[:, None], jnp.ones((rows, 1), jnp.int32), cache)
        nxt = jnp.where(done, pad_id, pick(hidden[:, 0], step))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        return step + 1, nxt, pos + 1, done | jnp.isin(nxt, eos_ids), out, cache

    steps, _, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
    return constrain(out, (None, None)), steps  # replicated, so every process can read it


def left_pad(prompts: Sequence[Sequence[int]], rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """[rows, length] tokens / positions / segment_ids with each prompt at the right end of its row.

    Rows beyond len(prompts) are dummies holding a single pad token."""
    tokens = np.full((rows, length), pad_id, np.int32)
    positions = np.zeros((rows, length), np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    for i in range(rows):
        ids = prompts[i] if i < len(prompts) else [pad_id]
        n = len(ids)
        tokens[i, length - n:] = ids
        positions[i, length - n:] = np.arange(n)
        segment_ids[i, length - n:] = 1
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}


def _put(array: np.ndarray, mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return jnp.asarray(array)
    sharding = batch_sharding(mesh, array.ndim)  # every process holds the whole host array
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


# ----------------------------------------------------------------------------- the entry point


class Completion(NamedTuple):
    """One prompt's result; the field names are the `jaxalign generate` output columns."""

    completion: str | None  # decoded (special tokens skipped), cut before a stop string; None for id prompts
    completion_ids: list[int]  # the new token ids, EOS excluded, not cut at stop strings
    finish_reason: str  # "stop" (an EOS id or a stop string) or "length" (max_new_tokens reached)


def default_eos_ids(model, tokenizer=None) -> list[int]:
    """The model config's eos ids and the tokenizer's EOS (when there is a tokenizer)."""
    return sorted(set(model.cfg.eos_token_ids) | ({tokenizer.eos_id} if tokenizer is not None else set()))


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the earliest occurrence of any stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(model, tokenizer, prompts: Sequence, params: SamplingParams, *, mesh: Mesh | None = None,
             batch_size: int = 0, pad_id: int | None = None) -> list[Completion]:
    """A `Completion` per prompt, in input order. tokenizer: prompts are strings, {role, content} message
    lists or id lists, and completions are decoded; None: prompts are id lists, `completion` is None. batch_size: rows decoded together (0: all). mesh: shard each batch
    over the mesh's data axes (the model's params should live on it); None runs without a mesh context.
    pad_id: default the tokenizer's, else 0 (padding is never attended to)."""
    if tokenizer is None and params.stop:
        raise JaxalignError("stop strings cut the decoded text, so they need a tokenizer (id prompts are not decoded)")
    if tokenizer is not None:
        from jaxalign.data.examples import encode_prompt

        prompts = [p if _is_ids(p) else encode_prompt(tokenizer, p) for p in prompts]  # ids: as given
    pad_id = pad_id if pad_id is not None else tokenizer.pad_id if tokenizer is not None else 0
    eos_ids = default_eos_ids(model, tokenizer) if params.eos_ids is None else params.eos_ids
    out = []
    for ids, ended in _decode_all(model, prompts, params, eos_ids, pad_id, mesh, batch_size):
        text, stopped = (None, False) if tokenizer is None else truncate_at_stop(
            tokenizer.decode(ids, skip_special_tokens=True), params.stop)
        out.append(Completion(text, ids, "stop" if ended or stopped else "length"))
    return out


def _is_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt) and len(prompt) > 0

def generate_ids(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *, mesh: Mesh | None = None,
                 batch_size: int = 0, pad_id: int = 0) -> list[list[int]]:
    """The new token ids of each token id prompt: `generate` without a tokenizer."""
    return [c.completion_ids for c in generate(model, None, prompts, params, mesh=mesh, batch_size=batch_size,
                                               pad_id=pad_id)]


def generate_text(model, tokenizer, prompts: Sequence[str | list[dict[str, Any]]], params: SamplingParams, *,
                  mesh: Mesh | None = None, batch_size: int = 0) -> list[str]:
    """The completion text of each string or message-list prompt: `generate`'s `completion`s."""
    return [c.completion for c in generate(model, tokenizer, prompts, params, mesh=mesh, batch_size=batch_size)]


def _decode_all(model, prompts: Sequence[Sequence[int]], params: SamplingParams, eos_ids: Sequence[int],
                pad_id: int, mesh: Mesh | None, batch_size: int) -> list[tuple[list[int], bool]]:
    """(new token ids without EOS, whether the row ended at an EOS) per token id prompt."""
    vocab = model.cfg.vocab_size
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise JaxalignError(f"prompt {i} is empty; a prompt needs at least one token (e.g. BOS)")
        bad = [t for t in ids if not 0 <= int(t) < vocab]
        if bad:
            raise JaxalignError(f"prompt {i}: token id {bad[0]} is out of range for the model's vocab of {vocab}")
    if not prompts:
        return []
    eos = sorted({int(t) for t in eos_ids if 0 <= int(t) < vocab}) or [-1]
    pad_id = pad_id if 0 <= pad_id < vocab else 0
    # The default table: the batch is sharded under it below (_put), whatever rules the caller has set.
    data_parallel = data_parallel_size(mesh, RULES) if mesh is not None else 1
    rows = round_up(batch_size if batch_size > 0 else len(prompts), data_parallel)
    greedy, max_new_tokens = params.greedy, params.max_new_tokens
    # Compile-time settings; greedy ignores the filters, so they are zeroed and add no compiles.
    static = dict(max_new_tokens=max_new_tokens, greedy=greedy, top_k=0 if greedy else int(params.top_k),
                  use_top_p=not greedy and params.top_p < 1.0)
    scalars = [jnp.uint32(params.seed % 2**32), jnp.float32(params.temperature if not greedy else 1.0),
               jnp.float32(params.top_p), jnp.asarray(eos, jnp.int32), jnp.int32(pad_id)]
    graphdef, state = nnx.split(model)
    results: list[tuple[list[int], bool] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    context = use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with context:
        for start in range(0, len(order), rows):
            idx = order[start:start + rows]
            length = round_up(max(len(prompts[i]) for i in idx), PAD_TO_MULTIPLE_OF)
            if length + max_new_tokens > model.cfg.max_position_embeddings:
                log.warning("prompt (padded to %d tokens) + max_new_tokens %d exceeds the model's "
                            "max_position_embeddings %d", length, max_new_tokens, model.cfg.max_position_embeddings)
            host = left_pad([list(map(int, prompts[i])) for i in idx], rows, length, pad_id)
            host["row_ids"] = np.array(idx + [-1] * (rows - len(idx)), np.int32)
            batch = {k: _put(v, mesh) for k, v in host.items()}
            out, _ = _decode(graphdef, state, batch, *scalars, **static)
            out = np.asarray(jax.device_get(out))
            for j, i in enumerate(idx):
                row = out[j].tolist()
                stops = [k for k, t in enumerate(row) if t in eos]
                results[i] = (row[:stops[0]], True) if stops else (row, False)
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- files and CLI


def row_prompt(row: dict[str, Any], where: str) -> str | list[dict[str, str]]:
    """The prompt of one input row: `prompt` (string or messages), or `messages` minus a final assistant turn."""
    from jaxalign.data.formats import check_messages

    try:
        if "prompt" in row:
            prompt = row["prompt"]
            if isinstance(prompt, str):
                return prompt
            return check_messages(prompt, "prompt")
        if "messages" in row:
            messages = check_messages(row["messages"], "messages")
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not messages:
                raise JaxalignError("'messages' holds only an assistant turn; nothing is left as the prompt")
            return messages
    except JaxalignError as e:
        raise JaxalignError(f"{where}: {e}") from None
    raise JaxalignError(f"{where}: expected a 'prompt' (string or message list) or a 'messages' field; "
                        f"the row has {sorted(row)}")


def run_generate(model_path: str, prompts_path: str, out_path: str, params: SamplingParams, *, batch_size: int = 8,
                 tokenizer_path: str = "", chat_template: str = "", dtype: str = "float32",
                 mesh_sizes: dict | None = None) -> int:
    """The `jaxalign generate` command: each input row plus `completion`, `completion_ids` and
    `finish_reason`, in input order, written to `out_path`. Returns the number of rows."""
    from jaxalign.checkpoint import model_io
    from jaxalign.data.examples import encode_prompt
    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.eval.score import read_jsonl

    if batch_size < 1:
        raise JaxalignError(f"batch_size must be at least 1, got {batch_size}")
    # Everything cheap (paths, rows, tokenization) is checked before the model is loaded.
    model_dir = model_io.resolve_model_path(model_path)
    cfg = model_io.load_model_config(model_dir)
    inputs = list(read_jsonl(prompts_path))
    if not inputs:
        raise JaxalignError(f"{prompts_path} holds no rows")
    tokenizer = load_tokenizer(tokenizer_path or str(model_io.tokenizer_path(model_dir)), chat_template)
    prompts = []
    for i, row in inputs:
        where = f"{prompts_path}:{i}"
        prompt = row_prompt(row, where)
        try:
            ids = encode_prompt(tokenizer, prompt)
        except JaxalignError as e:
            raise JaxalignError(f"{where}: {e}") from None
        if not ids:
            raise JaxalignError(f"{where}: the prompt tokenizes to no tokens")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise JaxalignError(f"{where}: token id {bad[0]} is out of range for the model's vocab of {cfg.vocab_size}"
                                " (is the tokenizer the model's?)")
        prompts.append(prompt)

    mesh = make_mesh(mesh_sizes or {"data": 1, "fsdp": -1, "tensor": 1})
    with use_mesh(mesh):
        model = model_io.load_model(model_dir, mesh, dtype=dtype)
    results = generate(model, tokenizer, prompts, params, mesh=mesh, batch_size=batch_size)
    if jax.process_index() == 0:
        out = as_path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for (_, row), result in zip(inputs, results):
                f.write(json.dumps({**row, **result._asdict()}, ensure_ascii=False) + "\n")
    return len(inputs)


def _generate_command(args: argparse.Namespace) -> int:
    params = SamplingParams(args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, stop=args.stop)
    n = run_generate(args.model, args.prompts, args.out, params, batch_size=args.batch_size,
                     tokenizer_path=args.tokenizer, chat_template=args.chat_template, dtype=args.dtype)
    print(f"generated {n} completions -> {args.out}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction, commands: dict) -> None:
    """Register the `generate` subcommand; `commands[name]` receives its handler (args -> exit code)."""
    p = subparsers.add_parser(
        "generate", help="sample completions for JSONL prompts (KV-cache decoding)",
        description="For each JSONL row with `prompt` (a string, or a {role, content} message list) or "
                    "`messages` (all but a final assistant turn are the prompt), write the row plus "
                    "`completion` (text), `completion_ids` (new token ids, EOS excluded, not cut at stop "
                    "strings) and `finish_reason` ('stop' or 'length'). Prompts are tokenized exactly as "
                    "in training: message lists through the chat template with its generation prompt, "
                    "strings with BOS. Batched, jit-compiled, sharded over all devices.")
    p.add_argument("--model", required=True, help="HF model dir, jaxalign checkpoint dir, or run dir")
    p.add_argument("--prompts", required=True, help="input JSONL")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per prompt (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="cut the completion before this string (repeatable; applied after generation)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", default="", help="tokenizer dir or .model (default: the model's own)")
    p.add_argument("--chat-template", default="",
                   help="chat template: the tokenizer's own (default), a built-in name, or a .jinja file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    commands["generate"] = _generate_command
