"""Padded batches: unpacked SFT rows and DPO pairs, at bucketed lengths.

DPO layout: B pairs give 2B rows, chosen first: row i is prompt + chosen of pair i and row B + i
is prompt + rejected of the same pair, each trained (loss_mask) on its completion targets only.
The length is the longest row rounded up to a multiple of `data.pad_to_multiple_of` (capped at
data.max_length), so only max_length / multiple distinct shapes ever compile.

Pairs are not packed: a packed row would need a segment -> pair map for the loss, and DPO rows
(prompt + long answer) leave little room to gain. Rows that pad a short final batch
(`num_pairs` > len(pairs)) have an all-zero loss_mask; real DPO rows never do.
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


def pair_margins(pairs: Sequence[Mapping], num_pairs: int | None = None) -> np.ndarray | None:
    """[2 * num_pairs] each pair's `margin` on both its rows (the reward model's loss), or None without one."""
    if not pairs or "margin" not in pairs[0]:
        return None
    num_pairs = len(pairs) if num_pairs is None else num_pairs
    out = np.zeros(2 * num_pairs, np.float32)
    out[:len(pairs)] = out[num_pairs:num_pairs + len(pairs)] = [p["margin"] for p in pairs]
    return out


def dpo_batch(pairs: Sequence[Mapping], length: int, pad_id: int = 0,
              num_pairs: int | None = None) -> dict[str, np.ndarray]:
    """[2 * num_pairs, length] batch arrays: rows i and num_pairs + i are pair i's chosen and rejected."""
    batch = pack_rows(dpo_rows(pairs, num_pairs), length, pad_id)
    ref = dpo_ref_logps(pairs, num_pairs)
    return batch if ref is None else {**batch, "ref_logps": ref}


def sft_rows(examples: Sequence[Mapping], num_rows: int | None = None) -> list[list[Mapping]]:
    """Unpacked SFT: one example per row ([] for padding rows)."""
    num_rows = len(examples) if num_rows is None else num_rows
    return [[ex] for ex in examples] + [[] for _ in range(num_rows - len(examples))]


def sft_batch(examples: Sequence[Mapping], length: int, pad_id: int = 0,
              num_rows: int | None = None) -> dict[str, np.ndarray]:
    """[num_rows, length] unpacked SFT batch: example i alone in row i, padded."""
    return pack_rows(sft_rows(examples, num_rows), length, pad_id)
