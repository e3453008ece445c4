"""Train a small SentencePiece BPE tokenizer that jaxalign can load and export exactly.

Settings: BPE, byte fallback (any text encodes), `<unk>` 0, `<s>` 1, `</s>` 2, no pad piece
(jaxalign pads with unk, always masked), identity normalization with whitespace kept as is
(so `Tokenizer.save_pretrained` can reproduce it in tokenizer.json), digits split into single
pieces (`split_digits`), every character of the corpus kept (`character_coverage` 1.0).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

from jaxalign.data.sources import iter_jsonl
from jaxalign.errors import JaxalignError
from jaxalign.runtime.paths import as_path

DEFAULTS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": True,
    "split_digits": True,
    "character_coverage": 1.0,
    "max_sentence_length": 1 << 16,
    "num_threads": 2,
    "minloglevel": 2,
}


def model_file_path(out: str) -> str:
    """`out` itself when it ends in .model, else `out/tokenizer.model`."""
    return out if out.endswith(".model") else os.path.join(out, "tokenizer.model")


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_path: str, **kw) -> str:
    """Train on `texts` and write the model to `model_file_path(out_path)`; returns that path.

    `kw` overrides any SentencePiece trainer option (see DEFAULTS). The vocab includes 256 byte
    pieces and 3 specials, so vocab_size must exceed 259 plus the corpus's distinct characters.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise JaxalignError("train_sentencepiece: no text to train on")
    options = DEFAULTS | kw
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                       vocab_size=vocab_size, **options)
    except RuntimeError as e:
        raise JaxalignError(f"SentencePiece training failed (vocab_size={vocab_size}): {e}") from e
    path = model_file_path(out_path)
    as_path(path).parent.mkdir(parents=True, exist_ok=True)
    as_path(path).write_bytes(model.getvalue())
    return path


def texts_from_jsonl(paths: Sequence[str], fields: Sequence[str]) -> list[str]:
    """The string values of `fields` in every row of the JSONL files (missing fields skipped)."""
    return [row[k] for path in paths for _, row in iter_jsonl(path) for k in fields
            if isinstance(row.get(k), str) and row[k]]
