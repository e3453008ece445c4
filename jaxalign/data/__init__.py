"""Data: files -> rows -> normalized examples -> token ids + loss masks (batching lives beside it).

    ds = load_rows(cfg.data.train, cfg.data.split, cfg.data.max_rows)
    train, held_out = split_train_eval(ds, cfg.data.eval_fraction, cfg.train.seed)
    examples, stats = tokenize_dataset(train, tok, cfg.data, cfg.stage, loss_on=cfg.sft.loss_on,
                                       cache_dir=resolve_cache_dir(cfg))
"""

import importlib

# Where each name lives; imported on first use, so a tokenizing worker process that needs only
# `jaxalign.data.row_rules` does not import `datasets` (and JAX through the config) for it.
_HOME = {
    "TokenizeSettings": "examples", "tokenize_preference_example": "examples", "tokenize_sft_example": "examples",
    "FORMATS": "formats", "BadRow": "formats", "Conversation": "formats", "PromptCompletion": "formats",
    "Text": "formats", "detect_format": "formats", "normalize_sft_row": "formats", "resolve_format": "formats",
    "Preference": "preference", "normalize_preference_row": "preference", "preference_to_sft": "preference",
    "split_hh": "preference", "load_rows": "sources", "split_train_eval": "sources", "DataStats": "row_rules",
    "resolve_cache_dir": "tokenize", "tokenize_dataset": "tokenize", "tokenizer_fingerprint": "tokenize",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'jaxalign.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jaxalign.data.{_HOME[name]}"), name)
