"""The transformers backend of `jaxalign.data.tokenizer`: an HF tokenizer directory, local files only.

`load_tokenizer` picks it for a directory with `tokenizer.json` or other HF tokenizer files. A thin
wrapper: transformers already gives ids, offsets and chat templates; this maps them onto the
`Tokenizer` interface.
"""

from __future__ import annotations

from typing import Any, Sequence

from jaxalign.data.tokenizer import Offsets, Tokenizer
from jaxalign.errors import JaxalignError


class HFTokenizer(Tokenizer):
    """A transformers tokenizer loaded from a local directory."""

    backend = "transformers"

    def __init__(self, path: str, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.path = path
        try:
            self.hf = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise JaxalignError(f"cannot load HF tokenizer from {path!r}: {e}") from e
        hf = self.hf
        if hf.eos_token_id is None:
            raise JaxalignError(f"tokenizer at {path!r} has no eos_token; set eos_token in its tokenizer_config.json")
        self.vocab_size = len(hf)
        self.bos_id = hf.bos_token_id
        self.eos_id = hf.eos_token_id
        self.pad_id = next((i for i in (hf.pad_token_id, hf.unk_token_id) if i is not None), 0)
        self.bos_token = hf.bos_token
        self.eos_token = hf.eos_token

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        try:
            enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as e:
            raise JaxalignError(
                f"tokenizer at {self.path!r} ({type(self.hf).__name__}) cannot report character offsets, which "
                "loss masks need; use a fast tokenizer (a directory with tokenizer.json)"
            ) from e
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        i = self.hf.convert_tokens_to_ids(token)
        return None if i is None or (i == self.hf.unk_token_id and token != self.hf.unk_token) else i

    def own_chat_template(self) -> str | None:
        template = self.hf.chat_template
        if isinstance(template, dict):  # several named templates: use the default one
            template = template.get("default")
        return template or None

    def template_variables(self) -> dict[str, Any]:
        # transformers passes every special token string to the template; do the same.
        return {k: v for k, v in self.hf.special_tokens_map.items() if isinstance(v, str)} | {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }

    def save_pretrained(self, out_dir: str) -> None:
        own = self.hf.chat_template
        if self.chat_template != self.own_chat_template():
            self.hf.chat_template = self.chat_template
        try:
            self.hf.save_pretrained(out_dir)
        finally:
            self.hf.chat_template = own
