"""Data: files -> rows -> normalized examples -> token ids + loss masks (batching lives beside it).

    ds = load_rows(cfg.data.train, cfg.data.split, cfg.data.max_rows)
    train, held_out = split_train_eval(ds, cfg.data.eval_fraction, cfg.train.seed)
    examples, stats = tokenize_dataset(train, tok, cfg.data, cfg.stage, loss_on=cfg.sft.loss_on,
                                       cache_dir=resolve_cache_dir(cfg))
"""

from jaxalign.data.examples import TokenizeSettings, tokenize_preference_example, tokenize_sft_example
from jaxalign.data.formats import (
    FORMATS,
    BadRow,
    Conversation,
    PromptCompletion,
    Text,
    detect_format,
    normalize_sft_row,
    resolve_format,
)
from jaxalign.data.preference import Preference, normalize_preference_row, preference_to_sft, split_hh
from jaxalign.data.sources import load_rows, split_train_eval
from jaxalign.data.tokenize import DataStats, resolve_cache_dir, tokenize_dataset, tokenizer_fingerprint

__all__ = [
    "FORMATS", "BadRow", "Conversation", "PromptCompletion", "Text", "detect_format", "normalize_sft_row",
    "resolve_format", "Preference", "normalize_preference_row", "preference_to_sft", "split_hh", "load_rows",
    "split_train_eval", "DataStats", "TokenizeSettings", "resolve_cache_dir", "tokenize_dataset",
    "tokenize_preference_example", "tokenize_sft_example", "tokenizer_fingerprint",
]
