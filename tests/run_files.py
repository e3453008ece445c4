"""Readers of a run dir's files, shared by the loop and reliability tests."""

import json
import pathlib


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
