"""Tokenize normalized rows into the examples the batching code consumes; cache them on disk.

    examples, stats = tokenize_dataset(load_rows(path), tok, cfg.data, "sft", loss_on=cfg.sft.loss_on,
                                       cache_dir=resolve_cache_dir(cfg))

SFT example:        {"input_ids": [int], "loss_mask": [bool]}, same length; loss_mask[i] is True iff
                    token i is a trained target (the loss code shifts: logits at i-1 predict token i).
Preference example: {"prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]}; the model
                    reads prompt_ids + chosen_ids (resp. rejected_ids); only completions are scored.

Rules (the TRL semantics in REFERENCE-SEMANTICS.md, minus its known bugs):
- Plain strings: the prompt is tokenized with special tokens (BOS); the completion is the tokens
  of prompt+completion after the prompt's tokens (if the prompt's tokens are not a prefix, the
  completion is tokenized alone and counted in `prompt_not_prefix`); EOS appended unless present.
- Chat rows: text comes from the chat template, whose own BOS is kept (no second one added).
  SFT trains every assistant turn from `render_conversation`'s spans, end-of-turn marker included.
  A preference completion is what the template renders after the prompt + generation prompt,
  up to its end-of-turn marker. EOS is appended only when the template ends a reply with no
  special token (never after "</s>", "<|im_end|>", "<|eot_id|>").
- Lengths: the prompt is cut to max_prompt_length (keep_end keeps its last tokens, as TRL;
  keep_start its first), then completions are cut from the end to fit max_length. In SFT the
  prompt is the untrained prefix of prompt/completion rows; conversations and text are cut
  from the end. A row left with no completion token is dropped and counted.
- Every skip, drop and truncation is counted in `DataStats`; nothing disappears silently.

Cache: one arrow file per (rows fingerprint, tokenizer fingerprint, chat template, settings,
code version) under `cache_dir/tokenized/`; a second run with the same inputs reads it back
without tokenizing. `resolve_cache_dir(cfg)` gives data.cache_dir or, when that is '',
`output_dir/cache` (the schema's rule); with no config at all, or an output_dir that is a URL,
~/.cache/jaxalign.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Mapping, Sequence

import datasets

from jaxalign.config.schema import SCHEMA
from jaxalign.data.chat_templates import render_conversation
from jaxalign.data.formats import (
    BadRow,
    Conversation,
    PromptCompletion,
    SFTExample,
    Text,
    normalize_sft_row,
    resolve_format,
)
from jaxalign.data.preference import Preference, normalize_preference_row, preference_to_sft
from jaxalign.data.tokenizer import Tokenizer, char_spans_to_token_mask
from jaxalign.errors import JaxalignError
from jaxalign.runtime.paths import is_remote

log = logging.getLogger(__name__)

# Bump when tokenization output changes for the same inputs: old cache files are then ignored.
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxalign")

SFT_FEATURES = {"input_ids": datasets.List(datasets.Value("int32")), "loss_mask": datasets.List(datasets.Value("bool"))}
PREFERENCE_FEATURES = {k: datasets.List(datasets.Value("int32")) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
# Per-row bookkeeping written next to the example and dropped after the stats are read.
_ROW_FEATURES = {
    "_drop": datasets.Value("string"),  # "" = kept, else "reason\tFILE:ROW: message"
    "_truncated_prompt": datasets.Value("bool"),
    "_truncated_completion": datasets.Value("bool"),
    "_prompt_not_prefix": datasets.Value("int8"),
}


class Dropped(BadRow):
    """A row dropped whatever data.on_bad_row says (truncation left it no completion)."""


@dataclasses.dataclass(frozen=True)
class TokenizeSettings:
    """The config values tokenization depends on (they are part of the cache key)."""

    max_length: int = 1024
    max_prompt_length: int = 512
    truncation: str = "keep_end"
    loss_on: str = "completion"

    @classmethod
    def from_config(cls, cfg_data: Mapping[str, Any], loss_on: str = "completion") -> TokenizeSettings:
        get = lambda k: _data_value(cfg_data, k)  # noqa: E731
        return cls(get("max_length"), get("max_prompt_length"), get("truncation"), loss_on)


@dataclasses.dataclass
class DataStats:
    """What happened to the rows: counts of kept rows, truncations and drops by reason."""

    rows_in: int = 0
    rows_out: int = 0
    truncated_prompt: int = 0
    truncated_completion: int = 0
    prompt_not_prefix: int = 0  # completions tokenized alone (prompt tokens not a prefix of the full text's)
    dropped_by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_drop: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> "FILE:ROW: message"
    from_cache: bool = False

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    def __add__(self, other: DataStats) -> DataStats:
        return DataStats(
            self.rows_in + other.rows_in, self.rows_out + other.rows_out,
            self.truncated_prompt + other.truncated_prompt, self.truncated_completion + other.truncated_completion,
            self.prompt_not_prefix + other.prompt_not_prefix, self.dropped_by_reason + other.dropped_by_reason,
            {**other.first_drop, **self.first_drop}, self.from_cache and other.from_cache,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"dropped_by_reason": dict(self.dropped_by_reason), "dropped": self.dropped}

    def summary(self) -> str:
        text = (
            f"{self.rows_out}/{self.rows_in} rows kept; truncated prompts {self.truncated_prompt}, "
            f"truncated completions {self.truncated_completion}, completions tokenized alone {self.prompt_not_prefix}"
        )
        for reason, n in sorted(self.dropped_by_reason.items()):
            text += f"\n  dropped {n} ({reason}), e.g. {self.first_drop.get(reason, '')}"
        return text


# ----------------------------------------------------------------------------- one example


def tokenize_sft_example(example: SFTExample, tok: Tokenizer, settings: TokenizeSettings) -> tuple[dict, dict]:
    """({"input_ids", "loss_mask"}, flags); raises BadRow (no trained tokens) or Dropped."""
    not_prefix, n_prompt = 0, 0
    if isinstance(example, Text):
        ids = _with_eos(tok.encode(example.text, add_special_tokens=True), tok)
        mask = [True] * len(ids)
    elif isinstance(example, PromptCompletion):
        prompt = tok.encode(example.prompt, add_special_tokens=True)
        completion, not_prefix = _completion_ids(tok, prompt, example.prompt, example.completion, True)
        completion = _with_eos(completion, tok)
        ids, mask, n_prompt = prompt + completion, [False] * len(prompt) + [True] * len(completion), len(prompt)
    else:
        ids, mask = _conversation_ids(example, tok)
        if example.train_from and any(mask):
            n_prompt = mask.index(True)
    if not any(mask):
        raise BadRow("no_trained_tokens", "no token is marked for training (check the chat template's assistant turns)")
    ids, mask, flags = _truncate_sft(ids, mask, n_prompt, settings)
    if not any(mask):
        raise Dropped(
            "completion_truncated_away",
            f"no trained token is left within max_length={settings.max_length} "
            f"(max_prompt_length={settings.max_prompt_length})",
        )
    if settings.loss_on == "all":
        mask = [True] * len(ids)
    return {"input_ids": ids, "loss_mask": mask}, flags | {"_prompt_not_prefix": not_prefix}


def tokenize_preference_example(pref: Preference, tok: Tokenizer, settings: TokenizeSettings) -> tuple[dict, dict]:
    """({"prompt_ids", "chosen_ids", "rejected_ids"}, flags); raises BadRow or Dropped."""
    prompt_text, prompt = _prompt_text_and_ids(tok, pref.prompt)
    completions, mismatches = [], 0
    for side in (pref.chosen, pref.rejected):
        if pref.conversational:
            full = _render(tok, pref.prompt + side)
            if not full.startswith(prompt_text):
                raise BadRow("template_error", "the chat template renders the prompt differently when a reply follows")
            # Up to the end-of-turn marker: a model stops there, so whitespace after it is never generated.
            ids, mismatch = _completion_ids(tok, prompt, prompt_text, full[len(prompt_text):].rstrip(), False)
            ids = ids if ids and _is_special(tok, ids[-1]) else ids + [tok.eos_id]
        else:
            ids, mismatch = _completion_ids(tok, prompt, prompt_text, side, True)
            ids = _with_eos(ids, tok)
        completions.append(ids)
        mismatches += mismatch
    chosen, rejected = completions
    prompt, truncated_prompt = _truncate_prompt(prompt, settings)
    room = settings.max_length - len(prompt) if settings.max_length > 0 else max(len(chosen), len(rejected))
    room = max(room, 0)
    truncated_completion = len(chosen) > room or len(rejected) > room
    chosen, rejected = chosen[:room], rejected[:room]
    if not chosen or not rejected:
        raise Dropped(
            "completion_truncated_away",
            f"the prompt ({len(prompt)} tokens after truncation) leaves no room for the completions within "
            f"max_length={settings.max_length}",
        )
    flags = {"_truncated_prompt": truncated_prompt, "_truncated_completion": truncated_completion,
             "_prompt_not_prefix": mismatches}
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, flags


# ----------------------------------------------------------------------------- helpers


def encode_prompt(tok: Tokenizer, prompt: str | list[dict[str, Any]]) -> list[int]:
    """Prompt ids exactly as training tokenizes prompts (`tokenize_preference_example`): a message
    list is rendered with the chat template and its generation prompt (the template writes BOS
    itself); a plain string is encoded with special tokens (BOS). Used by `jaxalign.eval.generate`."""
    return _prompt_text_and_ids(tok, prompt)[1]


def _prompt_text_and_ids(tok: Tokenizer, prompt: str | Sequence[dict[str, Any]]) -> tuple[str, list[int]]:
    """A message list renders with the chat template and its generation prompt (the template writes
    BOS itself); a plain string is encoded with special tokens (BOS)."""
    if isinstance(prompt, str):
        return prompt, tok.encode(prompt, add_special_tokens=True)
    text = _render(tok, prompt, add_generation_prompt=True)
    return text, tok.encode(text)


def _render(tok: Tokenizer, messages, add_generation_prompt: bool = False) -> str:
    try:
        return tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
    except JaxalignError as e:
        raise BadRow("template_error", str(e)) from None


def _conversation_ids(example: Conversation, tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and the mask of its trained assistant turns."""
    try:
        text, spans = render_conversation(tok, example.messages)
    except JaxalignError as e:
        raise BadRow("template_error", str(e)) from None
    replies = [i for i, m in enumerate(example.messages) if m["role"] == "assistant"]
    trained = [span for i, span in zip(replies, spans) if i >= example.train_from]
    ids, offsets = tok.encode_with_offsets(text)
    mask = char_spans_to_token_mask(offsets, trained)
    # A template that ends the last reply with no end-of-turn token: append EOS so the model learns to stop.
    if example.messages[-1]["role"] == "assistant" and any(mask):
        last = len(mask) - 1 - mask[::-1].index(True)
        if not _is_special(tok, ids[last]):
            ids, mask = ids[: last + 1] + [tok.eos_id], mask[: last + 1] + [True]
    return ids, mask


def _completion_ids(tok: Tokenizer, prompt_ids: list[int], prompt: str, completion: str, special: bool):
    """(completion ids, 1 if tokenized alone else 0): the tokens of prompt+completion after the prompt's."""
    full = tok.encode(prompt + completion, add_special_tokens=special)
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids):], 0
    return tok.encode(completion), 1


def _with_eos(ids: list[int], tok: Tokenizer) -> list[int]:
    return ids if ids and ids[-1] == tok.eos_id else ids + [tok.eos_id]


def _is_special(tok: Tokenizer, token_id: int) -> bool:
    """EOS, or a token that decodes to text only when special tokens are kept (<|im_end|>, <|eot_id|>)."""
    if token_id == tok.eos_id:
        return True
    return tok.decode([token_id], skip_special_tokens=True) == "" != tok.decode([token_id], skip_special_tokens=False)


def _truncate_prompt(prompt: list, settings: TokenizeSettings) -> tuple[list, bool]:
    n = settings.max_prompt_length
    if n <= 0 or len(prompt) <= n:
        return prompt, False
    return (prompt[-n:] if settings.truncation == "keep_end" else prompt[:n]), True


def _truncate_sft(ids: list[int], mask: list[bool], n_prompt: int, settings: TokenizeSettings):
    prompt_ids, truncated_prompt = _truncate_prompt(ids[:n_prompt], settings)
    prompt_mask, _ = _truncate_prompt(mask[:n_prompt], settings)
    ids, mask = prompt_ids + ids[n_prompt:], prompt_mask + mask[n_prompt:]
    truncated = 0 < settings.max_length < len(ids)
    if truncated:
        ids, mask = ids[: settings.max_length], mask[: settings.max_length]
    return ids, mask, {"_truncated_prompt": truncated_prompt, "_truncated_completion": truncated}


# ----------------------------------------------------------------------------- datasets


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer: Tokenizer,
    cfg_data: Mapping[str, Any],
    stage: str,
    *,
    loss_on: str = "completion",
    cache_dir: str | None = None,
    source: str = "",
) -> tuple[datasets.Dataset, DataStats]:
    """Normalize and tokenize every row: (examples dataset, stats). Cached on disk; see the module doc.

    cfg_data: the `data` config section (format, lengths, truncation, on_bad_row, sft_from_preference,
    cache_dir). stage: "sft" or "dpo". loss_on: `sft.loss_on`. cache_dir: overrides data.cache_dir.
    source: the name quoted in errors for rows without a `_source` column (see `load_rows`).
    """
    if stage not in ("sft", "dpo"):
        raise JaxalignError(f"tokenize_dataset: stage must be 'sft' or 'dpo', got {stage!r}")
    settings = TokenizeSettings.from_config(cfg_data, loss_on if stage == "sft" else "completion")
    on_bad_row = _data_value(cfg_data, "on_bad_row")
    from_pref = _data_value(cfg_data, "sft_from_preference")
    fmt = resolve_format(ds.column_names, _data_value(cfg_data, "format"), stage, from_pref)
    preference_rows = fmt == "preference"
    features = datasets.Features((PREFERENCE_FEATURES if stage == "dpo" else SFT_FEATURES) | _ROW_FEATURES)
    empty = {k: [] for k in features if not k.startswith("_")}

    def process(row: dict[str, Any], index: int) -> dict[str, Any]:
        where = f"{row.get('_source') or source or 'rows'}:{row.get('_row') or index + 1}"
        try:
            if preference_rows:
                pref = normalize_preference_row(row)
                if stage == "dpo":
                    example, flags = tokenize_preference_example(pref, tokenizer, settings)
                else:
                    example, flags = tokenize_sft_example(preference_to_sft(pref), tokenizer, settings)
            else:
                example, flags = tokenize_sft_example(normalize_sft_row(row, fmt), tokenizer, settings)
        except BadRow as e:
            if on_bad_row == "error" and not isinstance(e, Dropped):
                raise JaxalignError(
                    f"{where}: {e} [{e.reason}]. Fix the row, or set data.on_bad_row: skip to skip such rows "
                    "(they are counted)"
                ) from None
            return empty | {"_drop": f"{e.reason}\t{where}: {e}", "_truncated_prompt": False,
                            "_truncated_completion": False, "_prompt_not_prefix": 0}
        return example | flags | {"_drop": ""}

    key = _cache_key(ds, tokenizer, fmt, stage, settings, on_bad_row, from_pref)
    cache_file = None
    if key is not None:
        root = os.path.join(os.path.expanduser(cache_dir or _data_value(cfg_data, "cache_dir") or DEFAULT_CACHE_DIR),
                            "tokenized")
        cache_file = os.path.join(root, f"{stage}-{key[:32]}.arrow")
    from_cache = cache_file is not None and os.path.exists(cache_file)
    mapped = ds.map(
        process, with_indices=True, remove_columns=ds.column_names, features=features,
        cache_file_name=cache_file, load_from_cache_file=True, keep_in_memory=cache_file is None,
        new_fingerprint=(key or _random_key())[:32], desc=f"tokenizing ({stage}, {fmt})",
    )
    if cache_file is not None and not from_cache:
        _write_cache_note(cache_file, ds, tokenizer, fmt, stage, settings, on_bad_row, from_pref)
    examples, stats = _collect(mapped, from_cache)
    log.info("tokenized %s rows (%s, %s): %s", source or "data", stage, fmt, stats.summary())
    if stats.rows_out == 0:
        raise JaxalignError(f"every one of the {stats.rows_in} rows of {source or 'the data'} was dropped:\n"
                            + stats.summary())
    return examples, stats


def _collect(mapped: datasets.Dataset, from_cache: bool) -> tuple[datasets.Dataset, DataStats]:
    """Stats from the bookkeeping columns, then the kept rows without them."""
    cols = mapped.select_columns(list(_ROW_FEATURES)).to_dict()
    stats = DataStats(rows_in=len(mapped), from_cache=from_cache)
    keep = []
    for i, drop in enumerate(cols["_drop"]):
        if drop:
            reason, message = drop.split("\t", 1)
            stats.dropped_by_reason[reason] += 1
            stats.first_drop.setdefault(reason, message)
            continue
        keep.append(i)
        stats.truncated_prompt += cols["_truncated_prompt"][i]
        stats.truncated_completion += cols["_truncated_completion"][i]
        stats.prompt_not_prefix += cols["_prompt_not_prefix"][i] > 0
    stats.rows_out = len(keep)
    if len(keep) < len(mapped):
        mapped = mapped.select(keep)
    return mapped.remove_columns(list(_ROW_FEATURES)), stats


def resolve_cache_dir(cfg: Mapping[str, Any]) -> str:
    """data.cache_dir, or output_dir/cache when it is '' (the schema's rule); the local default cache
    when output_dir is a URL, since datasets memory-maps the cache from local disk."""
    if cfg["data"]["cache_dir"]:
        return cfg["data"]["cache_dir"]
    return DEFAULT_CACHE_DIR if is_remote(cfg["output_dir"]) else os.path.join(cfg["output_dir"], "cache")


def tokenizer_fingerprint(tok: Tokenizer) -> str | None:
    """A hash of what decides the ids: vocab/model, special tokens, chat template; None if unknown."""
    h = hashlib.sha256()
    if getattr(tok, "sp", None) is not None:
        h.update(tok.sp.serialized_model_proto())
    elif getattr(tok, "hf", None) is not None and getattr(tok.hf, "is_fast", False):
        h.update(tok.hf.backend_tokenizer.to_str().encode())
        h.update(json.dumps(tok.hf.special_tokens_map, sort_keys=True, default=str).encode())
    else:
        return None
    h.update(json.dumps([type(tok).__name__, tok.bos_id, tok.eos_id, tok.chat_template]).encode())
    return h.hexdigest()


def _cache_key(ds, tok, fmt, stage, settings, on_bad_row, from_pref) -> str | None:
    tok_hash = tokenizer_fingerprint(tok)
    if tok_hash is None:
        log.warning("tokenized data is not cached: cannot fingerprint tokenizer %r", tok)
        return None
    parts = [CACHE_VERSION, ds._fingerprint, tok_hash, fmt, stage, dataclasses.astuple(settings), on_bad_row, from_pref]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _write_cache_note(cache_file, ds, tok, fmt, stage, settings, on_bad_row, from_pref) -> None:
    """A readable note next to the cache file saying what it was made from."""
    note = {"rows_fingerprint": ds._fingerprint, "rows": len(ds), "tokenizer": repr(tok), "format": fmt,
            "stage": stage, "settings": dataclasses.asdict(settings), "on_bad_row": on_bad_row,
            "sft_from_preference": from_pref, "cache_version": CACHE_VERSION}
    with open(os.path.splitext(cache_file)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump(note, f, indent=2)


def _random_key() -> str:
    return os.urandom(16).hex()


def _data_value(cfg_data: Mapping[str, Any], key: str) -> Any:
    """cfg_data[key], or the schema default when the key is absent."""
    try:
        return cfg_data[key]
    except (KeyError, AttributeError):
        return SCHEMA["data"][key].default
