"""One tokenizer interface over two backends: HF tokenizer dirs and bare SentencePiece models.

`load_tokenizer(path)` picks the backend:
- a dir with `tokenizer.json`, or other HF tokenizer files -> transformers.AutoTokenizer (local only);
- a `.model` file, or a dir with `tokenizer.model` but no `tokenizer.json` -> sentencepiece itself.

Bare SentencePiece models are run by `sentencepiece`, not converted by transformers: the
automatic conversion in transformers 5 orders BPE merges by vocab id instead of SentencePiece's
scores and skips the dummy prefix for text that starts with a space, so it disagrees with
SentencePiece on strings like " Hello" or "a  b". Text is split on special-token strings
("<s>", "</s>", ...) first, those become their ids, and each piece in between is encoded by
sentencepiece with its dummy prefix, which is what HF Llama tokenizers do (legacy mode).

`save_pretrained` on a SentencePiece tokenizer writes a `tokenizer.json` built to reproduce
sentencepiece exactly (merges ranked by piece score, a Prepend("▁") normalizer), checked on
probe strings before it is written, so `AutoTokenizer.from_pretrained(out_dir)` gives the
same ids.

pad_id: the tokenizer's pad token if it has one, else its unk token, else 0. Padding is always
masked out of attention and loss, so the choice only has to be a valid id.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import shutil
from typing import Any, Sequence

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
    path = os.fspath(path)
    expected = "an HF tokenizer directory (tokenizer.json / tokenizer_config.json) or a SentencePiece .model file"
    if not paths.exists(path):
        raise JaxalignError(f"tokenizer path {path!r} does not exist; expected {expected}")
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
    mask = []
    for start, end in offsets:
        if start == end:
            mask.append(any(a <= start < b for a, b in spans))
        else:
            mask.append(any(start < b and a < end for a, b in spans))
    return mask


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


# ----------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A bare SentencePiece model, run by the sentencepiece library (ids equal its own)."""

    backend = "sentencepiece"

    def __init__(self, model_file: str, config_dir: str | None = None):
        import sentencepiece as spm

        self.model_file = model_file
        self.config_dir = config_dir
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as e:
            raise JaxalignError(f"cannot load SentencePiece model {model_file!r}: {e}") from e
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        if sp.eos_id() < 0:
            raise JaxalignError(f"SentencePiece model {model_file!r} has no eos piece; jaxalign needs one")
        self.eos_id = sp.eos_id()
        unk = sp.unk_id()
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else (unk if unk >= 0 else 0)
        self.bos_token = sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = sp.id_to_piece(self.eos_id)
        self.unk_token = sp.id_to_piece(unk) if unk >= 0 else None
        # Strings parsed atomically from text: control pieces (<s>, </s>), unk, user-defined pieces.
        user_defined = _user_defined_ids(sp)
        self.special_ids = {
            sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if sp.is_control(i) or sp.is_unknown(i) or i in user_defined
        }
        self.special_ids.pop("", None)
        # Longest first so "<s>" never matches inside a longer special string.
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self._check_config_dir()

    # --- encoding
    def _segments(self, text: str) -> list[tuple[int, int, int | None]]:
        """Split text into (start, end, special_id or None) pieces."""
        if self._special_re is None:
            return [(0, len(text), None)] if text else []
        out, pos = [], 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append((pos, m.start(), None))
            out.append((m.start(), m.end(), self.special_ids[m.group()]))
            pos = m.end()
        if pos < len(text):
            out.append((pos, len(text), None))
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.bos_id] if add_special_tokens and self.bos_id is not None else []
        for start, end, special in self._segments(text):
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self.sp.encode(text[start:end]))
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        ids: list[int] = []
        offsets: Offsets = []
        for start, end, special in self._segments(text):
            if special is not None:
                ids.append(special)
                offsets.append((start, end))
                continue
            seg_ids, seg_offsets = self._encode_segment_with_offsets(text[start:end])
            ids.extend(seg_ids)
            offsets.extend((start + s, start + e) for s, e in seg_offsets)
        return ids, offsets

    def _encode_segment_with_offsets(self, segment: str) -> tuple[list[int], Offsets]:
        proto = self.sp.encode_as_proto(segment)
        # sentencepiece reports UTF-8 byte offsets; map them to character offsets.
        byte_starts = _char_byte_starts(segment)
        to_char = lambda b: bisect.bisect_right(byte_starts, b) - 1 if b < byte_starts[-1] else len(segment)  # noqa: E731
        ids = [p.id for p in proto.pieces]
        offsets = [(to_char(p.begin), to_char(p.end)) for p in proto.pieces]
        # Byte-fallback pieces of one multi-byte character: all but the last come back empty.
        # Give them the character's range so they are masked together with it.
        for k in range(len(ids) - 2, -1, -1):
            s, e = offsets[k]
            if s == e and self.sp.is_byte(ids[k]) and self.sp.is_byte(ids[k + 1]) and offsets[k + 1][0] == s:
                offsets[k] = offsets[k + 1]
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # sentencepiece drops control ids when decoding, so decode runs of ordinary ids and
        # write special pieces out (or skip them) in between.
        special = set(self.special_ids.values())
        parts: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in special:
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.unk_token else i

    # --- chat template / files
    def own_chat_template(self) -> str | None:
        """A template shipped next to tokenizer.model (chat_template.jinja or tokenizer_config.json)."""
        if self.config_dir is None:
            return None
        jinja_file = os.path.join(self.config_dir, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                return f.read()
        template = self._tokenizer_config().get("chat_template")
        if isinstance(template, list):  # HF's list of named templates
            template = {t["name"]: t["template"] for t in template}.get("default")
        return template or None

    def _tokenizer_config(self) -> dict[str, Any]:
        cfg = os.path.join(self.config_dir or "", "tokenizer_config.json")
        if self.config_dir is None or not os.path.isfile(cfg):
            return {}
        with open(cfg, encoding="utf-8") as f:
            return json.load(f)

    def _check_config_dir(self) -> None:
        """Refuse a tokenizer_config.json that adds tokens the .model does not have: ids would be wrong."""
        added = self._tokenizer_config().get("added_tokens_decoder", {})
        extra = {int(i): t.get("content") for i, t in added.items() if int(i) >= self.vocab_size}
        if extra:
            raise JaxalignError(
                f"{self.config_dir}/tokenizer_config.json adds tokens {extra} beyond the {self.vocab_size} pieces of "
                f"tokenizer.model, and there is no tokenizer.json; provide the tokenizer.json that defines them"
            )

    def template_variables(self) -> dict[str, Any]:
        return {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token, "pad_token": None}

    def save_pretrained(self, out_dir: str) -> None:
        from transformers import PreTrainedTokenizerFast

        backend = _sentencepiece_to_tokenizers(self)
        hf = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token=self.bos_token, eos_token=self.eos_token, unk_token=self.unk_token
        )
        hf.chat_template = self.chat_template or None
        os.makedirs(out_dir, exist_ok=True)
        hf.save_pretrained(out_dir)
        shutil.copyfile(self.model_file, os.path.join(out_dir, "tokenizer.model"))
        _set_tokenizer_class(out_dir, "PreTrainedTokenizerFast")


def _user_defined_ids(sp: Any) -> set[int]:
    """Ids of USER_DEFINED pieces (matched verbatim in text); the processor has no accessor for them."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return {i for i, piece in enumerate(proto.pieces) if piece.type == user_defined}


def _char_byte_starts(text: str) -> list[int]:
    """UTF-8 byte offset of each character, plus the total length as a sentinel."""
    starts, pos = [], 0
    for ch in text:
        starts.append(pos)
        pos += len(ch.encode("utf-8"))
    starts.append(pos)
    return starts


# Strings on which an exported tokenizer.json must reproduce sentencepiece before it is written.
_EXPORT_PROBES = (
    "Hello world",
    " Hello",
    "  two  spaces   here",
    "\n\nHuman: hi\n\nAssistant: hello",
    "héllo 日本語 🤖 ok",
    "def f(x):\n        return x  \t\n",
    "    ",
)


def _sentencepiece_to_tokenizers(tok: SentencePieceTokenizer):
    """Build a `tokenizers.Tokenizer` that gives sentencepiece's ids (BPE models only)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFBackend

    sp = tok.sp
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise JaxalignError(f"{tok.model_file}: only BPE SentencePiece models can be exported to tokenizer.json")
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        raise JaxalignError(
            f"{tok.model_file}: SentencePiece normalization {norm.name!r} (remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}) cannot be reproduced exactly in tokenizer.json"
        )
    vocab = {sp.id_to_piece(i): i for i in range(tok.vocab_size)}
    special = set(tok.special_ids.values())
    mergeable = {
        sp.id_to_piece(i): sp.get_score(i)
        for i in range(tok.vocab_size)
        if i not in special and not sp.is_byte(i) and not sp.is_unused(i)
    }
    # sentencepiece BPE merges the adjacent pair whose result has the highest score; rank
    # merges the same way (ties by id), not by vocab order as transformers' conversion does.
    merges = sorted(
        (
            (-score, vocab[piece], k, piece[:k], piece[k:])
            for piece, score in mergeable.items()
            for k in range(1, len(piece))
            if piece[:k] in mergeable and piece[k:] in mergeable
        )
    )
    model = models.BPE(
        vocab=vocab,
        merges=[(m[3], m[4]) for m in merges],
        unk_token=tok.unk_token,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )
    backend = HFBackend(model)
    # Prepend (unlike Metaspace) adds the dummy prefix even when a segment starts with a space.
    steps = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])
    )
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.special_ids])
    if tok.bos_id is not None:
        bos = (tok.bos_token, tok.bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]
        )
    for text in _EXPORT_PROBES:
        got = backend.encode(text, add_special_tokens=False).ids
        if got != tok.encode(text):
            raise JaxalignError(f"{tok.model_file}: exported tokenizer.json disagrees with sentencepiece on {text!r}")
    return backend


def _set_tokenizer_class(out_dir: str, cls: str) -> None:
    # "PreTrainedTokenizerFast" loads our tokenizer.json as is in transformers 4 and 5; a
    # model-specific class (LlamaTokenizer) would rebuild the pre-tokenizer and change ids.
    cfg_file = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = cls
    with open(cfg_file, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------- HF


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
