"""Chat templates: built-in Jinja templates, template selection, and assistant-span rendering.

Templates are HF-style Jinja strings (variables `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, ...) rendered in a sandboxed environment configured like
transformers' (`trim_blocks`, `lstrip_blocks`, `raise_exception`, `tojson`), so a template
written for `tokenizer.apply_chat_template` renders the same text here.

Built-ins (`BUILTIN_TEMPLATES`):
- `llama2`: Meta's Llama-2-chat format, `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]
  {assistant} </s>` per exchange. No generation prompt (a user turn already ends in `[/INST]`).
- `llama3`: `<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`;
  the generation prompt is an empty assistant header.
- `chatml`: `<|im_start|>{role}\\n{content}<|im_end|>\\n`; generation prompt `<|im_start|>assistant\\n`.
- `plain`: the Anthropic HH format, `{bos}{system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}{eos}`;
  generation prompt `\\n\\nAssistant:` (the space before the reply belongs to the reply, as in
  HH transcripts, so prompt tokens stay a prefix of prompt+reply tokens).

`render_conversation` gives the rendered text plus the character span of every assistant turn
(reply and end-of-turn marker); SFT loss masks are built from those spans.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
from typing import Any, Protocol, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxalign.data.builtin_render import render_builtin
from jaxalign.errors import JaxalignError
from jaxalign.runtime import paths

logger = logging.getLogger(__name__)

Message = dict[str, Any]

# Every template below starts each line with `{%-` or `{{-`, so the newlines and indentation
# of the source never reach the output: only the quoted strings do.
LLAMA2_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message %}
            {{- bos_token + '[INST] <<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] | trim + ' [/INST]' }}
        {%- else %}
            {{- bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + ' ' + eos_token }}
    {%- else %}
        {{- raise_exception('llama2 template: role must be user or assistant after an optional first system message, got ' + message['role']) }}
    {%- endif %}
{%- endfor %}
"""

LLAMA3_TEMPLATE = r"""
{{- '<|begin_of_text|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

CHATML_TEMPLATE = r"""
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

PLAIN_TEMPLATE = r"""
{%- if bos_token %}
    {{- bos_token }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {{- message['content'] }}
    {%- elif message['role'] == 'user' %}
        {{- '\n\nHuman: ' + message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {{- '\n\nAssistant: ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('plain template: unknown role ' + message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '\n\nAssistant:' }}
{%- endif %}
"""

BUILTIN_TEMPLATES: dict[str, str] = {
    "llama2": LLAMA2_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "plain": PLAIN_TEMPLATE,
}

# Tag strings a built-in emits as text; each must be one token of the tokenizer, otherwise
# the model would be trained on tags spelled out character by character.
_REQUIRED_TAGS: dict[str, tuple[str, ...]] = {
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}


class _TemplateTokenizer(Protocol):
    """What template selection needs from a tokenizer (jaxalign.data.tokenizer.Tokenizer has it)."""

    bos_token: str | None
    eos_token: str | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str: ...


# ----------------------------------------------------------------------------- rendering


class _GenerationBlock(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (TRL-style assistant markers) as a no-op.

    Spans come from progressive rendering instead, so the body is rendered unchanged.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # The same environment settings as transformers' apply_chat_template.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_template(
    template: str,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    name: str = "chat template",
    **special_tokens: Any,
) -> str:
    """Render `messages` with a Jinja chat template; `special_tokens` are e.g. bos_token=..., eos_token=..."""
    try:
        compiled = _compile(template)
        return compiled.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except jinja2.exceptions.TemplateError as e:
        raise JaxalignError(f"chat template {name!r} failed to render {len(messages)} messages: {e}") from e


# ----------------------------------------------------------------------------- selection


def resolve_chat_template(spec: str, own_template: str | None, tokenizer: _TemplateTokenizer) -> tuple[str, str]:
    """Pick the active template: returns (jinja_source, name used in messages).

    spec: "" -> the tokenizer's own template, else `plain`; a built-in name; a path to a
    `.jinja` file; or an inline Jinja string (anything containing `{{` or `{%`).
    """
    if not spec:
        if own_template:
            return own_template, "tokenizer's own template"
        logger.info("tokenizer has no chat template and none was configured: using the built-in 'plain' template")
        return _builtin("plain", tokenizer), "plain"
    if "{{" in spec or "{%" in spec:
        return spec, "inline template"
    if spec.endswith(".jinja"):
        if not paths.isfile(spec):
            raise JaxalignError(f"chat_template file {spec!r} does not exist (expected a Jinja file)")
        with paths.as_path(spec).open(encoding="utf-8") as f:
            return f.read(), spec
    if spec.lower() in BUILTIN_TEMPLATES:
        return _builtin(spec.lower(), tokenizer), spec.lower()
    raise JaxalignError(
        f"unknown chat_template {spec!r}: use one of {sorted(BUILTIN_TEMPLATES)}, a path to a .jinja file, "
        "or '' for the tokenizer's own template"
    )


def _builtin(name: str, tokenizer: _TemplateTokenizer) -> str:
    """A built-in template, after checking the tokenizer can represent what it emits."""
    if tokenizer.eos_token is None:
        raise JaxalignError(f"chat template {name!r} needs an eos_token, but the tokenizer has none")
    if name == "llama2" and tokenizer.bos_token is None:
        raise JaxalignError("chat template 'llama2' needs a bos_token, but the tokenizer has none")
    missing = [tag for tag in _REQUIRED_TAGS.get(name, ()) if len(tokenizer.encode(tag)) != 1]
    if missing:
        raise JaxalignError(
            f"chat template {name!r} needs the special tokens {missing} but this tokenizer does not have them "
            f"(they would be split into several tokens); pick a template matching the model, e.g. 'llama2' or 'plain'"
        )
    return BUILTIN_TEMPLATES[name]


# ----------------------------------------------------------------------------- assistant spans


def render_conversation(
    tokenizer: _TemplateTokenizer, messages: Sequence[Message]
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return (text, [(start, end)] char spans of each assistant turn).

    A span covers what the template emits for the assistant turn after the generation prompt:
    the reply and its end-of-turn marker (" </s>", "<|eot_id|>", "<|im_end|>"), without the
    whitespace the template adds after the marker. It is found by rendering prefixes of the
    conversation, not by searching for tags, so it works for any prefix-stable template (the
    built-ins: in one pass, `jaxalign.data.builtin_render`, to the same result).
    """
    name = getattr(tokenizer, "chat_template_name", "chat template")
    if (name in BUILTIN_TEMPLATES and getattr(tokenizer, "chat_template", None) == BUILTIN_TEMPLATES[name]
            and hasattr(tokenizer, "template_variables")):
        tokens = tokenizer.template_variables()  # a built-in, unmodified: one pass (builtin_render.py)
        fast = render_builtin(name, messages, tokens.get("bos_token"), tokens.get("eos_token"))
        if fast is not None:
            return fast
    return render_conversation_by_prefixes(tokenizer, messages)


def render_conversation_by_prefixes(
    tokenizer: _TemplateTokenizer, messages: Sequence[Message]
) -> tuple[str, list[tuple[int, int]]]:
    """`render_conversation` through the template itself: each assistant span from prefix renders."""
    name = getattr(tokenizer, "chat_template_name", "chat template")
    full = tokenizer.apply_chat_template(messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        # The last turn of a conversation that ends with a reply is the full text (rendered once).
        with_turn = full if i + 1 == len(messages) else tokenizer.apply_chat_template(messages[: i + 1])
        _check_prefix(prompt, with_turn, name, f"the first {i} messages with the generation prompt", f"the first {i + 1}")
        _check_prefix(with_turn, full, name, f"the first {i + 1} messages", f"all {len(messages)}")
        turn = with_turn[len(prompt):]
        spans.append((len(prompt), len(prompt) + len(turn.rstrip())))
    return full, spans


def _check_prefix(prefix: str, text: str, name: str, what: str, of_what: str) -> None:
    if not text.startswith(prefix):
        raise JaxalignError(
            f"chat template {name!r} is not prefix-stable: rendering {what} is not a prefix of rendering "
            f"{of_what}, so assistant turns cannot be located for the loss mask. Use a template that renders "
            f"earlier turns the same way whatever follows (e.g. chat_template: {sorted(BUILTIN_TEMPLATES)})"
        )
