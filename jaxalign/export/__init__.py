"""Leaving jaxalign: a model written as a Hugging Face dir (safetensors shards, config.json, tokenizer)."""
