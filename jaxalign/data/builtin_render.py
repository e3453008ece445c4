"""The built-in chat templates rendered in one pass, assistant spans included.

`render_conversation` finds each assistant turn by rendering the conversation's prefixes with Jinja
(2 renders per turn: a third of the time of tokenizing multi-turn rows). For the four built-ins
(`chat_templates.BUILTIN_TEMPLATES`) a rendering is the concatenation of one piece per message, so
the prefix renders are prefixes of those pieces and the spans follow from their lengths:

    prompt_i    = head + pieces[:i] + generation prompt
    with_turn_i = head + pieces[:i + 1]
    span_i      = (len(prompt_i), len(prompt_i) + len(with_turn_i[len(prompt_i):].rstrip()))

which is the Jinja path's definition. Written by hand because the Jinja source is the reference:
tests compare the two on conversations with edge-case whitespace, and anything these functions do
not handle exactly (an unexpected role, a non-string content, a missing token) returns None, so the
caller renders with Jinja and gets its result or its error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Message = dict[str, Any]


def _plain(messages: Sequence[Message], bos: str | None, eos: str) -> tuple[str, list[str], str] | None:
    lead = {"system": "", "user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}
    pieces = []
    for m in messages:
        if m.get("role") not in lead:
            return None
        pieces.append(lead[m["role"]] + m["content"] + (eos if m["role"] == "assistant" else ""))
    return bos or "", pieces, "\n\nAssistant:"


def _chatml(messages: Sequence[Message], bos: str | None, eos: str) -> tuple[str, list[str], str] | None:
    if not all(isinstance(m.get("role"), str) for m in messages):
        return None
    return "", [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages], "<|im_start|>assistant\n"


def _llama3(messages: Sequence[Message], bos: str | None, eos: str) -> tuple[str, list[str], str] | None:
    if not all(isinstance(m.get("role"), str) for m in messages):
        return None
    pieces = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages]
    return "<|begin_of_text|>", pieces, "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _llama2(messages: Sequence[Message], bos: str | None, eos: str) -> tuple[str, list[str], str] | None:
    if bos is None:
        return None
    system = messages[0]["content"].strip() if messages and messages[0].get("role") == "system" else None
    pieces = [""] if system is not None else []  # the system message renders inside the first user turn
    for j, m in enumerate(messages[len(pieces):]):
        if m.get("role") == "user":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if j == 0 and system else ""
            pieces.append(f"{bos}[INST] {sys_block}{m['content'].strip()} [/INST]")
        elif m.get("role") == "assistant":
            pieces.append(f" {m['content'].strip()} {eos}")
        else:
            return None
    return "", pieces, ""


RENDERERS: dict[str, Callable] = {"plain": _plain, "chatml": _chatml, "llama3": _llama3, "llama2": _llama2}


def render_builtin(name: str, messages: Sequence[Message], bos: str | None,
                   eos: str | None) -> tuple[str, list[tuple[int, int]]] | None:
    """(text, assistant spans) of built-in template `name`, as the Jinja path gives them; None when
    the Jinja path must decide (see the module doc)."""
    if eos is None or not all(isinstance(m.get("content"), str) for m in messages):
        return None
    parts = RENDERERS[name](messages, bos, eos)
    if parts is None:
        return None
    head, pieces, generation = parts
    spans, at = [], len(head)
    for m, piece in zip(messages, pieces):
        if m["role"] == "assistant":
            if not piece.startswith(generation):
                return None  # not prefix-stable here: the Jinja path says so
            start = at + len(generation)
            spans.append((start, start + len(piece[len(generation):].rstrip())))
        at += len(piece)
    return head + "".join(pieces), spans
