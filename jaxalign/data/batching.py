"""Padded batches: unpacked SFT rows and DPO pairs, at bucketed lengths; shared-prompt DPO rows.

Padded DPO layout (dpo.share_prompt: false, and the reward model): B pairs give 2B rows, chosen
first: row i is prompt + chosen of pair i and row B + i is prompt + rejected of the same pair, each
trained (loss_mask) on its completion targets only. The length is the longest row rounded up to a
multiple of `data.pad_to_multiple_of` (capped at data.max_length), so only max_length / multiple
distinct shapes ever compile (times the few `loss_index` widths below). Rows that pad a short final
batch (`num_pairs` > len(pairs)) have an all-zero loss_mask; real DPO rows never do.

Shared-prompt layout (dpo.share_prompt): a pair is one run of P + C + R + 1 tokens in a row,

    tokens      p0 .. p(P-2) | p(P-1) c0 .. c(C-1) | p(P-1) r0 .. r(R-1)
    branch_ids  0  ..  0     | 1      1  ..  1     | 2      2  ..  2
    positions   0  ..  P-2   | P-1    P  ..  P+C-1 | P-1    P  ..  P+R-1

the prompt's last token opening each reply's branch, so every reply token (its first included) is
predicted inside its own branch, and attention (models/attention.py) lets a branch see the shared
prompt and itself, never the other reply: each reply's log-probs are those of prompt + reply alone.
Several pairs may share a row (data.packing), each its own segment. A row has `slots` pair slots:
`pair_index` [rows, slots] names the batch's pair in each (-1: empty), in segment order, and per-pair
arrays (`ref_logps`) are [rows, slots, 2] (chosen, rejected), KTO's `label` [rows, slots], so every array is
split by rows.

Either pair layout also carries `loss_index` [rows, width]: each row's loss positions in order, then
padding; `width` is `pad_to_multiple_of` times 1, 2, 3, 4, 6, 8, 12, ..., the least that fits the batch's
fullest row, capped at the row length (every process's the same: all of them see every pair's lengths).
The log-probs are computed at those positions only: on HH-RLHF pairs about 40% of a row's positions, and
the LM head is the largest matmul of a small model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from jaxalign.data.packing import pack_rows
from jaxalign.errors import JaxalignError


def round_up(n: int, multiple: int) -> int:
    return -(-n // max(multiple, 1)) * max(multiple, 1)


def bucket_length(n: int, multiple: int, max_length: int) -> int:
    """`n` rounded up to a multiple of `multiple`, but no more than max_length (unless n is)."""
    return max(min(round_up(n, multiple), max_length), n)


def loss_width(counts: Sequence[int], multiple: int, length: int) -> int:
    """The `loss_index` width of a batch whose rows have `counts` loss positions: `multiple` times 1, 2, 3, 4, 6,
    8, 12, ... (two sizes an octave, so a row length meets a few widths and the step compiles a few shapes per
    length, not one per multiple), capped at the row length."""
    blocks = -(-max(counts, default=0) // max(multiple, 1))
    k = max(blocks - 1, 0).bit_length()  # 2**k >= blocks
    size = 3 << (k - 2) if k >= 2 and 3 << (k - 2) >= blocks else 1 << k
    return max(1, min(max(multiple, 1) * size, length))


def with_loss_index(batch: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """`batch` with `loss_index` [rows, width]: each row's loss positions, ascending, then zeros."""
    mask = batch["loss_mask"].astype(bool)
    counts = mask.sum(axis=1)
    if counts.max(initial=0) > width:  # the width comes from every pair's lengths: a mismatch is a bug
        raise JaxalignError(f"a row has {int(counts.max())} loss positions, more than its batch's {width}")
    index = np.zeros((mask.shape[0], width), np.int32)
    for r in range(mask.shape[0]):
        index[r, :counts[r]] = np.flatnonzero(mask[r])
    return batch | {"loss_index": index}


def check_pair(pair: Mapping, where: str = "pair") -> None:
    """Raise unless the pair has a prompt and two non-empty completions (no NaN rewards later)."""
    if len(pair["prompt_ids"]) == 0:
        raise JaxalignError(f"{where}: empty prompt; the first completion token needs a token to be predicted from")
    for side in ("chosen_ids", "rejected_ids"):
        if len(pair[side]) == 0:
            raise JaxalignError(f"{where}: empty {side.removesuffix('_ids')} completion (its summed log-prob "
                                "would be 0 and its mean NaN); drop the row or lower data.max_prompt_length")


def pair_lengths(pair: Mapping) -> tuple[int, int]:
    """Tokens of (prompt + chosen, prompt + rejected)."""
    p = len(pair["prompt_ids"])
    return p + len(pair["chosen_ids"]), p + len(pair["rejected_ids"])


def completion_sequence(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """prompt + completion as one sequence, trained on the completion tokens only."""
    ids = np.concatenate([np.asarray(prompt_ids, np.int32), np.asarray(completion_ids, np.int32)])
    mask = np.arange(len(ids)) >= len(prompt_ids)
    return {"input_ids": ids, "loss_mask": mask}


def dpo_rows(pairs: Sequence[Mapping], num_pairs: int | None = None) -> list[list[dict]]:
    """The 2 * num_pairs rows of a DPO batch (one sequence each; [] for padding), chosen first."""
    num_pairs = len(pairs) if num_pairs is None else num_pairs
    for pair in pairs:
        check_pair(pair)
    empty: list[list[dict]] = [[] for _ in range(num_pairs - len(pairs))]
    chosen = [[completion_sequence(p["prompt_ids"], p["chosen_ids"])] for p in pairs]
    rejected = [[completion_sequence(p["prompt_ids"], p["rejected_ids"])] for p in pairs]
    return chosen + empty + rejected + empty


def dpo_ref_logps(pairs: Sequence[Mapping], num_pairs: int | None = None) -> np.ndarray | None:
    """[2 * num_pairs] precomputed reference log-probs (chosen rows first), or None when the pairs
    carry none (`dpo.reference: model`)."""
    if not pairs or "ref_chosen_logp" not in pairs[0]:
        return None
    num_pairs = len(pairs) if num_pairs is None else num_pairs
    out = np.zeros(2 * num_pairs, np.float32)
    out[:len(pairs)] = [p["ref_chosen_logp"] for p in pairs]
    out[num_pairs:num_pairs + len(pairs)] = [p["ref_rejected_logp"] for p in pairs]
    return out


def pair_scalars(pairs: Sequence[Mapping], key: str, num_pairs: int | None = None) -> np.ndarray | None:
    """[2 * num_pairs] each pair's `key` on both its rows (the reward model's `margin`, KTO's `label`), or None
    without one."""
    if not pairs or key not in pairs[0]:
        return None
    num_pairs = len(pairs) if num_pairs is None else num_pairs
    out = np.zeros(2 * num_pairs, np.float32)
    out[:len(pairs)] = out[num_pairs:num_pairs + len(pairs)] = [p[key] for p in pairs]
    return out


def dpo_batch(pairs: Sequence[Mapping], length: int, pad_id: int = 0,
              num_pairs: int | None = None) -> dict[str, np.ndarray]:
    """[2 * num_pairs, length] batch arrays: rows i and num_pairs + i are pair i's chosen and rejected."""
    batch = pack_rows(dpo_rows(pairs, num_pairs), length, pad_id)
    ref = dpo_ref_logps(pairs, num_pairs)
    return batch if ref is None else {**batch, "ref_logps": ref}


def shared_length(prompt: int, chosen: int, rejected: int):
    """Tokens of a pair in the shared-prompt layout (ints or arrays)."""
    return prompt + chosen + rejected + 1


def shared_batch(rows: Sequence[Sequence[tuple[int, Mapping]]], length: int, slots: int, pad_id: int = 0,
                 num_rows: int | None = None, with_ref: bool | None = None,
                 with_label: bool | None = None) -> dict[str, np.ndarray]:
    """[num_rows, length] shared-prompt batch: rows[r] lists (index in the batch, pair) laid end to end
    in row r (see the module doc); `ref_logps` [num_rows, slots, 2] when the pairs carry them (`with_ref`:
    whether the whole batch's do, for a process whose rows may all be empty), and KTO's `label` [num_rows, slots]
    likewise (`with_label`)."""
    num_rows = len(rows) if num_rows is None else num_rows
    if len(rows) > num_rows:
        raise JaxalignError(f"{len(rows)} rows do not fit a batch of {num_rows}")
    shape = (num_rows, length)
    batch = {"tokens": np.full(shape, pad_id, np.int32), "targets": np.full(shape, pad_id, np.int32),
             "loss_mask": np.zeros(shape, bool), "positions": np.zeros(shape, np.int32),
             "segment_ids": np.zeros(shape, np.int32), "branch_ids": np.zeros(shape, np.int32),
             "pair_index": np.full((num_rows, slots), -1, np.int32)}
    if with_ref is None:
        with_ref = any("ref_chosen_logp" in pair for row in rows for _, pair in row)
    ref = np.zeros((num_rows, slots, 2), np.float32)
    if with_label is None:
        with_label = any("label" in pair for row in rows for _, pair in row)
    label = np.zeros((num_rows, slots), np.float32)
    for r, row in enumerate(rows):
        if len(row) > slots:
            raise JaxalignError(f"row {r}: {len(row)} pairs exceed its {slots} pair slots")
        at = 0
        for s, (index, pair) in enumerate(row):
            check_pair(pair, f"pair {index}")
            prompt = np.asarray(pair["prompt_ids"], np.int32)
            p, start = len(prompt), at
            end = at + shared_length(p, len(pair["chosen_ids"]), len(pair["rejected_ids"]))
            if end > length:
                raise JaxalignError(f"row {r}: pairs of {end} tokens exceed the row length {length}")
            batch["tokens"][r, at:at + p - 1] = prompt[:-1]
            batch["targets"][r, at:at + p - 1] = prompt[1:]  # not trained; ORPO's NLL counts the prompt
            batch["positions"][r, at:at + p - 1] = np.arange(p - 1)
            at += p - 1
            for branch, side in ((1, "chosen_ids"), (2, "rejected_ids")):
                reply = np.asarray(pair[side], np.int32)
                n = len(reply) + 1
                batch["tokens"][r, at:at + n] = np.concatenate([prompt[-1:], reply])
                batch["targets"][r, at:at + n - 1] = reply
                batch["loss_mask"][r, at:at + n - 1] = True
                batch["positions"][r, at:at + n] = np.arange(p - 1, p - 1 + n)
                batch["branch_ids"][r, at:at + n] = branch
                at += n
            batch["segment_ids"][r, start:end] = s + 1
            batch["pair_index"][r, s] = index
            if with_ref:
                ref[r, s] = pair["ref_chosen_logp"], pair["ref_rejected_logp"]
            if with_label:
                label[r, s] = pair["label"]
    return batch | ({"ref_logps": ref} if with_ref else {}) | ({"label": label} if with_label else {})


def by_pair(values: np.ndarray, pair_index: np.ndarray | None, num_pairs: int) -> np.ndarray:
    """[2N] per-sequence values (chosen first) of a batch -> [2, num_pairs] in the batch's pair order: the
    padded layout's rows are in it already; a shared-prompt batch's slots say which pair they hold."""
    halves = np.asarray(values).reshape(2, -1)
    if pair_index is None:
        return halves
    index = np.asarray(pair_index).reshape(-1)
    real = index >= 0
    return np.stack([np.bincount(index[real], h[real], num_pairs) for h in halves])


def sft_rows(examples: Sequence[Mapping], num_rows: int | None = None) -> list[list[Mapping]]:
    """Unpacked SFT: one example per row ([] for padding rows)."""
    num_rows = len(examples) if num_rows is None else num_rows
    return [[ex] for ex in examples] + [[] for _ in range(num_rows - len(examples))]


def sft_batch(examples: Sequence[Mapping], length: int, pad_id: int = 0,
              num_rows: int | None = None) -> dict[str, np.ndarray]:
    """[num_rows, length] unpacked SFT batch: example i alone in row i, padded."""
    return pack_rows(sft_rows(examples, num_rows), length, pad_id)
