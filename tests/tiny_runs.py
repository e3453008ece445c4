"""The tiny training runs the loop, reliability, multi-host and gs:// tests are built from: a 2-layer
Llama with the real Llama 2 tokenizer, SFT on HH-RLHF chosen replies, and a reader of its metrics."""

import gzip
import json
import pathlib
from collections.abc import Callable

TINY_LLAMA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": True}


def hh_sft_config(shared_data: pathlib.Path, output_dir: pathlib.Path, cache_dir: pathlib.Path, *,
                  data: dict, mesh: dict | None = None, **sections: dict) -> dict:
    """A plain-dict SFT config on shared_data's HH-RLHF file; `data` adds to the data section (rows,
    lengths, eval split), `sections` (train, eval, optimizer, checkpoint, ...) are taken as given."""
    return {
        "stage": "sft",
        "output_dir": str(output_dir),
        "model": {"config": dict(TINY_LLAMA)},
        "tokenizer": {"path": str(shared_data / "llama2-tokenizer.model"), "chat_template": "plain"},
        "mesh": mesh or {"data": 1, "fsdp": -1, "tensor": 1},
        "data": {"train": str(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz"), "format": "preference",
                 "sft_from_preference": True, "pad_to_multiple_of": 64, "on_bad_row": "skip",
                 "cache_dir": str(cache_dir), **data},
        **sections,
    }


def read_metrics(run: pathlib.Path) -> tuple[dict[int, dict], list[dict]]:
    """(train records by step, eval records in order) of RUN/metrics.jsonl; a step logged twice fails."""
    train, evals = {}, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if any(k.startswith("eval/") for k in record):
            evals.append(record)
        else:
            assert record["step"] not in train, f"step {record['step']} logged twice"
            train[record["step"]] = record
    return train, evals


def train_until(trainer, step: int) -> dict:
    """`trainer.train()` with a real SIGTERM sent to this process as step `step` finishes: the loop stops
    there as a preempted run does (checkpoint written, status "preempted"); its summary."""
    import os
    import signal

    compiled = trainer.compiled_step

    def compiled_step(batch):
        fn = compiled(batch)

        def run(state, *args):
            out = fn(state, *args)
            if int(out[0].step) == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        return run

    trainer.compiled_step = compiled_step
    return trainer.train()


def short_hh_pairs(shared_data: pathlib.Path, out: pathlib.Path, n: int,
                   keep: Callable[[dict], bool] = lambda row: row["chosen"] != row["rejected"],
                   extra: Callable[[int], dict] = lambda k: {}) -> pathlib.Path:
    """The first `n` HH-RLHF pairs under 300 characters a side that `keep` accepts, each with `extra(k)`'s
    columns (k: its index), written to `out` as JSON Lines (the side-by-side tests against TRL train on them)."""
    rows = []
    with gzip.open(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            if max(len(row["chosen"]), len(row["rejected"])) < 300 and keep(row):
                rows.append({**row, **extra(len(rows))})
            if len(rows) == n:
                break
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def stand_in_tokenizer():
    """TRL's trainers read only the pad, BOS and EOS tokens of their processing class when the rows come
    tokenized: a three-token stand-in."""
    import tokenizers
    import transformers

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<unk>")
