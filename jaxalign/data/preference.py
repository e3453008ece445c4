"""Preference rows: explicit or implicit prompts, normalized to `Preference(prompt, chosen, rejected)`.

Forms accepted (TRL's, plus Anthropic HH transcripts):
- explicit: `prompt`, `chosen`, `rejected`, all strings or all message lists (TRL conversational:
  prompt ends with a user turn, chosen/rejected start with an assistant turn);
- implicit message lists: no `prompt`; the prompt is the longest run of whole messages the two
  sides share, the completions are what follows;
- implicit HH transcripts: `chosen`/`rejected` are `\\n\\nHuman: ...\\n\\nAssistant: ...` strings.
  The prompt ends at the LAST SHARED `\\n\\nAssistant:` marker, and the turns become messages
  (Human -> user, Assistant -> assistant; the one space after the colon is the template's).

Why not TRL's split at the first differing character: when both answers start with the same
words ("I think that ...") those words would move into the prompt, and when one answer is a
prefix of the other ("You're welcome." / "You're welcome.  I'd be happy ...") the shorter one
would become an empty completion. Splitting at a turn boundary gives whole answers on both sides.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxalign.data.formats import (
    BadRow,
    Conversation,
    Message,
    PromptCompletion,
    check_assistant_turns,
    check_messages,
    get_field,
    get_string,
)

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Preference:
    """Plain strings (prompt tokenized with BOS), or message tuples (rendered by the chat template)."""

    prompt: str | tuple[Message, ...]
    chosen: str | tuple[Message, ...]
    rejected: str | tuple[Message, ...]

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def normalize_preference_row(row: dict[str, Any]) -> Preference:
    """One preference row in its internal form; raises BadRow."""
    chosen, rejected = get_field(row, "chosen"), get_field(row, "rejected")
    if row.get("prompt") is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            return _implicit_hh(chosen, rejected)
        if isinstance(chosen, list) and isinstance(rejected, list):
            return _implicit_messages(check_messages(chosen, "chosen"), check_messages(rejected, "rejected"))
        raise BadRow("wrong_type", "fields 'chosen' and 'rejected' must both be strings or both message lists")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        p, c, r = prompt, get_string(row, "chosen"), get_string(row, "rejected")
        if c == r:
            raise BadRow("chosen_equals_rejected", "'chosen' and 'rejected' are the same text")
        return Preference(p, c, r)
    if not all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        raise BadRow("wrong_type", "fields 'prompt', 'chosen' and 'rejected' must all be strings or all message lists")
    return _conversational(check_messages(prompt, "prompt"), check_messages(chosen, "chosen"),
                           check_messages(rejected, "rejected"))


@dataclasses.dataclass(frozen=True)
class Unpaired:
    """One reply to a prompt with a thumbs up or down (KTO's data)."""

    prompt: str | tuple[Message, ...]
    completion: str | tuple[Message, ...]
    label: bool


def normalize_unpaired_row(row: dict[str, Any]) -> Unpaired:
    """An unpaired row {prompt, completion, label} (TRL's: strings, or message lists); raises BadRow."""
    label = row.get("label")
    if not isinstance(label, bool):
        raise BadRow("bad_label", f"'label' must be true (desirable) or false (undesirable), got {label!r:.40}")
    prompt, completion = get_field(row, "prompt"), get_field(row, "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Unpaired(prompt, get_string(row, "completion"), label)
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise BadRow("wrong_type", "fields 'prompt' and 'completion' must both be strings or both message lists")
    prompt, completion = check_messages(prompt, "prompt"), check_messages(completion, "completion")
    if completion[0]["role"] != "assistant":
        raise BadRow("no_assistant_turn", f"completion continues the prompt with a {completion[0]['role']} turn")
    check_assistant_turns(completion, "completion")
    return Unpaired(tuple(prompt), tuple(completion), label)


def preference_to_sft(pref: Preference) -> PromptCompletion | Conversation:
    """The SFT example `prompt + chosen` (data.sft_from_preference).

    Only the chosen completion is trained (as for prompt/completion data): it is the reply the
    labelers compared; earlier assistant turns of the prompt were not.
    """
    if pref.conversational:
        return Conversation(pref.prompt + pref.chosen, train_from=len(pref.prompt))
    return PromptCompletion(pref.prompt, pref.chosen)


# ----------------------------------------------------------------------------- implicit prompts


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen_reply, rejected_reply): the prompt ends with the last shared `\\n\\nAssistant:`."""
    if chosen == rejected:
        raise BadRow("chosen_equals_rejected", "'chosen' and 'rejected' are the same transcript")
    shared = _common_prefix_len(chosen, rejected)
    cut = chosen.rfind(ASSISTANT, 0, shared)
    if cut < 0 or HUMAN not in chosen[:cut]:
        raise BadRow(
            "no_shared_prompt",
            "no 'prompt' field, and 'chosen'/'rejected' are not Human/Assistant transcripts sharing a turn; "
            "add a 'prompt' column or use message lists",
        )
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def hh_to_messages(transcript: str) -> list[Message]:
    """`\\n\\nHuman: a\\n\\nAssistant: b` -> [user a, assistant b]; text before the first turn -> system."""
    parts = _TURN.split(transcript)
    lead, pairs = parts[0], zip(parts[1::2], parts[2::2])
    messages = [{"role": "system", "content": lead}] if lead.strip() else []
    for speaker, content in pairs:
        # The template writes "Human: " + content, so the space after the colon is not content.
        messages.append({"role": _HH_ROLES[speaker], "content": content[1:] if content.startswith(" ") else content})
    return messages


def _implicit_hh(chosen: str, rejected: str) -> Preference:
    prompt, c, r = split_hh(chosen, rejected)
    prompt_messages = hh_to_messages(prompt[: -len(ASSISTANT)])  # the final marker is the generation prompt
    return _conversational(prompt_messages, hh_to_messages(ASSISTANT + c), hh_to_messages(ASSISTANT + r))


def _implicit_messages(chosen: list[Message], rejected: list[Message]) -> Preference:
    if chosen == rejected:
        raise BadRow("chosen_equals_rejected", "'chosen' and 'rejected' are the same conversation")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise BadRow("no_shared_prompt", "no 'prompt' field, and 'chosen' and 'rejected' share no leading message")
    return _conversational(chosen[:k], chosen[k:], rejected[k:])


def _conversational(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> Preference:
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion:
            raise BadRow("empty_completion", f"{name} has no reply after the prompt")
        if completion[0]["role"] != "assistant":
            raise BadRow("no_assistant_turn", f"{name} continues after the prompt with a {completion[0]['role']} turn")
        check_assistant_turns(completion, name)
    if chosen == rejected:
        raise BadRow("chosen_equals_rejected", "'chosen' and 'rejected' are the same reply")
    return Preference(tuple(prompt), tuple(chosen), tuple(rejected))


def _common_prefix_len(a: str, b: str) -> int:
    n, i = min(len(a), len(b)), 0
    while i < n and a[i:i + 64] == b[i:i + 64]:  # compare in chunks: transcripts are long
        i += 64
    i = min(i, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i
