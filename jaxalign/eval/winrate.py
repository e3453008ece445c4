"""Win-rate statistics of pairwise verdicts, as pure functions: the rate with a 95% interval, the
length-controlled rate (AlpacaEval 2's idea), and the KL estimate of a model from the SFT model.

A verdict is 1 (the model's reply wins), 0 (tie, counts half) or -1 (the baseline's wins).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959964


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a rate `p` measured on `n` trials (ties counted as half-wins)."""
    if n <= 0:
        return 0.0, 1.0
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def win_rate(verdicts: Sequence[int]) -> dict[str, float | int]:
    """Win-rate (ties half), its 95% interval, and the counts."""
    n = len(verdicts)
    wins, losses = sum(v == 1 for v in verdicts), sum(v == -1 for v in verdicts)
    rate = (wins + 0.5 * (n - wins - losses)) / n if n else math.nan
    low, high = wilson_interval(rate, n) if n else (math.nan, math.nan)
    return {"win_rate": rate, "ci_low": low, "ci_high": high, "wins": wins, "losses": losses,
            "ties": n - wins - losses, "judged": n}


def length_controlled_win_rate(verdicts: Sequence[int], model_lengths: Sequence[float],
                               baseline_lengths: Sequence[float], l2: float = 1e-3) -> float:
    """The win-rate the judge would give at equal lengths.

    Fits P(win) = sigmoid(theta + phi * tanh(d / std(d))) with d = the model's length minus the
    baseline's (AlpacaEval 2's length term; ties are half-wins), by Newton's method with a small ridge
    (a two-parameter fit: no solver library needed), and returns sigmoid(theta): the rate at d = 0.
    """
    y = (np.asarray(verdicts, np.float64) + 1) / 2
    d = np.asarray(model_lengths, np.float64) - np.asarray(baseline_lengths, np.float64)
    if y.size == 0:
        return math.nan
    scale = d.std()
    x = np.stack([np.ones_like(d), np.tanh(d / scale) if scale > 0 else np.zeros_like(d)], axis=1)
    w = np.zeros(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-x @ w))
        grad = x.T @ (y - p) - l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0])))


def kl_per_token(model_logps: Sequence[float], sft_logps: Sequence[float], tokens: Sequence[int]) -> float:
    """KL(model || SFT) per token, estimated on the model's own samples: the mean over sampled tokens of
    log p_model - log p_SFT (the summed log-probs of each sample, divided by all sampled tokens)."""
    total = sum(tokens)
    return float((np.sum(model_logps) - np.sum(sft_logps)) / total) if total else math.nan
