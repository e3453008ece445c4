"""The SentencePiece backend of `jaxalign.data.tokenizer`: a bare `.model` run by sentencepiece.

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
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import shutil
from typing import Any, Sequence

import numpy as np

from jaxalign.data.sentencepiece_words import WordCache
from jaxalign.data.tokenizer import Offsets, Tokenizer
from jaxalign.errors import JaxalignError


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
        proto = _model_proto(sp)  # parsed once: the piece types, the normalizer, the word cache's rule
        user_defined = _user_defined_ids(proto)
        self.special_ids = {
            sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if sp.is_control(i) or sp.is_unknown(i) or i in user_defined
        }
        self.special_ids.pop("", None)
        # Longest first so "<s>" never matches inside a longer special string.
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self._piece_chars, self._dummy_prefix = _piece_chars(self, proto)
        self._words = WordCache(sp) if WordCache.applies(proto, _keeps_text) else None
        self._check_config_dir()

    # A tokenizing worker reopens the model file (checked against these bytes) rather than being sent the
    # model: a spawned worker's start-up argument over a pipe's 64 KB makes each launch wait for the last.
    _REBUILT = ("sp", "_piece_chars", "_words", "_special_re", "special_ids")

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in vars(self).items() if k not in self._REBUILT}
        return state | {"_model_sha": hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        sha = state.pop("_model_sha")
        self.__init__(state["model_file"], state["config_dir"])
        if hashlib.sha256(self.sp.serialized_model_proto()).hexdigest() != sha:
            raise JaxalignError(f"SentencePiece model {self.model_file!r} changed on disk while it was in use")
        vars(self).update(state)

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
                ids.extend(self._encode_plain(text[start:end]))
        return ids

    def _encode_plain(self, segment: str) -> list[int]:
        """sentencepiece's ids of a segment holding no special string (word by word where that is exact)."""
        return self._words.encode(segment) if self._words is not None else self.sp.encode(segment)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        ids, offsets = self.encode_with_offset_array(text)
        return ids, [tuple(o) for o in offsets.tolist()]

    def encode_with_offset_array(self, text: str) -> tuple[list[int], np.ndarray]:
        """`encode_with_offsets` with the offsets as one int64 [n, 2] array (what masks are built from)."""
        ids: list[int] = []
        parts: list[np.ndarray] = []
        for start, end, special in self._segments(text):
            if special is not None:
                ids.append(special)
                parts.append(np.array([[start, end]], np.int64))
                continue
            seg_ids, seg_offsets = self._encode_segment_with_offsets(text[start:end])
            ids.extend(seg_ids)
            parts.append(seg_offsets + start)
        return ids, np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)

    def _encode_segment_with_offsets(self, segment: str) -> tuple[list[int], np.ndarray]:
        """(ids, int64 [n, 2] character offsets) of one segment without special tokens."""
        if self._piece_chars is not None and segment.isascii():
            # Identity normalization and one byte per character: each piece covers as many characters as
            # it has (a byte piece one), after the dummy prefix; twice as fast as reading the proto.
            ids = self._encode_plain(segment)
            chars = self._piece_chars[np.fromiter(ids, np.int64, len(ids))]  # a third faster than [list]
            ends = np.cumsum(chars)
            if (chars >= 0).all() and (not ids or ends[-1] == len(segment) + self._dummy_prefix):
                d = self._dummy_prefix
                offsets = np.stack([np.maximum(ends - chars - d, 0), np.maximum(ends - d, 0)], axis=1)
                return ids, offsets.reshape(-1, 2).astype(np.int64)
        proto = self.sp.encode_as_proto(segment)
        ids = [p.id for p in proto.pieces]
        # sentencepiece reports UTF-8 byte offsets; map them to character offsets.
        byte_starts = _char_byte_starts(segment)
        to_char = lambda b: bisect.bisect_right(byte_starts, b) - 1 if b < byte_starts[-1] else len(segment)  # noqa: E731
        offsets = [(to_char(p.begin), to_char(p.end)) for p in proto.pieces]
        # Byte-fallback pieces of one multi-byte character: all but the last come back empty.
        # Give them the character's range so they are masked together with it.
        for k in range(len(ids) - 2, -1, -1):
            s, e = offsets[k]
            if s == e and self.sp.is_byte(ids[k]) and self.sp.is_byte(ids[k + 1]) and offsets[k + 1][0] == s:
                offsets[k] = offsets[k + 1]
        return ids, np.asarray(offsets, np.int64).reshape(-1, 2)

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


def _model_proto(sp: Any):
    """The model's ModelProto: what the processor has no accessor for (piece types, normalizer spec)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def _keeps_text(norm: Any) -> bool:
    """The normalizer leaves text as it is (spaces become "▁", a dummy prefix may be added)."""
    return norm.name in ("identity", "") and not norm.remove_extra_whitespaces


def _user_defined_ids(proto: Any) -> set[int]:
    """Ids of USER_DEFINED pieces (matched verbatim in text), from the model's ModelProto."""
    from sentencepiece import sentencepiece_model_pb2

    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return {i for i, piece in enumerate(proto.pieces) if piece.type == user_defined}


def _piece_chars(tok: SentencePieceTokenizer, proto: Any) -> tuple[np.ndarray | None, int]:
    """(characters of text each piece stands for, 1 if a dummy prefix is added), when the model does not
    normalize text; (None, 0) otherwise, or when a piece (unk, control) stands for no fixed text."""
    norm = proto.normalizer_spec
    if not _keeps_text(norm):
        return None, 0
    sp = tok.sp
    chars = np.array([1 if sp.is_byte(i) else -1 if sp.is_unknown(i) or sp.is_control(i) else len(sp.id_to_piece(i))
                      for i in range(tok.vocab_size)], np.int64)
    return chars, int(norm.add_dummy_prefix)


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
    from tokenizers import AddedToken, Tokenizer as HFBackend, decoders, models, normalizers, processors

    sp = tok.sp
    proto = _model_proto(sp)
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise JaxalignError(f"{tok.model_file}: only BPE SentencePiece models can be exported to tokenizer.json")
    if not _keeps_text(norm):
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
