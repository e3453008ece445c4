"""SFT row formats: detect which one a dataset uses, and normalize each row to one internal form.

| format              | columns                                  | normalized to                        |
|---------------------|------------------------------------------|--------------------------------------|
| `messages`          | messages: [{role, content}]              | Conversation (every assistant turn)  |
| `prompt_completion` | prompt, completion: strings              | PromptCompletion                     |
|                     | prompt, completion: message lists (TRL)  | Conversation(train_from=len(prompt)) |
| `alpaca`            | instruction, input (optional), output    | Conversation(user, assistant)        |
| `sharegpt`          | conversations: [{from, value}]           | Conversation                         |
| `text`              | text                                     | Text                                 |
| `preference`        | chosen, rejected (+ prompt)              | see `jaxalign.data.preference`       |
| `unpaired`          | prompt, completion, label (KTO's, TRL's) | see `jaxalign.data.preference`       |

Alpaca rows become a two-turn conversation (user = instruction, then a blank line and the
input if there is one), so they go through the same chat template as every other chat row.

A malformed row raises `BadRow(reason, message)`; the tokenize step adds FILE:ROW and either
raises it or skips the row and counts it under `reason` (data.on_bad_row).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from jaxalign.errors import JaxalignError

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "text", "preference", "unpaired")
SFT_FORMATS = tuple(f for f in FORMATS if f not in ("preference", "unpaired"))
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Columns that identify each format, in detection order (first match wins).
_REQUIRED = {
    "preference": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}

Message = dict[str, str]


class BadRow(JaxalignError):
    """A row that cannot be used; `reason` is the key it is counted under when skipped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Text:
    text: str


@dataclasses.dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Messages rendered with the chat template; assistant turns at index >= train_from are trained."""

    messages: tuple[Message, ...]
    train_from: int = 0


SFTExample = Text | PromptCompletion | Conversation


# ----------------------------------------------------------------------------- detection


def detect_format(columns: Iterable[str]) -> str:
    """The row format implied by the column names (bookkeeping columns `_*` ignored)."""
    cols = {c for c in columns if not c.startswith("_")}
    for fmt, required in _REQUIRED.items():
        if set(required) <= cols:
            return fmt
    raise JaxalignError(
        f"cannot tell the data format from the columns {sorted(cols)}; expected one of: "
        + "; ".join(f"{f} ({', '.join(r)})" for f, r in _REQUIRED.items())
        + ". Rename the columns or set data.format"
    )


def resolve_format(
    columns: Iterable[str], declared: str = "auto", stage: str = "sft", sft_from_preference: bool = False
) -> str:
    """The format to read: detected when `declared` is auto, checked against the columns and the stage."""
    columns = list(columns)
    if declared == "auto":
        fmt = detect_format(columns)
    else:
        if declared not in FORMATS:
            raise JaxalignError(f"data.format {declared!r} is not one of {('auto',) + FORMATS}")
        missing = [c for c in _REQUIRED[declared] if c not in columns]
        if missing:
            raise JaxalignError(f"data.format is {declared!r} but the data has no column {missing}; it has {columns}")
        fmt = declared
    if stage == "dpo" and fmt != "preference":
        raise JaxalignError(
            f"stage dpo needs preference rows (chosen, rejected, optional prompt) but the data is {fmt!r} "
            f"(columns {columns})"
        )
    if stage == "kto" and fmt not in ("preference", "unpaired"):
        raise JaxalignError(f"stage kto needs unpaired rows (prompt, completion, label) or preference rows (chosen, "
                            f"rejected: each a row of its own) but the data is {fmt!r} (columns {columns})")
    if stage == "sft" and fmt == "unpaired":
        raise JaxalignError("the data has unpaired rows (prompt, completion, label): KTO's data; use stage: kto")
    if stage == "sft" and fmt == "preference" and not sft_from_preference:
        raise JaxalignError(
            "the data has preference rows (chosen/rejected); set data.sft_from_preference: true to train SFT "
            "on prompt + chosen, or use stage: dpo"
        )
    return fmt


# ----------------------------------------------------------------------------- normalization


def normalize_sft_row(row: dict[str, Any], fmt: str) -> SFTExample:
    """One SFT row (a dict of column values) in its internal form; raises BadRow."""
    if fmt == "text":
        return Text(get_string(row, "text", empty_reason="empty_field"))
    if fmt == "prompt_completion":
        prompt, completion = get_field(row, "prompt"), get_field(row, "completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt = check_messages(prompt, "prompt")
            completion = check_messages(completion, "completion")
            check_assistant_turns(completion, "completion")
            return Conversation(tuple(prompt + completion), train_from=len(prompt))
        return PromptCompletion(get_string(row, "prompt", empty_reason=None), get_string(row, "completion"))
    if fmt == "messages":
        messages = check_messages(get_field(row, "messages"), "messages")
    elif fmt == "sharegpt":
        messages = _sharegpt_messages(get_field(row, "conversations"))
    elif fmt == "alpaca":
        instruction = get_string(row, "instruction", empty_reason="empty_field")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise BadRow("wrong_type", f"field 'input' must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": get_string(row, "output")}]
    else:
        raise JaxalignError(f"normalize_sft_row: format {fmt!r} is not an SFT format")
    check_assistant_turns(messages, fmt)
    return Conversation(tuple(messages))


def _sharegpt_messages(turns: Any) -> list[Message]:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadRow("wrong_type", "field 'conversations' must be a list of {from, value} objects")
    converted = []
    for i, t in enumerate(turns):
        who = t.get("from")
        if not isinstance(who, str) or who not in SHAREGPT_ROLES:
            expected = sorted(SHAREGPT_ROLES)
            raise BadRow("unknown_role", f"conversations[{i}].from is {who!r}; expected one of {expected}")
        converted.append({"role": SHAREGPT_ROLES[who], "content": t.get("value")})
    return check_messages(converted, "conversations")


# ----------------------------------------------------------------------------- field checks


def get_field(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise BadRow("missing_field", f"field {name!r} is missing or null")
    return value


def get_string(row: dict[str, Any], name: str, empty_reason: str | None = "empty_completion") -> str:
    """A string field; an all-whitespace value is a BadRow(empty_reason) unless empty_reason is None."""
    value = get_field(row, name)
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field {name!r} must be a string, got {type(value).__name__}")
    if empty_reason and not value.strip():
        raise BadRow(empty_reason, f"field {name!r} is empty")
    return value


def check_messages(value: Any, field: str) -> list[Message]:
    """A list of {role, content} messages, copied down to those two keys."""
    if not isinstance(value, list):
        raise BadRow(
            "wrong_type", f"field {field!r} must be a list of {{role, content}} messages, got {type(value).__name__}"
        )
    if not value:
        raise BadRow("empty_field", f"field {field!r} is an empty message list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRow("wrong_type", f"{field}[{i}] must be a {{role, content}} object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRow("unknown_role", f"{field}[{i}].role is {role!r}; expected one of {list(ROLES)}")
        if content is None:
            raise BadRow("missing_field", f"{field}[{i}].content is missing or null")
        if not isinstance(content, str):
            raise BadRow("wrong_type", f"{field}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def check_assistant_turns(messages: list[Message], field: str) -> None:
    """At least one assistant turn, and none empty (an empty reply teaches the model to stop at once)."""
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise BadRow("no_assistant_turn", f"{field} has no assistant turn to train on")
    for i in replies:
        if not messages[i]["content"].strip():
            raise BadRow("empty_completion", f"{field}[{i}] is an empty assistant turn")
