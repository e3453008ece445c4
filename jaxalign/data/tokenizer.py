"""One tokenizer interface over two backends: HF tokenizer dirs and bare SentencePiece models.

`load_tokenizer(path)` picks the backend:
- a dir with `tokenizer.json`, or other HF tokenizer files -> transformers.AutoTokenizer (local only,
  `jaxalign.data.hf_tokenizer`);
- a `.model` file, or a dir with `tokenizer.model` but no `tokenizer.json` -> sentencepiece itself
  (`jaxalign.data.sentencepiece_tokenizer`, whose doc says why it is not converted by transformers).

This module holds the interface, the loader and `char_spans_to_token_mask`, which callers need
whatever the backend; each backend is a subclass in its own module.

pad_id: the tokenizer's pad token if it has one, else its unk token, else 0. Padding is always
masked out of attention and loss, so the choice only has to be a valid id.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from jaxalign.data import chat_templates
from jaxalign.errors import JaxalignError
from jaxalign.runtime import paths

logger = logging.getLogger(__name__)

Offsets = list[tuple[int, int]]

_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt")
# Left out of a tokenizer download: a model dir at a URL is also its tokenizer dir.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".onnx")


# ----------------------------------------------------------------------------- loading


def load_tokenizer(path: str, chat_template: str = "", trust_remote_code: bool = False) -> Tokenizer:
    """Load a tokenizer from an HF tokenizer dir or a SentencePiece model; see the module doc.

    chat_template: "" (the tokenizer's own, else `plain`), a built-in name
    (`jaxalign.data.chat_templates.BUILTIN_TEMPLATES`), or a path to a `.jinja` file.
    """
    # Imported here, not at the top: the backend modules import this one for the interface.
    from jaxalign.data.hf_tokenizer import HFTokenizer
    from jaxalign.data.sentencepiece_tokenizer import SentencePieceTokenizer

    path = os.fspath(path)
    expected = "an HF tokenizer directory (tokenizer.json / tokenizer_config.json) or a SentencePiece .model file"
    if not paths.exists(path):
        raise JaxalignError(f"tokenizer path {path!r} does not exist{paths.offline_hint(path)}; expected {expected}")
    if paths.isfile(path) and not path.endswith(".model"):
        raise JaxalignError(f"tokenizer path {path!r} is a file but not a SentencePiece .model; expected {expected}")
    # sentencepiece and transformers read local files only: a URL is downloaded, without model weights
    local = str(paths.local_copy(path, keep=_not_weights)) if paths.is_remote(path) else path
    if os.path.isfile(local):
        tok: Tokenizer = SentencePieceTokenizer(local)
    elif _is_sentencepiece_dir(local):
        tok = SentencePieceTokenizer(os.path.join(local, "tokenizer.model"), config_dir=local)
    elif any(os.path.exists(os.path.join(local, f)) for f in _HF_FILES):
        tok = HFTokenizer(local, trust_remote_code=trust_remote_code)
    else:
        raise JaxalignError(f"tokenizer directory {path!r} has no tokenizer files; expected {expected}")
    tok.set_chat_template(chat_template)
    return tok


def _not_weights(name: str) -> bool:
    return not name.endswith(_WEIGHT_SUFFIXES)


def _is_sentencepiece_dir(path: str) -> bool:
    has = lambda f: os.path.exists(os.path.join(path, f))  # noqa: E731
    return has("tokenizer.model") and not has("tokenizer.json")


def char_spans_to_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Mark each token whose (start, end) character range overlaps one of `spans`.

    A zero-width token (a SentencePiece dummy prefix "▁" inserted before a segment) is marked
    when it sits at or inside a span: it is generated as part of the text that follows it.
    """
    o = np.asarray(offsets, np.int64).reshape(-1, 2)
    start, end = o[:, 0], o[:, 1]
    zero_width = start == end
    mask = np.zeros(len(o), bool)
    for a, b in spans:
        mask |= np.where(zero_width, (a <= start) & (start < b), (start < b) & (a < end))
    return mask.tolist()


# ----------------------------------------------------------------------------- interface


class Tokenizer:
    """Common interface; use `load_tokenizer` to get one.

    Attributes: vocab_size (number of ids the tokenizer can emit), bos_id (or None), eos_id,
    pad_id, bos_token, eos_token, chat_template (active Jinja source), chat_template_name.
    """

    backend: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    bos_token: str | None
    eos_token: str
    chat_template: str = ""
    chat_template_name: str = ""

    # --- per backend
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; special-token strings in `text` become their ids. add_special_tokens adds BOS (as HF does)."""
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """Ids (as `encode(text)`) and a (start_char, end_char) range into `text` per token."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def save_pretrained(self, out_dir: str) -> None:
        """Write files `transformers.AutoTokenizer.from_pretrained(out_dir)` loads, chat template included."""
        raise NotImplementedError

    def own_chat_template(self) -> str | None:
        """The template shipped with the tokenizer files, if any."""
        raise NotImplementedError

    def template_variables(self) -> dict[str, Any]:
        """Special-token strings passed to chat templates (bos_token, eos_token, ...)."""
        return {"bos_token": self.bos_token, "eos_token": self.eos_token}

    # --- shared
    def set_chat_template(self, spec: str = "") -> None:
        """Select the active chat template (see `chat_templates.resolve_chat_template`)."""
        self.chat_template, self.chat_template_name = chat_templates.resolve_chat_template(
            spec, self.own_chat_template(), self
        )

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """Render messages ({"role", "content"} dicts) with the active template, as text."""
        return chat_templates.render_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            name=self.chat_template_name,
            **self.template_variables(),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad_id={self.pad_id}, chat_template={self.chat_template_name!r})"
        )
