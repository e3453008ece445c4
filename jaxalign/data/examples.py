"""Tokenize one normalized example: the per-row rules that `jaxalign.data.tokenize` maps over a dataset.

Kept apart from the dataset map and its cache: these rules alone decide the ids and loss masks,
and `encode_prompt` reuses them so generation sees prompts exactly as training did.

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
- Every skip, drop and truncation is reported (BadRow, Dropped, or the returned flags) for
  `tokenize_dataset` to count in `DataStats`; nothing disappears silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from jaxalign.data.chat_templates import render_conversation
from jaxalign.data.formats import BadRow, Conversation, PromptCompletion, SFTExample, Text
from jaxalign.data.preference import Preference
from jaxalign.data.tokenizer import Tokenizer, char_spans_to_token_mask
from jaxalign.errors import JaxalignError


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
        get = lambda k: data_value(cfg_data, k)  # noqa: E731
        return cls(get("max_length"), get("max_prompt_length"), get("truncation"), loss_on)


def data_value(cfg_data: Mapping[str, Any], key: str) -> Any:
    """cfg_data[key], or the schema default when the key is absent."""
    try:
        return cfg_data[key]
    except (KeyError, AttributeError):
        from jaxalign.config.schema import SCHEMA  # here, not above: the config imports JAX, a worker needs neither

        return SCHEMA["data"][key].default


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
    prompt, (chosen, rejected), flags = tokenize_replies(pref.prompt, (pref.chosen, pref.rejected), tok, settings)
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, flags


def tokenize_replies(prompt_in, replies, tok: Tokenizer, settings: TokenizeSettings) -> tuple[list, list, dict]:
    """(prompt ids, each reply's ids, flags) of replies to one prompt (strings, or message tuples rendered by the
    chat template), truncated to max_length together; raises BadRow or Dropped."""
    conversational = not isinstance(prompt_in, str)
    prompt_text, prompt = _prompt_text_and_ids(tok, prompt_in)
    completions, mismatches = [], 0
    for side in replies:
        if conversational:
            full = _render(tok, prompt_in + side)
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
    prompt, truncated_prompt = _truncate_prompt(prompt, settings)
    longest = max(len(c) for c in completions)
    room = max(settings.max_length - len(prompt) if settings.max_length > 0 else longest, 0)
    truncated_completion = longest > room
    completions = [c[:room] for c in completions]
    if not all(completions):
        raise Dropped(
            "completion_truncated_away",
            f"the prompt ({len(prompt)} tokens after truncation) leaves no room for the completions within "
            f"max_length={settings.max_length}",
        )
    flags = {"_truncated_prompt": truncated_prompt, "_truncated_completion": truncated_completion,
             "_prompt_not_prefix": mismatches}
    return prompt, completions, flags


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
    # the offsets as one array where the tokenizer gives one (SentencePiece): no per-token tuples
    ids, offsets = (tok.encode_with_offset_array(text) if hasattr(tok, "encode_with_offset_array")
                    else tok.encode_with_offsets(text))
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
